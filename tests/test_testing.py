"""fnlight.testing: the assertions catch what they promise to, the strategies draw valid
setups, and the pytest plugin's fixtures and option work."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlight
import fnlight.optim as fo
from fnlight.testing import (
    OptimizerConfig,
    assert_reproducible,
    assert_resume_equivalent,
    datasets,
    interruption_points,
    models,
    optimizers,
    pipelines,
)
from fnlight.tree import tree_equal

from .models import data, loss_fn, metrics_fn, mlp
from .models import resume_setup as shared_resume_setup

# -- assert_reproducible --------------------------------------------------------------------


def train_setup(**kw):
    model = mlp(**kw)
    opt = fo.adamw(1e-2)
    state = fnlight.TrainState.create(model, opt, seed=1)
    return fnlight.make_train_step(model, loss_fn, opt), state, data(16)


def test_a_pure_train_step_is_reproducible_and_its_first_result_is_returned():
    step, state, batch = train_setup(dropout=0.5, bn=True)
    new, metrics = assert_reproducible(step, state, batch, runs=3)
    assert tree_equal((new, metrics), step(state, batch))
    assert int(new.step) == 1


def test_global_rng_use_fails_naming_the_leaf():
    with pytest.raises(AssertionError, match=r"(?s)run 2 differs from run 1 at result\['noisy'\]: float32\[3\], "
                                             r"3 of 3 elements differ, max abs difference .*global random"):
        assert_reproducible(lambda x: {"clean": x * 2, "noisy": x + torch.rand(3)}, torch.zeros(3))


def test_a_train_step_with_global_noise_fails_naming_the_parameter():
    step, state, batch = train_setup()

    def noisy_step(state, batch):
        x, y = batch
        return step(state, (x + 0.1 * torch.rand_like(x), y))

    with pytest.raises(AssertionError, match=r"at result\[0\]\.params\['0\.bias'\]: float32\[16\]"):
        assert_reproducible(noisy_step, state, batch)


def test_reseeding_the_global_rng_fails_even_when_results_agree():
    def reseeding(x):
        torch.manual_seed(0)
        return x + torch.rand(3)

    with pytest.raises(AssertionError, match="global random generator.*results were equal"):
        assert_reproducible(reseeding, torch.zeros(3))
    assert_reproducible(reseeding, torch.zeros(3), check_global_rng=False)


def test_mutating_an_input_fails_naming_the_leaf():
    def bump(tree, scale=1.0):
        tree["w"].add_(scale)
        return tree["w"].sum()

    with pytest.raises(AssertionError, match=r"mutated its input in run 1 .* at args\[0\]\['w'\]: float32\[2, 2\], "
                                             r"4 of 4 elements differ, max abs difference 1"):
        assert_reproducible(bump, {"w": torch.zeros(2, 2), "b": torch.zeros(2)})
    with pytest.raises(AssertionError, match=r"at kwargs\['tree'\]\['w'\]"):
        assert_reproducible(bump, tree={"w": torch.zeros(2, 2)})


def test_a_mutated_module_argument_is_seen():
    def scale_weights(module, x):
        with torch.no_grad():
            module.weight.mul_(2)
        return x

    with pytest.raises(AssertionError, match=r"at args\[0\]\['weight'\]"):
        assert_reproducible(scale_weights, torch.nn.Linear(2, 2), torch.ones(2))


def test_a_donating_step_needs_check_inputs_false_and_then_gets_fresh_inputs():
    step, state, batch = train_setup(bn=True)
    with pytest.raises(AssertionError, match=r"(?s)mutated its input .* at args\[0\]\.params.*check_inputs=False"):
        assert_reproducible(step.donating(), fnlight.tree.tree_map(torch.clone, state), batch)
    donated = assert_reproducible(step.donating(), state, batch, check_inputs=False)
    assert tree_equal(donated, step(state, batch))


def test_python_values_and_structures_are_compared():
    assert assert_reproducible(lambda: (1, 2.5, "a", None)) == (1, 2.5, "a", None)
    assert_reproducible(lambda: float("nan"))  # bitwise: NaN is NaN
    calls = []

    def growing():
        calls.append(1)
        return {"n": len(calls)}

    with pytest.raises(AssertionError, match=r"at result\['n'\]: 1 vs 2"):
        assert_reproducible(growing)
    with pytest.raises(AssertionError, match="structures differ"):
        assert_reproducible(lambda: [0] * (len(calls.append(1) or calls) % 2 + 1))
    with pytest.raises(ValueError, match="runs"):
        assert_reproducible(lambda: 0, runs=1)


# -- assert_resume_equivalent ----------------------------------------------------------------

def resume_setup():
    """Dropout, BatchNorm, a random transform, shuffling, a schedule and a callback with state."""
    dm, state, train_step, eval_step = shared_resume_setup(n=40, batch=8, warmup=2, decay_steps=8)
    trainer = fnlight.Trainer(max_epochs=2, callbacks=(fnlight.EarlyStopping("val/loss", patience=100),))
    return trainer, state, train_step, dm, eval_step


def test_resume_equivalence_holds_for_a_correct_setup(tmp_path):
    trainer, state, step, dm, eval_step = resume_setup()
    full = assert_resume_equivalent(trainer, state, step, dm, eval_step, stop_at=[1, 4, 6], tmp_path=tmp_path)
    assert int(full.state.step) == 8 and len(full.history) == 2 and "val/loss" in full.history[-1]
    runs = sorted(p.name for p in next(tmp_path.iterdir()).iterdir())
    assert runs == ["cut1", "cut4", "cut6", "full"]  # in a fresh directory inside tmp_path
    assert int(state.step) == 0  # the caller's state is untouched
    plain = dataclasses.replace(trainer, loggers=(), run_dir=tmp_path / "plain").fit(state, step, dm, eval_step)
    assert tree_equal(full.state, plain.state)  # the returned run is the user's setup, unchanged


def test_resume_equivalence_fails_for_a_step_using_global_randomness():
    trainer, state, step, dm, eval_step = resume_setup()

    def noisy_step(state, batch):
        x, y = batch
        return step(state, (x + 0.01 * torch.rand_like(x), y))

    with pytest.raises(AssertionError, match=r"resuming after 3 of 8 steps does not reproduce the uninterrupted run "
                                             r"\(uninterrupted vs resumed\) at state\.params\['0\.bias'\]"):
        assert_resume_equivalent(trainer, state, noisy_step, dm, eval_step, stop_at=3)


def test_resume_equivalence_compares_the_history():
    trainer, state, step, dm, eval_step = resume_setup()
    calls = []

    def counting_step(state, batch):  # the state is right, the metrics depend on hidden state
        calls.append(1)
        new, metrics = step(state, batch)
        return new, {**metrics, "calls": torch.tensor(float(len(calls)))}

    with pytest.raises(AssertionError, match=r"at history\[0\]\['train/calls'\]: 2\.5 vs"):
        assert_resume_equivalent(trainer, state, counting_step, dm, eval_step, stop_at=2)


def test_stop_at_is_validated():
    trainer, state, step, dm, eval_step = resume_setup()  # (the trainer's EarlyStopping monitors val/loss)
    with pytest.raises(ValueError, match=r"stop_at must be in 1 \.\. 7 \(the uninterrupted fit runs 8 steps\), "
                                         r"got \[0, 8\]"):
        assert_resume_equivalent(trainer, state, step, dm, eval_step, stop_at=[0, 3, 8])
    with pytest.raises(TypeError, match="stop_at"):
        assert_resume_equivalent(trainer, state, step, dm, stop_at=[])
    with pytest.raises(TypeError, match="ints"):
        assert_resume_equivalent(trainer, state, step, dm, stop_at=[2.0])


# -- strategies ---------------------------------------------------------------------------------

def run_parity(cfg, steps=5):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(steps)]
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    topt = cfg.torch(ref.values())
    opt = cfg.build()
    state = opt.init(params)
    for t in range(steps):
        params, state = fo.step(opt, grads[t], state, params)
        for k, p in ref.items():
            p.grad = grads[t][k].clone()
        topt.step()
    return params, {k: p.detach() for k, p in ref.items()}


@given(cfg=optimizers())
def test_drawn_optimizers_match_torch_optim(cfg):
    ours, theirs = run_parity(cfg)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-6, msg=f"{cfg}: {k}")


@given(cfg=optimizers(names=("sgd",)))
def test_optimizer_names_are_respected(cfg):
    assert cfg.name == "sgd" and cfg.betas == (0.9, 0.999) and not cfg.amsgrad
    assert not cfg.nesterov or (cfg.momentum > 0 and cfg.dampening == 0)


def test_optimizer_config():
    cfg = OptimizerConfig("sgd", lr=0.05, momentum=0.9, nesterov=True)
    assert repr(cfg) == "OptimizerConfig('sgd', lr=0.05, momentum=0.9, nesterov=True)"
    assert eval(repr(cfg)) == cfg
    assert isinstance(cfg.torch([torch.nn.Parameter(torch.zeros(1))]), torch.optim.SGD)
    assert isinstance(OptimizerConfig("adamw", 1e-3).torch([torch.nn.Parameter(torch.zeros(1))]), torch.optim.AdamW)
    with pytest.raises(ValueError, match="nesterov"):
        OptimizerConfig("sgd", 0.1, nesterov=True)
    with pytest.raises(ValueError, match="amsgrad do not apply to sgd"):
        OptimizerConfig("sgd", 0.1, amsgrad=True)
    with pytest.raises(ValueError, match="momentum do not apply to adam"):
        OptimizerConfig("adam", 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="name"):
        OptimizerConfig("rmsprop", 0.1)


@given(data=st.data(), dropout=st.sampled_from([None, True, False, 0.25]),
       batchnorm=st.sampled_from([None, True, False]))
def test_drawn_models_run_and_leave_the_global_rng_alone(data, dropout, batchnorm):
    before = torch.get_rng_state()
    model = data.draw(models(din=5, dout=2, dropout=dropout, batchnorm=batchnorm))
    assert torch.equal(torch.get_rng_state(), before)
    kinds = {type(m) for m in model}
    assert (torch.nn.BatchNorm1d in kinds) == batchnorm or batchnorm is None
    assert (torch.nn.Dropout in kinds) == bool(dropout) or dropout is None
    if dropout == 0.25:
        assert model[[type(m) for m in model].index(torch.nn.Dropout)].p == 0.25
    assert model.eval()(torch.randn(3, 5)).shape == (3, 2)


@given(xy=datasets(din=st.integers(1, 6), dout=st.integers(2, 4)))
def test_drawn_datasets(xy):
    x, y = xy
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[0] == y.shape[0] >= 8
    assert int(y.min()) >= 0 and int(y.max()) < 4


@settings(max_examples=15)
@given(pipeline=pipelines(din=4, dout=3), seed=st.integers(0, 99))
def test_drawn_pipelines_give_datamodules_that_yield_batches(pipeline, seed):
    dm = fnlight.DataModule(pipeline, seed=seed)
    assert len(dm.fingerprint) == 64  # describable: it can go into checkpoints
    train = list(dm.batches("train", epoch=1))
    assert train and all(len(x) > 1 and x.shape[1:] == (4,) and x.dtype == torch.float32 for x, _ in train)
    assert sum(len(y) for _, y in train) >= len(dm.dataset("train")) - 1
    assert sum(len(y) for _, y in dm.batches("val")) == len(dm.dataset("val")) >= 2


@given(total=st.integers(2, 50), data=st.data())
def test_interruption_points_are_sorted_distinct_and_inside_the_run(total, data):
    points = data.draw(interruption_points(total, max_points=4))
    assert 1 <= len(points) <= 4 and list(points) == sorted(set(points))
    assert all(1 <= p <= total - 1 for p in points)


def test_interruption_points_need_two_steps():
    with pytest.raises(ValueError, match="no step to interrupt"):
        interruption_points(1)


@settings(max_examples=8)
@given(model=models(din=4, dout=3), pipeline=pipelines(n=st.integers(8, 20), din=4, dout=3,
                                                       batch_size=st.integers(4, 8)),
       cfg=optimizers(), seed=st.integers(0, 99), data=st.data())
def test_drawn_setups_resume_exactly(tmp_path_factory, model, pipeline, cfg, seed, data):
    dm = fnlight.DataModule(pipeline, seed=seed)
    opt = cfg.build()
    state = fnlight.TrainState.create(model, opt, seed=seed)
    total = 2 * dm.num_batches("train")
    assert_resume_equivalent(fnlight.Trainer(max_epochs=2), state, fnlight.make_train_step(model, loss_fn, opt), dm,
                             fnlight.make_eval_step(model, metrics_fn), stop_at=data.draw(interruption_points(total)),
                             tmp_path=tmp_path_factory.mktemp("resume"))


def test_strategies_explain_a_missing_hypothesis():
    code = textwrap.dedent("""
        import sys
        sys.modules["hypothesis"] = None  # as if it were not installed
        import fnlight.testing as ft
        assert ft.OptimizerConfig("adam", 1e-3).build() is not None and ft.assert_reproducible(lambda: 1) == 1
        try:
            from fnlight.testing import models
        except ImportError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'fnlight[testing]'" in out


# -- the pytest plugin ---------------------------------------------------------------------------

def test_the_plugin_is_registered_as_a_pytest11_entry_point():
    (ep,) = [ep for ep in entry_points(group="pytest11") if ep.name == "fnlight"]
    assert ep.value == "fnlight.testing.plugin"


def test_the_plugin_imports_neither_torch_nor_hypothesis_itself():
    import fnlight.testing.plugin as plugin

    with open(plugin.__file__) as f:
        source = f.read()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top_level if "torch" in line or "hypothesis" in line or "fnlight" in line]


PLUGIN_TESTS = """
    import os
    from pathlib import Path

    import torch
    import fnlight


    def test_seed_and_key(fnlight_seed, fnlight_key):
        assert fnlight_seed == int(os.environ["EXPECTED_SEED"])
        assert torch.equal(fnlight_key, fnlight.random.key(fnlight_seed))


    def test_run_dir(fnlight_run_dir, tmp_path):
        assert fnlight_run_dir.is_dir() and not any(fnlight_run_dir.iterdir())
        assert fnlight_run_dir.parent == tmp_path


    def test_home(fnlight_home):
        assert os.environ["FNLIGHT_HOME"] == str(fnlight_home) and fnlight_home.is_dir()
        assert fnlight_home != Path.home() / ".cache" / "fnlight"
"""


@pytest.mark.parametrize("args, seed", [((), 0), (("--fnlight-seed", "7"), 7)])
def test_plugin_fixtures_and_seed_option(pytester, monkeypatch, args, seed):
    monkeypatch.setenv("EXPECTED_SEED", str(seed))
    home_before = os.environ["FNLIGHT_HOME"]
    pytester.makepyfile(test_plugin_use=PLUGIN_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=3)
    if args:
        result.stdout.fnmatch_lines(["fnlight: --fnlight-seed=7"])
    assert os.environ["FNLIGHT_HOME"] == home_before  # restored after the inner tests
    help_text = pytester.runpytest("--help").stdout.str()
    assert "--fnlight-seed" in help_text
