"""``OptimizerConfig``: one optimizer configuration, buildable both as an
:mod:`fnlight.optim` transformation and as the equivalent ``torch.optim`` optimizer.

Example:
    >>> cfg = OptimizerConfig("sgd", lr=0.05, momentum=0.9, nesterov=True)
    >>> cfg
    OptimizerConfig('sgd', lr=0.05, momentum=0.9, nesterov=True)
    >>> opt = cfg.build()                               # fnlight.optim.sgd(0.05, momentum=0.9, nesterov=True)
    >>> ref = cfg.torch([torch.nn.Parameter(torch.zeros(3))])   # torch.optim.SGD(..., the same)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .. import optim as fo

NAMES = ("sgd", "adam", "adamw")
_SGD_ONLY = ("momentum", "dampening", "nesterov")
_ADAM_ONLY = ("betas", "eps", "amsgrad")


@dataclass(frozen=True)
class OptimizerConfig:
    """An optimizer's name and hyperparameters, with torch.optim's meaning.

    Args:
        name: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: the (constant) learning rate.
        momentum: SGD momentum (0: none).
        dampening: SGD dampening.
        nesterov: SGD Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 added to the gradient (SGD, Adam) or decoupled decay (AdamW).
        betas: Adam's ``(b1, b2)``.
        eps: Adam's epsilon.
        amsgrad: Adam's AMSGrad variant.

    :meth:`build` gives the :mod:`fnlight.optim` transformation and :meth:`torch`
    the ``torch.optim`` optimizer with the same arithmetic, which makes a parity
    test a few lines (see :func:`fnlight.testing.optimizers`).

    Example:
        >>> opt = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.05).build()
    """

    name: Literal["sgd", "adam", "adamw"]
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"OptimizerConfig name must be one of {NAMES}, got {self.name!r}")
        object.__setattr__(self, "betas", tuple(self.betas))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        foreign = _ADAM_ONLY if self.name == "sgd" else _SGD_ONLY
        bad = [k for k in foreign if getattr(self, k) != defaults[k]]
        if bad:
            raise ValueError(f"{', '.join(bad)} do not apply to {self.name}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0 (as in torch.optim.SGD)")

    def __repr__(self) -> str:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        changed = [f"{k}={getattr(self, k)!r}" for k in defaults if k not in ("name", "lr")
                   and getattr(self, k) != defaults[k]]
        return f"OptimizerConfig({', '.join([repr(self.name), f'lr={self.lr!r}', *changed])})"

    def build(self, **kwargs: Any) -> fo.GradientTransformation:
        """The :mod:`fnlight.optim` transformation; ``kwargs`` go to it (e.g. ``fused=False`` for Adam).

        Example:
            >>> opt = OptimizerConfig("adam", lr=1e-3, amsgrad=True).build(fused=False)
        """
        if self.name == "sgd":
            return fo.sgd(self.lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay,
                          dampening=self.dampening, **kwargs)
        make = fo.adam if self.name == "adam" else fo.adamw
        return make(self.lr, b1=self.betas[0], b2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay,
                    amsgrad=self.amsgrad, **kwargs)

    def torch(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
        """The equivalent ``torch.optim`` optimizer over ``params``; ``kwargs`` go to it
        (e.g. ``foreach=True`` or ``fused=True``).

        Example:
            >>> model = torch.nn.Linear(2, 1)
            >>> ref = OptimizerConfig("sgd", lr=0.1, momentum=0.9).torch(model.parameters(), foreach=True)
        """
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, dampening=self.dampening,
                                   nesterov=self.nesterov, weight_decay=self.weight_decay, **kwargs)
        cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                   amsgrad=self.amsgrad, **kwargs)
