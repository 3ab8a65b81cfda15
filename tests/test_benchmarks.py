"""The benchmark scripts run and print what they promise (speed is not tested here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_data_throughput_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_throughput.py"), "--samples", "1280",
                          "--repeats", "1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rates = json.loads(out.stdout)
    assert {"dataloader_w0", "dataloader_w2", "handwritten_vectorized", "fnlight"} <= set(rates)
    assert all(v > 0 for v in rates.values())
