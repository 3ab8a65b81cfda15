import re
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from fnlight.cli import digits_datamodule, main

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_trains_digits_to_95_percent_in_under_a_minute(tmp_path):
    fnlight_cli = Path(sys.executable).parent / "fnlight"
    t0 = time.perf_counter()
    out = subprocess.run([str(fnlight_cli), "fit", "--run-dir", str(tmp_path / "run")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    acc = float(re.search(r"test accuracy (\d\.\d+)", out.stdout).group(1))
    assert acc >= 0.95 and wall < 60, (acc, wall)
    assert f"run directory: {tmp_path / 'run'}" in out.stdout
    assert digits_datamodule().fingerprint[:16] in out.stdout
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 41 and rows[0].startswith("step,epoch,train/loss")
    # checkpoints for resuming (the newest 3), and what was trained
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == [
        "step_000000874", "step_000000897", "step_000000920"]
    assert '"target": "fnlight.experiment:digits"' in (tmp_path / "run" / "experiment.json").read_text()


def test_data_describe_and_bad_options():
    runner = CliRunner()
    res = runner.invoke(main, ["data", "describe"])
    assert res.exit_code == 0 and "split(parts=" in res.output and "fingerprint: " in res.output
    res = runner.invoke(main, ["fit", "--max-epochs", "0"])
    assert res.exit_code == 2 and "--max-epochs" in res.output
    res = runner.invoke(main, ["fit", "--device", "gpu7"])
    assert res.exit_code == 2 and "--device" in res.output


def test_fit_options(tmp_path):
    res = CliRunner().invoke(main, ["fit", "--max-steps", "30", "--seed", "3", "--run-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "30 steps in" in res.output


def test_data_pipeline_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "data_pipeline.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "same remaining batches: True" in out.stdout
    assert "augments differently: True" in out.stdout


def test_train_distributed_example_runs_in_one_process(tmp_path):
    """Without torchrun the distributed example is a plain single-process run (tests/test_launch.py runs 2 ranks)."""
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_distributed.py"), "--max-epochs", "1",
                          "--max-steps", "6", "--run-dir", str(run)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "1 rank(s), 45 batches of 32 per rank" in out.stdout
    assert re.search(r"test accuracy \d\.\d+ after 6 steps", out.stdout), out.stdout
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000000006"]
