"""One call of :meth:`fnlight.train.Trainer.fit`, the mutable part of the loop: the run's position and
history, the callbacks and their states, the checkpoint policy, the signals that stop it, and the
running means of the metrics. Nothing here outlives the call; the Trainer stays a frozen configuration.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import distributed
from .._remote import Location, RemotePath, location
from ..data.datamodule import DataModule
from ..tree import batch_size, device_put, tree_map
from . import elastic
from .callbacks import Callback, FitContext, Signal
from .checkpoint import (
    AsyncCheckpointer,
    Resumable,
    find_resumable,
    list_checkpoints,
    remove_checkpoint,
    save_checkpoint,
    step_dir,
)
from .checkpoint_remote import remove_incomplete
from .checkpoint_zero import save_sharded
from .checks import check_state_matches, noted
from .ensemble import EnsembleTrainStep, PerMember, member_metrics, scalar_step, spread_members
from .loggers import CSVLogger, JSONLLogger, Logger
from .rundir import RESUMES, claim, next_version, record_resume
from .state import TrainState
from .step import TrainStep
from .zero import is_sharded, unshard

if TYPE_CHECKING:
    from .loop import Trainer

Metrics = dict[str, float]
log = logging.getLogger("fnlight")  # resume, early stop and interrupt lines
progress_log = logging.getLogger("fnlight.progress")  # one line per epoch when no progress bar is shown


class _WeightedMean:
    """Per-key means over batches weighted by batch size, summed on the device (no sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: Mapping[str, torch.Tensor], n: int) -> None:
        for k, v in spread_members(metrics).items():  # an ensemble's [members] values: name/i and the mean
            v = v.detach().double() * n
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += n

    def result(self) -> Metrics:
        return {k: float(v) / self.count for k, v in self.sums.items()} if self.count else {}

    def reduced(self) -> _WeightedMean:
        """The sums and counts of every rank (one all-reduce; itself with a single rank)."""
        if distributed.world_size() == 1:
            return self
        keys = sorted(self.sums)
        *sums, count = distributed.all_reduce_sum([float(self.sums[k]) for k in keys] + [float(self.count)])
        out = _WeightedMean()
        out.sums = {k: torch.tensor(v, dtype=torch.float64) for k, v in zip(keys, sums, strict=True)}
        out.count = round(count)
        return out

    def snapshot(self) -> dict[str, Any]:
        """JSON-able and exact (float64 sums), for a checkpoint taken mid-epoch."""
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "count": self.count}

    @classmethod
    def restore(cls, snap: Mapping[str, Any] | None) -> _WeightedMean:
        out = cls()
        if snap:
            out.sums = {k: torch.tensor(v, dtype=torch.float64) for k, v in snap["sums"].items()}
            out.count = snap["count"]
        return out


def _reduce_row(values: Mapping[str, float], n: int) -> Metrics:
    """A step's metrics averaged over ranks, weighted by their batch sizes (itself with one rank)."""
    if distributed.world_size() == 1:
        return dict(values)
    keys = sorted(values)
    *sums, count = distributed.all_reduce_sum([values[k] * n for k in keys] + [float(n)])
    return {k: v / count for k, v in zip(keys, sums, strict=True)}


class _SignalFlag:
    """While entered, the first of ``signums`` is recorded (training stops after the step in progress);
    a second one restores the previous handlers and is re-raised at once (a second Ctrl-C aborts, as
    Python's own KeyboardInterrupt does; checkpoints are written atomically, so none is left damaged).
    Handlers can only be set in the main thread: elsewhere it records nothing."""

    #: Under torchrun (its agent forwards the signal it gets to the ranks, which a Ctrl-C or a scheduler's
    #: signal to the process group has reached already), the same signal again within this many seconds
    #: is that one delivered twice, not a second one.
    FORWARDED_WITHIN_S = 1.0

    def __init__(self, signums: tuple[int, ...]) -> None:
        self.signums, self.received, self._saved, self._at = signums, 0, {}, 0.0
        self._launched = "TORCHELASTIC_RUN_ID" in os.environ

    def __enter__(self) -> _SignalFlag:
        if self.signums and threading.current_thread() is threading.main_thread():
            for s in self.signums:
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.received:
            self.received, self._at = signum, time.monotonic()
            if distributed.rank() == 0:
                log.warning("received %s: stopping after the current step (again to abort now)",
                            signal.Signals(signum).name)
            return
        if self._launched and signum == self.received and time.monotonic() - self._at < self.FORWARDED_WITHIN_S:
            return
        self._restore()
        signal.raise_signal(signum)

    def _restore(self) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._saved = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()


class _Callbacks:
    """The trainer's callbacks, each with its state beside it; checkpoints key the states by ``<type>#<n>``
    (the n-th callback of that type), so adding or removing callbacks between runs is fine."""

    def __init__(self, callbacks: tuple[Callback, ...]) -> None:
        seen: dict[str, int] = {}
        self.entries: list[list[Any]] = []  # [id, callback, state]
        for cb in callbacks:
            name = type(cb).__qualname__
            self.entries.append([f"{name}#{seen.get(name, 0)}", cb, cb.init()])
            seen[name] = seen.get(name, 0) + 1

    def restore(self, saved: Mapping[str, Any]) -> None:
        for entry in self.entries:
            entry[2] = saved.get(entry[0], entry[2])

    def snapshot(self) -> dict[str, Any]:
        return {cb_id: cb_state for cb_id, _, cb_state in self.entries}

    def states(self) -> tuple[Any, ...]:
        return tuple(cb_state for _, _, cb_state in self.entries)

    def keep(self) -> set[int]:
        """Steps whose checkpoints some callback (ModelCheckpoint) pins."""
        return {s for _, cb, cb_state in self.entries for s in cb.keep(cb_state)}

    def signal(self, hook: str, state: TrainState, metrics: Mapping[str, Any], ctx: FitContext,
               where: str) -> tuple[Signal, str | None]:
        """Call every callback's ``hook`` in order; merge what they ask for, and name the first to ask to stop."""
        stop, save, logged, stopper, edit = False, False, {}, None, None
        for entry in self.entries:
            cb_id, cb = entry[0], entry[1]
            with noted(lambda: f"in callback {cb_id} ({type(cb).__name__}.{hook}) {where}"):  # noqa: B023
                entry[2], sig = getattr(cb, hook)(entry[2], state, metrics, ctx)
            if sig.stop and stopper is None:
                stopper = cb_id.split("#")[0]
            stop, save, logged = stop or sig.stop, save or sig.save, {**logged, **sig.log}
            if sig.edit_opt_state is not None:  # composed in callback order
                edit = sig.edit_opt_state if edit is None else _then(edit, sig.edit_opt_state)
        return Signal(stop, save, logged, edit), stopper


class _Checkpoints:
    """The checkpoint policy of one fit: when to save (every n steps, every n epochs, when asked, where
    training stops), what to keep (the newest ``keep_last`` and those callbacks pin), and the writer
    (synchronous, or in the background). Only rank 0 writes, except with a sharded optimizer state
    (ZeRO-1), whose checkpoints every rank writes its slice of (synchronously)."""

    def __init__(self, trainer: Trainer, callbacks: _Callbacks, lead: bool,
                 on_checkpoint: Callable[[Location], Any] | None) -> None:
        assert trainer.ckpt_dir is not None
        self.dir = location(trainer.ckpt_dir)
        self.every_steps = trainer.ckpt_every_n_steps
        self.every_epochs = trainer.ckpt_every_n_epochs or (1 if not trainer.ckpt_every_n_steps else None)
        self.keep_last, self.callbacks, self.lead, self.on_checkpoint = \
            trainer.keep_last, callbacks, lead, on_checkpoint
        self.writer = AsyncCheckpointer() if trainer.async_save and lead else None
        self.saved: tuple[int, int] | None = None  # (step, position) of the last save
        self.last: Location | None = None

    def due_after_step(self, step: int, asked: bool) -> bool:
        return asked or bool(self.every_steps and step % self.every_steps == 0)

    def due_after_epoch(self, epochs_done: int, step: int, asked: bool, last: bool) -> bool:
        scheduled = self.every_epochs is not None and epochs_done % self.every_epochs == 0
        return asked or scheduled or (last and self.saved != (step, 0))  # the final state is saved too

    def save(self, state: TrainState, step: int, meta: dict[str, Any]) -> Location:
        self.saved, path = (step, meta["position"]), step_dir(self.dir, step)
        self.last = path
        sharded = is_sharded(state)
        if sharded:  # every rank writes its slice of the optimizer state (a collective; synchronous)
            if self.writer is not None:
                self.writer.wait()  # the previous checkpoint first: they are installed in order
            save_sharded(path, state, meta=meta)
        if not self.lead:
            return path
        pinned = {step_dir(self.dir, s) for s in self.callbacks.keep()}

        def then(_: Location) -> None:  # after the new checkpoint is in place, never before
            for old in list_checkpoints(self.dir)[:-self.keep_last] if self.keep_last else []:
                if old not in pinned:
                    remove_checkpoint(old)
            if isinstance(self.dir, RemotePath):  # what writers killed mid-checkpoint left (never committed)
                remove_incomplete(self.dir, below=step)
            if self.on_checkpoint is not None:
                self.on_checkpoint(path)

        if sharded:
            then(path)
        elif self.writer is not None:
            self.writer.save(path, state, meta=meta, then=then)
        else:
            then(save_checkpoint(path, state, meta=meta))
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # the last checkpoint is on disk when fit returns


def _limit(limit: int | float | None, total: int) -> int:
    if limit is None:
        return total
    if isinstance(limit, float):
        if not 0.0 < limit <= 1.0:
            raise ValueError(f"a fractional batch limit must be in (0, 1], got {limit}")
        return max(1, int(total * limit))
    if limit < 0:
        raise ValueError(f"a batch limit must be >= 0, got {limit}")
    return min(limit, total)


def _clone(state: TrainState) -> TrainState:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, state)

class _Fit:
    """One call of :meth:`Trainer.fit`: the run's position, history, callbacks, checkpoint policy and
    loggers (mutable, and never outliving the call; the Trainer itself stays a frozen configuration)."""

    def __init__(self, trainer: Trainer, train_step: Callable[..., Any], dm: DataModule, eval_step: Any,
                 hparams: Mapping[str, Any] | None, on_checkpoint: Callable[[Location], Any] | None) -> None:
        self.t, self.train_step, self.dm, self.eval_step = trainer, train_step, dm, eval_step
        self.hparams = _json_hparams(hparams)
        self.config: dict[str, Any] | None = None
        self.lead = distributed.rank() == 0  # only rank 0 writes logs and checkpoints
        self.callbacks = _Callbacks(trainer.callbacks)
        self.checkpoints = _Checkpoints(trainer, self.callbacks, self.lead, on_checkpoint) \
            if trainer.ckpt_dir is not None else None
        self.step_fn = train_step.donating() \
            if trainer.donate and isinstance(train_step, TrainStep | EnsembleTrainStep) else train_step
        self.split = dm.split_for("fit")
        self.max_epochs = trainer.max_epochs if trainer.max_epochs is not None else math.inf
        self.max_steps = trainer.max_steps if trainer.max_steps is not None else math.inf
        self.epoch, self.position, self.step = 0, 0, 0
        self.skip = 0  # elements of this epoch's dealt sequence left out (an elastic resume; see elastic.py)
        self.partial: dict[str, Any] | None = None  # a mid-epoch checkpoint's running sums
        self.history: list[Metrics] = []
        self.logged = {"epoch": 0, "step": 0}
        self.resumed = Resumable(None, None, None, ())
        self.stopped: str | None = None  # why training ended: max_epochs, max_steps, or the callback that stopped it
        self.finished_before = False  # resumed a run that had finished: nothing to train
        self.interrupted = 0  # the signal that stopped it
        self.loggers: list[Logger] = []
        self.val: Metrics = {}  # the latest validation metrics (for the progress bar)
        self.groups = frozenset({"train/"} | ({"val/"} if eval_step is not None else set()))
        self.claimed = contextlib.ExitStack()  # the run directory's claim, from start() until fit returns

    # -- start or resume ------------------------------------------------------------------------
    def start(self, state: TrainState) -> TrainState:
        t, dm = self.t, self.dm
        if is_sharded(state):  # (a previous fit's result): whole again, as every rank starts from rank 0's
            state = unshard(state)
        if isinstance(self.train_step, TrainStep | EnsembleTrainStep) and \
                not isinstance(self.train_step.optimizer, PerMember):
            check_state_matches(state, self.train_step.optimizer)
        dm.prepare()  # downloads once (rank 0 while the others wait), before any rank reads
        if t.run_dir is not None:
            self.run_dir = location(t.run_dir)
        else:
            self.run_dir = distributed.broadcast_object(next_version(Path("runs")) if self.lead else None)
        if self.lead and isinstance(self.run_dir, Path):  # (a remote directory exists once it holds a file)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.claimed.enter_context(claim(self.run_dir))  # one run at a time in a directory (released by fit)
        self.fingerprint = dm.fingerprint if self.checkpoints is not None else None  # a checkpoint records its data
        # Rank 0 reads the checkpoint; the others get its meta here and its state from the broadcast below
        # (so ranks need not share a file system for resuming).
        if self.checkpoints is not None and t.resume and self.lead:
            self.resumed = find_resumable(self.checkpoints.dir, state, pipeline_fingerprint=self.fingerprint)
        elif self.checkpoints is not None and self.lead and list_checkpoints(self.checkpoints.dir):
            log.warning("resume=False, but %s holds checkpoints of an earlier run (newest %s): this run's will be "
                        "mixed with them (move them aside first with fnlight.train.rundir.set_aside, or give another "
                        "ckpt_dir)", self.checkpoints.dir, list_checkpoints(self.checkpoints.dir)[-1].name)
        meta = self.resumed.meta
        if distributed.world_size() > 1:
            meta = distributed.broadcast_object(meta)
        if self.resumed.state is not None:
            state = self.resumed.state  # fresh tensors: nobody else holds them
        elif self.step_fn is not self.train_step and distributed.world_size() == 1:
            state = _clone(state)  # the loop donates only states it made itself (the broadcast makes new ones)
        state = device_put(state, t.torch_device)
        if distributed.world_size() > 1:
            state = distributed.broadcast(state)  # every rank starts from rank 0's state
        self.step = scalar_step(state)
        if meta is not None:
            # a mid-epoch checkpoint holds the partial sums of all ranks: rank 0 carries them on
            self.epoch = meta["epoch"]
            # the position on this number of ranks (translated when the checkpoint's differs)
            self.skip, self.position = elastic.resume(meta.get("data"), meta["position"], dm, self.split,
                                                      distributed.world_size())
            self.partial = meta["totals"] if self.lead else None
            self.callbacks.restore(meta["callbacks"])
            self.history, self.logged = list(meta["history"]), dict(meta["logged"])
            if self.checkpoints is not None:
                self.checkpoints.saved = (self.step, self.position)
            self.finished_before = self._finished(meta)
        self._say_where(meta)
        if self.finished_before:
            return state
        if self.step >= self.max_steps:
            self.stopped = "max_steps"
        if self.lead:
            self.loggers = [lg.open(self.run_dir, self.logged if meta is not None else None)
                            for lg in (t.loggers if t.loggers is not None else (CSVLogger(), JSONLLogger()))]
            if self.hparams is not None:
                for lg in self.loggers:
                    lg.log_hparams(self.hparams)
            if meta is not None:
                record_resume(self.run_dir, self.step, self.epoch, self.position, self.resumed.path)
            else:  # a fresh run in a reused directory (its logs start afresh too)
                with contextlib.suppress(FileNotFoundError):
                    (self.run_dir / RESUMES).unlink()
        return state

    def _finished(self, meta: Mapping[str, Any]) -> bool:
        """Whether the checkpoint resumed from ended a run that these limits would not continue."""
        reason = meta.get("finished")
        if isinstance(reason, str) and reason.startswith("stopped by"):
            self.stopped = reason  # a callback's decision stands (EarlyStopping's counters are in its state)
        elif self.epoch >= self.max_epochs:
            self.stopped = "max_epochs"
        elif self.step >= self.max_steps:
            self.stopped = "max_steps"
        return self.stopped is not None

    def _say_where(self, meta: Mapping[str, Any] | None) -> None:
        if not self.lead or self.checkpoints is None or not self.t.resume:
            return
        r = self.resumed
        # Damaged checkpoints: one warning line naming each skipped one and why, and where the run goes on.
        skipped = "; ".join(f"{path} ({why})" for path, why in r.skipped)
        plural = "s" if len(r.skipped) > 1 else ""
        if r.path is None and r.skipped:
            log.warning("skipped the damaged checkpoint%s %s; every checkpoint in %s is damaged: starting afresh",
                        plural, skipped, self.checkpoints.dir)
        elif r.path is not None and meta is not None:
            where = f"step {self.step}, epoch {self.epoch}" + (f", batch {self.position}" if self.position else "")
            if self.finished_before:
                log.info("already finished at step %d (%s): nothing to train (%s; raise max_epochs or max_steps "
                         "to continue it)", self.step, _reason_text(self.stopped), r.path)
            elif r.skipped:
                log.warning("skipped the damaged checkpoint%s %s; resuming from %s (%s)", plural, skipped, r.path,
                            where)
            else:
                log.info("resuming from %s (%s)", r.path, where)
            data = meta.get("data") or {}
            if self.skip and data.get("world_size") != distributed.world_size():
                log.info("the checkpoint was written by %s ranks, this run has %d: the rest of epoch %d is dealt "
                         "out from its element %d on (see fnlight.train.elastic)", data.get("world_size"),
                         distributed.world_size(), self.epoch, self.skip)

    # -- the epochs ------------------------------------------------------------------------------
    def train_epoch(self, state: TrainState, signals: _SignalFlag) -> TrainState:
        """Train from the current position to the end of the epoch (or a stop), then close the epoch:
        validate, call the callbacks, log, save as the policy says."""
        t, dm, split, epoch = self.t, self.dm, self.split, self.epoch
        ctx = FitContext(t, self.train_step, dm, self.run_dir, epoch, self.groups)
        mid = self.position or self.skip
        totals, t0 = _WeightedMean.restore(self.partial if mid else None), time.perf_counter()
        n = _limit(t.limit_train_batches, dm.num_batches(split, skip=self.skip))
        if n == 0 and t.max_epochs is None:
            raise ValueError(f"the {split!r} split yields no training batches (after limit_train_batches),"
                             " so max_steps can never be reached")
        done = min(self.position, n)  # batches of this epoch trained so far
        batches = dm.batches(split, epoch, start=done, skip=self.skip)
        with batches, t._progress(n - done, f"epoch {epoch}") as bar:
            if self.val:  # the latest validation metrics, next to the loss
                bar.set_postfix({f"val/{k}": f"{v:.4g}" for k, v in self.val.items()}, refresh=False)
            it = iter(batches)
            for i in range(done, n):
                with noted(lambda: _data_where(dm, split, epoch, i)):  # noqa: B023
                    batch = next(it, None)
                if batch is None:
                    break
                where = f"at step {self.step + 1}, epoch {epoch}, batch {i} of split {split!r}"
                with noted(lambda: f"in the train step ({_fn_name(self.train_step, 'loss_fn')}) {where}"):  # noqa: B023
                    state, metrics = self.step_fn(state, device_put(batch, t.torch_device))
                self.step += 1
                totals.add(metrics, batch_size(batch))
                extra, stopper = self.callbacks.signal("on_step", state, metrics, ctx, where)
                state = _edited(state, extra)
                extra, stopper = self._agree(extra, stopper, signals)
                if stopper is None and self.step >= self.max_steps:
                    stopper = "max_steps"
                if self.step % t.log_every_n_steps == 0:
                    row = _reduce_row(member_metrics(metrics), batch_size(batch))
                    row |= dict(extra.log)
                    self._log("step", row)
                    bar.set_postfix({"loss": f"{row.get('loss', float('nan')):.4g}",
                                     **{f"val/{k}": f"{v:.4g}" for k, v in self.val.items()}}, refresh=False)
                if self.eval_step is not None and t.val_every_n_steps and self.step % t.val_every_n_steps == 0:
                    val = self._validate(state)
                    self._log("step", {f"val/{k}": v for k, v in val.items()})
                done = i + 1
                bar.update()
                self.stopped = self.stopped or stopper
                # Stopped mid-epoch (a signal, max_steps, a callback): save where, so that a resume (say with a
                # larger max_steps) finishes this epoch instead of skipping the rest of it.
                stop_here = self.interrupted or (self.stopped and done < n)
                if self.checkpoints is not None and (stop_here or self.checkpoints.due_after_step(self.step,
                                                                                                  extra.save)):
                    self._save(state, epoch, done, totals)
                if self.interrupted or self.stopped:
                    break
        if self.interrupted:
            self.position = done
            return state
        self.position, self.partial, self.skip = 0, None, 0
        row = {f"train/{k}": v for k, v in totals.reduced().result().items()}
        row["time_s"] = time.perf_counter() - t0
        if self.eval_step is not None and (epoch + 1) % t.val_every_n_epochs == 0:
            row |= {f"val/{k}": v for k, v in self._validate(state).items()}
        extra, stopper = self.callbacks.signal("on_epoch", state, row, ctx, f"at the end of epoch {epoch}")
        state = _edited(state, extra)
        extra, stopper = self._agree(extra, stopper, signals, stop=self.stopped is not None)
        self.stopped = self.stopped or stopper
        row |= dict(extra.log)
        self.history.append({"epoch": epoch, "step": self.step, **row})
        self._log("epoch", row)
        self._progress_line(epoch, row, bar_shown=not bar.disable)
        self.epoch += 1
        if self.stopped is None and self.epoch >= self.max_epochs:
            self.stopped = "max_epochs"
        last = self.stopped is not None or self.interrupted != 0
        if self.checkpoints is not None and done == n and \
                self.checkpoints.due_after_epoch(self.epoch, self.step, extra.save, last):
            self._save(state, self.epoch, 0, _WeightedMean())
        if self.stopped and self.stopped.startswith("stopped by") and self.lead:
            log.info("%s at step %d, epoch %d", self.stopped, self.step, epoch)
        return state

    def _agree(self, extra: Signal, stopper: str | None, signals: _SignalFlag,
               stop: bool = False) -> tuple[Signal, str | None]:
        """What the callbacks (and signals) asked, agreed by all ranks: step metrics differ between ranks, and
        so may their wishes; a rank that stopped or saved alone would leave the others waiting in a collective."""
        if signals.received and not self.interrupted:
            self.interrupted = signals.received
        if distributed.world_size() > 1:
            flags = [float(stopper is not None or extra.stop or stop), float(extra.save)]
            flags += [float(self.interrupted == s) for s in self.t.signal_numbers]
            n_stop, n_save, *got = distributed.all_reduce_sum(flags)
            extra = extra._replace(stop=n_stop > 0, save=n_save > 0)
            if extra.stop and stopper is None and not stop:
                stopper = "stopped by a callback on another rank"
            # a signal on any rank stops every rank at this same step
            self.interrupted = next((s for s, c in zip(self.t.signal_numbers, got, strict=True) if c > 0), 0)
        if stopper is not None:
            stopper = stopper if stopper.startswith("stopped by") else f"stopped by {stopper}"
        return extra, stopper

    def _validate(self, state: TrainState) -> Metrics:
        self.val = self.t._evaluate(state, self.eval_step, self.dm, "validate", self.t.limit_val_batches)
        return self.val

    def _save(self, state: TrainState, epoch: int, position: int, totals: _WeightedMean) -> None:
        assert self.checkpoints is not None
        totals = totals.reduced() if position else totals  # (a collective: every rank comes here)
        data = elastic.record(self.dm, self.split, epoch, self.skip, position, distributed.world_size())
        meta = {"epoch": epoch, "position": position, "data": data, "callbacks": self.callbacks.snapshot(),
                "history": self.history, "totals": totals.snapshot(), "logged": self.logged, "finished": self.stopped,
                "hparams": self.hparams, **({"config": self.config} if self.config is not None else {}),
                "pipeline": {"fingerprint": self.fingerprint, "description": self.dm.describe()}}
        for lg in self.loggers:  # the rows this checkpoint counts are stored before it exists (remote logs buffer)
            if callable(flush := getattr(lg, "flush", None)):  # (a logger of the user's may not derive from Logger)
                flush()
        self.checkpoints.save(state, self.step, meta)

    def _log(self, kind: str, values: Mapping[str, float]) -> None:
        self.logged[kind] += 1
        row = {"kind": kind, "step": self.step, "epoch": self.epoch, **values}
        for lg in self.loggers:
            lg.log(row)

    def _progress_line(self, epoch: int, row: Mapping[str, float], bar_shown: bool) -> None:
        """One line per epoch through ``logging`` (logger ``fnlight``) when no progress bar is shown."""
        if self.lead and not bar_shown:
            values = "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "time_s")
            progress_log.info("epoch %d (step %d): %s  (%.1f s)", epoch, self.step, values, row.get("time_s", 0.0))

    # -- close ---------------------------------------------------------------------------------
    def close(self, ended: bool = True) -> None:
        try:
            if self.checkpoints is not None:
                self.checkpoints.close()
        finally:
            last = self.checkpoints.last if self.checkpoints is not None else None
            try:
                if ended and last is not None and last.exists():
                    for lg in self.loggers:
                        lg.log_checkpoint(last)
            finally:
                for lg in self.loggers:
                    lg.close()
        if self.interrupted and self.lead:
            log.warning("interrupted by %s at step %d, epoch %d; %s", signal.Signals(self.interrupted).name,
                        self.step, self.epoch, f"checkpoint {self.checkpoints.last}" if self.checkpoints is not None
                        else "nothing saved (no ckpt_dir)")


def _then(f: Callable[[Any], Any], g: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda x: g(f(x))


def _edited(state: TrainState, extra: Signal) -> TrainState:
    """The state with the optimizer-state edit the callbacks asked for (ReduceLROnPlateau, LRFinder)."""
    return state if extra.edit_opt_state is None else state.replace(opt_state=extra.edit_opt_state(state.opt_state))


def _data_where(dm: DataModule, split: str, epoch: int, i: int, stage: str | None = None) -> str:
    """Where producing a batch failed; with the sample, when one sample alone fails (a per-sample transform).

    Only called on an error: it reads the batch's samples again, one by one, to find the one that fails."""
    text = f"while producing batch {i} of split {split!r} " + (f"for {stage}" if stage else f"(epoch {epoch})") + \
        " in the data pipeline (a transform, collate or reader)"
    with contextlib.suppress(Exception):  # (never hide the error being reported)
        ds = dm.dataset(split)
        for j in dm.index_batches(split, epoch)[i].tolist():
            try:
                ds[j]
            except Exception:  # noqa: BLE001
                return text + f"; it fails on sample {j} of the split"
    return text


def _reason_text(reason: str | None) -> str:
    return {"max_epochs": "max_epochs reached", "max_steps": "max_steps reached"}.get(reason or "", reason or "")


def _fn_name(step: Any, attr: str) -> str:
    fn = getattr(step, attr, None)
    name = getattr(fn, "__qualname__", None) if fn is not None else None
    return f"{attr} {name}" if name else getattr(step, "__qualname__", type(step).__name__)


def _json_hparams(hparams: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``hparams`` as it will read back from a checkpoint (JSON), or a TypeError naming the value that is not."""
    if hparams is None:
        return None
    if not isinstance(hparams, Mapping):
        raise TypeError(f"hparams must be a mapping of names to JSON-able values, got {type(hparams).__name__}")
    for k, v in hparams.items():
        try:
            json.dumps(v, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"hparams[{k!r}] is a {type(v).__name__}, which a checkpoint's JSON cannot hold ({e}): "
                            "give numbers, strings, lists or dicts of them (e.g. its name)") from None
    return json.loads(json.dumps({str(k): v for k, v in hparams.items()}))
