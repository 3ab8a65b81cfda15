import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from fnlight.cli import digits_datamodule, main

ROOT = Path(__file__).resolve().parents[1]


def test_fit_runs_the_digits_pipeline_as_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "fnlight.cli", "fit", "--max-epochs", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "epoch 1 train:  23 batches, 1438 samples" in out.stdout
    assert "test:   3 batches,  179 samples" in out.stdout
    assert digits_datamodule().fingerprint[:16] in out.stdout


def test_data_describe_and_bad_options():
    runner = CliRunner()
    res = runner.invoke(main, ["data", "describe"])
    assert res.exit_code == 0 and "split(parts=" in res.output and "fingerprint: " in res.output
    res = runner.invoke(main, ["fit", "--batch-size", "0"])
    assert res.exit_code == 2 and "--batch-size" in res.output


def test_data_pipeline_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "data_pipeline.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "same remaining batches: True" in out.stdout
    assert "augments differently: True" in out.stdout
