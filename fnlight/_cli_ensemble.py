"""``fnlight fit --seeds`` / ``--sweep``: several members of one experiment trained in one vectorized step.

A member is the TARGET built with its own hyperparameters (``--seeds 0,1,2``: one per seed;
``--sweep lr=1e-3,3e-3``: one per value). The members are stacked into one state and trained by
one ensemble step (:mod:`fnlight.train.ensemble`), so they must share what the step shares: the
model's computation, the loss, the data and the training length. That is checked before training
by running each member's own model and loss and the first member's on one batch (bitwise equal,
or the hyperparameter is refused with a reason). Their optimizers may differ (a schedule's peak
learning rate, weight decay): the step then updates each member with its own optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from . import random as fr
from ._cli_common import CliError, Target, configure, parse_sets
from .experiment import Experiment
from .optim import step as optim_step
from .train import make_eval_step, make_train_step, stack_states, unstack_states
from .train.ensemble import EnsembleEvalStep, EnsembleTrainStep
from .train.state import TrainState
from .tree import tree_equal


@dataclass(frozen=True)
class Members:
    """The members of an ensemble run: their labels, hyperparameters, experiments and stacked state."""

    labels: list[str]
    hparams: list[dict[str, Any]]
    experiments: list[Experiment]
    state: TrainState
    what: str  # "--seeds" or "--sweep <key>"

    @property
    def first(self) -> Experiment:
        return self.experiments[0]

    def train_step(self, **options: Any) -> EnsembleTrainStep:
        """One ensemble step: vectorized when the members' optimizers compute alike (e.g. ``--seeds``), else
        with one optimizer per member (e.g. ``--sweep lr=...`` where the rate is a schedule's peak)."""
        exp = self.first
        opts = [e.optimizer for e in self.experiments]
        same = all(_same_updates(opts[0], o, self.state) for o in opts[1:])
        return make_train_step(exp.model, exp.loss_fn, opts[0] if same else opts, ensemble=True, **options)

    def eval_step(self, precision: str = "32") -> EnsembleEvalStep:
        return make_eval_step(self.first.model, self.first.metrics_fn, precision=precision, ensemble=True)


def _same_updates(a: Any, b: Any, stacked: TrainState, steps: int = 3) -> bool:
    """Whether optimizers ``a`` and ``b`` make bitwise the same first ``steps`` updates from the first member's
    state (several steps: a warmup schedule starts at 0 whatever its peak)."""
    state = unstack_states(stacked)[0]
    g = torch.Generator().manual_seed(0)
    grads = {k: torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for k, p in state.params.items()}
    pa, sa, pb, sb = state.params, state.opt_state, state.params, state.opt_state
    for _ in range(steps):
        pa, sa = optim_step(a, grads, sa, pa)
        pb, sb = optim_step(b, grads, sb, pb)
        if not tree_equal(pa, pb):
            return False
    return True


def _values(text: str, option: str, example: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if len(values) < 2 or any(not v for v in values):
        raise CliError(f"{option} takes two or more comma-separated values, e.g. {example}; got {text!r}")
    if len(set(values)) != len(values):
        raise CliError(f"{option}: the values {values} repeat one (a repeated member trains the same model twice)")
    return values


def build_members(target: Target, sets: Sequence[str], *, seeds: str | None, sweep: str | None,
                  max_epochs: int | None, recorded: Mapping[str, Any] | None = None) -> Members:
    """The members for ``--seeds`` or ``--sweep``, checked to train correctly in one vectorized step;
    ``recorded`` are hyperparameters given before ``sets`` (a config file's)."""
    if seeds is not None and sweep is not None:
        raise CliError("--seeds and --sweep together are not supported: give one (for seeds of a swept "
                       "configuration, --sweep seed=0,1,2 --set key=value)")
    configs: list[tuple[str, list[str], int | None]] = []
    if seeds is not None:
        for v in _values(seeds, "--seeds", "--seeds 0,1,2"):
            try:
                configs.append((f"seed={int(v)}", list(sets), int(v)))
            except ValueError:
                raise CliError(f"--seeds takes integers, got {v!r}") from None
        what = "--seeds"
    else:
        key, sep, rest = (sweep or "").partition("=")
        if not sep or not key.strip():
            raise CliError(f"--sweep takes KEY=V1,V2,..., e.g. --sweep lr=1e-3,3e-3,1e-2; got {sweep!r}")
        key = key.strip()
        values = _values(rest, f"--sweep {key}", f"--sweep {key}=1e-3,3e-3" if key == "lr" else f"--sweep {key}=1,2")
        if isinstance(target.obj, Experiment):
            raise CliError(f"--sweep needs a factory: {target.spec} is an Experiment object, which has no "
                           "hyperparameters; name a function that returns it and takes them as keyword arguments")
        try:  # each value on its own, so that an error names the --sweep option and the value
            for v in values:
                parse_sets([f"{key}={v}"], target.obj)
        except CliError as e:
            raise CliError(str(e).replace("bad --set ", "bad --sweep ", 1)) from None
        configs = [(f"{key}={v}", [*sets, f"{key}={v}"], None) for v in values]
        what = f"--sweep {key}"
    exps, hps = [], []
    for _, member_sets, seed in configs:
        exp, hp = configure(target, member_sets, seed=seed, max_epochs=max_epochs, recorded=recorded)
        exps.append(exp)
        hps.append(hp)
    labels = [label for label, _, _ in configs]
    states = [e.init_state() for e in exps]
    try:
        state = stack_states(states)
    except ValueError as e:
        raise CliError(f"{what}: the members' states differ in structure or shape, so they cannot be stacked "
                       f"(a hyperparameter that changes the model's shapes needs separate runs): {e}") from None
    _check_same_training(exps, states, labels, what)
    return Members(labels, hps, exps, state, what)


def _check_same_training(exps: list[Experiment], states: list[TrainState], labels: list[str], what: str) -> None:
    """Refuse members that differ in what the ensemble step shares: data, length, model and loss."""
    first = exps[0]
    for exp, label in zip(exps[1:], labels[1:], strict=True):
        if exp.max_epochs != first.max_epochs:
            raise CliError(f"{what}: {label} trains {exp.max_epochs} epochs and {labels[0]} {first.max_epochs}; "
                           "the members of one run train together")
        same_data = exp.datamodule.replace(seed=first.datamodule.seed).fingerprint == first.datamodule.fingerprint
        if not same_data:
            raise CliError(f"{what}: {label} reads other data than {labels[0]} (its pipeline differs, not only its "
                           "seed); the members of one run share every batch: train separate runs instead")
    split = first.datamodule.split_for("fit")
    batch = next(iter(first.datamodule.batches(split, epoch=0)))
    for exp, state, label in zip(exps[1:], states[1:], labels[1:], strict=True):
        if _loss(exp, state, batch) != _loss(first, state, batch):
            raise CliError(f"{what}: {label} changes the model or the loss, not only the initial weights or the "
                           "optimizer (its loss on the first batch differs from the first member's model and loss "
                           "with the same weights); the members of one run share the model's computation: train "
                           "separate runs instead")


def _loss(exp: Experiment, state: TrainState, batch: Any) -> float:
    """``exp``'s loss on ``batch`` with ``state``'s weights, training mode, dropout from a fixed seed."""
    def model_fn(*args: Any, **kwargs: Any) -> Any:
        return functional_call(exp.model, (state.params, state.buffers), args, kwargs)

    exp.model.train()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        out = exp.loss_fn(model_fn, batch, fr.key(0))
    loss = out[0] if isinstance(out, tuple) else out
    return float(loss)


def summary(members: Members, history: list[dict[str, Any]], test: dict[str, float]) -> list[str]:
    """A table of each member's last validation (or training) metrics and test metrics, and the best member."""
    last = history[-1] if history else {}
    n = len(members.labels)
    names = sorted({k.rsplit("/", 1)[0] for k in (*last, *(f"test/{k}" for k in test))
                    if k.rsplit("/", 1)[-1].isdigit() and int(k.rsplit("/", 1)[-1]) < n})
    values: dict[str, list[float]] = {}
    for name in names:
        source = test if name.startswith("test/") else last
        key = name.removeprefix("test/") if name.startswith("test/") else name
        values[name] = [source.get(f"{key}/{i}", math.nan) for i in range(n)]
    width = max(len(label) for label in members.labels)
    shown = [c for c in names if not c.startswith("train/")] or names
    lines = [f"{'member':>6}  {'':{width}}  " + "  ".join(f"{c:>12}" for c in shown)]
    for i, label in enumerate(members.labels):
        lines.append(f"{i:>6}  {label:{width}}  " + "  ".join(f"{values[c][i]:>12.4g}" for c in shown))
    monitor = next((c for c in ("val/loss", "train/loss") if c in values), None)
    if monitor is not None:
        best = min(range(n), key=lambda i: values[monitor][i])
        lines.append(f"best member: {best} ({members.labels[best]}) by {monitor} = {values[monitor][best]:.4g}")
    return lines


# -- commands that take a checkpoint (validate, test, predict, export) ------------------------------

def recorded_members(recorded: Any) -> list[dict[str, Any]] | None:
    """The members' hyperparameters that ``fit --seeds/--sweep`` recorded in its checkpoints, if any."""
    members = recorded.get("members") if isinstance(recorded, dict) else None
    return members if isinstance(members, list) and all(isinstance(m, dict) for m in members) else None


def member_labels(recorded: Any, n: int) -> list[str]:
    """Each member's label as ``fit`` recorded it (``seed=1``, ``lr=1e-3``), else its number."""
    labels = recorded.get("labels") if isinstance(recorded, dict) else None
    if isinstance(labels, list) and len(labels) == n:
        return [str(label) for label in labels]
    return [f"member {i}" for i in range(n)]


def pick_members(state: TrainState, labels: list[str], member: int | None, command: str,
                 ) -> list[tuple[str, TrainState]]:
    """The states a checkpoint command works on: the one state, or an ensemble's members (all, or ``--member``)."""
    from .train.ensemble import num_members

    n = num_members(state)
    if n is None:
        if member is not None:
            raise CliError(f"--member {member}: the checkpoint holds one model, not an ensemble; leave --member out")
        return [("", state)]
    if member is None:
        if command in ("predict", "export"):
            raise CliError(f"the checkpoint holds an ensemble of {n} members ({', '.join(labels)}): {command} one "
                           f"of them with --member 0..{n - 1}")
        return list(zip(labels, unstack_states(state), strict=True))
    if not 0 <= member < n:
        raise CliError(f"--member {member}: the ensemble has members 0..{n - 1}")
    return [(labels[member], unstack_states(state)[member])]
