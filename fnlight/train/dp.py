"""Per-sample gradients and DP-SGD: ``vmap(grad)`` over the samples of a batch.

:func:`per_sample_grads` gives each sample's gradient (as Opacus's per-sample gradients);
``make_train_step(..., dp=DPConfig(...))`` clips them, adds noise drawn from the state's key and
averages them (Opacus's ``DPOptimizer`` arithmetic). See docs/ensembles.md.

Example:
    >>> import torch, fnlight, fnlight.optim as fo
    >>> model = torch.nn.Linear(4, 2)
    >>> def loss_fn(model_fn, batch, key):
    ...     x, y = batch
    ...     return torch.nn.functional.cross_entropy(model_fn(x), y)
    >>> step = fnlight.make_train_step(model, loss_fn, fo.sgd(0.1), dp=fnlight.DPConfig(1.0, 1.1))
    >>> state = fnlight.TrainState.create(model, fo.sgd(0.1))
    >>> state, metrics = step(state, (torch.randn(8, 4), torch.randint(0, 2, (8,))))
    >>> sorted(metrics)
    ['clipped', 'grad_norm', 'loss']
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.func import grad_and_value

from .. import distributed
from .. import random as fr
from ..optim import GradientTransformation, global_norm
from ..optim import step as optim_step
from ..tree import batch_size, tree_map
from . import checks
from ._vmap import ModelFns, Vectorizable, explain_vmap_errors, vmap_tree
from .ensemble import num_members
from .state import TrainState
from .step import LossFn, Metrics, NonFiniteError, Precision, autocast, split_loss

__all__ = ["DPConfig", "DPTrainStep", "PerSampleGrads", "clip_per_sample", "per_sample_grads"]


def _one_sample(batch: Any) -> Any:
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, batch)


def _check_per_sample_model(model: torch.nn.Module) -> None:
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.SyncBatchNorm)
    bad = [n for n, m in model.named_modules() if isinstance(m, norms)]
    if bad:
        raise TypeError(f"per-sample gradients are not defined for BatchNorm (it mixes the samples of a batch): "
                        f"{bad[0]!r}. Use GroupNorm or LayerNorm (as Opacus requires).")


@dataclass(frozen=True, eq=False)
class PerSampleGrads:
    """``(state, batch) -> grads``; see :func:`per_sample_grads`."""

    model: torch.nn.Module
    loss_fn: LossFn
    precision: Precision = "32"

    def __post_init__(self) -> None:
        _check_per_sample_model(self.model)
        object.__setattr__(self, "_fns", ModelFns(self.model, self.precision))
        object.__setattr__(self, "_vmapped", vmap_tree(grad_and_value(self._sample_loss), (None, None, 0, 0)))

    def _sample_loss(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], sample: Any,
                     key: torch.Tensor) -> torch.Tensor:
        with Vectorizable(key), autocast(self.precision, key.device):
            loss, _ = split_loss(self.loss_fn(self._fns.run(params, buffers), _one_sample(sample), key))
        return loss.float()

    def with_losses(self, state: TrainState, batch: Any,
                    key: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample gradients and per-sample losses (``[batch]``)."""
        if self.model.training is False:
            self.model.train(True)
        n = batch_size(batch)
        base = fr.fold_in(state.key, state.step) if key is None else key
        keys = fr.fold_in(base.expand(n), torch.arange(n, device=base.device))
        with explain_vmap_errors("per-sample gradients"):
            return self._vmapped(state.params, state.buffers, batch, keys)

    def __call__(self, state: TrainState, batch: Any, key: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample gradients of ``batch`` at ``state``; sample ``i`` draws from ``fold_in(key, i)``
        (``key`` defaults to this step's key, ``fold_in(state.key, state.step)``)."""
        return self.with_losses(state, batch, key)[0]


def per_sample_grads(model: torch.nn.Module, loss_fn: LossFn, *, precision: Precision = "32") -> PerSampleGrads:
    """``(state, batch) -> grads``: a tree like ``state.params`` whose leaves have a leading batch axis,
    ``grads[k][i]`` the gradient of the loss of sample ``i`` alone (``vmap(grad)``, as Opacus's
    per-sample gradients). ``loss_fn(model_fn, batch, key)`` is the ordinary step's: it sees one sample
    with a leading batch axis of size 1. Dropout draws per sample from ``fold_in(step_key, i)``.
    BatchNorm, which mixes the samples of a batch, is refused.

    Example:
        ```python
        psg = fnlight.per_sample_grads(model, loss_fn)
        g = psg(fnlight.TrainState.create(model, fo.sgd(0.1)), (torch.randn(5, 4), torch.randint(0, 2, (5,))))
        tuple(g["weight"].shape)
        # (5, 2, 4)
        ```
    """
    return PerSampleGrads(model, loss_fn, precision)


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD (Abadi et al., 2016) for ``make_train_step(..., dp=DPConfig(...))``.

    Each sample's gradient is clipped to ``clip_norm`` (its global L2 norm over all parameters, factor
    ``min(1, clip_norm / norm)``), the clipped gradients are summed, Gaussian noise of standard deviation
    ``noise_multiplier * clip_norm`` is added (drawn from the state's key, so a run is reproducible and
    resumes exactly), and the sum is divided by the batch size: Opacus's ``DPOptimizer`` arithmetic,
    except that Opacus divides by ``norm + 1e-6``.

    Example:
        >>> dp = fnlight.DPConfig(clip_norm=1.0, noise_multiplier=1.1)
    """

    clip_norm: float
    noise_multiplier: float
    expected_batch_size: int | None = None
    """Divide by this instead of the batch's size (Opacus's ``expected_batch_size``): with Poisson
    sampling the actual size depends on the data, and dividing by it is not private."""

    def __post_init__(self) -> None:
        if self.expected_batch_size is not None and self.expected_batch_size < 1:
            raise ValueError(f"DPConfig.expected_batch_size must be >= 1, got {self.expected_batch_size}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"DPConfig.clip_norm must be a positive finite number, got {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"DPConfig.noise_multiplier must be >= 0 and finite, got {self.noise_multiplier}")


_NOISE_SALT = 0x5EED  # the noise key: fold_in(step_key, _NOISE_SALT), apart from the samples' fold_in(key, i)


def clip_per_sample(per: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The sum over samples of per-sample gradients clipped to ``clip_norm`` (global L2 norm over all
    parameters, factor ``min(1, clip_norm / norm)``), and the per-sample norms before clipping.

    Example:
        >>> summed, norms = clip_per_sample({"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}, 1.0)
        >>> summed["w"], norms
        (tensor([0.9000, 1.2000]), tensor([5.0000, 0.5000]))
    """
    names = list(per)
    n = per[names[0]].shape[0]
    norms = torch.stack([per[k].reshape(n, -1).double().pow(2).sum(1) for k in names]).sum(0).sqrt()
    factor = torch.clamp(clip_norm / norms, max=1.0)  # norm 0: inf, clamped to 1
    return {k: torch.einsum("n,n...->...", factor.to(per[k].dtype), per[k]) for k in names}, norms.to(torch.float32)


@dataclass(frozen=True, eq=False)
class DPTrainStep:
    """``train_step(state, batch) -> (state, metrics)`` with DP-SGD gradients; see ``make_train_step(dp=...)``.

    Metrics: ``loss`` (the batch's mean loss, before clipping), ``grad_norm`` (the mean per-sample
    gradient norm before clipping) and ``clipped`` (the fraction of samples that were clipped).
    """

    model: torch.nn.Module
    loss_fn: LossFn
    optimizer: GradientTransformation
    dp: DPConfig
    accumulate: int = 1
    precision: Precision = "32"
    donate: bool = False
    on_nonfinite: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        checks.check_step_options(self.accumulate, self.precision, self.on_nonfinite)
        object.__setattr__(self, "_psg", PerSampleGrads(self.model, self.loss_fn, self.precision))

    def donating(self) -> DPTrainStep:
        """The same step with ``donate=True``."""
        return self if self.donate else dataclasses.replace(self, donate=True)

    def gradients(self, state: TrainState, batch: Any) -> tuple[dict[str, torch.Tensor], Metrics]:
        """The noised, averaged DP gradient of ``batch`` at ``state``, and the step's metrics."""
        key = fr.fold_in(state.key, state.step)
        n = batch_size(batch)
        if n < self.accumulate:
            raise ValueError(f"accumulate={self.accumulate} needs batches of at least that many samples, got {n}")
        total: dict[str, torch.Tensor] = {}
        losses, norms = [], []
        offset = 0
        for chunk in _chunks(batch, self.accumulate):  # sample i keeps key fold_in(key, i) in any chunking
            m = batch_size(chunk)
            keys = fr.fold_in(key.expand(m), torch.arange(offset, offset + m, device=key.device))
            with explain_vmap_errors("per-sample gradients"):
                per, loss_i = self._psg._vmapped(state.params, state.buffers, chunk, keys)
            summed, norm_i = clip_per_sample(per, self.dp.clip_norm)
            total = {k: total[k] + v for k, v in summed.items()} if total else summed
            losses.append(loss_i)
            norms.append(norm_i)
            offset += m
        noise_key = fr.fold_in(key, _NOISE_SALT)
        std = self.dp.noise_multiplier * self.dp.clip_norm
        divisor = self.dp.expected_batch_size or n
        grads = {}
        for j, (k, summed) in enumerate(total.items()):
            if std > 0:
                summed = summed + fr.normal(fr.fold_in(noise_key, j), tuple(summed.shape), dtype=summed.dtype) * std
            grads[k] = summed / divisor
        norm = torch.cat(norms)
        return grads, {"loss": torch.cat(losses).mean(), "grad_norm": norm.mean(),
                       "clipped": (norm > self.dp.clip_norm).float().mean()}

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if num_members(state) is not None:
            raise ValueError("dp= takes an ordinary state, not a stacked one (ensembles with DP are not supported)")
        if self.model.training is False:
            self.model.train(True)
        grads, metrics = self.gradients(state, batch)
        if distributed.world_size() > 1:
            grads = distributed.all_reduce_mean(grads)
        if not bool(torch.isfinite(global_norm(list(grads.values()))) & torch.isfinite(metrics["loss"])):
            if self.on_nonfinite == "raise":
                raise NonFiniteError(f"non-finite loss or gradients at step {int(state.step)} "
                                     f"(loss={float(metrics['loss'])}). Use on_nonfinite='skip' to skip such steps, "
                                     "or lower the learning rate.")
            return state.replace(step=state.step + 1), {**metrics, "skipped": torch.ones(())}
        params, opt_state = optim_step(self.optimizer, grads, state.opt_state, state.params, inplace=self.donate)
        if self.on_nonfinite == "skip":
            metrics["skipped"] = torch.zeros(())
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


def _chunks(batch: Any, k: int) -> list[Any]:
    if k == 1:
        return [batch]
    return [tree_map(lambda t, i=i: torch.tensor_split(t, k)[i] if isinstance(t, torch.Tensor) else t, batch)
            for i in range(k)]
