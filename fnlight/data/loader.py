"""Iterating a split's batches: in the caller, in a prefetch thread, or in worker processes.

Every batch is a pure function of (indices, epoch), so where it is computed
never changes it: results are identical for any number of workers. The only
state of an iteration is (epoch, position). Threads and processes belong to
one :class:`BatchIterator` and are released when it is exhausted, closed,
garbage-collected (e.g. after ``break``), or when its DataModule is closed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import traceback
from collections.abc import Iterator, Sequence
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing as tmp

from .order import BatchOrder
from .stage import SplitPlan

_POLL_S = 0.1


class WorkerError(RuntimeError):
    """A data worker process failed or died."""


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc
        self.tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Failure._rebuild, (self.exc, self.tb))

    @staticmethod
    def _rebuild(exc: BaseException, tb: str) -> _Failure:
        f = _Failure.__new__(_Failure)
        f.exc, f.tb = exc, tb
        return f


def _raise(f: _Failure, where: str) -> None:
    exc = f.exc
    if exc.__traceback__ is None and f.tb and hasattr(exc, "add_note"):  # it crossed a process boundary
        exc.add_note(f"(raised in {where}; its traceback:)\n{f.tb}")
    raise exc


class _Cursor:
    """The index tensors of a lazy plan read in order, computed a chunk at a time
    (one vectorized pass per chunk: per-batch torch calls would cost more than small batches)."""

    def __init__(self, batches: Sequence[torch.Tensor]):
        self.batches = batches
        self.start, self.chunk = 0, list[torch.Tensor]()

    def __getitem__(self, pos: int) -> torch.Tensor:
        if not isinstance(self.batches, BatchOrder):
            return self.batches[pos]
        if not self.start <= pos < self.start + len(self.chunk):
            stop = min(len(self.batches), pos + self.batches.batches_per_chunk())
            self.start, self.chunk = pos, self.batches.chunk(pos, stop)
        return self.chunk[pos - self.start]


def _produce(plan: SplitPlan, epoch: int, batches: Sequence[torch.Tensor], out: queue.Queue,
             stop: threading.Event) -> None:
    """The prefetch thread: compute batches in order into a bounded queue."""
    for idx in batches:
        try:
            item: Any = plan.get_batch(idx, epoch)
        except BaseException as e:  # delivered to the consumer, which re-raises it
            item = _Failure(e)
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        if stop.is_set() or isinstance(item, _Failure):
            return


def _send(results: Any, pos: int, value: Any) -> None:
    """Pickle here, not in the queue's feeder thread, where a failure would be
    printed and the item dropped (and the consumer would wait for it forever)."""
    try:
        data = bytes(ForkingPickler.dumps((pos, value)))
    except Exception as e:
        what = f"; the worker raised:\n{value.tb}" if isinstance(value, _Failure) else ""
        failure = _Failure(WorkerError(f"batch {pos} could not be sent from the worker "
                                       f"({type(e).__name__}: {e}){what}"))
        failure.tb = ""
        data = bytes(ForkingPickler.dumps((pos, failure)))
    results.put(data)


def _work(plan: SplitPlan, epoch: int, tasks: Any, results: Any, parent: int) -> None:
    """A worker process: compute the host part of the batches it is given."""
    torch.set_num_threads(1)  # the parent and the other workers share the cores
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned: the parent died
                return
            continue
        if task is None:
            return
        pos, idx = task
        try:
            value: Any = plan.host_batch(idx, epoch)
        except BaseException as e:
            value = _Failure(e)
        _send(results, pos, value)


class BatchIterator(Iterator[Any]):
    """Batches ``start, start + 1, ...`` of one split and epoch.

    Use it as an iterator (``for batch in it``) or a context manager; ``close()``
    stops its thread or processes at once.
    """

    def __init__(self, plan: SplitPlan, epoch: int, batches: Sequence[torch.Tensor], prefetch: int = 2,
                 workers: int = 0, mp_context: str | None = None):
        self.plan, self.epoch, self._batches = plan, epoch, batches
        self._index = _Cursor(batches)
        self._in_flight: dict[int, torch.Tensor] = {}  # index tensors sent to workers, by position
        self._next = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._procs: list[Any] = []
        if workers > 0 and batches:
            self._start_workers(workers, max(prefetch, 1), mp_context)
        elif prefetch > 0 and batches:
            self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=_produce, args=(plan, epoch, batches, self._queue, self._stop),
                name="fnlight-prefetch", daemon=True)
            self._thread.start()

    # -- worker processes ---------------------------------------------------
    def _start_workers(self, workers: int, prefetch: int, mp_context: str | None) -> None:
        ctx = tmp.get_context(mp_context or ("fork" if os.name == "posix" else "spawn"))
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        self._buffer: dict[int, Any] = {}
        self._sent = 0
        self._window = workers * prefetch
        for _ in range(workers):
            p = ctx.Process(target=_work, args=(self.plan, self.epoch, self._tasks, self._results,
                                                os.getpid()), daemon=True)
            p.start()
            self._procs.append(p)
        self._fill()

    def _fill(self) -> None:
        while self._sent < len(self._batches) and self._sent < self._next + self._window:
            idx = self._index[self._sent]
            self._in_flight[self._sent] = idx
            self._tasks.put((self._sent, idx))
            self._sent += 1

    def _from_workers(self, pos: int) -> Any:
        while pos not in self._buffer:
            try:
                got, value = ForkingPickler.loads(self._results.get(timeout=_POLL_S))
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    raise WorkerError(
                        f"a data worker process died unexpectedly (exit code {dead[0].exitcode}); "
                        "run with workers=0 to see the error in this process."
                    ) from None
                continue
            self._buffer[got] = value
        value = self._buffer.pop(pos)
        if isinstance(value, _Failure):
            _raise(value, f"data worker, batch {pos}")
        return self.plan.device_batch(value, self._in_flight.pop(pos), self.epoch)

    # -- iteration ----------------------------------------------------------
    def __iter__(self) -> BatchIterator:
        return self

    def __len__(self) -> int:
        return len(self._batches) - self._next

    def __next__(self) -> Any:
        if self._closed or self._next >= len(self._batches):
            self.close()
            raise StopIteration
        pos = self._next
        try:
            if self._procs:
                item = self._from_workers(pos)
                self._next += 1
                self._fill()
                return item
            if self._thread is not None:
                item = self._get_prefetched()
                if isinstance(item, _Failure):
                    _raise(item, f"prefetch thread, batch {pos}")
            else:
                item = self.plan.get_batch(self._index[pos], self.epoch)
        except BaseException:
            self.close()
            raise
        self._next += 1
        return item

    def _get_prefetched(self) -> Any:
        # Poll, so that close() from another thread ends a wait for a batch never coming.
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._closed:
                    raise StopIteration from None

    def close(self) -> None:
        """Stop the prefetch thread or worker processes (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._procs:
            for _ in self._procs:
                with contextlib.suppress(Exception):
                    self._tasks.put(None)
            for p in self._procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.terminate()
                    p.join()
            for q in (self._tasks, self._results):
                q.cancel_join_thread()
                q.close()
            self._procs = []

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
