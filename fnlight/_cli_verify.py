"""``fnlight verify``: train an experiment twice from scratch and once interrupted and resumed, and compare.

Every run records, after every step, a short hash of each leaf of the state
(a callback, so the record goes into checkpoints and survives the
interruption). Two runs that part are then named by the first step after
which they differ and the first leaf that differs there; the final states
are compared bitwise, leaf by leaf, as ``fnlight.testing`` does.

Example:
    ```python
    report = verify(lambda: digits(hidden=32), steps=30, stop_at=15)
    report.ok, report.lines()[0]
    # (True, 'verify: OK: ...')
    ```
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._cli_common import CliError
from .experiment import Experiment
from .testing.assertions import history_difference
from .train import Callback, FitResult, Trainer, TrainState
from .train.callbacks import NOTHING, FitContext, Signal
from .tree import named_leaves, tree_first_difference, tree_hash

Hashes = list[list[str]]  # per step (0: the initial state), per leaf


def leaf_hashes(state: TrainState) -> list[str]:
    """A short sha256 of every leaf of ``state`` (dtype, shape and bytes), in tree order."""
    return [tree_hash(leaf)[:16] for leaf in named_leaves(state, "state")[1]]


class StepHashes(Callback):
    """Records :func:`leaf_hashes` of the state after every step (its callback state is a JSON-able list)."""

    def init(self) -> Hashes:
        return []

    def on_step(self, cb_state: Hashes, state: Any, metrics: Mapping[str, Any],
                ctx: FitContext) -> tuple[Hashes, Signal]:
        return [*cb_state, leaf_hashes(state)], NOTHING


@dataclass
class Run:
    """One fit: its result and the hashes of its states, step 0 (the initial state) included."""

    label: str
    result: FitResult
    hashes: Hashes


def _fit(build: Callable[[], Experiment], label: str, where: Path, max_steps: int, *, device: str | None,
         step_options: Mapping[str, Any], checkpoints: bool = False, initial: list[str] | None = None) -> Run:
    exp = build()  # afresh for every run: hidden state in the factory shows as a difference at step 0
    state = exp.init_state()
    recorder = StepHashes()
    trainer = Trainer(max_epochs=exp.max_epochs, max_steps=max_steps, loggers=(), progress=False, device=device,
                      run_dir=where / "run", ckpt_dir=where / "ckpt" if checkpoints else None,
                      callbacks=(recorder,))
    eval_step = exp.eval_step(step_options.get("precision")) if exp.has_stage("validate") else None
    result = trainer.fit(state, exp.train_step(**step_options), exp.datamodule, eval_step=eval_step)
    return Run(label, result, [initial or leaf_hashes(state), *result.callback_state(recorder)])


def _first_step(a: Run, b: Run, names: list[str]) -> str:
    """Where the hash records of two runs part: ``after step k, at <leaf>``."""
    for step, (x, y) in enumerate(zip(a.hashes, b.hashes, strict=False)):
        if x != y:
            leaf = next((names[i] for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), "the structure")
            return "in the initial states (step 0)" if step == 0 else f"first after step {step}, at {leaf}"
    return f"after {min(len(a.hashes), len(b.hashes)) - 1} steps, one run went on"


@dataclass
class Report:
    """What ``verify`` found: ``ok`` and the text to print."""

    name: str
    steps: int
    stop_at: int
    seconds: float
    state_hash: str
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        if self.ok:
            return [f"verify: OK: {self.name}: 2 runs of {self.steps} steps and 1 interrupted after step "
                    f"{self.stop_at} and resumed end bitwise identical (state sha256 {self.state_hash[:16]}, "
                    f"{self.seconds:.1f} s)"]
        return [f"verify: FAILED: {self.name} ({self.steps} steps, interrupted after step {self.stop_at}):",
                *(f"  {f}" for f in self.failures)]


def _compare(full: Run, other: Run, names: list[str]) -> str | None:
    state_diff = tree_first_difference(full.result.state, other.result.state, "state")
    if state_diff is not None or full.hashes != other.hashes:
        return (f"{other.label} differs from {full.label} {_first_step(full, other, names)}\n"
                f"    final states differ at {state_diff or 'no leaf (only intermediate states differ)'}")
    history = history_difference(full.result.history, other.result.history)
    if history is not None:
        return f"{other.label} ends in the same state as {full.label}, but its metrics differ at {history}"
    return None


def verify(build: Callable[[], Experiment], steps: int, stop_at: int | None = None, *, device: str | None = None,
           name: str = "experiment", step_options: Mapping[str, Any] | None = None) -> Report:
    """Run ``build()``'s experiment for ``steps`` steps twice, and once stopped after ``stop_at`` (default
    half of the steps) and resumed from its checkpoint; compare the three.

    Raises CliError when the run is too short to interrupt or ``stop_at`` is out of range.
    """
    options = dict(step_options or {})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fnlight-verify-") as tmp:
        root = Path(tmp)
        common = {"device": device, "step_options": options}
        first = _fit(build, "run 1", root / "run1", steps, **common)
        total = int(first.result.state.step)
        if total < 2:
            raise CliError(f"the experiment trains {total} step(s) (max_epochs={build().max_epochs}): "
                             "nothing to interrupt")
        cut_at = total // 2 if stop_at is None else stop_at
        if not 1 <= cut_at < total:
            raise CliError(f"--stop-at must be in 1 .. {total - 1} (the run has {total} steps), got {cut_at}")
        second = _fit(build, "run 2", root / "run2", steps, **common)
        cut = _fit(build, "the interrupted run", root / "cut", cut_at, checkpoints=True, **common)
        resumed = _fit(build, f"the run interrupted after step {cut_at} and resumed", root / "cut", steps,
                       checkpoints=True, initial=cut.hashes[0], **common)
    names = named_leaves(first.result.state, "state")[0]
    failures = [d for d in (_compare(first, second, names), _compare(first, resumed, names)) if d is not None]
    return Report(name, total, cut_at, time.perf_counter() - t0, tree_hash(first.result.state), failures)
