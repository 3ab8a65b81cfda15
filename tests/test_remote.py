"""Remote run directories: checkpoints and logs in object stores, through fsspec.

Fast unit coverage on fsspec's in-memory file system (``memory://``); the real S3 API on moto's standalone
server, started here on 127.0.0.1 at a random port and reached through s3fs with fake credentials: a writer
killed with SIGKILL mid-checkpoint, a resume from the bucket in a fresh process and a fresh directory, the CLI,
and credentials that never show in what is written or in errors.
"""

import hashlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import traceback
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnlight.train.rundir import read_resumes

fsspec = pytest.importorskip("fsspec")

import fnlight  # noqa: E402
from fnlight._remote import RemotePath, is_remote, location, redact  # noqa: E402
from fnlight.train import checkpoint_files, checkpoint_remote  # noqa: E402
from fnlight.train.checkpoint import (  # noqa: E402
    CheckpointError,
    CorruptCheckpointError,
    find_resumable,
    list_checkpoints,
    step_dir,
)
from fnlight.train.loggers import CSVLogger, JSONLLogger  # noqa: E402
from fnlight.train.remote_logs import read_log  # noqa: E402
from fnlight.tree import tree_equal  # noqa: E402

from .test_resume import setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY_ID, SECRET = "FNLIGHTKEYID7Q2W9", "fnlight-s3cr3t-4f9d1c7be2a06a55"  # fake, distinctive: grepped for below


def no_time(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def mem(name: str) -> str:
    return f"memory://fnlight-tests/{name}-{uuid.uuid4().hex[:8]}"


def state_tree():
    return {"w": torch.arange(12.0).reshape(3, 4), "b": {"n": torch.tensor(3), "h": torch.ones(5, dtype=torch.half)}}


# -- locations ---------------------------------------------------------------------------------------------


def test_urls_become_remote_paths_and_local_paths_stay_paths(tmp_path):
    assert location("runs/a") == Path("runs/a") and location(tmp_path) == tmp_path
    assert location(f"file://{tmp_path}") == tmp_path  # file:// keeps the local code path (renames, fsync)
    p = location("s3://bucket/runs/a") / "checkpoints"
    assert isinstance(p, RemotePath) and str(p) == "s3://bucket/runs/a/checkpoints"
    assert p.name == "checkpoints" and p.parent == RemotePath("s3://bucket/runs/a")
    assert step_dir("s3://bucket/ck", 7) == RemotePath("s3://bucket/ck/step_000000007")
    assert step_dir(tmp_path, 7) == tmp_path / "step_000000007"
    assert is_remote("gs://b/x") and is_remote("memory://x") and not is_remote(f"file://{tmp_path}")
    assert redact("ftp://me:hunter2@host/x") == "ftp://me:***@host/x" and "hunter2" not in repr(RemotePath(
        "ftp://me:hunter2@host/x"))


def test_local_paths_never_go_through_fsspec(tmp_path):
    """Local checkpoints, resume and logs keep their own code path: fsspec is not even imported."""
    code = f"""
import sys
import fnlight
from fnlight.train.loggers import CSVLogger, JSONLLogger
from tests.test_resume import setup
dm, state, step, eval_step = setup()
t = fnlight.Trainer(max_steps=4, run_dir={str(tmp_path)!r}, ckpt_dir={str(tmp_path / "ck")!r},
                    loggers=(CSVLogger(), JSONLLogger()))
t.fit(state, step, dm, eval_step)
fnlight.load_checkpoint({f"file://{tmp_path}/ck/step_000000004"!r})
print(sorted(m for m in ("fsspec", "s3fs", "gcsfs") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


# -- checkpoints on memory:// ------------------------------------------------------------------------------


def test_a_remote_checkpoint_is_its_files_and_a_manifest_of_all_of_them(monkeypatch):
    url = mem("ck")
    tree = state_tree()
    fnlight.save_checkpoint(url, tree, meta={"epoch": 2})
    loaded, meta = fnlight.load_checkpoint(url, like=tree)
    assert tree_equal(loaded, tree) and meta == {"epoch": 2}
    p = RemotePath(url)
    manifest = json.loads((p / "manifest.json").read_bytes())
    assert set(manifest["files"]) == {"checkpoint.json", "tensors.safetensors"}
    for name, entry in manifest["files"].items():
        data = (p / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    # a sharded state: every shard is in the manifest; overwriting replaces the old checkpoint whole
    monkeypatch.setattr(checkpoint_files, "SHARD_BYTES", 16)
    bigger = {**tree, "v": torch.randn(40)}
    fnlight.save_checkpoint(url, bigger)
    names = set(json.loads((p / "manifest.json").read_bytes())["files"])
    assert len([n for n in names if n.startswith("tensors-")]) > 1 and "tensors.safetensors" not in names
    assert set(p.files()) == names | {"manifest.json"}
    assert tree_equal(fnlight.load_checkpoint(url)[0], bigger)


def test_files_other_writers_put_in_the_checkpoint_are_committed_too():
    p = RemotePath(mem("ck"))
    tensors, doc = fnlight.train.checkpoint.prepare(state_tree(), None)
    known = checkpoint_remote.write_files(p, {k: v.contiguous() for k, v in tensors.items()}, doc)
    (p / "optimizer-rank-00001.safetensors").write_bytes(b"another rank's shard")  # not hashed by this writer
    manifest = checkpoint_remote.commit(p, known)
    entry = manifest["files"]["optimizer-rank-00001.safetensors"]
    assert entry["size"] == 20 and entry["sha256"] == hashlib.sha256(b"another rank's shard").hexdigest()


def test_damage_and_incomplete_checkpoints_are_errors_naming_the_file():
    tree = state_tree()
    url = mem("ck")
    p = RemotePath(url)
    fnlight.save_checkpoint(url, tree)
    good = (p / "tensors.safetensors").read_bytes()
    flipped = bytearray(good)
    flipped[-1] ^= 1
    (p / "tensors.safetensors").write_bytes(bytes(flipped))  # the same size: only the sha256 tells
    with pytest.raises(CorruptCheckpointError, match=r"tensors\.safetensors is corrupted: its sha256"):
        fnlight.load_checkpoint(url)
    (p / "tensors.safetensors").write_bytes(good)
    (p / "notes.txt").write_bytes(b"x")
    with pytest.raises(CorruptCheckpointError, match=r"refusing to load .*notes\.txt"):
        fnlight.load_checkpoint(url)
    (p / "notes.txt").unlink()
    manifest = json.loads((p / "manifest.json").read_bytes())
    manifest["files"]["tensors.safetensors"]["size"] += 1
    (p / "manifest.json").write_bytes(json.dumps(manifest).encode())
    with pytest.raises(CorruptCheckpointError, match=r"manifest\.json is corrupted"):
        fnlight.load_checkpoint(url)
    (p / "manifest.json").unlink()  # files without their commit marker: not a checkpoint
    with pytest.raises(CorruptCheckpointError, match="incomplete: it has no manifest.json"):
        fnlight.load_checkpoint(url)
    with pytest.raises(CheckpointError, match="nothing is there"):
        fnlight.load_checkpoint(mem("nothing"))


def test_saving_over_something_else_is_refused_and_removes_nothing():
    p = RemotePath(mem("dir"))
    (p / "data.csv").write_bytes(b"a,b\n")
    with pytest.raises(CheckpointError, match=r"data\.csv.*nothing was written or removed"):
        fnlight.save_checkpoint(p, state_tree())
    assert p.files() == {"data.csv": 4}


def test_find_resumable_skips_uncommitted_and_damaged_checkpoints():
    tree = state_tree()
    ck = RemotePath(mem("ck"))
    for n in (1, 2, 3):
        fnlight.save_checkpoint(step_dir(ck, n), {**tree, "w": tree["w"] + n})
    (step_dir(ck, 4) / "tensors.safetensors").write_bytes(b"a killed writer's upload")  # never committed
    (step_dir(ck, 3) / "tensors.safetensors").write_bytes(b"garbage")
    assert [p.name for p in list_checkpoints(ck)] == ["step_000000001", "step_000000002", "step_000000003"]
    found = find_resumable(ck, like=tree)
    assert found.path == step_dir(ck, 2) and torch.equal(found.state["w"], tree["w"] + 2)
    assert "step_000000003" in found.message() and "step_000000004" not in found.message()
    assert checkpoint_remote.remove_incomplete(ck, below=5) == [step_dir(ck, 4)]
    assert not any(rel.startswith("step_000000004/") for rel in ck.files())


@settings(max_examples=25)
@given(chunks=st.lists(st.integers(1, 5), max_size=6), keep_frac=st.floats(0, 1), then=st.integers(0, 4))
def test_a_resumed_log_holds_each_row_once_whatever_its_chunks(chunks, keep_frac, then):
    """Law: rows logged in any chunking, cut back to any count a checkpoint recorded, then continued, read
    back as the kept prefix followed by the new rows."""
    run = RemotePath(mem("log"))
    first = JSONLLogger().open(run)
    rows = []
    for size in chunks:
        for _ in range(size):
            rows.append({"kind": "step", "step": len(rows)})
            first.log(rows[-1])
        first.flush()
    keep = int(keep_frac * len(rows))
    second = JSONLLogger().open(run, {"step": keep, "epoch": 0})
    new = [{"kind": "step", "step": 1000 + i} for i in range(then)]
    for row in new:
        second.log(row)
    second.close()
    assert read_log(run, "metrics.jsonl") == rows[:keep] + new


def trainer(run, **kw):
    return fnlight.Trainer(max_epochs=4, run_dir=run, ckpt_dir=f"{run}/ck", log_every_n_steps=1,
                           loggers=(CSVLogger(), JSONLLogger()), **kw)


def local_rows(run: Path):
    import csv

    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [{"kind": "step", **{k: json.loads(v) for k, v in r.items() if v != ""}}
             for r in csv.DictReader((run / "steps.csv").open())]
    return jsonl, steps


def test_a_trainer_resumes_from_a_memory_run_dir_bitwise_with_whole_logs(tmp_path):
    dm, state, step, eval_step = setup()
    full = trainer(tmp_path / "full").fit(state, step, dm, eval_step)  # the local reference
    url = mem("run")
    trainer(url, max_steps=7, ckpt_every_n_steps=3).fit(state, step, dm, eval_step)
    ck = RemotePath(url) / "ck"
    (step_dir(ck, 8) / "checkpoint.json").write_bytes(b"{}")  # what a writer killed mid-checkpoint leaves
    resumed = trainer(url, ckpt_every_n_steps=3, keep_last=2).fit(state, step, dm, eval_step)
    assert resumed.resumed_from == step_dir(ck, 7) and tree_equal(resumed.state, full.state)
    assert [p.name for p in list_checkpoints(ck)] == ["step_000000018", "step_000000020"]
    assert not any(rel.startswith("step_000000008/") for rel in ck.files())  # cleaned up after a newer commit
    jsonl, steps = local_rows(tmp_path / "full")
    assert no_time(read_log(RemotePath(url), "metrics.jsonl")) == no_time(jsonl)  # no row missing or twice
    assert no_time(read_log(RemotePath(url), "steps.csv")) == no_time(steps)
    assert len(read_log(RemotePath(url), "metrics.csv")) == 4
    assert not any(".tmp" in rel for rel in RemotePath(url).files())
    assert [r["step"] for r in read_resumes(RemotePath(url))] == [7]  # the mark fnlight plot draws


# -- the real S3 API: moto's server, s3fs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 at a random port; s3fs reaches it through the environment (as a user's
    job would: credentials and endpoint from variables). Yields the environment for child processes."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("fnlight-tests")
    try:
        yield {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.filesystem("s3").clear_instance_cache()
        server.stop()


def everything_written(url: str) -> bytes:
    p = RemotePath(url)
    return b"".join(rel.encode() + (p / rel).read_bytes() for rel in p.files())


def assert_no_credentials(*texts: bytes | str) -> None:
    for text in texts:
        raw = text.encode() if isinstance(text, str) else text
        assert SECRET.encode() not in raw and KEY_ID.encode() not in raw


@pytest.mark.slow
def test_s3_writer_killed_mid_checkpoint_resumes_from_the_bucket_in_a_fresh_place(s3, tmp_path):
    """kill -9 of a writer between its files and its manifest; then a new process in a new empty directory
    resumes from the bucket alone, and ends bitwise where an uninterrupted run ends, logs whole."""
    dm, state, step, eval_step = setup()
    full = trainer(tmp_path / "full", ckpt_every_n_steps=2).fit(state, step, dm, eval_step)
    url = f"s3://fnlight-tests/killed-{uuid.uuid4().hex[:8]}"
    first = tmp_path / "machine1"
    first.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "tests._remote_fit", url, "8"], cwd=first, env=s3,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "committing"
        ck = RemotePath(url) / "ck"
        assert {"checkpoint.json", "tensors.safetensors"} <= {
            rel.split("/", 1)[1] for rel in ck.files() if rel.startswith("step_000000008/")}
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        out1, err1 = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert list_checkpoints(ck)[-1] == step_dir(ck, 6)  # step 8's files are there, uncommitted: invisible
    second = tmp_path / "machine2"  # nothing local is kept: a new directory, a new process
    second.mkdir()
    res = subprocess.run([sys.executable, "-m", "tests._remote_fit", url, "0"], cwd=second, env=s3,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"finished resumed_from={step_dir(ck, 6)}" in res.stdout
    assert list(second.iterdir()) == []  # it wrote nothing locally
    final = find_resumable(ck, like=full.state)
    assert final.path == step_dir(ck, 20) and tree_equal(final.state, full.state)
    jsonl, steps = local_rows(tmp_path / "full")
    assert no_time(read_log(RemotePath(url), "metrics.jsonl")) == no_time(jsonl)
    assert no_time(read_log(RemotePath(url), "steps.csv")) == no_time(steps)
    assert_no_credentials(everything_written(url), out1, err1, res.stdout, res.stderr)


@pytest.mark.slow
def test_s3_cli_fit_resume_inspect_test(s3, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fnlight.cli import main

    monkeypatch.chdir(tmp_path)
    url = f"s3://fnlight-tests/cli-{uuid.uuid4().hex[:8]}"

    def invoke(*args):
        res = CliRunner().invoke(main, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        assert_no_credentials(res.output)
        return res.output

    invoke("fit", "--max-steps", "12", "--set", "hidden=16", "--run-dir", url)
    out = invoke("fit", "--max-steps", "20", "--set", "hidden=16", "--run-dir", url)
    assert "(resumed at step 12)" in out and f"run directory: {url}" in out
    assert "step 20," in invoke("inspect", url)
    info = json.loads(invoke("inspect", f"{url}/checkpoints", "--json"))
    assert info["step"] == 20 and info["checksum"] == "OK"
    tested = json.loads(invoke("test", "--ckpt", url, "--json").splitlines()[-1])
    assert tested["checkpoint"] == f"{url}/checkpoints/step_000000020" and tested["step"] == 20
    assert 0.0 <= tested["metrics"]["acc"] <= 1.0
    out = invoke("fit", "--max-steps", "4", "--set", "hidden=16", "--run-dir", url, "--no-resume")
    assert f"{url}/previous/0" in out
    kept = RemotePath(url) / "previous" / "0"
    assert list_checkpoints(kept / "checkpoints")[-1].name == "step_000000020"  # the old run, still loadable
    assert [p.name for p in list_checkpoints(RemotePath(url) / "checkpoints")][-1] == "step_000000004"
    assert json.loads((RemotePath(url) / "experiment.json").read_bytes())["overrides"] == {"hidden": 16}
    assert_no_credentials(everything_written(url))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_s3_errors_name_the_place_but_never_the_credentials(s3):
    with pytest.raises(CheckpointError) as e1:
        fnlight.load_checkpoint("s3://fnlight-tests/no-such-checkpoint")
    with pytest.raises(OSError) as e2:
        fnlight.save_checkpoint("s3://fnlight-no-such-bucket/ck", state_tree())
    for e in (e1, e2):
        text = "".join(traceback.format_exception(e.value))
        assert_no_credentials(text)
    assert "s3://fnlight-no-such-bucket/ck" in str(e2.value)


def test_a_url_whose_file_system_is_not_installed_says_what_to_install():
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(ImportError, match=r"gcsfs.*fnlight\[remote\]|fnlight\[remote\].*gcsfs"):
        fnlight.load_checkpoint("gs://bucket/ck")
    with pytest.raises(ImportError, match="cannot open nosuchfs://x"):
        fnlight.load_checkpoint("nosuchfs://x")
