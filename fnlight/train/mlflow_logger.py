"""An MLflow logger: a run's hyperparameters, metrics and final checkpoint in an MLflow tracking store.

``pip install 'fnlight[mlflow]'`` (``mlflow-skinny`` and what its SQLite store needs). The MLflow run's
id is kept in ``mlflow_run.json`` in the run directory, so a resumed fit continues the same MLflow run,
and the metrics a killed run had logged after its checkpoint are not logged twice (a resumed run
replays them bitwise, so the values already in the store are the ones it would log).

Example:
    >>> from fnlight import Trainer
    >>> trainer = Trainer(run_dir="runs/a", loggers=(MLflowLogger("sqlite:///runs/mlflow.db", experiment="digits"),))
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .loggers import Logger, Rows

log = logging.getLogger("fnlight")

#: The file in the run directory that names the MLflow run (a resumed fit continues it).
RECORD = "mlflow_run.json"


def flatten_params(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested hyperparameter record as MLflow params: ``"a.b"`` keys, values as text (JSON for lists).

    Example:
        >>> flatten_params({"lr": 0.001, "model": {"width": 64, "act": "relu"}, "sizes": [1, 2]})
        {'lr': '0.001', 'model.width': '64', 'model.act': 'relu', 'sizes': '[1, 2]'}
    """
    out: dict[str, str] = {}
    for k, v in hparams.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out |= flatten_params(v, key + ".")
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


class MLflowLogger(Logger):
    """Every row's numbers as MLflow metrics at the row's step (step rows as ``step/<name>``, epoch rows
    under their own names with ``epoch``), the hyperparameter record as params (nested keys joined with
    ``.``), and the last checkpoint as the artifact ``checkpoints/<step dir>`` when ``fit`` ends.

    Args:
        tracking_uri: where the store is (``sqlite:///mlflow.db``, ``http://host:5000``); None: MLflow's
            default (``MLFLOW_TRACKING_URI``).
        experiment: the MLflow experiment's name (created when missing); None: ``MLFLOW_EXPERIMENT_NAME``,
            else ``"fnlight"``.
        run_name: the MLflow run's name; None: the run directory's name.
        tags: extra tags on the run.
        checkpoint: log the final checkpoint as an artifact (a copy of its files into the artifact store).
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, checkpoint: bool = True) -> None:
        self.tracking_uri, self.run_name = tracking_uri, run_name
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "fnlight"
        self.tags, self.checkpoint = dict(tags or {}), checkpoint
        self.client: Any = None
        self.run_id: str | None = None
        self._logged_to: dict[str, int] = {}  # per metric: the last step the store has (a resumed run's)

    def open(self, run_dir: Path, keep: Rows | None = None) -> MLflowLogger:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError("MLflowLogger needs mlflow: pip install 'fnlight[mlflow]'") from e
        out = MLflowLogger(self.tracking_uri, self.experiment, self.run_name, self.tags, self.checkpoint)
        out.client = MlflowClient(tracking_uri=self.tracking_uri)
        record = Path(run_dir) / RECORD
        if keep is not None and record.exists():
            out.run_id = out._continue(record)
        if out.run_id is None:
            found = out.client.get_experiment_by_name(self.experiment)
            exp_id = found.experiment_id if found is not None else out.client.create_experiment(self.experiment)
            run = out.client.create_run(exp_id, run_name=self.run_name or Path(run_dir).name,
                                        tags={"fnlight.run_dir": str(Path(run_dir).resolve()), **self.tags})
            out.run_id = run.info.run_id
            _write_record(record, {"run_id": out.run_id, "experiment_id": exp_id,
                                   "tracking_uri": out.client.tracking_uri})
        return out

    def _continue(self, record: Path) -> str | None:
        """The recorded run, set running again, with the last step of each of its metrics; None (and a
        warning) when the record is damaged or the store does not have that run."""
        from mlflow.exceptions import MlflowException

        try:
            run_id = json.loads(record.read_text())["run_id"]
            run = self.client.get_run(run_id)
        except (ValueError, KeyError, TypeError, OSError, MlflowException) as e:
            log.warning("%s: cannot continue the MLflow run it names (%s): starting a new MLflow run", record, e)
            return None
        for key in run.data.metrics:
            self._logged_to[key] = max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
        self.client.update_run(run_id, status="RUNNING")
        log.info("continuing MLflow run %s", run_id)
        return run_id

    def log(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, now = int(row["step"]), int(time.time() * 1000)
        prefix = "step/" if row["kind"] == "step" else ""
        values = {f"{prefix}{k}": v for k, v in row.items() if k not in ("kind", "step", "epoch")}
        if row["kind"] == "epoch":
            values["epoch"] = row["epoch"]
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)
                   and step > self._logged_to.get(k, -1)]  # (a resumed run: what the store has already)
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_hparams(self, hparams: dict[str, Any]) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        params = []
        for k, v in flatten_params(hparams).items():
            if k not in have:
                params.append(Param(k, v))
            elif have[k] != v:  # MLflow params cannot change
                log.warning("MLflow run %s keeps param %s=%r (this run has %r: MLflow params cannot change)",
                            self.run_id, k, have[k], v)
        for i in range(0, len(params), 100):  # (MLflow takes at most 100 params per call)
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_checkpoint(self, path: Path) -> None:
        if self.checkpoint:
            self.client.log_artifacts(self.run_id, str(path), artifact_path=f"checkpoints/{Path(path).name}")

    def close(self) -> None:
        if self.client is not None and self.run_id is not None:
            client, self.client = self.client, None
            client.set_terminated(self.run_id, "FINISHED")


def _write_record(path: Path, doc: dict[str, Any]) -> None:
    """Write the run's record atomically (a kill leaves no half of it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)
