"""The ``Trainer``: a frozen configuration whose methods thread a state through
fit / validate / test / predict. It holds no mutable state; the training loop
is one short function (``fit``) that reads top to bottom, with every callback
and logger call visible in it.

Example:
    ```python
    trainer = fnlight.Trainer(max_epochs=5, run_dir="runs/digits")
    result = trainer.fit(state, train_step, dm, eval_step=eval_step)
    trainer.test(result.state, eval_step, dm)
    # {'loss': 0.08, 'acc': 0.97}
    ```
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import distributed
from .._remote import Location
from ..data.datamodule import DataModule
from ..tree import batch_size, device_put, tree_leaves, tree_map
from ._fit import _data_where, _Fit, _fn_name, _json_hparams, _limit, _SignalFlag, _WeightedMean
from .callbacks import Callback
from .checks import noted
from .loggers import Logger
from .state import TrainState

Metrics = dict[str, float]
log = logging.getLogger("fnlight")  # resume, early stop and interrupt lines


class _DefaultHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Prints fnlight's lines on stderr while nobody has configured logging (as ``logging.lastResort``
    does for warnings, but from INFO): once the root logger or ``fnlight`` has another handler, that
    one decides. ``logging.getLogger("fnlight").setLevel(logging.WARNING)`` keeps only warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("fnlight: %(message)s"))

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr  # the current one (tests and notebooks replace sys.stderr)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers or any(h is not self for h in log.handlers):
            return
        super().emit(record)


if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)
if not any(isinstance(h, _DefaultHandler) for h in log.handlers):
    log.addHandler(_DefaultHandler())


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns: the final state, one metrics row per epoch, the run directory."""

    state: TrainState
    history: list[Metrics]
    run_dir: Location
    callback_states: tuple[Any, ...] = ()
    callbacks: tuple[Callback, ...] = ()
    ckpt_dir: Location | None = None
    #: the checkpoint this fit resumed from (None: it started afresh)
    resumed_from: Location | None = None
    #: why training ended: "max_epochs", "max_steps" or "stopped by <callback>"
    finished: str | None = None
    #: the run had finished before this call, which trained nothing
    already_finished: bool = False

    def callback_state(self, callback: Callback) -> Any:
        """The final state of one of the trainer's callbacks (the object itself)."""
        for cb, cb_state in zip(self.callbacks, self.callback_states, strict=True):
            if cb is callback:
                return cb_state
        raise ValueError(f"{callback!r} is not one of this fit's callbacks")


class Interrupted(Exception):
    """``fit`` was stopped by a signal (SIGTERM, SIGINT, SIGUSR1...) after saving where it was.

    Raised after the checkpoint is on disk and the loggers are closed; ``fit`` on the same
    ``ckpt_dir`` resumes from it bitwise. ``exit_code`` is what a shell reports for the signal
    (128 + its number: 143 for SIGTERM, 130 for SIGINT).

    Example:
        ```python
        try:
            trainer.fit(state, train_step, dm)
        except fnlight.train.Interrupted as e:
            print(e.signal.name, e.step, e.checkpoint)
            sys.exit(e.exit_code)
        ```
    """

    def __init__(self, signum: int, step: int, epoch: int, position: int, checkpoint: Location | None) -> None:
        self.signal, self.step, self.epoch, self.position, self.checkpoint = \
            signal.Signals(signum), step, epoch, position, checkpoint
        where = f"step {step}, epoch {epoch}" + (f" (batch {position} of the epoch)" if position else "")
        saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint (the Trainer has no ckpt_dir)"
        super().__init__(f"interrupted by {self.signal.name} at {where}; {saved}")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal)


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
        run_dir: where logs (and checkpoints) go; default ``runs/version_<n>``. A URL
            (``s3://bucket/runs/a``, ``gs://``, ``memory://``; ``pip install 'fnlight[remote]'``)
            puts the logs in an object store, as chunk objects (see the resume guide).
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
        ckpt_dir: where checkpoints go (``step_<n>`` directories); None: none. A URL
            keeps them in an object store, each committed by a manifest written last.
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
        handle_signals: signals that stop ``fit`` cleanly: the step in progress
            finishes, a checkpoint is saved at that position (mid-epoch), the
            loggers are flushed and :class:`Interrupted` is raised (a second one
            aborts at once). Default SIGTERM (preemption: SLURM, Kubernetes, spot
            instances), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's warning before a
            requeue); ``()`` leaves signals alone. The previous handlers are back
            when ``fit`` returns. With several ranks, a signal on any rank stops
            them all at the same step.
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
    handle_signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1")

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
        object.__setattr__(self, "handle_signals", tuple(self.handle_signals or ()))
        for name in self.handle_signals:
            if not isinstance(name, str) or not name.startswith("SIG") or not hasattr(signal, name):
                raise ValueError(f"handle_signals: unknown signal {name!r} (give names such as 'SIGTERM', or () to "
                                 "leave signals alone)")

    @property
    def signal_numbers(self) -> tuple[int, ...]:
        """The numbers of ``handle_signals`` (those this platform has)."""
        return tuple(int(getattr(signal, name)) for name in self.handle_signals)

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
            datamodule: DataModule, eval_step: Callable[[TrainState, Any], Any] | None = None, *,
            hparams: Mapping[str, Any] | None = None,
            on_checkpoint: Callable[[Location], Any] | None = None,
            config: Mapping[str, Any] | None = None) -> FitResult:
        """Train ``state`` with ``train_step`` on the fit split of ``datamodule``.

        Returns the final state and one metrics row per epoch (``train/...`` means
        weighted by batch size, and ``val/...`` when ``eval_step`` is given).

        Args:
            hparams: the hyperparameters that produced this run (JSON-able), recorded in every
                checkpoint (``fnlight inspect`` shows them), as Lightning's ``save_hyperparameters``.
            on_checkpoint: called on rank 0 with the path of each checkpoint once it is on disk.
            config: the whole configuration of the run (JSON-able; ``fnlight fit`` gives its resolved
                config), recorded in every checkpoint beside ``hparams``.

        With a ``ckpt_dir`` it resumes from the newest checkpoint that loads (skipping damaged
        ones, with a warning); a run that had finished (``max_epochs``/``max_steps`` reached, or
        stopped by a callback) trains nothing, unless the limits were raised. SIGTERM, SIGINT and
        SIGUSR1 (``handle_signals``) stop it after the step in progress: it saves a checkpoint
        there, closes the loggers and raises :class:`Interrupted`. The run directory is claimed for the
        call (:func:`fnlight.train.rundir.claim`): another process fitting into it meanwhile gets
        ``RunDirInUse`` at once, before it reads or writes anything there.

        Example:
            >>> model, opt = torch.nn.Linear(4, 2), fo.sgd(0.1)
            >>> step = fnlight.make_train_step(model, lambda f, b, key: torch.nn.functional.cross_entropy(f(b[0]),
            ...                                                                                          b[1]), opt)
            >>> dm = fnlight.DataModule(fd.from_tensors(torch.randn(32, 4), torch.randint(0, 2, (32,)))
            ...                         >> fd.batch(8), seed=0)
            >>> state = fnlight.TrainState.create(model, opt, seed=0)
            >>> trainer = Trainer(max_epochs=2, run_dir="runs/a", ckpt_dir="runs/a/ckpt", progress=False)
            >>> result = trainer.fit(state, step, dm, hparams={"lr": 0.1})
            >>> int(result.state.step), len(result.history), result.finished
            (8, 2, 'max_epochs')
            >>> trainer.fit(state, step, dm).already_finished   # the same call again: resumed, nothing to train
            True
        """
        run = _Fit(self, train_step, self._datamodule(datamodule), eval_step, hparams, on_checkpoint)
        run.config = _json_hparams(config)
        with run.claimed:  # (the run directory, claimed by start: released last)
            state = run.start(state)  # start, or resume where the newest checkpoint left off
            if run.finished_before:
                return _result(run, state)
            with _SignalFlag(self.signal_numbers) as signals, _deterministic(self.deterministic):
                ended = False  # training ended (finished, stopped or interrupted by a signal), not an exception
                try:
                    while run.epoch < run.max_epochs and run.stopped is None and not run.interrupted:
                        state = run.train_epoch(state, signals)
                    ended = True
                finally:
                    run.close(ended)
        if run.interrupted:
            raise Interrupted(run.interrupted, run.step, run.epoch, run.position, run.checkpoints.last
                              if run.checkpoints is not None else None)
        return _result(run, state)

    # -- evaluation -----------------------------------------------------------
    def _evaluate(self, state: TrainState, eval_step: Callable[[TrainState, Any], Any], dm: DataModule,
                  stage: str, limit: int | float | None) -> Metrics:
        split = dm.split_for(stage)
        totals = _WeightedMean()
        batches, n = self._batches(dm, split, 0, limit)
        with batches, self._progress(n, stage) as bar:
            it = iter(batches)
            for i in range(n):
                with noted(lambda: _data_where(dm, split, 0, i, stage)):  # noqa: B023
                    batch = next(it, None)
                if batch is None:
                    break
                with noted(lambda: f"in the eval step ({_fn_name(eval_step, 'metrics_fn')}) for {stage}, "  # noqa: B023
                           f"batch {i} of split {split!r}"):  # noqa: B023
                    totals.add(eval_step(state, device_put(batch, self.torch_device)), batch_size(batch))
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
            ```python
            logits = trainer.predict(state, lambda s, b: model_fn_of(s)(b[0]), dm)
            ```
        """
        dm = self._datamodule(datamodule)
        state = device_put(state, self.torch_device)
        split = dm.split_for("predict")
        outs = []
        batches, n = self._batches(dm, split, 0, self.limit_predict_batches)
        with _deterministic(self.deterministic), torch.no_grad(), batches, self._progress(n, "predict") as bar:
            it = iter(batches)
            for i in range(n):
                with noted(lambda: _data_where(dm, split, 0, i, "predict")):  # noqa: B023
                    batch = next(it, None)
                if batch is None:
                    break
                with noted(lambda: f"in predict_fn {getattr(predict_fn, '__qualname__', '')} on batch {i} of "  # noqa: B023
                           f"split {split!r}"):
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


def _result(run: _Fit, state: TrainState) -> FitResult:
    return FitResult(state, run.history, run.run_dir, run.callbacks.states(), run.t.callbacks,
                     run.checkpoints.dir if run.checkpoints is not None else None, run.resumed.path,
                     run.stopped, run.finished_before)
