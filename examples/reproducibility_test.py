"""A user's own reproducibility tests, written with ``fnlight.testing``.

Run:
    python -m pytest -q examples/reproducibility_test.py
    python -m pytest -q examples/reproducibility_test.py --fnlight-seed 7     # the same tests with another seed

(``pip install 'fnlight[testing]'`` brings hypothesis and pytest.) The project's
own ``pytest`` run does not collect this file (its ``testpaths`` is ``tests``);
in your project, put such a file among your tests.

What it shows:

- the fixtures of fnlight's pytest plugin, active wherever fnlight is installed:
  ``fnlight_seed`` (0, or ``--fnlight-seed N``), ``fnlight_key`` (a key from it),
  ``fnlight_run_dir`` (a fresh directory for ``run_dir`` / ``ckpt_dir``) and
  ``fnlight_home`` (an isolated download and cache root, used by every test here);
- ``assert_reproducible``: the train step (and the augmented batches) come out
  bitwise the same twice, the step leaves its inputs unchanged, and neither
  touches torch's global generator; a function that draws from that generator
  fails, naming the first value that differs;
- ``assert_resume_equivalent``: this Trainer setup (BatchNorm, dropout, a random
  transform, a shuffle, a schedule), interrupted after given steps and resumed
  from its checkpoint, ends bitwise where the uninterrupted run ends;
- hypothesis strategies (``models``, ``pipelines``, ``optimizers``) that draw
  small setups, for properties that should hold for any of them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import fnlight
import fnlight.data as fd
import fnlight.optim as fo
import fnlight.random as fr
from fnlight.testing import assert_reproducible, assert_resume_equivalent, models, optimizers, pipelines
from fnlight.tree import tree_equal


@pytest.fixture(autouse=True)
def _isolated_home(fnlight_home):
    """Downloads and caches go to a fresh directory in every test, never to ~/.cache/fnlight."""


def noisy(sample, key):
    """A random augmentation: draws from its key only."""
    x, y = sample
    return x + 0.1 * fr.normal(key, x.shape), y


def loss_fn(model_fn, batch, key):
    x, y = batch
    return F.cross_entropy(model_fn(x), y)


def make_setup(seed: int):
    """Data, model, state and step of the run under test (as a project would build them)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    pipeline = (fd.from_tensors(x, y) >> fd.split({"train": 0.75, "val": 0.25})
                >> fd.transform(noisy, on="train") >> fd.shuffle() >> fd.batch(8))
    dm = fnlight.DataModule(pipeline, seed=seed)
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed, global generator untouched
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                    torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    opt = fo.adamw(fo.warmup_cosine(1e-2, 2, 10))
    state = fnlight.TrainState.create(model, opt, seed=seed)
    return dm, model, state, fnlight.make_train_step(model, loss_fn, opt)


def test_train_step_is_pure_and_reproducible(fnlight_seed, fnlight_key):
    dm, _, state, step = make_setup(fnlight_seed)
    state = state.replace(key=fnlight_key)  # dropout masks come from fold_in(state.key, state.step)
    batch = next(iter(dm.batches("train", epoch=0)))
    new_state, metrics = assert_reproducible(step, state, batch)
    assert int(new_state.step) == 1 and torch.isfinite(metrics["loss"])
    assert not torch.equal(new_state.buffers["1.running_mean"], state.buffers["1.running_mean"])  # new buffers


def test_batches_depend_only_on_seed_epoch_and_position(fnlight_seed):
    dm, *_ = make_setup(fnlight_seed)
    epoch = assert_reproducible(lambda: list(dm.batches("train", epoch=1)))  # shuffle + random transform
    resumed = list(dm.batches("train", epoch=1, start=2))                    # resuming mid-epoch
    assert tree_equal(resumed, epoch[2:])
    other = list(dm.batches("train", epoch=2))
    assert not torch.equal(other[0][0], epoch[0][0])  # another epoch: another order and other noise


def test_interrupted_run_resumes_exactly(fnlight_seed, fnlight_run_dir):
    dm, _, state, step = make_setup(fnlight_seed)
    trainer = fnlight.Trainer(max_epochs=2)  # 36 training samples, 5 batches an epoch: 10 steps
    full = assert_resume_equivalent(trainer, state, step, dm, stop_at=[1, 5, 7], tmp_path=fnlight_run_dir)
    assert int(full.state.step) == 10 and len(full.history) == 2


@settings(max_examples=5, deadline=None)
@given(model=models(din=4, dout=3), pipeline=pipelines(din=4, dout=3), cfg=optimizers())
def test_any_small_setup_steps_reproducibly(model, pipeline, cfg):
    opt = cfg.build()
    state = fnlight.TrainState.create(model, opt, seed=0)
    step = fnlight.make_train_step(model, loss_fn, opt)
    batch = next(iter(fnlight.DataModule(pipeline, seed=0).batches("train", epoch=0)))
    assert_reproducible(step, state, batch)
