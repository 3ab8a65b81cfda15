"""Assertions for a test suite: reproducibility of a function, and exact resume of a training setup.

Both compare bitwise (NaN equals NaN with the same payload, ``0.0`` differs from
``-0.0``) and, on failure, raise an ``AssertionError`` naming the first leaf
that differs (``result[0].params['0.weight']``), both values' dtypes and shapes,
how many elements differ and by how much at most.

Example:
    ```python
    from fnlight.testing import assert_reproducible, assert_resume_equivalent
    assert_reproducible(train_step, state, batch)
    assert_resume_equivalent(fnlight.Trainer(max_epochs=2), state, train_step, dm, stop_at=[3, 7],
                             tmp_path=tmp_path)
    ```
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..tree import tree_equal, tree_first_difference, tree_map

if TYPE_CHECKING:
    from ..data.datamodule import DataModule
    from ..train.loop import FitResult, Trainer
    from ..train.state import TrainState

R = TypeVar("R")

__all__ = ["assert_reproducible", "assert_resume_equivalent"]


def _view(tree: Any) -> Any:
    """``tree`` with modules replaced by their state dicts (so a mutated module is seen)."""
    def leaf(v: Any) -> Any:
        if isinstance(v, torch.nn.Module):
            return {"training": v.training, **v.state_dict(keep_vars=False)}
        return v

    return tree_map(leaf, tree)


def _clone(tree: Any) -> Any:
    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, tree)


def _rng_state() -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += list(torch.cuda.get_rng_state_all())
    return states


_RNG_ADVICE = ("fn changed torch's global random generator (torch.rand*, torch.manual_seed, dropout or random "
               "init outside a fork): results that depend on hidden state are not reproducible; draw with "
               "fnlight.random from an explicit key, or scope it with torch.random.fork_rng")


# -- assert_reproducible --------------------------------------------------------------------

def assert_reproducible(fn: Callable[..., R], *args: Any, runs: int = 2, check_inputs: bool = True,
                        check_global_rng: bool = True, **kwargs: Any) -> R:
    """Call ``fn(*args, **kwargs)`` ``runs`` times and assert the results are bitwise equal.

    Results may be any pytree of tensors and Python values (a ``(TrainState,
    metrics)`` pair, a dict of tensors...). On failure the ``AssertionError``
    names the first differing leaf (``result[0].params['0.weight']``), which run
    differed, the dtype and shape, how many elements differ and the max abs difference.

    Args:
        fn: the function under test.
        *args: its positional arguments.
        runs: how many calls (at least 2).
        check_inputs: also assert that ``fn`` leaves its arguments bitwise
            unchanged (purity: tensors, and the state dicts of modules, in
            ``args`` and ``kwargs``). With ``False`` (a donating step, which
            consumes its input), every call gets fresh clones of the tensors instead.
        check_global_rng: also assert that ``fn`` leaves torch's global random
            generator as it found it (no hidden draws, no reseeding).
        **kwargs: its keyword arguments.

    Returns:
        The result of the first call.

    The global generator is deliberately *not* reset between calls, so a
    function that draws from it (``lambda x: x + torch.rand(3)``) fails.

    Example:
        ```python
        new_state, metrics = assert_reproducible(train_step, state, batch)
        assert_reproducible(lambda x: x + torch.rand(3), torch.zeros(3))
        # Traceback (most recent call last):
        # AssertionError: fn is not reproducible: run 2 differs from run 1 at result: float32[3], 3 of 3 elements ...
        ```
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
        raise ValueError(f"runs must be an int >= 2, got {runs!r}")
    inputs = (args, kwargs)
    pristine = _clone(_view(inputs))
    rng_before = _rng_state()
    results: list[Any] = []
    for run in range(1, runs + 1):
        call_args, call_kwargs = inputs if check_inputs else _clone(inputs)
        results.append(fn(*call_args, **call_kwargs))
        if check_inputs:
            changed = tree_first_difference(_view(inputs), pristine, "(args, kwargs)")
            if changed is not None:
                raise AssertionError(
                    f"fn mutated its input in run {run} (after vs before the call) at {_input_path(changed)}\n"
                    "A pure function returns new values instead; for a function meant to consume its input "
                    "(a donating step) pass check_inputs=False")
    rng_changed = not tree_equal(_rng_state(), rng_before)
    for run, result in enumerate(results[1:], start=2):
        diff = tree_first_difference(results[0], result, "result")
        if diff is not None:
            note = f"\n{_RNG_ADVICE}" if check_global_rng and rng_changed else ""
            raise AssertionError(f"fn is not reproducible: run {run} differs from run 1 at {diff}{note}")
    if check_global_rng and rng_changed:
        raise AssertionError(f"{_RNG_ADVICE} (the results were equal)")
    return results[0]


def _input_path(diff: str) -> str:
    """``(args, kwargs)[0][1]['w']...`` -> ``args[1]['w']...``."""
    for prefix, name in (("(args, kwargs)[0]", "args"), ("(args, kwargs)[1]", "kwargs")):
        if diff.startswith(prefix):
            return name + diff[len(prefix):]
    return diff


# -- assert_resume_equivalent -----------------------------------------------------------------

def _stop_points(stop_at: int | Sequence[int]) -> list[int]:
    points = [stop_at] if isinstance(stop_at, int) and not isinstance(stop_at, bool) else stop_at
    if not isinstance(points, Sequence) or not points:
        raise TypeError(f"stop_at must be a step count or a non-empty sequence of them, got {stop_at!r}")
    for p in points:
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"stop_at must hold ints (steps), got {p!r}")
    return sorted(set(points))


def _without_time(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


@contextlib.contextmanager
def _workdir(tmp_path: str | Path | None) -> Iterator[Path]:
    if tmp_path is None:
        with tempfile.TemporaryDirectory(prefix="fnlight-resume-") as d:
            yield Path(d)
    else:
        Path(tmp_path).mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix="resume-", dir=tmp_path))  # fresh: never resumes a stale run


def assert_resume_equivalent(trainer: Trainer, state: TrainState, train_step: Callable[[TrainState, Any], Any],
                             datamodule: DataModule, eval_step: Callable[[TrainState, Any], Any] | None = None, *,
                             stop_at: int | Sequence[int], tmp_path: str | Path | None = None) -> FitResult:
    """Assert that a training setup, interrupted after ``stop_at`` steps and resumed, ends as if never stopped.

    Runs ``trainer.fit(state, train_step, datamodule, eval_step)`` once without
    interruption; then, for every point ``p`` in ``stop_at``, a fit that stops
    after ``p`` steps (as a crash would, right after a checkpoint of that step)
    and a fit with the original settings that resumes from that checkpoint. The
    resumed final state must be bitwise equal to the uninterrupted one, and so
    must the history (ignoring ``time_s``) and the callback states; the
    ``AssertionError`` names the first differing leaf (``state.params['0.weight']``,
    ``history[1]['val/loss']``) and the interruption point.

    Every fit uses ``trainer`` with ``loggers=()``, ``progress=False`` and its own
    run and checkpoint directories (``ckpt_dir`` and ``run_dir`` are replaced).

    Args:
        trainer: the user's :class:`~fnlight.Trainer` configuration.
        state: the initial state (never modified).
        train_step: the train step, as given to ``fit``.
        datamodule: the DataModule, as given to ``fit``.
        eval_step: the eval step, as given to ``fit`` (optional).
        stop_at: the number of steps after which to interrupt: an int or a
            sequence, each in ``1 .. total - 1`` where ``total`` is the number of
            steps of the uninterrupted fit (see :func:`fnlight.testing.interruption_points`).
        tmp_path: runs go to a new directory inside it (kept for inspection);
            default: a temporary directory, removed afterwards.

    Returns:
        The uninterrupted run's :class:`~fnlight.FitResult`.

    Example:
        ```python
        trainer = fnlight.Trainer(max_epochs=2, ckpt_every_n_epochs=1)
        full = assert_resume_equivalent(trainer, state, train_step, dm, eval_step, stop_at=[1, 5, 9],
                                        tmp_path=tmp_path)
        int(full.state.step)
        # 20
        ```
    """
    from ..train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, step_dir

    points = _stop_points(stop_at)
    base = dataclasses.replace(trainer, loggers=(), progress=False, resume=True)
    start = int(state.step)
    with _workdir(tmp_path) as root:
        full = dataclasses.replace(base, run_dir=root / "full" / "run", ckpt_dir=root / "full" / "ckpt").fit(
            state, train_step, datamodule, eval_step)
        total = int(full.state.step) - start
        if total < 2:
            raise ValueError(f"the uninterrupted fit runs {total} step(s): there is no step to interrupt it after")
        bad = [p for p in points if not 1 <= p <= total - 1]
        if bad:
            raise ValueError(f"stop_at must be in 1 .. {total - 1} (the uninterrupted fit runs {total} steps), "
                             f"got {bad}")
        for p in points:
            where = root / f"cut{p}"
            cut = dataclasses.replace(base, run_dir=where / "run", ckpt_dir=where / "ckpt", max_steps=start + p,
                                      ckpt_every_n_steps=start + p, ckpt_every_n_epochs=None)
            cut.fit(state, train_step, datamodule, eval_step)
            saved = list_checkpoints(where / "ckpt")
            if not saved or saved[-1].name != step_dir(where / "ckpt", start + p).name:
                raise AssertionError(f"the fit stopped after {p} steps left no checkpoint of step {start + p} "
                                     f"(found: {[s.name for s in saved]}) in {where / 'ckpt'}")
            try:
                load_checkpoint(saved[-1], like=state)
            except CheckpointError as e:
                raise AssertionError(f"the checkpoint written after {p} steps does not load: {e}") from e
            resumed = dataclasses.replace(base, run_dir=where / "run", ckpt_dir=where / "ckpt").fit(
                state, train_step, datamodule, eval_step)
            diff = (tree_first_difference(full.state, resumed.state, "state")
                    or history_difference(full.history, resumed.history)
                    or tree_first_difference(full.callback_states, resumed.callback_states, "callback_states"))
            if diff is not None:
                raise AssertionError(f"resuming after {p} of {total} steps does not reproduce the uninterrupted "
                                     f"run (uninterrupted vs resumed) at {diff}")
    return full


def history_difference(full: list[dict[str, Any]], resumed: list[dict[str, Any]]) -> str | None:
    """Where two fit histories (lists of epoch rows) first differ, ignoring the wall-clock ``time_s``;
    None when they are equal bitwise.

    Example:
        >>> history_difference([{"train/loss": 1.0, "time_s": 3.0}], [{"train/loss": 1.0, "time_s": 9.0}]) is None
        True
        >>> history_difference([{"train/loss": 1.0}], [])
        'history: 1 rows vs 0 rows'
    """
    a, b = _without_time(full), _without_time(resumed)
    if len(a) != len(b):
        return f"history: {len(a)} rows vs {len(b)} rows"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if sorted(x) != sorted(y):
            return f"history[{i}]: keys {sorted(x)} vs {sorted(y)}"
    return tree_first_difference(a, b, "history")
