"""Parameter groups: ``masked``, ``multi_transform``, ``label_by_name``, ``set_to_zero``, ``freeze``
(optax's semantics).

A transformation applied to a group sees a flat dict of that group's leaves, keyed by their
names (the dict's own keys for a flat dict of parameters, dotted paths for nested trees), so
masks written with parameter names keep working inside a group.

Example (torch's param groups: no weight decay for biases and norms, a smaller rate for the head):
    >>> import torch, fnlight.optim as fo
    >>> labels = fo.label_by_name({"head.*": "head", "*.bias": "no_decay", "*norm*": "no_decay"}, default="decay")
    >>> opt = fo.multi_transform({"decay": fo.adamw(1e-3, weight_decay=0.1),
    ...                           "no_decay": fo.adamw(1e-3, weight_decay=0.0),
    ...                           "head": fo.adamw(1e-4, weight_decay=0.1)}, labels)
    >>> params = {"body.weight": torch.ones(2, 2), "body.bias": torch.ones(2), "head.weight": torch.ones(1, 2)}
    >>> state = opt.init(params)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ._base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    Spec,
    Updates,
    flatten,
    foreach,
    scatter,
    select,
)
from ._base import step as opt_step
from ._transforms import Mask, resolve_mask

Labels = Callable[[Params], Any] | Mapping[str, str] | Any


class MaskedState(NamedTuple):
    inner_state: OptState


class MultiTransformState(NamedTuple):
    inner_states: dict[str, OptState]


def _sub(leaves: list[torch.Tensor], names: list[str], idx: list[int]) -> dict[str, torch.Tensor]:
    return {names[i]: leaves[i] for i in idx}


def _group_step(inner: GradientTransformation, grads: dict[str, torch.Tensor], state: OptState,
                params: dict[str, torch.Tensor], inplace: bool) -> tuple[dict[str, torch.Tensor], OptState]:
    if not grads:
        return params, state
    return opt_step(inner, grads, state, params, inplace=inplace)


def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Apply ``inner`` to the parameters ``mask`` selects; the other updates pass through
    unchanged (optax's ``masked``: in a chain, later transformations still see them).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.chain(fo.masked(fo.add_decayed_weights(0.1), fo.default_decay_mask),
        ...                fo.scale_by_learning_rate(0.1))
    """

    def split(tree: Any, params: Any) -> tuple[list[torch.Tensor], Spec, list[str], list[int]]:
        leaves, spec = flatten(tree)
        idx = [i for i, on in enumerate(resolve_mask(mask, params, spec)) if on]
        return leaves, spec, spec.names(), idx

    def init(params: Params) -> MaskedState:
        leaves, _, names, idx = split(params, params)
        return MaskedState(inner.init(_sub(leaves, names, idx)))

    def update(updates: Updates, state: MaskedState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, MaskedState]:
        u, spec, names, idx = split(updates, params if params is not None else updates)
        sub_p = _sub(spec.flatten_up_to(params), names, idx) if params is not None else None
        new, inner_state = inner.update(_sub(u, names, idx), state.inner_state, sub_p, inplace=inplace)
        return spec.unflatten(scatter(u, idx, list(new.values()))), MaskedState(inner_state)

    def step(grads: Updates, state: MaskedState, params: Params, *, inplace: bool = False
             ) -> tuple[Params, MaskedState]:
        g, spec, names, idx = split(grads, params)
        p = spec.flatten_up_to(params)
        new, inner_state = _group_step(inner, _sub(g, names, idx), state.inner_state, _sub(p, names, idx), inplace)
        rest = [i for i in range(len(p)) if i not in set(idx)]  # their updates pass through: p + g
        out = scatter(p, idx, list(new.values()))
        out = scatter(out, rest, foreach("add", select(p, rest), select(g, rest), inplace=inplace))
        return spec.unflatten(out), MaskedState(inner_state)

    return GradientTransformation(init, update, step, inner.learning_rate)


def _resolve_labels(labels: Labels, params: Params, spec: Spec, known: Sequence[str]) -> list[str]:
    """One label per leaf; computed once per labels and parameter structure (see ``resolve_mask``)."""
    names = spec.names()
    key = (id(labels), tuple(names), tuple(tuple(t.shape) for t in spec.flatten_up_to(params)), tuple(known))
    hit = _LABELS.get(key)
    if hit is not None and hit[0] is labels:
        return hit[1]
    if len(_LABELS) > 512:
        _LABELS.clear()
    out = _compute_labels(labels, params, spec, names, known)
    _LABELS[key] = (labels, out)
    return out


_LABELS: dict[tuple[Any, ...], tuple[Any, list[str]]] = {}


def _compute_labels(labels: Labels, params: Params, spec: Spec, names: list[str], known: Sequence[str]) -> list[str]:
    lab = labels(params) if callable(labels) else labels
    if isinstance(lab, Mapping) and all(isinstance(v, str) for v in lab.values()) and set(lab) <= set(names):
        missing = [n for n in names if n not in lab]
        if missing:
            raise ValueError(f"multi_transform: no label for the parameters {missing}; give every parameter one of "
                             f"{sorted(known)} (label_by_name(..., default=...) gives the rest a default)")
        out = [lab[n] for n in names]
    else:
        try:
            out = list(spec.flatten_up_to(lab))
        except (ValueError, TypeError) as e:
            extra = sorted(set(lab) - set(names)) if isinstance(lab, Mapping) else None
            hint = f" (these names are not parameters: {extra})" if extra else ""
            raise ValueError("multi_transform's labels must map every parameter name to a label or be a tree of "
                             f"labels shaped like the params{hint}") from e
    bad = sorted({x for x in out if x not in known})
    if bad:
        raise ValueError(f"multi_transform: labels {bad} have no transformation; the transformations are "
                         f"{sorted(known)}")
    return out


def multi_transform(transforms: Mapping[str, GradientTransformation], labels: Labels) -> GradientTransformation:
    """Parameter groups: each parameter gets the transformation of its label (optax's
    ``multi_transform``). ``labels``: a mapping of parameter names to labels, a tree of labels
    shaped like the params, or a function of the params returning either (see
    :func:`label_by_name`).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.multi_transform({"decay": fo.adamw(1e-3, weight_decay=0.1), "frozen": fo.set_to_zero()},
        ...                          lambda params: {k: "frozen" if k.startswith("embed") else "decay"
        ...                                          for k in params})
    """
    names_of = list(transforms)
    if not names_of:
        raise ValueError("multi_transform needs at least one transformation")

    def split(tree: Any, params: Any) -> tuple[list[torch.Tensor], Spec, list[str], dict[str, list[int]]]:
        leaves, spec = flatten(tree)
        lab = _resolve_labels(labels, params, spec, names_of)
        groups: dict[str, list[int]] = {k: [] for k in names_of}
        for i, x in enumerate(lab):
            groups[x].append(i)
        return leaves, spec, spec.names(), groups

    def init(params: Params) -> MultiTransformState:
        leaves, _, names, groups = split(params, params)
        return MultiTransformState({k: transforms[k].init(_sub(leaves, names, ix)) for k, ix in groups.items()})

    def update(updates: Updates, state: MultiTransformState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, MultiTransformState]:
        u, spec, names, groups = split(updates, params if params is not None else updates)
        p = spec.flatten_up_to(params) if params is not None else None
        out, states = list(u), {}
        for k, ix in groups.items():
            new, states[k] = transforms[k].update(_sub(u, names, ix), state.inner_states[k],
                                                  _sub(p, names, ix) if p is not None else None, inplace=inplace)
            out = scatter(out, ix, list(new.values()))
        return spec.unflatten(out), MultiTransformState(states)

    def step(grads: Updates, state: MultiTransformState, params: Params, *, inplace: bool = False
             ) -> tuple[Params, MultiTransformState]:
        g, spec, names, groups = split(grads, params)
        p = spec.flatten_up_to(params)
        out, states = list(p), {}
        for k, ix in groups.items():
            new, states[k] = _group_step(transforms[k], _sub(g, names, ix), state.inner_states[k],
                                         _sub(p, names, ix), inplace)
            out = scatter(out, ix, list(new.values()))
        return spec.unflatten(out), MultiTransformState(states)

    rate = next((t.learning_rate for t in transforms.values() if t.learning_rate is not None), None)
    return GradientTransformation(init, update, step, rate)


def label_by_name(rules: Mapping[str, str] | Sequence[tuple[str, str]], default: str | None = None
                  ) -> Callable[[Params], Any]:
    """Labels for :func:`multi_transform` from parameter-name patterns, for users of torch's
    param groups: ``rules`` maps shell-style patterns (``fnmatch``: ``*.bias``, ``*norm*``,
    ``head.*``) to labels, the first matching pattern wins; names no pattern matches get
    ``default`` (an error without one).

    Example:
        >>> import torch
        >>> labels = label_by_name({"*.bias": "no_decay", "*norm*": "no_decay"}, default="decay")
        >>> labels({"fc.weight": torch.ones(1), "fc.bias": torch.ones(1)})
        {'fc.weight': 'decay', 'fc.bias': 'no_decay'}
    """
    pairs = list(rules.items()) if isinstance(rules, Mapping) else [tuple(r) for r in rules]

    def labels(params: Params) -> Any:
        leaves, spec = flatten(params)
        out, unmatched = [], []
        for n in spec.names():
            label = next((lab for pat, lab in pairs if fnmatch.fnmatchcase(n, pat)), default)
            if label is None:
                unmatched.append(n)
            out.append(label)
        if unmatched:
            raise ValueError(f"label_by_name: no pattern matches {unmatched} and there is no default; patterns: "
                             f"{[p for p, _ in pairs]}")
        return spec.unflatten(out)

    return labels


def set_to_zero() -> GradientTransformation:
    """Updates of zero: the parameters it is applied to do not change (optax's ``set_to_zero``).
    Its ``step`` returns them as they are, without reading the gradients.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.multi_transform({"train": fo.adam(1e-3), "frozen": fo.set_to_zero()},
        ...                          fo.label_by_name({"encoder.*": "frozen"}, default="train"))
    """

    def init(params: Params) -> EmptyState:
        return EmptyState()

    def update(updates: Updates, state: OptState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, OptState]:
        u, spec = flatten(updates)
        return spec.unflatten(foreach("zero", u, inplace=True) if inplace else [torch.zeros_like(t) for t in u]), \
            state

    def step(grads: Updates, state: OptState, params: Params, *, inplace: bool = False) -> tuple[Params, OptState]:
        return params, state

    return GradientTransformation(init, update, step)


def freeze(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """``inner`` for every parameter but those ``mask`` selects, which do not change (a
    frozen group: no optimizer state is kept for them).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.freeze(fo.adamw(1e-4), lambda params: {k: k.startswith("backbone.") for k in params})
    """

    def labels(params: Params) -> Any:
        leaves, spec = flatten(params)
        return spec.unflatten(["frozen" if on else "train" for on in resolve_mask(mask, params, spec, "freeze mask")])

    return multi_transform({"train": inner, "frozen": set_to_zero()}, labels)


