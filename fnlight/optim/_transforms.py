"""Small gradient transformations (optax's ``transform`` module): scaling, weight decay, clipping,
and the masks that select parameters (``default_decay_mask``).

Example:
    >>> import torch, fnlight.optim as fo
    >>> opt = fo.chain(fo.clip_by_global_norm(1.0), fo.add_decayed_weights(1e-4), fo.scale_by_learning_rate(0.1))
    >>> params = {"w": torch.ones(2)}
    >>> updates, state = opt.update({"w": torch.ones(2)}, opt.init(params), params)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from ._base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    Scalar,
    Spec,
    Updates,
    count_up,
    counter,
    fe,
    first_leaf,
    flatten,
    foreach,
    l2,
    per_step,
    sum_across,
)
from ._schedules import Schedule, as_schedule

Mask = Callable[[Params], Any] | Mapping[str, bool] | Any
"""Which parameters a transformation applies to: a mapping of parameter names (dotted paths for
nested trees) to bools (names left out are False), a pytree of bools shaped like the params, or a
function of the params returning either (e.g. :func:`default_decay_mask`)."""


class CountState(NamedTuple):
    count: torch.Tensor


# -- masks ------------------------------------------------------------------------------

class _ModelNames(NamedTuple):
    """What a model tells a mask about names that are not (stored) parameters."""

    tied: dict[str, str]  # alias -> the name the parameter is stored under
    frozen: set[str]  # parameters with requires_grad=False (TrainState keeps them among the buffers)


def _model_names(model: torch.nn.Module) -> _ModelNames:
    stored: dict[int, str] = {}
    tied: dict[str, str] = {}
    frozen: set[str] = set()
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if not p.requires_grad:
                frozen.add(name)
            if id(p) in stored and stored[id(p)] != name:
                tied[name] = stored[id(p)]
            stored.setdefault(id(p), name)
    return _ModelNames(tied, frozen)


def _unknown_names(unknown: list[str], names: list[str], what: str, model: _ModelNames | None) -> ValueError:
    lines = []
    for n in unknown:
        if model is not None and n in model.tied:
            lines.append(f"{n!r} is tied to {model.tied[n]!r}, and the parameter is stored under that name: "
                         f"use {model.tied[n]!r}")
        elif model is not None and n in model.frozen:
            lines.append(f"{n!r} is a frozen parameter (requires_grad=False): TrainState keeps it among the buffers "
                         "and no optimizer sees it; leave it out")
        else:
            close = difflib.get_close_matches(n, names, n=3)
            lines.append(f"{n!r} is not a parameter" + (f" (did you mean {', '.join(map(repr, close))}?)"
                                                        if close else ""))
    return ValueError(f"the {what} names parameters the optimizer does not have:\n  " + "\n  ".join(lines)
                      + f"\nThe parameters are: {names}")


def resolve_mask(mask: Mask, params: Params, spec: Spec, what: str = "mask") -> list[bool]:
    """``mask`` as one bool per leaf of ``params`` (in ``spec``'s order), checked: a mapping
    naming something that is not a parameter is an error that says what it is instead.

    Example:
        >>> import torch
        >>> from fnlight.optim._base import flatten
        >>> params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
        >>> resolve_mask({"w": True}, params, flatten(params)[1])
        [True, False]
    """
    names = spec.names()
    # Evaluated once per mask and parameter structure (names and shapes): later updates, traced by
    # torch.compile too, look the answer up instead of calling the user's function again.
    key = (id(mask), tuple(names), tuple(tuple(t.shape) for t in spec.flatten_up_to(params)), what)
    hit = _MASKS.get(key)
    if hit is not None and hit[0] is mask:
        return hit[1]
    if len(_MASKS) > 512:
        _MASKS.clear()
    flags = _resolve_mask(mask, params, names, spec, what)
    _MASKS[key] = (mask, flags)  # (the mask is kept, so its id is not reused while cached)
    return flags


_MASKS: dict[tuple[Any, ...], tuple[Any, list[bool]]] = {}


def _resolve_mask(mask: Mask, params: Params, names: list[str], spec: Spec, what: str) -> list[bool]:
    model = getattr(mask, "model_names", None)
    m = mask(params) if callable(mask) else mask
    if isinstance(m, bool):  # optax's prefix: all or none
        return [m] * len(names)
    if isinstance(m, Mapping) and all(isinstance(k, str) for k in m) \
            and all(isinstance(v, bool | int) for v in m.values()):
        unknown = [k for k in m if k not in set(names)]
        if unknown:
            raise _unknown_names(unknown, names, what, model)
        return [bool(m.get(n, False)) for n in names]
    try:
        flat = spec.flatten_up_to(m)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the {what} must map parameter names to bools or be a tree of bools shaped like the "
                         f"params, got {type(m).__name__}") from e
    return [bool(v) for v in flat]


def mask_indices(mask: Mask | None, params: Params, spec: Spec, what: str = "mask") -> list[int] | None:
    """The leaf indices ``mask`` selects (None for no mask: all of them)."""
    if mask is None:
        return None
    return [i for i, on in enumerate(resolve_mask(mask, params, spec, what)) if on]


#: Name parts that mark an embedding table (nanoGPT, Hugging Face, Llama, torchvision's ViT, ...).
EMBEDDING_NAMES = re.compile(r"(^|\.)(wte|wpe|embed_tokens|embed_positions|tok_embeddings|pos_embedding|"
                             r"position_embeddings?|token_type_embeddings|word_embeddings|embeddings?|"
                             r"[a-z_]*_embeddings?|embed|emb|class_token|cls_token)(\.|$)")
_NO_DECAY_TYPES = (torch.nn.Embedding, torch.nn.EmbeddingBag, torch.nn.modules.batchnorm._NormBase,
                   torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.LocalResponseNorm,
                   *([torch.nn.RMSNorm] if hasattr(torch.nn, "RMSNorm") else []))


def default_decay_mask(params_or_model: Params | torch.nn.Module) -> Any:
    """Which parameters weight decay applies to, by the nanoGPT/Hugging Face convention: the
    weights of Linear and Conv layers (an untied LM head too), not biases, norm weights or
    embeddings.

    Given the params (what an optimizer passes it: names and tensors), a parameter is decayed
    when it has two or more dimensions and no part of its name is an embedding's usual name
    (``wte``, ``wpe``, ``embed_tokens``, ``tok_embeddings``, ``pos_embedding``, ``embeddings``,
    ``*_embedding(s)``, ``embed``, ``cls_token``...: :data:`EMBEDDING_NAMES`). A tied LM head is
    stored under its embedding's name, so it is not decayed; an untied one is.

    Given a model, it returns that rule as a function of the params, which also recognises by
    type the weights of ``nn.Embedding``/``nn.EmbeddingBag`` and norm layers whatever their
    names, and makes a mask's errors name the stored name of a tied parameter or say that a
    name is a frozen parameter.

    Pass your own rule as a dict of names to bools (names left out are not decayed), a tree of
    bools shaped like the params, or a function of the params returning either.

    Example:
        >>> import torch, fnlight.optim as fo
        >>> params = {"wte.weight": torch.ones(9, 4), "h.0.ln.weight": torch.ones(4),
        ...           "h.0.fc.weight": torch.ones(4, 4), "h.0.fc.bias": torch.ones(4)}
        >>> default_decay_mask(params)
        {'wte.weight': False, 'h.0.ln.weight': False, 'h.0.fc.weight': True, 'h.0.fc.bias': False}
        >>> opt = fo.adamw(1e-3, weight_decay=0.1, mask=default_decay_mask)
    """
    if isinstance(params_or_model, torch.nn.Module):
        return _model_decay_mask(params_or_model)
    leaves, spec = flatten(params_or_model)
    flags = [t.dim() > 1 and not EMBEDDING_NAMES.search(n) for n, t in zip(spec.names(), leaves, strict=True)]
    return spec.unflatten(flags)


def _model_decay_mask(model: torch.nn.Module) -> Callable[[Params], dict[str, bool]]:
    no_decay: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _NO_DECAY_TYPES):
            no_decay.update(f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters(recurse=False))
    names = _model_names(model)

    def mask(params: Params) -> Any:
        leaves, spec = flatten(params)
        flags = [t.dim() > 1 and n not in no_decay and not EMBEDDING_NAMES.search(n)
                 for n, t in zip(spec.names(), leaves, strict=True)]
        return spec.unflatten(flags)

    mask.model_names = names  # type: ignore[attr-defined]
    return mask


# -- transformations -----------------------------------------------------------------

def scale(factor: Scalar) -> GradientTransformation:
    """Multiply updates by a constant. Example: ``scale(-1.0)``."""

    def init(params: Params) -> EmptyState:
        return EmptyState()

    def update(updates: Updates, state: OptState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, OptState]:
        u, spec = flatten(updates)
        return spec.unflatten(foreach("mul", u, factor, inplace=inplace)), state

    return GradientTransformation(init, update, per_tensor=True)


def scale_by_learning_rate(learning_rate: float | Schedule) -> GradientTransformation:
    """Multiply updates by ``-learning_rate`` (a float, a tensor, or a schedule of the step count).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.chain(fo.scale_by_adam(), fo.scale_by_learning_rate(fo.warmup_cosine(1e-3, 100, 1000)))
    """
    schedule = as_schedule(learning_rate)

    def init(params: Params) -> CountState:
        return CountState(counter(first_leaf(params)))

    def update(updates: Updates, state: OptState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, OptState]:
        u, spec = flatten(updates)
        neg_lr = -float(learning_rate) if isinstance(learning_rate, int | float) \
            else per_step(-schedule(state.count))[0]
        out = foreach("mul", u, neg_lr, inplace=inplace)
        return spec.unflatten(out), CountState(count_up(state.count, inplace))

    return GradientTransformation(init, update, None, schedule, per_tensor=True)


def add_decayed_weights(weight_decay: Scalar, mask: Mask | None = None) -> GradientTransformation:
    """Add ``weight_decay * param`` to the updates of the parameters ``mask`` selects.

    ``mask``: see :data:`Mask` (e.g. :func:`default_decay_mask`).

    Example:
        >>> import fnlight.optim as fo
        >>> sgd_l2 = fo.chain(fo.add_decayed_weights(1e-4), fo.scale_by_learning_rate(0.1))
    """

    def init(params: Params) -> EmptyState:
        leaves, spec = flatten(params)
        mask_indices(mask, params, spec, "weight-decay mask")  # validate early
        return EmptyState()

    def update(updates: Updates, state: OptState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, OptState]:
        if params is None:
            raise ValueError("add_decayed_weights needs the params passed to update()")
        u, spec = flatten(updates)
        p = spec.flatten_up_to(params)
        idx = mask_indices(mask, params, spec, "weight-decay mask")
        return spec.unflatten(l2(u, p, weight_decay, idx, inplace=inplace)), state

    return GradientTransformation(init, update, per_tensor=mask is None)


def global_norm(tensors: Any) -> torch.Tensor:
    """The L2 norm of all tensors together (a list or any pytree of them), in the widest of
    their dtypes and at least float32, as ``torch.nn.utils.clip_grad_norm_`` computes it.

    Example:
        >>> import torch
        >>> global_norm([torch.full((4,), 0.5, dtype=torch.float64), torch.zeros(2)])
        tensor(1., dtype=torch.float64)
    """
    leaves = list(tensors) if isinstance(tensors, list | tuple) and all(isinstance(t, torch.Tensor)
                                                                         for t in tensors) else flatten(tensors)[0]
    if not leaves:
        return torch.zeros(())
    dtype = torch.float32
    for t in leaves:
        dtype = torch.promote_types(dtype, t.dtype)
    reduce = sum_across()
    if reduce is not None:  # sharded: this rank's pieces; the squares summed over the ranks
        squares = torch.stack([t.detach().to(dtype).square().sum() for t in leaves]).sum()
        return reduce(squares).sqrt()
    norms = fe("norm", leaves)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (norm + 1e-6))``: ``clip_grad_norm_``'s factor, the one place it is computed."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates by ``min(1, max_norm / (global_norm + 1e-6))``, as
    ``torch.nn.utils.clip_grad_norm_``.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.chain(fo.clip_by_global_norm(1.0), fo.adam(1e-3))
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")

    def init(params: Params) -> EmptyState:
        return EmptyState()

    def update(updates: Updates, state: OptState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, OptState]:
        g, spec = flatten(updates)
        if not g:
            return updates, state
        factor = clip_factor(global_norm(g), max_norm)
        return spec.unflatten(foreach("mul", g, factor, inplace=inplace)), state

    return GradientTransformation(init, update)
