"""Loggers: where metric rows go. Each row is a dict of floats with ``kind``
(``"step"`` or ``"epoch"``), ``step`` and ``epoch``.

- :class:`CSVLogger`: ``metrics.csv`` (epoch rows) and ``steps.csv`` (step rows);
- :class:`JSONLLogger`: ``metrics.jsonl``, every row, flushed as it is written;
- :class:`ConsoleLogger`: one line per epoch;
- :class:`TensorBoardLogger`: event files (``pip install fnlight[tensorboard]``);
- :class:`~fnlight.train.mlflow_logger.MLflowLogger`: an MLflow run (``pip install fnlight[mlflow]``).

In a remote run directory (a URL such as ``s3://bucket/runs/a``) the CSV and JSONL
logs are chunk objects written whole, never appended to, and cut back on resume
so that no row is missing or repeated (see ``fnlight.train.remote_logs``).

Files are appended to (``O_APPEND``), so two runs sharing a ``run_dir`` never
leave NUL-filled holes, and rewritten only atomically (temp file, rename). On
resume, a line that a killed or out-of-space run left half-written (no final
newline, or not parseable) is dropped, and said so on the "fnlight" logger;
it is never fatal. A write that fails (a full disk) raises an OSError naming
the file.

Example:
    >>> from fnlight import Trainer
    >>> trainer = Trainer(run_dir="runs/a", loggers=(CSVLogger(), JSONLLogger(), ConsoleLogger()))
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from .._remote import is_remote

log = logging.getLogger("fnlight")

Rows = dict[str, int]  # rows already logged per kind ("epoch", "step"): what a resumed run keeps


class Logger:
    """Base class. ``open(run_dir, keep)`` returns a ready logger (loggers are configs
    until then); ``keep`` (on resume) is how many rows of each kind the run had logged
    when its checkpoint was taken: later rows are dropped, so none is duplicated."""

    def open(self, run_dir: Path, keep: Rows | None = None) -> Logger:
        return self

    def log(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_hparams(self, hparams: dict[str, Any]) -> None:
        """The run's hyperparameter record (``fit(hparams=...)``, JSON-able), once after ``open``
        (again on every resume). Loggers that have no place for it ignore it."""

    def log_checkpoint(self, path: Path) -> None:
        """The run's last checkpoint directory, once when ``fit`` ends (finished, stopped, or interrupted
        by a signal; not when it raised), before ``close``, where it has a ``ckpt_dir``. Loggers that
        keep no artifacts ignore it."""

    def flush(self) -> None:
        """Store the rows logged so far (the Trainer calls it before each checkpoint)."""

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise an OSError (a full disk...) with the log file's name in it."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e} while writing the log {path}") from e


def _whole_lines(path: Path) -> list[str]:
    """The complete lines of a log file (without their newline); a torn last line or a line holding NULs
    (what a killed or out-of-space writer leaves) is dropped with a message naming the file."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline, as a whole file does
    if torn:
        log.warning("%s: dropped its last line, cut short when an earlier run stopped mid-write (%r)", path,
                    torn[:80])
    kept = [line for line in lines if "\0" not in line and "\ufffd" not in line]
    if len(kept) != len(lines):
        log.warning("%s: dropped %d damaged line(s) (NUL bytes or invalid UTF-8)", path, len(lines) - len(kept))
    return kept


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a kill or a full disk leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with _naming(path):
            with open(tmp, "w", newline="") as f:
                f.write(text)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class CSVLogger(Logger):
    """Epoch rows to ``metrics.csv``, step rows to ``steps.csv`` (rewritten when a new column appears)."""

    def __init__(self) -> None:
        self.dir: Path | None = None
        self._rows: dict[str, list[dict[str, Any]]] = {"epoch": [], "step": []}
        self._columns: dict[str, list[str]] = {"epoch": [], "step": []}

    def open(self, run_dir: Path, keep: Rows | None = None) -> Logger:
        if is_remote(run_dir):
            from .remote_logs import RemoteCSVLogger
            return RemoteCSVLogger().open(run_dir, keep)
        out = CSVLogger()
        out.dir = run_dir
        for kind, name in (("epoch", "metrics.csv"), ("step", "steps.csv")):
            path = run_dir / name
            if keep and keep.get(kind) and path.exists():
                reader = csv.DictReader(io.StringIO("".join(line + "\n" for line in _whole_lines(path))))
                out._columns[kind] = list(reader.fieldnames or [])
                rows = []
                for r in reader:
                    if None in r or None in r.values():  # a line with more or fewer fields than the header
                        log.warning("%s: dropped a damaged row (line %d)", path, reader.line_num)
                        continue
                    rows.append({k: csv_number(v) for k, v in r.items() if v != ""})
                out._rows[kind] = [{"kind": kind, **r} for r in rows[:keep[kind]]]
                out._rewrite(kind)
            elif path.exists():
                path.unlink()  # a fresh run in a reused directory
        return out

    def _rewrite(self, kind: str) -> None:
        path = self.dir / ("metrics.csv" if kind == "epoch" else "steps.csv")
        text = io.StringIO()
        w = csv.DictWriter(text, self._columns[kind], extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(self._rows[kind])
        _replace(path, text.getvalue())

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
            line = io.StringIO()
            csv.DictWriter(line, cols, extrasaction="ignore", lineterminator="\n").writerow(row)
            with _naming(path), open(path, "a", newline="") as f:
                f.write(line.getvalue())  # one write of one whole line


class JSONLLogger(Logger):
    """Every row as one JSON line in ``metrics.jsonl``."""

    def __init__(self) -> None:
        self._f: TextIO | None = None
        self._path: Path | None = None

    def open(self, run_dir: Path, keep: Rows | None = None) -> Logger:
        if is_remote(run_dir):
            from .remote_logs import RemoteJSONLLogger
            return RemoteJSONLLogger().open(run_dir, keep)
        path = run_dir / "metrics.jsonl"
        kept: list[str] = []
        if keep and path.exists():
            left = dict(keep)
            for i, line in enumerate(_whole_lines(path)):
                try:
                    kind = json.loads(line)["kind"]
                except (ValueError, TypeError, KeyError):
                    log.warning("%s: dropped line %d, which is not a JSON row (%r)", path, i + 1, line[:80])
                    continue
                if left.get(kind, 0) > 0:
                    left[kind] -= 1
                    kept.append(line + "\n")
        if keep and path.exists():
            _replace(path, "".join(kept))  # atomic: a kill now leaves the old lines or the kept ones
        elif path.exists():
            with _naming(path):
                os.truncate(path, 0)  # a fresh run in a reused directory (in place: other writers append to it)
        out = JSONLLogger()
        out._path = path
        with _naming(path):
            out._f = open(path, "a")  # noqa: SIM115 (closed by close()); appends: never a hole
        return out

    def log(self, row: dict[str, Any]) -> None:
        with _naming(self._path):
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            with contextlib.suppress(OSError):  # what could not be written was raised by log()
                f.close()


def csv_number(v: str) -> Any:
    """A CSV cell as the number it was written from (an int stays an int), else the text.

    Example:
        >>> csv_number("3"), csv_number("0.5"), csv_number("1e-05"), csv_number("val")
        (3, 0.5, 1e-05, 'val')
    """
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
    """Scalars to TensorBoard event files in the run directory (needs ``tensorboard``): epoch rows under
    their names, step rows as ``step/<name>``, at the row's step. A resumed run's first event purges
    what the earlier run logged from that step on (TensorBoard's ``purge_step``), so no step shows twice."""

    def __init__(self) -> None:
        self._writer: Any = None
        self._dir: Path | None = None
        self._resumed = False

    def open(self, run_dir: Path, keep: Rows | None = None) -> TensorBoardLogger:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise ImportError("TensorBoardLogger needs tensorboard: pip install 'fnlight[tensorboard]'") from e
        out = TensorBoardLogger()
        out._dir, out._resumed = Path(run_dir), keep is not None
        return out

    def log(self, row: dict[str, Any]) -> None:
        if self._writer is None:  # at the first row: a resumed run's first step is where the purge starts
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self._dir), purge_step=row["step"] if self._resumed else None)
        for k, v in row.items():
            if k not in ("kind", "step", "epoch") and isinstance(v, float):
                self._writer.add_scalar(f"{row['kind']}/{k}" if row["kind"] == "step" else k, v, row["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
