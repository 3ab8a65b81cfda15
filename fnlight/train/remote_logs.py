"""The CSV and JSONL loggers' form in a remote run directory: chunk objects, never appended to.

Object stores cannot append, and rewriting a whole log for every row would cost a growing upload per row. A
remote log ``<run>/<name>`` (``metrics.jsonl``, ``metrics.csv``, ``steps.csv``) is instead a series of chunk
objects ``<run>/<name>.parts/<i>.<ext>``, where ``i`` (9 digits) is the index of the chunk's first row in the
log: read them in name order and they are the log (:func:`read_log`). Each chunk is a complete file of its
format (a CSV chunk has its own header), written with one PUT. Rows are buffered and a chunk is written
after each epoch row, when the buffer is ``FLUSH_S`` seconds old or ``FLUSH_ROWS`` rows long, at the close,
and before every checkpoint (the Trainer calls ``flush``), so the rows a checkpoint counts are stored before
the checkpoint exists.

On resume, the rows after those the checkpoint counts (logged by the run after its last checkpoint) are
removed: chunks that start after them are deleted and the chunk that straddles the point is rewritten with
its kept rows (one PUT). The new rows then continue at the next index. A resume killed halfway is redone by
the next one, which computes the same cut. So a resumed log has every row once: none missing, none twice.

Example:
    ```python
    lg = RemoteJSONLLogger().open(RemotePath("s3://bucket/runs/a"))
    read_log(RemotePath("s3://bucket/runs/a"), "metrics.jsonl")
    ```
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from .._remote import RemotePath
from .loggers import Logger, csv_number

log = logging.getLogger("fnlight")

FLUSH_S = 30.0  # a buffered row is stored within this many seconds (at the next row logged)
FLUSH_ROWS = 1000

Row = dict[str, Any]


def _csv_text(rows: list[Row]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r if k != "kind"))
    out = io.StringIO()
    w = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return out.getvalue()


def _csv_rows(text: str, kind: str) -> list[Row]:
    return [{"kind": kind, **{k: csv_number(v) for k, v in r.items() if v not in ("", None)}}
            for r in csv.DictReader(io.StringIO(text))]


def _jsonl_text(rows: list[Row]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _jsonl_rows(text: str) -> list[Row]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class _Series:
    """One log as chunk objects in ``<run>/<name>.parts/``."""

    def __init__(self, run_dir: RemotePath, name: str, encode: Callable[[list[Row]], str],
                 decode: Callable[[str], list[Row]]) -> None:
        self.dir, self.ext = run_dir / f"{name}.parts", name.rsplit(".", 1)[-1]
        self.encode, self.decode = encode, decode
        self.next = 0  # the index of the next row
        self.buffer: list[Row] = []
        self.since = 0.0

    def chunks(self) -> list[tuple[int, RemotePath]]:
        found = []
        for rel in self.dir.files():
            stem = rel.rsplit(".", 1)[0]
            if "/" not in rel and stem.isdigit() and rel.endswith(f".{self.ext}"):
                found.append((int(stem), self.dir / rel))
        return sorted(found, key=lambda c: c[0])

    def _chunk(self, start: int) -> RemotePath:
        return self.dir / f"{start:09d}.{self.ext}"

    def read(self) -> list[tuple[int, RemotePath, list[Row]]]:
        return [(start, p, self.decode(p.read_text())) for start, p in self.chunks()]

    def rows(self) -> list[Row]:
        return [r for _, _, rows in self.read() for r in rows]

    def cut(self, keep: int) -> None:
        """Keep the first ``keep`` rows (delete the chunks after them, rewrite the one that straddles)."""
        stored = 0
        for start, path, rows in reversed(self.read()):  # the last chunks first: a kill leaves a prefix
            if start >= keep:
                path.unlink()
            elif start + len(rows) > keep:
                path.write_text(self.encode(rows[:keep - start]))
                stored = max(stored, keep)
            else:
                stored = max(stored, start + len(rows))
        if stored < keep:
            log.warning("%s holds %d rows, fewer than the %d the checkpoint counts: the later ones continue after "
                        "them", self.dir, stored, keep)
        self.next = stored

    def clear(self) -> None:
        for _, path in self.chunks():
            path.unlink()
        self.next = 0

    def add(self, row: Row, urgent: bool) -> None:
        if not self.buffer:
            self.since = time.monotonic()
        self.buffer.append(row)
        if urgent or len(self.buffer) >= FLUSH_ROWS or time.monotonic() - self.since >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self._chunk(self.next).write_text(self.encode(self.buffer))
            self.next += len(self.buffer)
            self.buffer = []


class RemoteCSVLogger(Logger):
    """:class:`~fnlight.train.loggers.CSVLogger` in a remote run directory: ``metrics.csv`` and ``steps.csv``
    as chunk series (see the module)."""

    def __init__(self) -> None:
        self.series: dict[str, _Series] = {}

    def open(self, run_dir: Any, keep: dict[str, int] | None = None) -> RemoteCSVLogger:
        out = RemoteCSVLogger()
        for kind, name in (("epoch", "metrics.csv"), ("step", "steps.csv")):
            s = _Series(run_dir, name, _csv_text, lambda text, kind=kind: _csv_rows(text, kind))
            if keep:
                s.cut(keep.get(kind, 0))
            else:
                s.clear()  # a fresh run in a reused directory (as the local logger truncates its file)
            out.series[kind] = s
        return out

    def log(self, row: Row) -> None:
        self.series[row["kind"]].add(row, urgent=row["kind"] == "epoch")

    def flush(self) -> None:
        for s in self.series.values():
            s.flush()

    def close(self) -> None:
        self.flush()


class RemoteJSONLLogger(Logger):
    """:class:`~fnlight.train.loggers.JSONLLogger` in a remote run directory: ``metrics.jsonl`` as a chunk
    series (see the module)."""

    def __init__(self) -> None:
        self.series: _Series | None = None

    def open(self, run_dir: Any, keep: dict[str, int] | None = None) -> RemoteJSONLLogger:
        out = RemoteJSONLLogger()
        s = out.series = _Series(run_dir, "metrics.jsonl", _jsonl_text, _jsonl_rows)
        if not keep:
            s.clear()
            return out
        # the rows logged before the checkpoint are a prefix: up to the first row beyond its kind's count
        left, n = dict(keep), 0
        for row in s.rows():
            kind = row.get("kind") if isinstance(row, dict) else None
            if left.get(kind, 0) <= 0:
                break
            left[kind] -= 1
            n += 1
        s.cut(n)
        return out

    def log(self, row: Row) -> None:
        self.series.add(row, urgent=row["kind"] == "epoch")

    def flush(self) -> None:
        self.series.flush()

    def close(self) -> None:
        self.flush()


def read_log(run_dir: str | RemotePath, name: str) -> list[Row]:
    """The rows of the remote log ``name`` (``metrics.jsonl``, ``metrics.csv`` or ``steps.csv``) of a run
    whose ``run_dir`` is a URL.

    Example:
        ```python
        read_log("s3://bucket/runs/a", "metrics.jsonl")[-1]["val/acc"]
        # 0.97
        ```
    """
    run_dir = RemotePath(run_dir) if isinstance(run_dir, str) else run_dir
    if name.endswith(".jsonl"):
        return _Series(run_dir, name, _jsonl_text, _jsonl_rows).rows()
    kind = "epoch" if name == "metrics.csv" else "step"
    return _Series(run_dir, name, _csv_text, lambda text: _csv_rows(text, kind)).rows()
