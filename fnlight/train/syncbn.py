"""Synchronized BatchNorm that works under ``torch.func`` transforms.

``torch.nn.SyncBatchNorm`` (and ``torch.distributed.nn.functional.all_reduce``) are
built on old-style ``autograd.Function``s, which ``torch.func.grad`` rejects. This
module provides the same computation from a differentiable all-reduce written
with a separate ``setup_context`` (which torch.func supports):

- :func:`all_reduce_sum`: a sum across ranks whose gradient is the sum across
  ranks of the incoming gradients;
- :func:`sync_batch_norm`: BatchNorm in training mode with the batch statistics
  of all ranks together (one flat all-reduce per call);
- :func:`convert_sync_batchnorm`: a copy of a module template whose BatchNorm
  layers use it, with unchanged parameter and buffer names.

``make_train_step(..., sync_batchnorm=True)`` uses them; they are public for
custom steps.

Example:
    ```python
    template = convert_sync_batchnorm(model)     # model: an nn.Module with BatchNorm layers
    out = torch.func.functional_call(template, (state.params, state.buffers), (x,))
    ```
"""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from .. import distributed

__all__ = ["all_reduce_sum", "convert_sync_batchnorm", "group_size", "has_batchnorm", "sync_batch_norm"]


def group_size(group: Any = None) -> int:
    """The number of ranks in ``group`` (the default group when None); 1 without a process group.

    Example:
        >>> group_size()
        1
    """
    if not distributed.is_initialized():
        return 1
    return dist.get_world_size(group)


class _AllReduceSum(torch.autograd.Function):
    """``y = sum over ranks of x``, on every rank. Every rank's output depends on every
    rank's input, so the gradient of ``x`` on a rank is the sum over ranks of the
    gradients of ``y``: the backward is the same all-reduce."""

    @staticmethod
    def forward(x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        # Under torch.func the forward receives plain tensors, which c10d can reduce.
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        # The incoming gradient may be a torch.func wrapper, which c10d cannot take: applying
        # the Function again unwraps it (and keeps the backward itself differentiable).
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The sum of ``x`` across the ranks of ``group``, differentiable (also under
    ``torch.func.grad``/``vjp``): the gradient of ``x`` is the sum across ranks of the
    gradients of the result. Returns ``x`` itself with one rank or no process group.

    Every rank must call it, in the same order, with a tensor of the same shape and dtype.

    Example:
        ```python
        total = all_reduce_sum(local_sum)   # inside a loss: gradients flow to every rank
        ```
    """
    if group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


def sync_batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, momentum: float | torch.Tensor, eps: float,
                    group: Any = None) -> torch.Tensor:
    """BatchNorm in training mode over the batch of all ranks together (``x``: ``(N, C, ...)``, this
    rank's part), as ``torch.nn.SyncBatchNorm`` computes it.

    Each rank's per-channel mean, sum of squared deviations and count go into its own slot of one
    flat buffer, all-reduced once; the global mean and variance are then combined exactly (parallel
    Welford, as torch's SyncBatchNorm does after its all-gather), which avoids the cancellation of
    ``E[x^2] - E[x]^2`` in float32. The buffer holds ``world * (2C + 1)`` numbers. Ranks may hold
    different numbers of samples (even none). Gradients flow through the statistics to every rank.

    ``running_mean``/``running_var`` (if given) are updated in place with factor ``momentum`` (a
    float, or a 0-dim tensor such as ``1 / num_batches_tracked``), with
    the unbiased variance over the global count, like ``torch.nn.functional.batch_norm`` on the whole
    batch. Statistics are computed in at least float32; the result has ``x``'s dtype.

    Example:
        ```python
        y = sync_batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, 0.1, 1e-5)
        ```
    """
    if x.dim() < 2:
        raise ValueError(f"sync_batch_norm expects an input of shape (N, C, ...), got {tuple(x.shape)}")
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    count = x.numel() // channels if channels else 0
    if count > 0:
        var, mean = torch.var_mean(xs, dim=dims, correction=0)
        m2 = var * count
    else:
        # zeros that still depend on x: this rank's backward must run the same all-reduce as the others'
        mean = m2 = xs.sum(dims)
    world = group_size(group)
    me = 0 if world == 1 else dist.get_rank(group)  # (this rank's index within the group)
    width = 2 * channels + 1
    # This rank writes its slot, the others are zeros: the sum is the gather of every rank's slot.
    mine = torch.cat([mean, m2, xs.new_full((1,), float(count))])
    flat = torch.cat([xs.new_zeros(me * width), mine, xs.new_zeros((world - me - 1) * width)])
    slots = all_reduce_sum(flat, group).view(world, width)
    means, m2s, counts = slots[:, :channels], slots[:, channels:2 * channels], slots[:, 2 * channels:]
    total = counts.sum()
    g_mean = (counts * means).sum(0) / total
    g_m2 = (m2s + counts * (means - g_mean) ** 2).sum(0)
    g_var = g_m2 / total
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_((g_mean.detach() * momentum).to(running_mean.dtype))
            unbiased = g_m2.detach() / (total - 1)  # (nan when the whole batch is one sample, as torch's)
            running_var.mul_(1 - momentum).add_((unbiased * momentum).to(running_var.dtype))
    shape = [1, channels] + [1] * (x.dim() - 2)
    y = (xs - g_mean.view(shape)) * torch.rsqrt(g_var + eps).view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(x.dtype)


class _SyncBatchNormMixin:
    """Put before a BatchNorm class: in training mode with more than one rank, the batch
    statistics are global; otherwise the BatchNorm's own forward runs (the same code path)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bn: Any = self
        group = getattr(bn, "process_group", None)  # set on torch.nn.SyncBatchNorm modules
        if not bn.training or group_size(group) == 1:
            return super().forward(input)  # type: ignore[misc]
        bn._check_input_dim(input)
        # The running-average factor, as torch's _BatchNorm.forward computes it, except that the
        # cumulative average (momentum=None) keeps it a tensor: no host read, nothing for
        # torch.compile to break its graph on.
        factor: float | torch.Tensor = 0.0 if bn.momentum is None else bn.momentum
        if bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / bn.num_batches_tracked.double()
        running = bn.track_running_stats
        return sync_batch_norm(input, bn.running_mean if running else None, bn.running_var if running else None,
                               bn.weight, bn.bias, factor, bn.eps, group)


_SYNC_CLASSES: dict[type, type] = {}


def _sync_class(cls: type) -> type:
    if cls not in _SYNC_CLASSES:
        _SYNC_CLASSES[cls] = type(f"Sync{cls.__name__}", (_SyncBatchNormMixin, cls), {"__module__": __name__})
    return _SYNC_CLASSES[cls]


def _convertible(module: torch.nn.Module) -> bool:
    """A BatchNorm whose forward is torch's own (a subclass with its own forward is left alone)."""
    return type(module).forward in (_BatchNorm.forward, torch.nn.SyncBatchNorm.forward)


def convert_sync_batchnorm(model: torch.nn.Module, *, plain: bool = True) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm layers (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) compute
    their training-mode statistics across ranks with :func:`sync_batch_norm`. With ``plain=False``
    only the ``torch.nn.SyncBatchNorm`` layers are converted (their own forward uses an
    autograd.Function that torch.func rejects, and accepts only GPU tensors).

    The copy is a template for ``torch.func.functional_call``: parameter and buffer names are
    unchanged (so states and checkpoints fit both), and it shares the parameter and buffer tensors
    of ``model`` rather than copying them. ``model`` itself is not changed. In eval mode, or with one
    rank, the layers run torch's BatchNorm code unchanged. BatchNorm subclasses that override
    ``forward`` are not converted (with a warning).

    Example:
        >>> template = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)))
        >>> type(template[1]).__name__
        'SyncBatchNorm1d'
    """
    # Tensors map to themselves: the copy costs the modules, not the weights.
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    try:
        clone = copy.deepcopy(model, memo)
    except Exception as e:  # noqa: BLE001 - any failure of a user's __deepcopy__ gets the same explanation
        raise TypeError(f"sync_batchnorm needs a copy of the model template, and copy.deepcopy failed: {e}") from e
    for name, module in clone.named_modules():
        if not isinstance(module, _BatchNorm) or isinstance(module, _SyncBatchNormMixin):
            continue
        if not plain and not isinstance(module, torch.nn.SyncBatchNorm):
            continue
        if _convertible(module):
            module.__class__ = _sync_class(type(module))
        else:
            warnings.warn(f"sync_batchnorm: {name} ({type(module).__name__}) overrides forward and is not "
                          "synchronized across ranks", stacklevel=2)
    return clone


def has_batchnorm(model: torch.nn.Module, *, plain: bool = True) -> bool:
    """True when ``model`` holds a BatchNorm layer (with ``plain=False``: a ``torch.nn.SyncBatchNorm``).

    Example:
        >>> has_batchnorm(torch.nn.BatchNorm2d(3)), has_batchnorm(torch.nn.BatchNorm2d(3), plain=False)
        (True, False)
    """
    kind = _BatchNorm if plain else torch.nn.SyncBatchNorm
    return any(isinstance(m, kind) for m in model.modules())
