"""``TrainState``: everything a training run depends on, as one frozen pytree.

Example:
    >>> import torch, fnlight, fnlight.optim as fo
    >>> model = torch.nn.Linear(3, 2)
    >>> state = fnlight.TrainState.create(model, fo.adam(1e-3), seed=0)
    >>> int(state.step), sorted(state.params)
    (0, ['bias', 'weight'])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as torch_pytree

from .. import random as fr
from ..optim import GradientTransformation
from ..tree import register_node

Tensors = dict[str, torch.Tensor]

@dataclass(frozen=True)
class TrainState:
    """The model's trainable parameters, its buffers (BatchNorm statistics, frozen
    parameters), the optimizer's state, the step counter (int64) and the RNG key.

    The module it was made from is afterwards only a template: steps keep a copy of
    it without its tensors (:func:`fnlight.train.step.stateless_template`) and call
    that with these values through ``torch.func.functional_call``. The state's
    tensors are its own (``create`` copies them, so training never changes the
    module); ``del model`` after making the state and the steps leaves them the
    only copy in memory.
    """

    params: Tensors
    buffers: Tensors
    opt_state: Any
    step: torch.Tensor
    key: torch.Tensor

    @classmethod
    def create(cls, model: torch.nn.Module, optimizer: GradientTransformation, seed: int = 0) -> TrainState:
        """Copy ``model``'s parameters and buffers and initialize the optimizer.

        Parameters with ``requires_grad=False`` are kept with the buffers (frozen).

        Example:
            >>> state = TrainState.create(torch.nn.Linear(2, 1), fo.sgd(0.1), seed=3)
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"TrainState.create needs an nn.Module, got {type(model).__name__}")
        params = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
        buffers = {**frozen, **{k: b.detach().clone() for k, b in model.named_buffers()}}
        return cls(params, buffers, optimizer.init(params), torch.zeros((), dtype=torch.int64), fr.key(seed))

    def replace(self, **changes: Any) -> TrainState:
        """A new state with some fields replaced. Example: ``state.replace(step=state.step + 1)``."""
        return dataclasses.replace(self, **changes)

    def write_to(self, model: torch.nn.Module) -> torch.nn.Module:
        """Copy the parameters and buffers into ``model`` (for export or plain inference).

        Example:
            >>> state = fnlight.TrainState.create(torch.nn.Linear(2, 1), fnlight.optim.sgd(0.1), seed=0)
            >>> model = state.write_to(torch.nn.Linear(2, 1)).eval()
            >>> torch.equal(model.weight, state.params["weight"])
            True
        """
        named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        values = {**self.params, **self.buffers}
        missing, unexpected = sorted(set(named) - set(values)), sorted(set(values) - set(named))
        if missing or unexpected:
            raise KeyError(f"the model does not match the state: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for k, t in named.items():
                if t.shape != values[k].shape:
                    raise ValueError(f"{k}: the model has shape {tuple(t.shape)}, the state {tuple(values[k].shape)}")
                t.copy_(values[k])
        return model

    @property
    def num_params(self) -> int:
        """The number of trainable scalars."""
        return sum(p.numel() for p in self.params.values())


#: TrainState's fields in order, read from the dataclass (pytree flattening, checkpoints and comparisons use it).
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainState))


def _flatten(s: TrainState) -> tuple[list[Any], None, tuple[str, ...]]:
    return [getattr(s, f) for f in FIELDS], None, FIELDS


def _unflatten(aux: None, children: Any) -> TrainState:
    return TrainState(*children)


register_node(TrainState, _flatten, _unflatten)
torch_pytree.register_pytree_node(
    TrainState,
    lambda s: ([getattr(s, f) for f in FIELDS], None),
    lambda children, aux: TrainState(*children),
    serialized_type_name="fnlight.TrainState",
)
