"""The benchmark scripts run and print what they promise (speed is not tested here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_data_throughput_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_throughput.py"), "--samples", "1280",
                          "--repeats", "1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rates = json.loads(out.stdout)
    assert {"dataloader_w0", "dataloader_w2", "handwritten_vectorized", "fnlight"} <= set(rates)
    assert all(v > 0 for v in rates.values())
    if sys.platform.startswith("linux"):  # the index-plan figures (peak memory from /proc)
        plan_keys = {f"plan.{n}.{k}" for n in ("1e6", "1e8") for k in ("first_batch_s", "peak_mb")}
        assert plan_keys <= set(rates)
        assert rates["plan.1e8.first_batch_s"] < 30 and rates["plan.1e8.peak_mb"] < 1000  # lazy: no 1e8-sized plan


def test_step_throughput_json():
    pytest.importorskip("lightning")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--quick", "--json",
                          "--workload", "small"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rates = json.loads(out.stdout.strip().splitlines()[-1])
    keys = {"torch_foreach", "torch_fused", "lightning", "fnlight_eager", "fnlight_compile", "fnlight_donate"}
    assert set(rates["small"]) == keys
    assert all(v > 0 for k, v in rates["small"].items() if k != "fnlight_compile")  # --quick skips compiling


def test_checkpoint_json(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint.py"), "--params", "2e5", "--repeats",
                          "1", "--json", "--dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    times = json.loads(out.stdout)
    assert {"torch_save", "torch_save_durable", "torch_load", "fnlight_save", "fnlight_load",
            "fnlight_async_blocked"} <= set(times)
    assert all(v > 0 for v in times.values())
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself


@pytest.mark.slow
def test_distributed_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--steps", "5", "--repeats",
                          "1", "--batch", "16", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert {"steps_per_s_1rank", "steps_per_s_2ranks", "allreduce_flat_s", "allreduce_per_tensor_s",
            "zero1.peak_optimizer_bytes_per_rank", "replicated.peak_optimizer_bytes_per_rank",
            "zero1.samples_per_s", "replicated.samples_per_s"} <= set(res)
    assert all(v > 0 for v in res.values())
    # ZeRO-1 on 2 ranks: each rank holds about half of Adam's state
    assert res["zero1.peak_optimizer_bytes_per_rank"] <= 0.55 * res["replicated.peak_optimizer_bytes_per_rank"]


def test_ensemble_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ensemble.py"), "--quick", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"sequential", "ensemble", "ensemble_compile", "peak_mb.sequential", "peak_mb.ensemble"} <= set(result)
    assert result["sequential"] > 0 and result["ensemble"] > 0 and result["ensemble_compile"] is None  # --quick
    assert result["products"] > 0 and result["products_x"] == round(result["products"] / result["sequential"], 2)
    assert result["peak_mb.ensemble"] > result["states_mb.ensemble"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_step_throughput_gpt_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--quick", "--json",
                          "--workload", "gpt"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    gpt = json.loads(out.stdout.strip().splitlines()[-1])["gpt"]
    assert gpt["fnlight_compile"] is None  # --quick skips compiling
    assert all(gpt[k] > 0 for k in ("torch_default", "fnlight_eager", "fnlight_donate"))
    assert set(gpt["peak_mb"]) == {"torch_default", "fnlight_eager", "fnlight_donate"}
    assert all(10 < mb < 1000 for mb in gpt["peak_mb"].values())  # model, Adam state, activations: ~70 MB


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_step_throughput_hf_json():
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--quick", "--json",
                          "--workload", "hf"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    hf = json.loads(out.stdout.strip().splitlines()[-1])["hf"]
    assert set(hf) == {"torch_default", "fnlight_eager", "fnlight_compile"}  # --quick: no compile, no counts
    assert hf["fnlight_compile"] is None and hf["torch_default"] > 0 and hf["fnlight_eager"] > 0


@pytest.mark.slow
def test_remote_json():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "remote.py"), "--params", "2e5", "--repeats", "1",
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["bytes"] == 800_000
    assert all(res[w][k] > 0 for w in ("local", "remote") for k in ("save_s", "load_s"))
