"""The ``fnlight`` command line: every command and its error paths, with click's CliRunner, and the main job
and ``verify`` as real processes.

The experiments below are TARGETs of some tests (``tests.test_cli:flaky``...): a non-reproducible one and
one that does not resume exactly, for ``verify`` to catch.
"""

import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fnlight._cli_common import CliError, coerce, load_target, parse_sets
from fnlight._cli_files import curves
from fnlight.cli import _forwarded, fit, main
from fnlight.experiment import Experiment, build_experiment, digits, digits_datamodule, hparams_of
from fnlight.train import load_checkpoint, save_checkpoint
from fnlight.train.checkpoint import list_checkpoints
from fnlight.train.rundir import LOCK

from .faults import small_disk

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--set", "hidden=16")  # a small digits MLP: a step costs little


# -- experiments that verify must reject ---------------------------------------------------------

_NOISE = torch.Generator().manual_seed(0)  # hidden state: it advances from one run to the next


def flaky(seed: int = 0) -> Experiment:
    """Its loss draws from a generator outside the state: two runs differ from the first step."""
    exp = digits(seed=seed, hidden=16, max_epochs=2)

    def loss(model_fn, batch, key):
        x, y = batch
        return exp.loss_fn(model_fn, (x + 0.01 * torch.rand(x.shape, generator=_NOISE), y), key)

    return dataclasses.replace(exp, loss_fn=loss)


def forgetful(seed: int = 0) -> Experiment:
    """Counts its steps in a closure, not in the state: reproducible, but a resumed run starts counting at 0."""
    exp = digits(seed=seed, hidden=16, max_epochs=2)
    calls = itertools.count()

    def loss(model_fn, batch, key):
        x, y = batch
        return exp.loss_fn(model_fn, (x + 1e-3 * next(calls), y), key)

    return dataclasses.replace(exp, loss_fn=loss)


FIXED = digits(hidden=16, max_epochs=1)  # an Experiment object (no hyperparameters to --set)


def needs_args(hidden):  # not a factory: a parameter without default
    return digits(hidden=hidden)


def not_an_experiment(hidden: int = 3):
    return hidden


def raises(hidden: int = 3) -> Experiment:
    raise ZeroDivisionError("no experiment today")


def broken_loss(seed: int = 0) -> Experiment:
    """Its loss_fn fails at the first step (an error in the user's own code)."""
    exp = digits(seed=seed, hidden=16, max_epochs=1)

    def loss(model_fn, batch, key):
        return model_fn(batch[0]).sum() / 0 + [][1]

    return dataclasses.replace(exp, loss_fn=loss)


# -- helpers ---------------------------------------------------------------------------------

def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(res, *needles: str) -> None:
    """Exit code 2, one line ``error: ...`` holding the needles, no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in errors[0], (needle, res.output)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return env | {"PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short digits run (hidden=16) with checkpoints: what validate, test, predict, export, inspect, plot read."""
    run = tmp_path_factory.mktemp("cli") / "run"
    res = invoke("fit", "--max-steps", "30", *SMALL, "--run-dir", run)
    assert res.exit_code == 0, res.output
    return run


# -- fit --------------------------------------------------------------------------------------

def test_fit_in_a_process_prints_a_summary_and_resumes(tmp_path):
    """The main job's path as a real process: summary, logs, checkpoints, experiment.json; again: resumed."""
    cli = Path(sys.executable).parent / "fnlight"
    cmd = [str(cli), "fit", "--max-steps", "25", *SMALL, "--set", "lr=3e-3", "--run-dir", str(tmp_path / "r")]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fit: digits MLP, 1,482 parameters" in out.stdout
    assert "hyperparameters: hidden=16 lr=0.003" in out.stdout
    assert re.search(r"final epoch 1: train/acc \d\.\d+  train/loss \d\.\d+  val/acc \d\.\d+  val/loss \d\.\d+$",
                     out.stdout, re.M), out.stdout
    assert re.search(r"test accuracy \d\.\d+  test loss \d\.\d+", out.stdout)
    assert "25 steps in " in out.stdout and f"run directory: {tmp_path / 'r'}" in out.stdout
    record = json.loads((tmp_path / "r" / "experiment.json").read_text())
    assert record["target"] == "fnlight.experiment:digits" and record["overrides"] == {"hidden": 16, "lr": 0.003}
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] != []
    # the same command with more steps continues where the first stopped
    out = subprocess.run(cmd[:3] + ["35"] + cmd[4:], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "resuming from" in out.stdout and "35 steps in" in out.stdout and "(resumed at step 25)" in out.stdout
    assert len((tmp_path / "r" / "metrics.csv").read_text().splitlines()) == 1 + 2  # epochs 0 and 1, once each


def test_no_resume_starts_afresh(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = sorted(p.name for p in copy.iterdir() if p.name != LOCK)  # (the claim's lock file stays)
    res = invoke("fit", "--max-steps", "5", *SMALL, "--run-dir", copy, "--no-resume")
    assert res.exit_code == 0, res.output
    assert f"--no-resume: the previous run is kept in {copy / 'previous' / '0'}" in res.output
    assert "resuming" not in res.output and "5 steps in" in res.output and "resumed" not in res.output
    assert [p.name for p in (copy / "checkpoints").iterdir()] == ["step_000000005"]
    # the previous run, whole and loadable where it was put
    assert sorted(p.name for p in (copy / "previous" / "0").iterdir()) == before
    res = invoke("test", "--ckpt", copy / "previous" / "0")
    assert res.exit_code == 0 and "step 30" in res.output, res.output
    # resuming with other hyperparameters: said, and a shape mismatch is one line that changes no file of the run
    files = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    res = invoke("fit", "--max-steps", "8", "--set", "hidden=8", "--run-dir", copy)
    assert_one_line_error(res, "cannot resume from", "does not match the expected state")
    assert "--no-resume starts afresh" in res.output and "trained with hidden=16" in res.output
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == files


def test_no_resume_that_crashes_at_step_0_keeps_the_previous_run_loadable(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    res = invoke("fit", "tests.test_cli:broken_loss", "--run-dir", copy, "--no-resume")
    assert res.exit_code == 1, res.output
    assert not (copy / "experiment.json").exists() and not (copy / "checkpoints").exists()  # nothing recorded
    res = invoke("test", "--ckpt", copy / "previous" / "0")
    assert res.exit_code == 0 and "step 30" in res.output, res.output


def test_fit_seed_and_max_epochs_go_to_the_factory(tmp_path):
    res = invoke("fit", "--max-epochs", "1", "--seed", "3", "--set", "hidden=8", "--run-dir", tmp_path)
    assert res.exit_code == 0, res.output
    assert "23 steps in" in res.output  # one epoch
    assert json.loads((tmp_path / "experiment.json").read_text())["overrides"] == {"hidden": 8, "seed": 3,
                                                                                    "max_epochs": 1}


def test_fit_an_experiment_object_with_a_seed(tmp_path):
    res = invoke("fit", "tests.test_cli:FIXED", "--seed", "5", "--max-steps", "3", "--run-dir", tmp_path)
    assert res.exit_code == 0 and "3 steps in" in res.output, res.output
    record = json.loads((tmp_path / "experiment.json").read_text())
    assert record["overrides"] == {} and record["seed"] == 5
    _, meta = load_checkpoint(tmp_path / "checkpoints" / "step_000000003")
    assert meta["pipeline"]["description"]["seed"] == 5  # the data's seed too


def test_fit_a_file_target_with_typed_sets(tmp_path):
    (tmp_path / "my_exp.py").write_text(
        "import dataclasses\n"
        "from fnlight.experiment import Experiment, digits\n\n"
        "def tiny(hidden: int = 8, dropout: float = 0.5, long: bool = False, name: str = 'tiny') -> Experiment:\n"
        "    exp = digits(hidden=hidden, dropout=dropout, max_epochs=2 if long else 1)\n"
        "    return dataclasses.replace(exp, name=name)\n")
    target = f"{tmp_path / 'my_exp.py'}:tiny"
    res = invoke("fit", target, "--set", "long=true", "--set", "name=mine", "--set", "dropout=0", "--max-steps",
                 "30", "--run-dir", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "fit: mine, " in res.output and "30 steps in" in res.output  # 2 epochs: 30 steps fit
    record = json.loads((tmp_path / "run" / "experiment.json").read_text())
    assert record["target"] == target and record["overrides"] == {"long": True, "name": "mine", "dropout": 0.0}
    res = invoke("test", target, "--ckpt", tmp_path / "run")  # the run's hyperparameters are used again
    assert res.exit_code == 0 and "test: accuracy" in res.output, res.output
    res = invoke("data", "describe", target)
    assert res.exit_code == 0 and "mine" not in res.output and f"tiny ({target})" in res.output


def test_launch_forwards_target_sets_and_no_resume():
    ctx = fit.make_context("fit", ["tests.test_cli:flaky", "--devices", "2", "--set", "a=1", "--set", "b=2",
                                   "--no-resume", "--max-steps", "3"])
    assert _forwarded(ctx, leave_out=("devices",)) == ["tests.test_cli:flaky", "--max-steps", "3", "--no-resume",
                                                       "--set", "a=1", "--set", "b=2"]
    assert _forwarded(fit.make_context("fit", []), leave_out=("devices",)) == []


# -- errors: one line, exit code 2 ----------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["fit", "nosuch_module_xyz:exp"], ["bad TARGET", "no module named 'nosuch_module_xyz'"]),
    (["fit", "nosuch.py:exp"], ["bad TARGET", "no file nosuch.py"]),
    (["fit", "fnlight.experiment"], ["expected module:attr or path/to/file.py:attr"]),
    (["fit", "fnlight.experiment:nothing"], ["has no attribute 'nothing'", "it defines: digits"]),
    (["fit", "tests.test_cli:needs_args"], ["parameter 'hidden' has no default"]),
    (["fit", "tests.test_cli:not_an_experiment"],
     ["building the experiment failed: TypeError: not_an_experiment returned a value of type int, not a "
      "fnlight.experiment.Experiment"]),
    (["fit", "tests.test_cli:raises"], ["building the experiment failed: ZeroDivisionError: no experiment today",
                                         "--debug for the traceback"]),
    (["fit", "tests.test_cli:FIXED", "--set", "hidden=3"], ["--set needs a factory"]),
    (["fit", "--set", "hiden=3"], ["unknown hyperparameter 'hiden'", "did you mean 'hidden'",
                                   "digits takes: batch_size, dropout, hidden, lr, max_epochs, seed, weight_decay"]),
    (["fit", "--set", "hidden=3.5"], ["bad --set hidden=3.5: expected an int"]),
    (["fit", "--set", "lr"], ["bad --set 'lr': expected key=value"]),
    (["fit", "--device", "gpu7"], ["unknown device 'gpu7'"]),
    (["test", "--ckpt", "no/such/dir"], ["no checkpoint at no/such/dir"]),
    (["inspect", "."], ["no checkpoint at ."]),
    (["predict", "--ckpt", "no/such/dir"], ["no checkpoint at"]),
    (["plot", "no/such/run"], ["no run directory no/such/run"]),
    (["data", "bench", "--split", "nope"], ["--split nope", "has the splits train, val, test"]),
])
def test_user_errors_are_one_line_with_exit_code_2(args, needles):
    assert_one_line_error(invoke(*args), *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_gpu_is_a_user_error():
    assert_one_line_error(invoke("fit", "--device", "cuda"), "CUDA is not available")


def test_a_target_that_raises_on_import_and_debug(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    res = invoke("fit", f"{tmp_path / 'broken.py'}:exp")
    assert_one_line_error(res, "importing it failed: RuntimeError: boom", "--debug")
    res = invoke("--debug", "fit", f"{tmp_path / 'broken.py'}:exp")
    assert res.exit_code == 2 and "Traceback" in res.output and "error: bad TARGET" in res.output
    res = invoke("--debug", "test", "--ckpt", "no/such/dir")
    assert res.exit_code == 2 and "Traceback" in res.output


def test_set_values_are_coerced_from_the_defaults():
    assert parse_sets(["hidden=64", "lr=1e-3", "dropout=0", "hidden=32"], digits) == {"hidden": 32, "lr": 1e-3,
                                                                                      "dropout": 0.0}
    assert coerce("on", "off", True) is False and coerce("on", "Yes", False) is True
    assert coerce("sizes", "1,2,3", (8, 8)) == (1, 2, 3) and coerce("sizes", "[4, 5]", [1]) == [4, 5]
    assert coerce("x", "none", None, int | None) is None and coerce("x", "7", None, int | None) == 7
    assert coerce("x", '{"a": 1}', None) == {"a": 1} and coerce("x", "text", None) == "text"
    with pytest.raises(CliError, match="expected true or false"):
        coerce("on", "maybe", True)
    with pytest.raises(CliError, match="expected an int"):
        coerce("n", "none", 5)
    assert hparams_of(digits)["hidden"] == 256
    assert build_experiment(digits, {"hidden": 8}).model[0].out_features == 8
    with pytest.raises(ValueError, match="unknown hyperparameter nope; digits takes: "):
        build_experiment(digits, {"nope": 1})
    assert isinstance(load_target(None).obj, type(digits)) and load_target("tests.test_cli:FIXED").label == \
        "digits MLP"


# -- validate / test / predict ---------------------------------------------------------------------

def test_validate_and_test_a_checkpoint(run):
    for stage in ("validate", "test"):
        res = invoke(stage, "--ckpt", run / "checkpoints")  # the newest checkpoint (step 30)
        assert res.exit_code == 0, res.output
        assert re.search(rf"{stage}: accuracy \d\.\d+  loss \d\.\d+  \(checkpoint .*step_000000030, step 30\)",
                         res.output), res.output
        assert "hyperparameters of the run" in res.output and "hidden=16" in res.output
    res = invoke("test", "--ckpt", run, "--json")
    doc = json.loads(res.output.splitlines()[-1])
    assert doc["stage"] == "test" and doc["step"] == 30 and set(doc["metrics"]) == {"loss", "acc"}
    # an older checkpoint, explicitly; and the wrong hyperparameters: one line naming the mismatch
    older = sorted((run / "checkpoints").iterdir())[0]
    assert invoke("validate", "--ckpt", older).exit_code == 0
    assert_one_line_error(invoke("test", "--ckpt", older, "--set", "hidden=8"), "does not match the expected state")


def test_predict_writes_predictions_that_give_the_test_accuracy(run, tmp_path):
    out = tmp_path / "preds.safetensors"
    res = invoke("predict", "--ckpt", run, "-o", out)
    assert res.exit_code == 0, res.output
    assert f"predict: 180 samples of 'test' -> {out}" in res.output
    saved = load_file(out)
    assert saved["predictions"].shape == (180, 10) and saved["indices"].shape == (180,)
    _, labels = digits_datamodule().dataset("test")[saved["indices"]]
    acc = (saved["predictions"].argmax(-1) == labels).float().mean().item()
    test = json.loads(invoke("test", "--ckpt", run, "--json").output.splitlines()[-1])["metrics"]
    assert acc == pytest.approx(test["acc"], abs=1e-6)
    res = invoke("predict", "--ckpt", run, "-o", tmp_path / "train.safetensors", "--split", "train")
    assert res.exit_code == 0 and "1437 samples of 'train'" in res.output, res.output


# -- inspect ------------------------------------------------------------------------------------

def test_inspect_shows_metadata_tensors_and_checksum(run, tmp_path):
    res = invoke("inspect", run)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "step 30, epoch 1, position 7 in the epoch" in out
    assert f"fingerprint {digits_datamodule().fingerprint}" in out and "digits >> split >> transform" in out
    assert re.search(r"^params/0\.weight +\[16, 64\] +float32 +4,096$", out, re.M), out
    assert re.search(r"^total: 21 tensors, .*; 1,482 parameters$", out, re.M)
    assert re.search(r"^checksum OK \(tensors\.safetensors: xxh128 [0-9a-f]{32}\)$", out, re.M), out
    info = json.loads(invoke("inspect", run, "--json").output)
    assert info["step"] == 30 and info["checksum"] == "OK" and info["num_params"] == 1482
    assert {"name": "step", "shape": [], "dtype": "int64", "bytes": 8} in info["tensors"]
    # a flipped byte: exit code 2 with the checksum error
    bad = tmp_path / "bad"
    shutil.copytree(sorted((run / "checkpoints").iterdir())[-1], bad)
    blob = bytearray((bad / "tensors.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "tensors.safetensors").write_bytes(bytes(blob))
    assert_one_line_error(invoke("inspect", bad), "is corrupted: its xxh128 is")
    assert_one_line_error(invoke("validate", "--ckpt", bad), "is corrupted")


def test_inspect_a_checkpoint_of_any_tree(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(2, 3, dtype=torch.float16), "n": 3})
    res = invoke("inspect", tmp_path / "ckpt")
    assert res.exit_code == 0, res.output
    assert re.search(r"^w +\[2, 3\] +float16 +12$", res.output, re.M) and "total: 1 tensors, 12 bytes" in res.output
    assert "checksum OK" in res.output and "position" not in res.output


# -- export ---------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_export_safetensors_and_torchscript_match_the_functional_model(run, tmp_path):
    x = torch.rand(5, 64)
    res = invoke("export", "--ckpt", run, "--format", "safetensors", "-o", tmp_path / "m.safetensors")
    assert res.exit_code == 0, res.output
    assert re.search(r"on a batch of 64 from 'test' it matches the functional model \(max abs difference 0\)",
                     res.output), res.output
    model = digits(hidden=16).model.eval()
    model.load_state_dict(load_file(tmp_path / "m.safetensors"))
    res = invoke("export", "--ckpt", run, "--format", "torchscript", "-o", tmp_path / "m.pt")
    assert res.exit_code == 0 and "it matches the functional model" in res.output, res.output
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
def test_export_onnx_runs_in_onnxruntime_and_matches(run, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    res = invoke("export", "--ckpt", run, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert res.exit_code == 0 and "it matches the functional model" in res.output, res.output
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    import onnxruntime

    x = torch.rand(7, 64)  # another batch size than the export's: the batch dimension is dynamic
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    model = digits(hidden=16).model.eval()
    from fnlight import load_checkpoint
    from fnlight.train.checkpoint import list_checkpoints

    state, _ = load_checkpoint(list_checkpoints(Path(run) / "checkpoints")[-1])
    with torch.no_grad():
        want = torch.func.functional_call(model, (state.params, state.buffers), (x,))
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(all(__import__("importlib").util.find_spec(p) for p in ("onnx", "onnxscript", "onnxruntime")),
                    reason="the onnx extra is installed")
def test_export_onnx_without_the_extra_says_how_to_install_it(run, tmp_path):
    res = invoke("export", "--ckpt", run, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert_one_line_error(res, "exporting to ONNX needs", "pip install 'fnlight[onnx]'")
    assert not (tmp_path / "m.onnx").exists()


# -- plot -----------------------------------------------------------------------------------------

def test_plot_curves_from_the_run_logs(run, tmp_path):
    panels = curves(run)
    assert list(panels)[:2] == ["loss", "acc"]
    assert panels["loss"]["train/loss"][0] == [0.0, 1.0] and len(panels["loss"]["val/loss"][1]) == 2
    # without metrics.jsonl the CSV files are read
    csv_only = tmp_path / "csv_only"
    shutil.copytree(run, csv_only, ignore=shutil.ignore_patterns("metrics.jsonl", "checkpoints"))
    assert curves(csv_only)["loss"] == panels["loss"]
    out = tmp_path / "curves.png"
    res = invoke("plot", run, "-o", out)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert_one_line_error(res, "plot needs matplotlib: pip install 'fnlight[plot]'")
        return
    assert res.exit_code == 0 and f"plot: {out}" in res.output, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_directory_without_logs(tmp_path):
    assert_one_line_error(invoke("plot", tmp_path), "no metrics in", "metrics.jsonl or metrics.csv")


# -- data ------------------------------------------------------------------------------------------

def test_data_describe_and_bench():
    res = invoke("data", "describe", "--set", "batch_size=32")
    assert res.exit_code == 0, res.output
    assert "├── split(parts=[[\"train\", 0.8]" in res.output and "└── batch(size=32," in res.output
    assert f"fingerprint: {digits_datamodule(batch_size=32).fingerprint}" in res.output
    doc = json.loads(invoke("data", "describe", "--json").output)
    assert doc["fingerprint"] == digits_datamodule().fingerprint and doc["description"]["stages"][0]["stage"] == \
        "digits"
    res = invoke("data", "bench", "--epochs", "2", "--split", "train", "--split", "test")
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split()[1:] for line in res.output.splitlines()[2:]}
    assert set(rows) == {"train", "test"} and rows["train"][:2] == ["46", "2874"] and float(rows["test"][3]) > 0


# -- verify ---------------------------------------------------------------------------------------

def test_verify_in_a_process_passes_for_digits_and_names_the_leaf_for_a_flaky_one():
    base = [sys.executable, "-m", "fnlight.cli", "verify", "--steps", "12"]
    out = subprocess.run(base + list(SMALL), cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.match(r"verify: OK: digits MLP: 2 runs of 12 steps and 1 interrupted after step 6 and resumed end "
                    r"bitwise identical \(state sha256 [0-9a-f]{16}", out.stdout), out.stdout
    out = subprocess.run(base + ["tests.test_cli:flaky"], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "verify: FAILED" in out.stdout
    # (after one AdamW step the weights move by lr * sign(gradient): the moments are the first to differ)
    assert re.search(r"run 2 differs from run 1 first after step 1, at state\.opt_state\.mu\['0\.bias'\]",
                     out.stdout), out.stdout
    assert re.search(r"final states differ at state\.params\['0\.bias'\]: float32\[16\], \d+ of 16 elements differ, "
                     r"max abs difference", out.stdout), out.stdout


def test_verify_names_the_step_where_a_resumed_run_parts():
    res = invoke("verify", "tests.test_cli:forgetful", "--steps", "10", "--stop-at", "4")
    assert res.exit_code == 1, res.output
    assert "run 2 differs" not in res.output  # two whole runs agree...
    assert ("the run interrupted after step 4 and resumed differs from run 1 first after step 5, at "
            "state.params['0.bias']") in res.output  # ...the resumed one parts at the first step after


def test_verify_options_are_checked():
    assert_one_line_error(invoke("verify", *SMALL, "--steps", "6", "--stop-at", "6"),
                          "--stop-at must be in 1 .. 5 (the run has 6 steps), got 6")
    assert invoke("verify", "--steps", "1").exit_code == 2


def test_a_full_disk_is_one_line_and_the_same_command_goes_on_once_space_is_freed(tmp_path):
    with small_disk(tmp_path, "120k") as disk:
        cmd = ("fit", "--max-steps", "40", *SMALL, "--ckpt-every-n-steps", "1", "--keep-last", "100",
               "--run-dir", disk / "run")
        res = invoke(*cmd)
        assert res.exit_code == 1, res.output
        errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "No space left on device" in errors[0], res.output
        assert "Traceback" not in res.output and "run the same command again" in res.output
        kept = list_checkpoints(disk / "run" / "checkpoints")
        assert kept, "the disk should hold a few checkpoints before it fills"
        newest = int(kept[-1].name.split("_")[1])
        assert invoke("test", "--ckpt", kept[-1]).exit_code == 0  # what was written is whole
        for ck in kept[:-1]:  # free space
            shutil.rmtree(ck)
        res = invoke(*cmd, "--keep-last", "1")  # (the last --keep-last counts: one checkpoint at a time now)
        assert res.exit_code == 0, res.output
        assert f"resuming from {kept[-1]}" in res.output and newest < 40
        assert [ck.name for ck in list_checkpoints(disk / "run" / "checkpoints")] == ["step_000000040"]
