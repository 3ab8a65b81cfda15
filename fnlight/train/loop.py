"""The ``Trainer``: a frozen configuration whose methods thread a state through
fit / validate / test / predict. It holds no mutable state; the training loop
is one short function (``fit``) that reads top to bottom, with every callback
and logger call visible in it.

Example:
    >>> trainer = fnlight.Trainer(max_epochs=5, run_dir="runs/digits")
    >>> result = trainer.fit(state, train_step, dm, eval_step=eval_step)
    >>> trainer.test(result.state, eval_step, dm)
    {'loss': 0.08, 'acc': 0.97}
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..data.datamodule import DataModule
from ..tree import device_put, tree_leaves, tree_map
from .callbacks import Callback, FitContext, Signal, to_float
from .checkpoint import (
    AsyncCheckpointer,
    find_resumable,
    list_checkpoints,
    save_checkpoint,
    step_dir,
)
from .loggers import CSVLogger, JSONLLogger, Logger
from .state import TrainState
from .step import TrainStep, _batch_size

Metrics = dict[str, float]


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns: the final state, one metrics row per epoch, the run directory."""

    state: TrainState
    history: list[Metrics]
    run_dir: Path
    callback_states: tuple[Any, ...] = ()
    callbacks: tuple[Callback, ...] = ()
    ckpt_dir: Path | None = None

    def callback_state(self, callback: Callback) -> Any:
        """The final state of one of the trainer's callbacks (the object itself)."""
        for cb, cb_state in zip(self.callbacks, self.callback_states, strict=True):
            if cb is callback:
                return cb_state
        raise ValueError(f"{callback!r} is not one of this fit's callbacks")


class _WeightedMean:
    """Per-key means over batches weighted by batch size, summed on the device (no sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: Mapping[str, torch.Tensor], n: int) -> None:
        for k, v in metrics.items():
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


def _resume_point(ckpt_dir: Path, like: TrainState, fingerprint: str) -> tuple[TrainState, dict[str, Any]] | None:
    """The newest checkpoint that loads; damaged ones are skipped, said in one line on the "fnlight" logger."""
    found = find_resumable(ckpt_dir, like, pipeline_fingerprint=fingerprint)
    if found.message():
        logging.getLogger("fnlight").warning(found.message())
    return (found.state, found.meta) if found.path is not None else None


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


def _next_version(root: Path) -> Path:
    """``root/version_<n>`` with n one more than the largest existing (as Lightning)."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        path = root / f"version_{n}"
        try:
            path.mkdir()  # atomic: two runs never share a directory
            return path
        except FileExistsError:
            n += 1


def _clone(state: TrainState) -> TrainState:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, state)


@contextlib.contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms and friends for the duration of a call.

    On CUDA some ops have no deterministic implementation and then raise (torch
    names them); cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before its first use.
    """
    if not on:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    had_cublas = "CUBLAS_WORKSPACE_CONFIG" in os.environ
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if not had_cublas:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@dataclass(frozen=True)
class Trainer:
    """A frozen training configuration.

    Args:
        max_epochs: stop after this many epochs (None: no limit).
        max_steps: stop after this many steps (None: no limit); whichever limit comes first.
        val_every_n_epochs: validate after every n-th epoch (when given an eval step).
        val_every_n_steps: also validate every n steps (logged as step rows).
        limit_train_batches: an int (batches) or a float (fraction of an epoch).
        limit_val_batches: the same for validation.
        limit_test_batches: the same for testing.
        limit_predict_batches: the same for prediction.
        callbacks: :class:`~fnlight.train.callbacks.Callback` objects.
        loggers: default CSV + JSONL in the run directory.
        run_dir: where logs (and checkpoints) go; default ``runs/version_<n>``.
        device: where the state and batches live (default: CUDA if available).
        progress: a progress bar (default: when stderr is a terminal).
        seed: overrides the DataModule's data seed (shuffles, augmentations).
        deterministic: run with ``torch.use_deterministic_algorithms(True)``, cuDNN's
            deterministic mode (no autotuner) and ``CUBLAS_WORKSPACE_CONFIG``; an op
            without a deterministic CUDA kernel then raises. Other GPUs, library
            versions and NCCL topologies may still round differently (see the
            training guide, "Determinism").
        log_every_n_steps: how often step rows are logged (each one reads the
            metrics on the host).
        donate: let the loop reuse the memory of states it has passed on (it
            copies the state it was given once, so the caller's state is untouched).
        ckpt_dir: where checkpoints go (``step_<n>`` directories); None: none.
        ckpt_every_n_steps: save every n steps (mid-epoch included).
        ckpt_every_n_epochs: save after every n-th epoch (default 1 when only
            ``ckpt_dir`` is given). Whatever the schedule, the state where
            training stops (max_epochs, max_steps, mid-epoch included, or a
            callback) is saved too.
        keep_last: keep only the newest k checkpoints (and those a callback such
            as :class:`~fnlight.train.callbacks.ModelCheckpoint` keeps).
        async_save: write checkpoints in a background thread; the loop blocks
            only while the state is copied to host memory (see
            :class:`~fnlight.train.checkpoint.AsyncCheckpointer`).
        resume: start from the newest valid checkpoint in ``ckpt_dir`` (its
            state, epoch, position in the epoch, callback states and history), so
            an interrupted run ends bitwise where an uninterrupted one would.
    """

    max_epochs: int | None = 1
    max_steps: int | None = None
    val_every_n_epochs: int = 1
    val_every_n_steps: int | None = None
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    limit_test_batches: int | float | None = None
    limit_predict_batches: int | float | None = None
    callbacks: tuple[Callback, ...] = ()
    loggers: tuple[Logger, ...] | None = None
    run_dir: str | os.PathLike | None = None
    device: str | None = None
    progress: bool | None = None
    seed: int | None = None
    deterministic: bool = False
    log_every_n_steps: int = 50
    donate: bool = True
    ckpt_dir: str | os.PathLike | None = None
    ckpt_every_n_steps: int | None = None
    ckpt_every_n_epochs: int | None = None
    keep_last: int | None = None
    async_save: bool = False
    resume: bool = True

    def __post_init__(self) -> None:
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("give max_epochs or max_steps (or both); otherwise training never ends")
        for name in ("max_epochs", "max_steps", "val_every_n_epochs", "val_every_n_steps", "log_every_n_steps",
                     "ckpt_every_n_steps", "ckpt_every_n_epochs", "keep_last"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)
                                  or v < (0 if name.startswith("max") else 1)):
                raise ValueError(f"{name} must be a {'non-negative' if name.startswith('max') else 'positive'} "
                                 f"int, got {v!r}")
        object.__setattr__(self, "callbacks", tuple(self.callbacks))

    # -- helpers ----------------------------------------------------------------
    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _datamodule(self, dm: DataModule) -> DataModule:
        if not isinstance(dm, DataModule):
            raise TypeError(f"expected a fnlight DataModule, got {type(dm).__name__}")
        changes: dict[str, Any] = {"device": str(self.torch_device)}
        if self.seed is not None:
            changes["seed"] = self.seed
        return dm.replace(**changes)

    def _progress(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        show = (sys.stderr.isatty() if self.progress is None else self.progress) and distributed.rank() == 0
        return tqdm(total=total, desc=desc, leave=False, disable=not show, dynamic_ncols=True)

    @staticmethod
    def _batches(dm: DataModule, split: str, epoch: int, limit: int | float | None) -> tuple[Any, int]:
        it = dm.batches(split, epoch)
        return it, _limit(limit, len(it))

    # -- the loop -----------------------------------------------------------------
    def fit(self, state: TrainState, train_step: Callable[[TrainState, Any], tuple[TrainState, Any]],
            datamodule: DataModule, eval_step: Callable[[TrainState, Any], Any] | None = None) -> FitResult:
        """Train ``state`` with ``train_step`` on the fit split of ``datamodule``.

        Returns the final state and one metrics row per epoch (``train/...`` means
        weighted by batch size, and ``val/...`` when ``eval_step`` is given).
        """
        dm = self._datamodule(datamodule)
        dm.prepare()  # downloads once (rank 0 while the others wait), before any rank reads
        lead = distributed.rank() == 0  # only rank 0 writes logs and checkpoints
        if self.run_dir is not None:
            run_dir = Path(self.run_dir)
        else:
            run_dir = distributed.broadcast_object(_next_version(Path("runs")) if lead else None)
        if lead:
            run_dir.mkdir(parents=True, exist_ok=True)
        step_fn = train_step.donating() if self.donate and isinstance(train_step, TrainStep) else train_step
        cb_states = [cb.init() for cb in self.callbacks]
        split, history = dm.split_for("fit"), []
        epoch, position, partial = 0, 0, None
        ckpt_dir = Path(self.ckpt_dir) if self.ckpt_dir is not None else None
        every_epochs = self.ckpt_every_n_epochs or (1 if ckpt_dir and not self.ckpt_every_n_steps else None)
        fingerprint = dm.fingerprint if ckpt_dir is not None else None  # a checkpoint records its data
        # Rank 0 reads the checkpoint; the others get its meta here and its state from the broadcast below
        # (so ranks need not share a file system for resuming).
        found = _resume_point(ckpt_dir, state, fingerprint) if ckpt_dir is not None and self.resume and lead \
            else None
        meta = found[1] if found is not None else None
        if distributed.world_size() > 1:
            meta = distributed.broadcast_object(meta)
        if found is not None:
            state = found[0]  # fresh tensors: nobody else holds them
        elif step_fn is not train_step and distributed.world_size() == 1:
            state = _clone(state)  # the loop donates only states it made itself (the broadcast makes new ones)
        if meta is not None:
            # a mid-epoch checkpoint holds the partial sums of all ranks: rank 0 carries them on
            epoch, position, partial = meta["epoch"], meta["position"], meta["totals"] if lead else None
            saved = meta["callbacks"]  # by callback identity, so adding or removing callbacks is fine
            cb_states = [saved.get(k, s) for k, s in zip(self._callback_ids(), cb_states, strict=True)]
            history = list(meta["history"])
        state = device_put(state, self.torch_device)
        if distributed.world_size() > 1:
            state = distributed.broadcast(state)  # every rank starts from rank 0's state
        global_step = int(state.step)
        logged = dict(meta["logged"]) if meta is not None else {"epoch": 0, "step": 0}
        loggers = [lg.open(run_dir, logged if meta is not None else None)
                   for lg in (self.loggers if self.loggers is not None else (CSVLogger(), JSONLLogger()))] \
            if lead else []

        writer = AsyncCheckpointer() if ckpt_dir is not None and self.async_save and lead else None
        saved_at = -1

        def save(epoch: int, position: int, totals: _WeightedMean) -> None:
            nonlocal saved_at
            totals = totals.reduced() if position else totals  # (a collective: every rank comes here)
            saved_at = global_step
            if not lead:
                return
            meta = {"epoch": epoch, "position": position, "callbacks": dict(zip(self._callback_ids(), cb_states,
                                                                                strict=True)), "history": history,
                    "totals": totals.snapshot(), "logged": logged,
                    "pipeline": {"fingerprint": fingerprint, "description": dm.describe()}}
            pinned = {step_dir(ckpt_dir, s) for cb, c in zip(self.callbacks, cb_states, strict=True)
                      for s in cb.keep(c)}

            def prune(_: Path) -> None:  # after the new checkpoint is in place, never before
                for old in list_checkpoints(ckpt_dir)[:-self.keep_last] if self.keep_last else []:
                    if old not in pinned:
                        shutil.rmtree(old, ignore_errors=True)

            path = step_dir(ckpt_dir, global_step)
            if writer is not None:
                writer.save(path, state, meta=meta, then=prune)
            else:
                prune(save_checkpoint(path, state, meta=meta))

        max_epochs = self.max_epochs if self.max_epochs is not None else math.inf
        max_steps = self.max_steps if self.max_steps is not None else math.inf
        stop = global_step >= max_steps
        try:
            with _deterministic(self.deterministic):
                while epoch < max_epochs and not stop:
                    ctx = FitContext(self, train_step, dm, run_dir, epoch)
                    totals, t0 = _WeightedMean.restore(partial if position else None), time.perf_counter()
                    n = _limit(self.limit_train_batches, dm.num_batches(split))
                    if n == 0 and self.max_epochs is None:
                        raise ValueError(f"the {split!r} split yields no training batches (after limit_train_batches),"
                                         " so max_steps can never be reached")
                    done = min(position, n)  # batches of this epoch trained so far
                    batches = dm.batches(split, epoch, start=done)
                    with batches, self._progress(n - done, f"epoch {epoch}") as bar:
                        for i, batch in zip(range(done, n), batches, strict=False):
                            state, metrics = step_fn(state, device_put(batch, self.torch_device))
                            global_step += 1
                            totals.add(metrics, _batch_size(batch))
                            extra = self._signal(cb_states, "on_step", state, metrics, ctx)
                            if extra.edit_opt_state is not None:
                                state = state.replace(opt_state=extra.edit_opt_state(state.opt_state))
                            stop = stop or extra.stop
                            if self.callbacks and distributed.world_size() > 1:
                                # step metrics differ between ranks, so may the callbacks' wishes: a rank that
                                # stopped or saved alone would leave the others waiting in a collective
                                n_stop, n_save = distributed.all_reduce_sum([float(stop), float(extra.save)])
                                stop, extra = n_stop > 0, extra._replace(save=n_save > 0)
                            if global_step % self.log_every_n_steps == 0:
                                row = _reduce_row({k: to_float(v) for k, v in metrics.items()}, _batch_size(batch))
                                row |= dict(extra.log)
                                self._log(loggers, logged, "step", global_step, epoch, row)
                                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", refresh=False)
                            if (eval_step is not None and self.val_every_n_steps
                                    and global_step % self.val_every_n_steps == 0):
                                val = self._evaluate(state, eval_step, dm, "validate", self.limit_val_batches)
                                self._log(loggers, logged, "step", global_step, epoch,
                                          {f"val/{k}": v for k, v in val.items()})
                            if ckpt_dir is not None and (extra.save or (
                                    self.ckpt_every_n_steps and global_step % self.ckpt_every_n_steps == 0)):
                                save(epoch, i + 1, totals)
                            bar.update()
                            done = i + 1
                            if stop or global_step >= max_steps:
                                stop = True
                                break
                    if done < n and ckpt_dir is not None and saved_at != global_step:
                        # Stopped mid-epoch (max_steps or a callback): save where, so that a resume (say with
                        # a larger max_steps) finishes this epoch instead of skipping the rest of it.
                        save(epoch, done, totals)
                    position = 0
                    row = {f"train/{k}": v for k, v in totals.reduced().result().items()}
                    row["time_s"] = time.perf_counter() - t0
                    if eval_step is not None and (epoch + 1) % self.val_every_n_epochs == 0:
                        val = self._evaluate(state, eval_step, dm, "validate", self.limit_val_batches)
                        row |= {f"val/{k}": v for k, v in val.items()}
                    extra = self._signal(cb_states, "on_epoch", state, row, ctx)
                    if extra.edit_opt_state is not None:
                        state = state.replace(opt_state=extra.edit_opt_state(state.opt_state))
                    stop = distributed.any_true(stop or extra.stop)  # (the same on every rank: rows are reduced)
                    row |= dict(extra.log)
                    history.append({"epoch": epoch, "step": global_step, **row})
                    self._log(loggers, logged, "epoch", global_step, epoch, row)
                    epoch += 1
                    scheduled = every_epochs is not None and epoch % every_epochs == 0
                    last = (stop or epoch >= max_epochs) and saved_at != global_step  # the final state is saved too
                    if ckpt_dir is not None and done == n and (extra.save or scheduled or last):
                        save(epoch, 0, _WeightedMean())
        finally:
            try:
                if writer is not None:
                    writer.close()  # the last checkpoint is on disk when fit returns
            finally:
                for lg in loggers:
                    lg.close()
        return FitResult(state, history, run_dir, tuple(cb_states), self.callbacks, ckpt_dir)

    def _callback_ids(self) -> list[str]:
        """``<type>#<n>``: the n-th callback of that type (what checkpoints key callback states by)."""
        seen: dict[str, int] = {}
        ids = []
        for cb in self.callbacks:
            name = type(cb).__qualname__
            ids.append(f"{name}#{seen.get(name, 0)}")
            seen[name] = seen.get(name, 0) + 1
        return ids

    def _signal(self, cb_states: list[Any], hook: str, state: TrainState, metrics: Mapping[str, Any],
                ctx: FitContext) -> Signal:
        """Call every callback's ``hook`` in order; merge what they ask for."""
        stop, save, log, edit = False, False, {}, None
        for i, cb in enumerate(self.callbacks):
            cb_states[i], sig = getattr(cb, hook)(cb_states[i], state, metrics, ctx)
            stop, save, log = stop or sig.stop, save or sig.save, {**log, **sig.log}
            if sig.edit_opt_state is not None:  # in callback order
                edit = sig.edit_opt_state if edit is None else \
                    (lambda f, g: lambda s: g(f(s)))(edit, sig.edit_opt_state)
        return Signal(stop, save, log, edit)

    @staticmethod
    def _log(loggers: list[Logger], logged: dict[str, int], kind: str, step: int, epoch: int,
             values: Mapping[str, float]) -> None:
        logged[kind] += 1
        row = {"kind": kind, "step": step, "epoch": epoch, **values}
        for lg in loggers:
            lg.log(row)

    # -- evaluation -----------------------------------------------------------
    def _evaluate(self, state: TrainState, eval_step: Callable[[TrainState, Any], Any], dm: DataModule,
                  stage: str, limit: int | float | None) -> Metrics:
        split = dm.split_for(stage)
        totals = _WeightedMean()
        batches, n = self._batches(dm, split, 0, limit)
        with batches, self._progress(n, stage) as bar:
            for _, batch in zip(range(n), batches, strict=False):
                totals.add(eval_step(state, device_put(batch, self.torch_device)), _batch_size(batch))
                bar.update()
        return totals.reduced().result()

    def validate(self, state: TrainState, eval_step: Callable[[TrainState, Any], Any],
                 datamodule: DataModule) -> Metrics:
        """Metrics of ``eval_step`` on the validate split, averaged weighted by batch size."""
        with _deterministic(self.deterministic):
            return self._evaluate(device_put(state, self.torch_device), eval_step, self._datamodule(datamodule),
                                  "validate", self.limit_val_batches)

    def test(self, state: TrainState, eval_step: Callable[[TrainState, Any], Any], datamodule: DataModule) -> Metrics:
        """Metrics of ``eval_step`` on the test split, averaged weighted by batch size."""
        with _deterministic(self.deterministic):
            return self._evaluate(device_put(state, self.torch_device), eval_step, self._datamodule(datamodule),
                                  "test", self.limit_test_batches)

    def predict(self, state: TrainState, predict_fn: Callable[[TrainState, Any], Any],
                datamodule: DataModule) -> Any:
        """``predict_fn(state, batch)`` over the predict split, outputs concatenated along dim 0.

        Across ranks (each reading its ``shard()``), every rank returns the outputs
        of all ranks in the split's order, the samples that ``shard`` repeated as
        padding kept once; ``predict_fn`` must then return per-sample tensors
        (first dimension: the batch).

        Example:
            >>> logits = trainer.predict(state, lambda s, b: model_fn_of(s)(b[0]), dm)
        """
        dm = self._datamodule(datamodule)
        state = device_put(state, self.torch_device)
        split = dm.split_for("predict")
        outs = []
        batches, n = self._batches(dm, split, 0, self.limit_predict_batches)
        with _deterministic(self.deterministic), torch.no_grad(), batches, self._progress(n, "predict") as bar:
            for _, batch in zip(range(n), batches, strict=False):
                outs.append(predict_fn(state, device_put(batch, self.torch_device)))
                bar.update()
        if distributed.world_size() > 1:
            return self._gather_predictions(outs, dm.index_batches(split, 0)[:n])
        if not outs:
            return []
        return tree_map(lambda *xs: torch.cat(xs) if xs[0].dim() else torch.stack(xs), *outs)

    @staticmethod
    def _gather_predictions(outs: list[Any], index_batches: list[torch.Tensor]) -> Any:
        """All ranks' per-sample outputs, sorted by sample index, each index once."""
        for out, idx in zip(outs, index_batches, strict=True):
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != len(idx):
                    raise ValueError("predict across ranks puts the outputs back in the split's order, sample by "
                                     "sample: predict_fn must return tensors whose first dimension is the batch, got "
                                     f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))} for a batch of {len(idx)}")
        if not outs:
            raise ValueError("this rank has no predict batches: shard() the predict split so that every rank "
                             "gets its part")
        local = tree_map(lambda *xs: torch.cat(xs), *outs)
        device = tree_leaves(local)[0].device
        idx = distributed.all_gather_cat(torch.cat(index_batches).to(device))
        order = torch.sort(idx, stable=True).indices
        sorted_idx = idx[order]
        first = torch.ones_like(sorted_idx, dtype=torch.bool)
        first[1:] = sorted_idx[1:] != sorted_idx[:-1]  # padding repeats a sample: keep it once
        pick = order[first]
        return tree_map(lambda t: distributed.all_gather_cat(t)[pick], local)
