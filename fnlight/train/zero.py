"""Sharded optimizer state (ZeRO-1): each rank keeps the optimizer state of 1/N of the parameters.

``make_train_step(..., shard_optimizer_state=True)`` under ``torch.distributed`` with N > 1 ranks.
The parameters, in the order of ``state.params``, form one flat buffer (one dtype), each tensor
starting at a multiple of 64 elements (:data:`ALIGN`); rank ``r`` owns the contiguous slice
``[r c, (r + 1) c)`` of it, ``c`` the buffer's length over N rounded up to a multiple of 64
(balanced to within the alignment; the optimizer's vectorized kernels then treat every element as
in the whole tensor, so the sharded update is bitwise the replicated one). A parameter tensor may
straddle a boundary: each rank holds a *piece* of it (the elements of its slice, viewed with the
tensor's number of dimensions, leading ones of size 1, so that masks like "decay weights with
``dim() > 1``" see what they see on whole tensors); a rank holds an empty piece of every tensor
outside its slice, so every rank runs the optimizer on the same names, in the same order.

One step (inside ``TrainStep``):

1. each rank computes its gradients (``accumulate`` micro-batches, ``precision``) as ever;
2. the flat gradients are reduce-scattered (``reduce_scatter_tensor``, a sum; gloo has it in torch
   2.13) and divided by N: each rank gets the mean gradient of its slice only;
3. the non-finite check reads the loss and this rank's slice, and the ranks agree (``all_true``);
4. the optimizer updates this rank's piece of every parameter, told where each piece lies in its
   tensor (:meth:`Layout.piece_map`: the whole shape and the piece's first flat index, see
   :func:`fnlight.optim.sharded`). Statistics of whole tensors are sums of the pieces' partial sums
   across ranks (small all-reduces): the norms of ``clip``, ``clip_by_global_norm``, ``lamb`` and
   ``lars``; adafactor's row and column means of ``g * g + eps`` (summed by each element's row and
   column index into whole-size vectors) and the RMS of its updates and parameters;
   adaptive_grad_clip's per-unit (row) norms;
5. the new pieces are all-gathered (``all_gather_into_tensor``) into the new parameters.

The state stays an ordinary ``TrainState``: ``state.opt_state`` becomes a :class:`ShardedOptState`,
whose ``inner`` is the optimizer's own state over this rank's pieces (ordinary tensor leaves) and
whose ``layout`` says which slice (``[rank, world, total]``). State leaves shaped like their parameter
are cut into pieces; a state type may keep others whole (the same on every rank, updated identically)
with a static method ``sharding_keeps_whole(field, leaf, shape)``: adafactor's factored moments
(``v_row``, ``v_col``, one row and one column statistic per matrix) are kept whole, its unfactored
second moments and momentum are cut; any other leaf not shaped like its parameter is refused. The
first sharded step shards the ordinary ``TrainState.create`` state (or a resumed, unsharded one);
:func:`unshard` gathers the whole optimizer state back (what the Trainer does before writing a
checkpoint, so a checkpoint of a sharded run resumes on any number of ranks, sharded or not).

Example:
    ```python
    step = fnlight.make_train_step(model, loss_fn, fo.adam(1e-3), shard_optimizer_state=True)
    state, metrics = step(fnlight.TrainState.create(model, fo.adam(1e-3)), batch)   # under torchrun
    full = unshard(state)        # every rank: the replicated optimizer state again
    ```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import optree
import torch
import torch.distributed as dist

from .. import distributed
from ..optim import GradientTransformation, Piece
from .state import Tensors, TrainState

__all__ = ["ALIGN", "Layout", "ShardedOptState", "all_gather_params", "check_layout", "is_sharded",
           "reduce_scatter_mean", "shard", "shard_opt_state", "sum_across", "unshard"]


class ShardedOptState(NamedTuple):
    """The optimizer state of one rank's slice of the flat parameters (see the module docstring)."""

    inner: Any  # the optimizer's state over this rank's pieces
    layout: torch.Tensor  # int64 [rank, world, total elements]


def is_sharded(state: TrainState) -> bool:
    """True when ``state.opt_state`` is one rank's shard (:class:`ShardedOptState`)."""
    return isinstance(state.opt_state, ShardedOptState)


#: Every tensor starts at a multiple of this many elements of the flat buffer, and the ranks' slices
#: are multiples of it too: every element of a piece then takes the same (vectorized or scalar-tail)
#: path through the optimizer's kernels as in the whole tensor, so the sharded update is bitwise the
#: replicated one; and the parameters rebuilt from the all-gathered buffer are aligned views of it.
ALIGN = 64


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Layout:
    """Where each parameter lies in the flat buffer and which slice ``[rank chunk, (rank + 1) chunk)``
    of it this rank owns. Tensor ``i`` takes ``[offsets[i], offsets[i] + numel)``, followed by zeros up
    to the next multiple of :data:`ALIGN`; ``chunk`` is ``ceil(padded total / N)`` rounded up to a
    multiple of :data:`ALIGN` (the buffer ends with zeros up to ``N chunk``)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]  # of each tensor in the flat buffer (multiples of ALIGN)
    total: int  # the parameters' elements
    rank: int
    world: int

    @classmethod
    def of(cls, params: Tensors, rank: int, world: int) -> Layout:
        dtypes = {(t.dtype, t.device) for t in params.values()}
        if len(dtypes) != 1:
            raise TypeError(f"shard_optimizer_state=True needs parameters of one dtype and device, got "
                            f"{sorted(str(d) for d in dtypes)}: cast them (e.g. all float32) or do not shard")
        offsets, at = [], 0
        for t in params.values():
            offsets.append(at)
            at += _up(t.numel())
        return cls(tuple(params), tuple(t.shape for t in params.values()), tuple(offsets),
                   sum(t.numel() for t in params.values()), rank, world)

    @property
    def padded(self) -> int:
        """The flat buffer's length before the final padding: the last tensor's padded end."""
        return self.offsets[-1] + _up(self.shapes[-1].numel()) if self.names else 0

    @property
    def chunk(self) -> int:
        """Elements of the flat buffer per rank."""
        return max(ALIGN, _up(-(-self.padded // self.world)))

    def bounds(self, i: int, rank: int | None = None) -> tuple[int, int]:
        """The range of tensor ``i``'s elements in a rank's slice (empty when it lies outside)."""
        r = self.rank if rank is None else rank
        n = self.shapes[i].numel()
        a = min(max(r * self.chunk - self.offsets[i], 0), n)
        b = min(max((r + 1) * self.chunk - self.offsets[i], 0), n)
        return a, max(a, b)

    def piece_shape(self, i: int) -> tuple[int, ...]:
        a, b = self.bounds(i)
        d = len(self.shapes[i])
        if d == 0:
            return () if b - a == 1 else (0,)
        return (1,) * (d - 1) + (b - a,)

    def piece_map(self) -> dict[str, Piece]:
        """Where this rank's piece of each parameter lies in it (what :func:`fnlight.optim.sharded` gets)."""
        return {k: Piece(self.shapes[i], self.bounds(i)[0]) for i, k in enumerate(self.names)}

    def pieces(self, tree: Tensors) -> Tensors:
        """This rank's piece of every tensor of a params-shaped dict (views, no copy)."""
        out = {}
        for i, k in enumerate(self.names):
            a, b = self.bounds(i)
            out[k] = tree[k].reshape(-1)[a:b].view(self.piece_shape(i))
        return out

    def _parts(self, get: Any, lo: int, hi: int, like: torch.Tensor) -> list[torch.Tensor]:
        """``[lo, hi)`` of a flat buffer as views and zero blocks to concatenate; ``get(i, a, b)`` gives
        tensor ``i``'s elements ``[a, b)`` (flat)."""
        parts, at = [], lo
        for i, shape in enumerate(self.shapes):
            start, n = self.offsets[i], shape.numel()
            a, b = min(max(lo - start, 0), n), min(max(hi - start, 0), n)
            if b <= a:
                continue
            if start + a > at:
                parts.append(like.new_zeros(start + a - at))
            parts.append(get(i, a, b))
            at = start + b
        if at < hi:
            parts.append(like.new_zeros(hi - at))
        return parts

    def local_flat(self, pieces: Tensors) -> torch.Tensor:
        """This rank's pieces as its ``chunk`` elements of the flat buffer."""
        lo = self.rank * self.chunk
        leaves = [pieces[k] for k in self.names]
        return torch.cat(self._parts(lambda i, a, b: leaves[i].reshape(-1), lo, lo + self.chunk, leaves[0]))

    def flat(self, tree: Tensors) -> torch.Tensor:
        """A params-shaped dict as the whole flat buffer (``world * chunk`` elements)."""
        leaves = [tree[k] for k in self.names]
        return torch.cat(self._parts(lambda i, a, b: leaves[i].reshape(-1)[a:b], 0, self.world * self.chunk,
                                     leaves[0]))

    def split_local(self, flat: torch.Tensor) -> Tensors:
        """This rank's ``chunk`` elements of a flat buffer as pieces (views)."""
        lo, out = self.rank * self.chunk, {}
        for i, k in enumerate(self.names):
            a, b = self.bounds(i)
            at = self.offsets[i] + a - lo
            out[k] = flat[at:at + b - a].view(self.piece_shape(i)) if b > a else flat[:0].view(self.piece_shape(i))
        return out

    def split_full(self, flat: torch.Tensor) -> Tensors:
        """The whole flat buffer as params-shaped tensors (views)."""
        return {k: flat[o:o + s.numel()].view(s) for k, o, s in zip(self.names, self.offsets, self.shapes, strict=True)}


def _layout_of(state: TrainState) -> Layout:
    return Layout.of(state.params, distributed.rank(), distributed.world_size())


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (a new tensor): the reduction :func:`fnlight.optim.sharded` uses.

    Example:
        ```python
        with fnlight.optim.sharded(sum_across): ...     # what the sharded step does around the optimizer
        ```
    """
    t = t.clone()
    dist.all_reduce(t)
    return t


def map_pieces(opt_state: Any, layout: Layout, fn: Any, what: str) -> Any:
    """Apply ``fn(i, leaf, path, what)`` to the optimizer-state leaves that are pieces of parameter
    ``i`` (found under the parameter's name); other leaves (counts, hyperparameters, and what a state
    type keeps whole, see :func:`kept_whole`) are kept as they are.

    Example:
        ```python
        inner = map_pieces(state.opt_state, layout, lambda i, leaf, path, what: leaf[:1], "cut")
        ```
    """
    accessors, leaves, spec = optree.tree_flatten_with_accessor(opt_state, none_is_leaf=False)
    index = {k: i for i, k in enumerate(layout.names)}
    out = []
    for accessor, leaf in zip(accessors, leaves, strict=True):
        path = tuple(e.entry for e in accessor)
        i = next((index[p] for p in reversed(path) if isinstance(p, str) and p in index), None)
        if i is None or not isinstance(leaf, torch.Tensor) or leaf.dim() == 0 and layout.shapes[i] != () \
                or kept_whole(accessor, leaf, layout.shapes[i]):
            out.append(leaf)
            continue
        out.append(fn(i, leaf, path, what))
    return optree.tree_unflatten(spec, out)


def kept_whole(accessor: Any, leaf: torch.Tensor, shape: torch.Size) -> bool:
    """Whether sharding keeps an optimizer-state leaf of a parameter of shape ``shape`` whole on
    every rank (the same, updated identically) instead of cutting it like the parameter: when the
    innermost state NamedTuple around it says so with a static method
    ``sharding_keeps_whole(field, leaf, shape) -> bool`` (adafactor's factored moments:
    :class:`fnlight.optim.FactoredState`).

    Example:
        ```python
        accessors, leaves, _ = optree.tree_flatten_with_accessor(fo.adafactor().init(params))
        whole = [kept_whole(a, leaf, params["w"].shape) for a, leaf in zip(accessors, leaves)]
        ```
    """
    entry = next((e for e in reversed(tuple(accessor)) if isinstance(e, optree.NamedTupleEntry)), None)
    rule = getattr(entry.type, "sharding_keeps_whole", None) if entry is not None else None
    return rule is not None and bool(rule(entry.field, leaf, shape))


def shard(state: TrainState, optimizer: GradientTransformation) -> TrainState:
    """This rank's shard of an ordinary (replicated) state's optimizer state; parameters unchanged.

    Example:
        ```python
        state = shard(fnlight.TrainState.create(model, opt), opt)    # what the first sharded step does
        ```
    """
    layout = _layout_of(state)
    layout_t = torch.tensor([layout.rank, layout.world, layout.total], dtype=torch.int64)
    return state.replace(opt_state=ShardedOptState(shard_opt_state(state.opt_state, layout), layout_t))


def shard_opt_state(opt_state: Any, layout: Layout) -> Any:
    """The pieces of a whole optimizer state that ``layout``'s rank keeps (copies): leaves shaped like
    their parameter are cut, what the state type keeps whole (:func:`kept_whole`) is copied whole.

    Example:
        ```python
        inner = shard_opt_state(opt.init(params), Layout.of(params, rank=1, world=2))
        ```
    """

    def cut(i: int, leaf: torch.Tensor, path: tuple[Any, ...], what: str) -> torch.Tensor:
        if leaf.shape != layout.shapes[i]:
            raise ValueError(
                f"cannot shard the optimizer state leaf {'/'.join(map(str, path))}: shape {tuple(leaf.shape)}, but "
                f"its parameter {layout.names[i]} has shape {tuple(layout.shapes[i])}; ZeRO-1 sharding cuts "
                "optimizer state shaped like the parameters, and keeps whole what its state type declares with "
                "sharding_keeps_whole (as adafactor's FactoredState does): declare it, or use "
                "shard_optimizer_state=False")
        a, b = layout.bounds(i)
        return leaf.reshape(-1)[a:b].clone().view(layout.piece_shape(i))

    return map_pieces(opt_state, layout, cut, "shard")


def check_layout(state: TrainState) -> Layout:
    """The layout of a sharded state, checked against this process group and the parameters.

    Example:
        ```python
        layout = check_layout(state); pieces = layout.pieces(state.params)
        ```
    """
    layout = _layout_of(state)
    rank, world, total = (int(v) for v in state.opt_state.layout)
    if (rank, world, total) != (layout.rank, layout.world, layout.total):
        raise ValueError(
            f"this optimizer state is rank {rank}'s shard of {world} ranks ({total} parameters), but this is rank "
            f"{layout.rank} of {layout.world} ({layout.total} parameters): a shard resumes only where it was made; "
            "pass fnlight.train.zero.unshard(state) (on the ranks that made it) or a checkpoint written by the "
            "Trainer (which holds the whole optimizer state) instead")
    return layout


def unshard(state: TrainState) -> TrainState:
    """The whole (replicated) optimizer state on every rank, gathered from the ranks' shards: a
    collective, every rank must call it. An unsharded state is returned as it is.

    Example:
        ```python
        fnlight.save_checkpoint("ck", unshard(state)) if fnlight.distributed.rank() == 0 else None
        ```
    """
    if not is_sharded(state):
        return state
    layout = check_layout(state)
    groups: dict[tuple[Any, ...], dict[int, torch.Tensor]] = {}

    def collect(i: int, leaf: torch.Tensor, path: tuple[Any, ...], what: str) -> torch.Tensor:
        groups.setdefault(path[:-1], {})[i] = leaf
        return leaf

    map_pieces(state.opt_state.inner, layout, collect, "collect")
    # one all-gather per group of pieces (Adam: mu and nu), each a padded chunk per rank
    full: dict[tuple[Any, ...], Tensors] = {}
    for group, pieces in groups.items():
        # a group may hold some parameters only (masked, multi_transform, freeze): zeros stand in for the rest
        like = next(iter(pieces.values()))
        local = layout.local_flat({k: pieces[i] if i in pieces else like.new_zeros(layout.piece_shape(i))
                                   for i, k in enumerate(layout.names)})
        out = local.new_empty(layout.world * layout.chunk)
        dist.all_gather_into_tensor(out, local.contiguous())
        full[group] = layout.split_full(out)

    def whole(i: int, leaf: torch.Tensor, path: tuple[Any, ...], what: str) -> torch.Tensor:
        return full[path[:-1]][layout.names[i]].clone()

    return state.replace(opt_state=map_pieces(state.opt_state.inner, layout, whole, "unshard"))


def reduce_scatter_mean(grads: Tensors, layout: Layout) -> Tensors:
    """The mean over ranks of this rank's slice of the gradients, as pieces (one reduce-scatter).

    Example:
        ```python
        grads = reduce_scatter_mean(grads, check_layout(state))
        ```
    """
    flat = layout.flat(grads)
    out = flat.new_empty(layout.chunk)
    dist.reduce_scatter_tensor(out, flat)
    out /= layout.world
    return layout.split_local(out)


def all_gather_params(pieces: Tensors, layout: Layout) -> Tensors:
    """Every rank's new pieces as whole parameters (one all-gather into a fresh flat buffer; the
    parameters are views of it).

    Example:
        ```python
        params = all_gather_params(new_pieces, layout)
        ```
    """
    local = layout.local_flat(pieces)
    out = local.new_empty(layout.world * layout.chunk)
    dist.all_gather_into_tensor(out, local.contiguous())
    return layout.split_full(out)
