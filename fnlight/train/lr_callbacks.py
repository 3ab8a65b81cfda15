"""Learning-rate callbacks on hyperparameters held in the optimizer state
(:func:`fnlight.optim.inject_hyperparams`): ``ReduceLROnPlateau`` (torch's, on an epoch metric)
and ``LRFinder`` (the learning-rate range test).

They change the learning rate by asking the loop to replace the optimizer state
(``Signal.edit_opt_state`` with :func:`fnlight.optim.set_hyperparams`): under ``compile=True``
the new value is a tensor input of the compiled step, so nothing recompiles. Their own state is
plain numbers, saved in checkpoints with the other callbacks'.

Example:
    >>> import fnlight, fnlight.optim as fo
    >>> opt = fo.inject_hyperparams(fo.adamw)(learning_rate=1e-3, weight_decay=0.05)
    >>> trainer = fnlight.Trainer(max_epochs=30, callbacks=(ReduceLROnPlateau("val/loss", patience=3),))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .. import optim as fo
from .callbacks import NOTHING, Callback, FitContext, Signal


def _learning_rates(opt_state: Any, name: str) -> dict[str | None, float]:
    """The injected ``name`` per parameter group (key None without groups)."""
    hp = fo.hyperparams(opt_state)
    if name in hp and not isinstance(hp[name], Mapping):
        return {None: float(hp[name])}
    found = {g: float(v[name]) for g, v in hp.items() if isinstance(v, Mapping) and name in v}
    if not found:
        raise ValueError(f"the optimizer state has no injected {name!r}: build the optimizer with "
                         f"fo.inject_hyperparams(...)({name}=...) (it has {sorted(hp)})")
    return found


def _setter(name: str, values: dict[str | None, float]) -> Any:
    def edit(opt_state: Any) -> Any:
        for group, v in values.items():
            opt_state = fo.set_hyperparams(opt_state, group=group, **{name: v})
        return opt_state
    return edit


@dataclass(frozen=True)
class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` (an epoch metric) has not
    improved for ``patience`` epochs, as ``torch.optim.lr_scheduler.ReduceLROnPlateau`` stepped
    once per epoch with that metric (same arguments and semantics: ``threshold_mode``,
    ``cooldown``, ``min_lr``, ``eps``). With parameter groups each group's rate is reduced.

    The optimizer must hold its learning rate in its state:
    ``fo.inject_hyperparams(fo.adamw)(learning_rate=1e-3, ...)``.

    Example:
        >>> cb = ReduceLROnPlateau("val/loss", factor=0.5, patience=2)
    """

    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8
    hyperparam: str = "learning_rate"

    def __post_init__(self) -> None:
        if not 0 <= self.factor < 1:
            raise ValueError(f"factor must be in [0, 1), got {self.factor}")
        if self.mode not in ("min", "max") or self.threshold_mode not in ("rel", "abs"):
            raise ValueError(f"mode must be 'min' or 'max' and threshold_mode 'rel' or 'abs', got {self.mode!r} "
                             f"and {self.threshold_mode!r}")

    def init(self) -> dict[str, float]:
        return {"best": math.inf if self.mode == "min" else -math.inf, "num_bad_epochs": 0, "cooldown_counter": 0}

    def is_better(self, a: float, best: float) -> bool:
        if self.mode == "min":
            return a < best * (1.0 - self.threshold) if self.threshold_mode == "rel" else a < best - self.threshold
        return a > best * (self.threshold + 1.0) if self.threshold_mode == "rel" else a > best + self.threshold

    def step(self, cb_state: dict[str, float], current: float, lrs: dict[str | None, float]
             ) -> tuple[dict[str, float], dict[str | None, float]]:
        """One epoch of torch's algorithm: the new callback state and the new rates (only the changed ones)."""
        s = dict(cb_state)
        if self.is_better(current, s["best"]):
            s["best"], s["num_bad_epochs"] = current, 0
        else:
            s["num_bad_epochs"] += 1
        if s["cooldown_counter"] > 0:
            s["cooldown_counter"] -= 1
            s["num_bad_epochs"] = 0
        changed: dict[str | None, float] = {}
        if s["num_bad_epochs"] > self.patience:
            for group, old in lrs.items():
                new = max(old * self.factor, self.min_lr)
                if old - new > self.eps:
                    changed[group] = new
            s["cooldown_counter"], s["num_bad_epochs"] = self.cooldown, 0
        return s, changed

    def on_epoch(self, cb_state: Any, state: Any, metrics: Mapping[str, Any], ctx: FitContext) -> tuple[Any, Signal]:
        if self.monitor not in metrics:
            prefix = self.monitor.split("/")[0] + "/" if "/" in self.monitor else None
            if prefix is not None and not any(k.startswith(prefix) for k in metrics):
                return cb_state, NOTHING  # not computed this epoch (no validation)
            raise KeyError(f"ReduceLROnPlateau monitors {self.monitor!r}, but the epoch metrics are {sorted(metrics)}")
        lrs = _learning_rates(state.opt_state, self.hyperparam)
        cb_state, changed = self.step(cb_state, float(metrics[self.monitor]), lrs)
        if not changed:
            return cb_state, NOTHING
        log = {f"lr/{g}" if g is not None else "lr": v for g, v in changed.items()}
        return cb_state, Signal(log=log, edit_opt_state=_setter(self.hyperparam, changed))


@dataclass(frozen=True)
class LRFinder(Callback):
    """The learning-rate range test (Smith, 2015; Lightning's ``lr_find``): from the optimizer's
    injected rate (start it at ``min_lr``), the rate grows exponentially to ``max_lr`` over
    ``num_steps`` steps, one step each; the loss of each step is recorded (with its rate) and
    the run stops when the smoothed loss exceeds ``diverge_factor`` times the best one, or after
    ``num_steps``. :meth:`suggestion` gives the rate where the smoothed loss falls fastest.

    Example:
        >>> import fnlight, fnlight.optim as fo
        >>> finder = LRFinder(min_lr=1e-6, max_lr=1.0, num_steps=100)
        >>> opt = fo.inject_hyperparams(fo.adam)(learning_rate=1e-6)
        >>> # result = fnlight.Trainer(max_epochs=10, callbacks=(finder,)).fit(state, step, dm)
        >>> # lr = finder.suggestion(result.callback_state(finder))
    """

    min_lr: float = 1e-7
    max_lr: float = 1.0
    num_steps: int = 100
    smoothing: float = 0.05
    diverge_factor: float = 4.0
    hyperparam: str = "learning_rate"

    def __post_init__(self) -> None:
        if not 0 < self.min_lr < self.max_lr:
            raise ValueError(f"need 0 < min_lr < max_lr, got {self.min_lr} and {self.max_lr}")
        if self.num_steps < 2:
            raise ValueError(f"num_steps must be >= 2, got {self.num_steps}")

    def init(self) -> dict[str, Any]:
        return {"lrs": [], "losses": [], "smoothed": [], "best": math.inf}

    def rate(self, k: int) -> float:
        """The rate of step ``k`` (0: ``min_lr``, ``num_steps - 1``: ``max_lr``)."""
        return self.min_lr * (self.max_lr / self.min_lr) ** (k / (self.num_steps - 1))

    def on_step(self, cb_state: Any, state: Any, metrics: Mapping[str, Any], ctx: FitContext) -> tuple[Any, Signal]:
        s = {k: list(v) if isinstance(v, list) else v for k, v in cb_state.items()}
        used = next(iter(_learning_rates(state.opt_state, self.hyperparam).values()))
        loss = float(metrics["loss"])
        smooth = loss if not s["smoothed"] else self.smoothing * loss + (1 - self.smoothing) * s["smoothed"][-1]
        s["lrs"].append(used)
        s["losses"].append(loss)
        s["smoothed"].append(smooth)
        s["best"] = min(s["best"], smooth)
        k = len(s["lrs"])
        if k >= self.num_steps or not math.isfinite(smooth) or smooth > self.diverge_factor * s["best"]:
            return s, Signal(stop=True)
        groups = _learning_rates(state.opt_state, self.hyperparam)
        return s, Signal(log={"lr": self.rate(k)}, edit_opt_state=_setter(self.hyperparam,
                                                                           dict.fromkeys(groups, self.rate(k))))

    @staticmethod
    def suggestion(cb_state: Mapping[str, Any]) -> float:
        """The rate at the steepest fall of the smoothed loss (against log rate)."""
        lrs, sm = cb_state["lrs"], cb_state["smoothed"]
        if len(lrs) < 3:
            raise ValueError("the range test recorded fewer than 3 steps: run it longer")
        slopes = [(sm[i + 1] - sm[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(len(lrs) - 1)
                  if lrs[i + 1] != lrs[i]]
        i = min(range(len(slopes)), key=slopes.__getitem__)
        return lrs[i]
