"""Hypothesis strategies for small, deterministic training setups.

Every drawn object is built from drawn values only (torch's global generator is
used inside ``torch.random.fork_rng`` with a drawn seed, so it is left as it
was): the same draw always gives bitwise the same model, data and pipeline,
which is what lets hypothesis shrink and replay a failure.

Needs hypothesis: ``pip install 'fnlight[testing]'``. (The ``draw`` argument in
the signatures below is hypothesis's own: call ``models(din=4)``, not ``models(draw, ...)``.)

Example:
    >>> from hypothesis import given
    >>> from fnlight.testing import models, optimizers, pipelines
    >>> @given(model=models(din=4, dout=3), pipeline=pipelines(din=4, dout=3), opt=optimizers())
    ... def test_one_epoch_is_finite(model, pipeline, opt):
    ...     ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

try:
    from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("fnlight.testing's hypothesis strategies need hypothesis: pip install 'fnlight[testing]'") from e

import torch

from .. import data as fd
from .. import random as fr
from .configs import NAMES, OptimizerConfig

__all__ = ["AddNoise", "OptimizerConfig", "datasets", "interruption_points", "models", "optimizers", "pipelines",
           "seeds"]

T = TypeVar("T")
IntOrStrategy = int | st.SearchStrategy[int] | None

#: Seeds for torch generators and fnlight keys.
seeds = st.integers(0, 2**32 - 1)


def _pick(draw: Any, value: T | st.SearchStrategy[T] | None, default: st.SearchStrategy[T]) -> T:
    """A fixed value as is; a strategy (or None: ``default``) drawn from."""
    if value is None:
        return draw(default)
    if isinstance(value, st.SearchStrategy):
        return draw(value)
    return value


@st.composite
def models(draw: Any, din: IntOrStrategy = 4, dout: IntOrStrategy = 3, *, depth: IntOrStrategy = None,
           width: IntOrStrategy = None, dropout: bool | float | None = None,
           batchnorm: bool | None = None) -> torch.nn.Sequential:
    """A strategy of small MLPs: ``depth`` hidden blocks of
    ``Linear -> [BatchNorm1d] -> ReLU -> [Dropout]``, then ``Linear``.

    Args:
        din: input features (an int or a strategy).
        dout: outputs (an int or a strategy).
        depth: hidden blocks (default: drawn in 1..2).
        width: hidden features (default: drawn in 2..16).
        dropout: None: drawn (with or without); True: with (rate drawn in
            0.1..0.5); a float: with that rate; False: without.
        batchnorm: None: drawn; True: with; False: without.

    The weights are initialized from a drawn seed inside a fork of torch's
    generator (the global generator is untouched).

    Example:
        ```python
        @given(model=models(din=6, dout=2, batchnorm=True))
        def test_forward(model):
            assert model(torch.zeros(4, 6)).shape == (4, 2)
        ```
    """
    din_, dout_ = _pick(draw, din, st.just(4)), _pick(draw, dout, st.just(3))
    depth_ = _pick(draw, depth, st.integers(1, 2))
    width_ = _pick(draw, width, st.integers(2, 16))
    p = _pick(draw, dropout, st.booleans())
    rate = draw(st.floats(0.1, 0.5)) if p is True else (0.0 if p is False else float(p))
    bn = _pick(draw, batchnorm, st.booleans())
    seed = draw(seeds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        features = din_
        for _ in range(depth_):
            layers.append(torch.nn.Linear(features, width_))
            if bn:
                layers.append(torch.nn.BatchNorm1d(width_))
            layers.append(torch.nn.ReLU())
            if rate:
                layers.append(torch.nn.Dropout(rate))
            features = width_
        layers.append(torch.nn.Linear(features, dout_))
        return torch.nn.Sequential(*layers)


@st.composite
def datasets(draw: Any, n: IntOrStrategy = None, din: IntOrStrategy = 4,
             dout: IntOrStrategy = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A strategy of classification data ``(x, y)``: ``x`` float32 ``[n, din]``, ``y`` int64 ``[n]``
    in ``0 .. dout - 1``.

    The labels are the argmax of a random linear map of ``x`` (learnable, not noise).

    Args:
        n: samples (default: drawn in 8..48).
        din: features.
        dout: classes.

    Example:
        ```python
        @given(data=datasets(n=32, din=5, dout=2))
        def test_shapes(data):
            x, y = data
            assert x.shape == (32, 5) and y.max() < 2
        ```
    """
    n_ = _pick(draw, n, st.integers(8, 48))
    din_, dout_ = _pick(draw, din, st.just(4)), _pick(draw, dout, st.just(3))
    g = torch.Generator().manual_seed(draw(seeds))
    x = torch.randn(n_, din_, generator=g)
    w = torch.randn(din_, dout_, generator=g)
    return x, (x @ w).argmax(-1)


@dataclass(frozen=True)
class AddNoise:
    """A random sample transform: ``(x, y) -> (x + std * normal(key), y)``.

    A frozen dataclass, so pipelines using it have a stable fingerprint.

    Example:
        ```python
        p = fd.from_tensors(x, y) >> fd.transform(AddNoise(0.1), on="train") >> fd.batch(8)
        ```
    """

    std: float = 0.1

    def __call__(self, sample: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sample
        return x + self.std * fr.normal(key, x.shape), y


@st.composite
def pipelines(draw: Any, n: IntOrStrategy = None, din: IntOrStrategy = 4, dout: IntOrStrategy = 3, *,
              batch_size: IntOrStrategy = None, random_transform: bool | None = None,
              shuffle: bool | None = None) -> fd.Pipeline:
    """A strategy of pipelines
    ``from_tensors >> split(train, val) >> [transform(AddNoise) on train] >> [shuffle()] >> batch(b)``.

    The data comes from :func:`datasets`; ``val`` holds 2 .. n/3 samples. No
    training batch has a single sample (the training split drops its last batch
    when it would), so models with BatchNorm train on every batch.

    Args:
        n: samples (default: drawn in 8..48; at least 6).
        din: features.
        dout: classes.
        batch_size: default drawn in 2..16 (at most the training split's size).
        random_transform: None: drawn; True/False: with/without the noise transform.
        shuffle: None: drawn; True/False: with/without shuffling the training split.

    Example:
        ```python
        @given(pipeline=pipelines(din=4, dout=3), seed=seeds)
        def test_batches(pipeline, seed):
            dm = fnlight.DataModule(pipeline, seed=seed)
            assert all(len(x) > 1 for x, _ in dm.batches("train"))
        ```
    """
    x, y = draw(datasets(n, din, dout))
    size = len(x)
    if size < 6:
        raise ValueError(f"pipelines() needs n >= 6 samples, got {size}")
    n_val = draw(st.integers(2, max(2, size // 3)))
    n_train = size - n_val
    b = _pick(draw, batch_size, st.integers(2, min(16, n_train)))
    pipeline = fd.from_tensors(x, y) >> fd.split({"train": n_train, "val": n_val}, seed=draw(st.integers(0, 999)))
    if _pick(draw, random_transform, st.booleans()):
        pipeline = pipeline >> fd.transform(AddNoise(draw(st.sampled_from([0.01, 0.1, 0.5]))), on="train")
    if _pick(draw, shuffle, st.booleans()):
        pipeline = pipeline >> fd.shuffle()
    if n_train % b == 1:  # a last training batch of one sample: drop it (BatchNorm cannot train on it)
        return pipeline >> fd.batch(b, drop_last=True, on="train") >> fd.batch(b, on="val")
    return pipeline >> fd.batch(b)


def _maybe(values: st.SearchStrategy[float]) -> st.SearchStrategy[float]:
    return st.one_of(st.just(0.0), values)


@st.composite
def optimizers(draw: Any, names: tuple[str, ...] = NAMES) -> OptimizerConfig:
    """A strategy of optimizer configurations (:class:`~fnlight.testing.OptimizerConfig`) whose fnlight and
    ``torch.optim`` versions agree: SGD with or without (Nesterov, damped) momentum and
    weight decay; Adam and AdamW with drawn betas, eps, weight decay and AMSGrad.

    Args:
        names: which of ``"sgd"``, ``"adam"``, ``"adamw"`` to draw from.

    Example:
        ```python
        @given(cfg=optimizers())
        def test_matches_torch(cfg):
            params = {"w": torch.randn(3, 2)}
            ours, ref = cfg.build(), cfg.torch([torch.nn.Parameter(params["w"].clone())])
            ...  # step both on the same gradients, compare with torch.testing.assert_close
        ```
    """
    unknown = set(names) - set(NAMES)
    if unknown or not names:
        raise ValueError(f"names must be a non-empty subset of {NAMES}, got {names!r}")
    name = draw(st.sampled_from(tuple(names)))
    if name == "sgd":
        lr = draw(st.floats(1e-3, 0.1))
        momentum = draw(_maybe(st.floats(0.5, 0.99)))
        nesterov = momentum > 0 and draw(st.booleans())
        dampening = draw(_maybe(st.floats(0.05, 0.5))) if momentum > 0 and not nesterov else 0.0
        return OptimizerConfig("sgd", lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                               weight_decay=draw(_maybe(st.floats(1e-4, 0.1))))
    lr = draw(st.floats(1e-4, 3e-2))
    betas = (draw(st.floats(0.5, 0.95)), draw(st.floats(0.9, 0.9999)))
    decay = st.floats(1e-4, 0.1) if name == "adam" else st.floats(0.0, 0.2)
    return OptimizerConfig(name, lr, betas=betas, eps=draw(st.sampled_from([1e-8, 1e-6])),
                           weight_decay=draw(_maybe(decay)), amsgrad=draw(st.booleans()))


def interruption_points(total_steps: int, max_points: int = 3) -> st.SearchStrategy[tuple[int, ...]]:
    """A strategy of sorted, distinct steps in ``1 .. total_steps - 1`` (1 to ``max_points`` of them) after which
    to interrupt a run of ``total_steps`` steps; made for ``assert_resume_equivalent(stop_at=...)``.

    Example:
        ```python
        @given(stop_at=interruption_points(20))
        def test_resume(tmp_path_factory, stop_at):
            assert_resume_equivalent(trainer, state, step, dm, stop_at=stop_at,
                                     tmp_path=tmp_path_factory.mktemp("resume"))
        ```
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 2:
        raise ValueError(f"a run of {total_steps!r} steps has no step to interrupt it after (needs >= 2)")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    return st.lists(st.integers(1, total_steps - 1), min_size=1, max_size=min(max_points, total_steps - 1),
                    unique=True).map(lambda xs: tuple(sorted(xs)))
