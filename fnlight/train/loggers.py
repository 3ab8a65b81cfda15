"""Loggers: where metric rows go. Each row is a dict of floats with ``kind``
(``"step"`` or ``"epoch"``), ``step`` and ``epoch``.

- :class:`CSVLogger`: ``metrics.csv`` (epoch rows) and ``steps.csv`` (step rows);
- :class:`JSONLLogger`: ``metrics.jsonl``, every row, flushed as it is written;
- :class:`ConsoleLogger`: one line per epoch;
- :class:`TensorBoardLogger`: event files (``pip install fnlight[tensorboard]``).

Example:
    >>> trainer = Trainer(run_dir="runs/a", loggers=(CSVLogger(), JSONLLogger(), ConsoleLogger()))
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, TextIO

Rows = dict[str, int]  # rows already logged per kind ("epoch", "step"): what a resumed run keeps


class Logger:
    """Base class. ``open(run_dir, keep)`` returns a ready logger (loggers are configs
    until then); ``keep`` (on resume) is how many rows of each kind the run had logged
    when its checkpoint was taken: later rows are dropped, so none is duplicated."""

    def open(self, run_dir: Path, keep: Rows | None = None) -> Logger:
        return self

    def log(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CSVLogger(Logger):
    """Epoch rows to ``metrics.csv``, step rows to ``steps.csv`` (rewritten when a new column appears)."""

    def __init__(self) -> None:
        self.dir: Path | None = None
        self._rows: dict[str, list[dict[str, Any]]] = {"epoch": [], "step": []}
        self._columns: dict[str, list[str]] = {"epoch": [], "step": []}

    def open(self, run_dir: Path, keep: Rows | None = None) -> CSVLogger:
        out = CSVLogger()
        out.dir = run_dir
        for kind, name in (("epoch", "metrics.csv"), ("step", "steps.csv")):
            path = run_dir / name
            if keep and keep.get(kind) and path.exists():
                with open(path, newline="") as f:
                    reader = csv.DictReader(f)
                    out._columns[kind] = list(reader.fieldnames or [])
                    rows = [{k: _number(v) for k, v in r.items() if v != ""} for r in reader][:keep[kind]]
                out._rows[kind] = [{"kind": kind, **r} for r in rows]
                out._rewrite(kind)
            elif path.exists():
                path.unlink()  # a fresh run in a reused directory
        return out

    def _rewrite(self, kind: str) -> None:
        path = self.dir / ("metrics.csv" if kind == "epoch" else "steps.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, self._columns[kind], extrasaction="ignore")
            w.writeheader()
            w.writerows(self._rows[kind])

    def log(self, row: dict[str, Any]) -> None:
        kind = row["kind"]
        rows, cols = self._rows[kind], self._columns[kind]
        rows.append(row)
        path = self.dir / ("metrics.csv" if kind == "epoch" else "steps.csv")
        new = [k for k in row if k not in cols and k != "kind"]
        if new or len(rows) == 1:
            cols += new
            self._rewrite(kind)
        else:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, cols, extrasaction="ignore").writerow(row)


class JSONLLogger(Logger):
    """Every row as one JSON line in ``metrics.jsonl``."""

    def __init__(self) -> None:
        self._f: TextIO | None = None

    def open(self, run_dir: Path, keep: Rows | None = None) -> JSONLLogger:
        path = run_dir / "metrics.jsonl"
        kept: list[str] = []
        if keep and path.exists():
            left = dict(keep)
            for line in path.read_text().splitlines():
                kind = json.loads(line)["kind"]
                if left.get(kind, 0) > 0:
                    left[kind] -= 1
                    kept.append(line + "\n")
        out = JSONLLogger()
        out._f = open(path, "w")  # noqa: SIM115 (closed by close())
        out._f.writelines(kept)
        return out

    def log(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _number(v: str) -> Any:
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


class ConsoleLogger(Logger):
    """One line per epoch on stderr (or ``stream``)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def log(self, row: dict[str, Any]) -> None:
        if row["kind"] != "epoch":
            return
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "kind"]
        print("  ".join(parts), file=self.stream or sys.stderr, flush=True)


class TensorBoardLogger(Logger):
    """Scalars to TensorBoard event files in the run directory (needs ``tensorboard``)."""

    def __init__(self) -> None:
        self._writer: Any = None

    def open(self, run_dir: Path, keep: Rows | None = None) -> TensorBoardLogger:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("TensorBoardLogger needs tensorboard: pip install 'fnlight[tensorboard]'") from e
        out = TensorBoardLogger()
        out._writer = SummaryWriter(str(run_dir))
        return out

    def log(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if k not in ("kind", "step", "epoch") and isinstance(v, float):
                self._writer.add_scalar(f"{row['kind']}/{k}" if row["kind"] == "step" else k, v, row["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
