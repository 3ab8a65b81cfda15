"""The examples run as real processes, on small data, and print what they promise.

(examples/data_pipeline.py and examples/train_distributed.py are run by tests/test_cli_examples.py
and tests/test_launch.py, examples/lightning_interop.py by tests/test_lightning.py.)
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from .conftest import serving

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(*argv: str, home: Path, timeout: float = 180) -> str:
    """``python *argv`` in the repository root (a script and its options); its stdout.

    Whatever it writes besides its run directory goes to ``home`` (downloads, hypothesis's database).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FNLIGHT_HOME": str(home),
           "PYTHONDONTWRITEBYTECODE": "1", "HYPOTHESIS_STORAGE_DIRECTORY": str(home / "hypothesis")}
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{argv} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def result(stdout: str) -> tuple[float, int]:
    """``(test accuracy, steps)`` from an example's last line."""
    m = re.search(r"^test accuracy (\d\.\d+) after (\d+) steps$", stdout.strip().splitlines()[-1])
    assert m, stdout
    return float(m.group(1)), int(m.group(2))


def test_mlp_digits(tmp_path):
    out = run("examples/mlp_digits.py", "--max-epochs", "3", "--run-dir", str(tmp_path / "run"), home=tmp_path)
    acc, steps = result(out)
    assert steps == 3 * 23 and acc >= 0.8, out
    assert (tmp_path / "run" / "metrics.csv").exists()


# -- the CNN reads its images through `download` from a real HTTP server on 127.0.0.1 --

def _stripes(n: int = 256, size: int = 16, seed: int = 1) -> bytes:
    """An .npz of two-class 16x16 uint8 images: horizontal (0) or vertical (1) bars, with noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    bars = (np.arange(size) // 2) % 2  # 2 pixels on, 2 off
    shift = rng.integers(0, 4, n)
    rows = np.stack([np.roll(bars, s) for s in shift])  # [n, size]
    images = np.where(labels[:, None, None] == 0, rows[:, :, None], rows[:, None, :]) * 0.7
    images = np.clip(images + rng.normal(0.15, 0.1, (n, size, size)), 0, 1)
    buf = io.BytesIO()
    np.savez(buf, images=(images * 255).astype(np.uint8)[:, None], labels=labels.astype(np.int64))
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.gets[self.path] += 1
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.gets = {}, Counter()
    with serving(srv):
        yield srv


def test_cnn_images_downloads_from_a_url_and_trains(tmp_path, server):
    body = _stripes()
    digest = hashlib.sha256(body).hexdigest()
    server.files["/data/stripes.npz"] = body
    url = f"http://127.0.0.1:{server.server_address[1]}/data/stripes.npz"
    data_root = tmp_path / "data"
    args = ["--url", url, "--sha256", digest, "--data-root", str(data_root), "--run-dir", str(tmp_path / "run")]
    out = run("examples/cnn_images.py", *args, "--max-epochs", "4", home=tmp_path / "home")
    cached = data_root / "downloads" / digest[:16] / "stripes.npz"
    assert f"data: {cached} (192 training images of shape (1, 16, 16))" in out, out
    assert cached.read_bytes() == body and server.gets["/data/stripes.npz"] == 1
    acc, steps = result(out)
    assert steps == 4 * 6 and acc >= 0.9, out
    # a second run reads the verified copy: no second request
    out = run("examples/cnn_images.py", *args, "--max-steps", "2", home=tmp_path / "home")
    assert result(out)[1] == 2 and server.gets["/data/stripes.npz"] == 1


def test_cnn_images_make_data(tmp_path):
    out = run("examples/cnn_images.py", "--make-data", str(tmp_path / "s.npz"), home=tmp_path)
    digest = hashlib.sha256((tmp_path / "s.npz").read_bytes()).hexdigest()
    assert f"--url {(tmp_path / 's.npz').as_uri()} --sha256 {digest}" in out


# -- BatchNorm + dropout: a run stopped by max_steps and run again ends bitwise where an uninterrupted one does --

def _hash(stdout: str) -> str:
    m = re.search(r"^final state hash ([0-9a-f]{16})$", stdout, re.M)
    assert m, stdout
    return m.group(1)


def test_batchnorm_dropout_resumes_exactly(tmp_path):
    straight = run("examples/batchnorm_dropout.py", "--max-epochs", "2", "--run-dir", str(tmp_path / "a"),
                   home=tmp_path)
    assert "'0.running_mean'" not in straight and "'1.running_mean'" in straight  # BatchNorm's buffers
    assert "starting from step 0" in straight and result(straight)[1] == 46
    assert re.search(r"^best checkpoint: step (23|46), val acc \d\.\d+$", straight, re.M), straight

    cut = run("examples/batchnorm_dropout.py", "--max-epochs", "2", "--max-steps", "30", "--run-dir",
              str(tmp_path / "b"), home=tmp_path)
    assert result(cut)[1] == 30 and "step_000000030" in cut
    resumed = run("examples/batchnorm_dropout.py", "--max-epochs", "2", "--run-dir", str(tmp_path / "b"),
                  home=tmp_path)
    assert "resuming from step_000000030" in resumed
    acc, steps = result(resumed)
    assert steps == 46 and acc >= 0.8
    assert _hash(resumed) == _hash(straight) != _hash(cut)
    assert result(resumed) == result(straight)


def test_accumulate_warmup_cosine(tmp_path):
    out = run("examples/accumulate_warmup_cosine.py", "--max-epochs", "4", "--accumulate", "4", "--peak-lr", "1e-2",
              "--run-dir", str(tmp_path / "run"), home=tmp_path)
    diff = float(re.search(r"accumulate=4 vs one whole batch of 256: max \|param difference\| (\S+)", out).group(1))
    assert diff < 1e-6, out
    m = re.search(r"24 steps, 2 of warmup: lr (\S+) at step 1, peak (\S+) at step (\d+), (\S+) at step 24", out)
    assert m, out
    first, peak, peak_step, last = float(m.group(1)), float(m.group(2)), int(m.group(3)), float(m.group(4))
    assert first == 0.0 and peak == pytest.approx(1e-2) and peak_step == 3 and 0 < last < 1e-4
    acc, steps = result(out)
    assert steps == 24 and acc >= 0.8, out


def test_reproducibility_test_file_passes_under_pytest(tmp_path):
    out = run("-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'pt'}",
              "examples/reproducibility_test.py", "--fnlight-seed", "3", home=tmp_path)
    assert re.search(r"^4 passed", out.strip().splitlines()[-1]), out


def test_ensemble_sweep(tmp_path):
    out = run("examples/ensemble_sweep.py", "--max-epochs", "2", "--seeds", "0,1", "--lrs", "1e-3,1e-2", "--out",
              str(tmp_path / "out"), home=tmp_path)
    assert "seeds member 1: val acc" in out and "sweep member 1: val acc" in out and "best learning rate:" in out
    png = tmp_path / "out" / "ensemble_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "out" / "sweep" / "metrics.csv").read_text().splitlines()
    assert "val/acc/1" in rows[0] and len(rows) == 3  # the header and 2 epochs
