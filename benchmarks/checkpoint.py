"""Checkpoint save / load time: fnlight vs ``torch.save`` / ``torch.load`` of the same tensors.

What it measures, on a state of ``--params`` parameters (default 100M: six
4096x4096 Linear layers and their biases plus one to make up the rest) with
Adam moments, so ~3x that many float32 values (~1.2 GB), all on the CPU:

* ``torch_save``: ``torch.save(tensors, file)`` of a flat dict of every tensor
  of the state (the parameters, both moments and the step counts);
* ``torch_save_durable``: ``torch.save`` followed by an fsync of the file and
  of its directory: what a crash-safe ``torch.save`` costs, the fair baseline
  for fnlight's save (which fsyncs every file and directory it writes);
* ``torch_load``: ``torch.load(file)`` of that file (``weights_only=True``);
* ``fnlight_save``: ``fnlight.save_checkpoint(dir, state)``: safetensors files
  (a state this big is split into up to 16 shards, written in parallel),
  the XXH128 checksum of each (computed while writing), JSON structure, fsync of every file and of
  the directories, atomic rename;
* ``fnlight_load``: ``fnlight.load_checkpoint(dir)``: reads (copies) every
  tensor file into memory while checking its XXH128 checksum (shards in parallel, one
  thread per core), and checks ``checkpoint.json``'s own sha256. Like
  ``torch.load``, the result no longer depends on the files;
* ``fnlight_async_blocked``: how long ``AsyncCheckpointer.save`` (what
  ``Trainer(async_save=True)`` uses) blocks the caller: the host copy into its
  staging buffers; the write goes on in the background and is waited for
  (untimed) before the next round. The first async save also allocates the
  staging buffers; it is reported apart (``fnlight_async_blocked_first``).

Both loads are followed by a sum over every tensor (inside the timing), so
both sides return values that have been read.
All files go to ``--dir`` (default: a temp directory), each save's files are
deleted after its load (so every save follows the deletion of the files before
it), the torch and fnlight blocks alternate in order from round to round,
``os.sync()`` runs (untimed) before each measurement so that none pays
for writing back the previous one's dirty pages, and every measurement is the median of ``--repeats`` rounds (variants
interleaved). The loads read files that were just written, i.e. from
the page cache for both.

Targets: save within 1.1x of ``torch_save_durable``, load at least as fast as
``torch.load``, and the loop blocked for at most 0.3x of a synchronous save
when saving asynchronously. (``torch_save`` without fsync is reported too.)

Run:
    .venv/bin/python benchmarks/checkpoint.py                 # table, 3 rounds, 100M parameters
    .venv/bin/python benchmarks/checkpoint.py --params 1e6 --repeats 1 --json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fnlight
import fnlight.optim as fo
from fnlight.train.checkpoint import AsyncCheckpointer
from fnlight.tree import tree_leaves


def make_state(n_params: int) -> fnlight.TrainState:
    """Linear layers of up to 4096x4096 (+ bias) adding up to exactly ``n_params`` parameters, with Adam moments."""
    layers, left = [], n_params
    while left > 0:
        out = min(4096, max(1, left // 4097))
        cin = min(4096, max(1, (left - out) // out))
        layers.append(torch.nn.Linear(cin, out))
        left -= cin * out + out
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():  # make the moments non-zero, like those of a trained state
        state = fnlight.TrainState.create(model, fo.adam(1e-3), seed=0)
        state = state.replace(opt_state=fnlight.tree.tree_map(
            lambda t: torch.randn_like(t) if t.is_floating_point() and t.dim() else t, state.opt_state))
    return state


def touch(tensors: Any) -> list[float]:
    """Read every value: the sorted per-tensor sums (comparable whatever order the leaves come in)."""
    return sorted(float(t.sum()) for t in tree_leaves(tensors))  # no temporary copies: a read of every value


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    os.sync()  # (untimed) no measurement pays for writing back the dirty pages of the one before
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def torch_save_durable(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.save``, then fsync the file and its directory: a save that survives a crash."""
    torch.save(tensors, path)
    for p, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def torch_load(path: Path) -> list[float]:
    return touch(torch.load(path, weights_only=True))


def fnlight_load(path: Path) -> list[float]:
    return touch(fnlight.load_checkpoint(path)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=100e6, help="parameters in the state (default 100M)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp directory)")
    ap.add_argument("--json", action="store_true", help="print one JSON object of median seconds")
    args = ap.parse_args()

    state = make_state(int(args.params))
    n = sum(p.numel() for p in tree_leaves(state.params))
    flat = {f"t{i}": t for i, t in enumerate(tree_leaves(state))}
    nbytes = sum(t.numel() * t.element_size() for t in flat.values())
    expected = touch(flat)
    root = Path(tempfile.mkdtemp(prefix="fnlight-ckpt-bench-", dir=args.dir))
    times: dict[str, list[float]] = {k: [] for k in ("torch_save", "torch_save_durable", "torch_load",
                                                      "fnlight_save", "fnlight_load", "fnlight_async_blocked")}
    first_async = None
    writer = AsyncCheckpointer()
    def torch_block(d: Path) -> None:
        t, _ = timed(torch.save, flat, d / "state.pt")
        times["torch_save"].append(t)
        (d / "state.pt").unlink()
        t, _ = timed(torch_save_durable, flat, d / "state.pt")
        times["torch_save_durable"].append(t)
        t, out = timed(torch_load, d / "state.pt")
        times["torch_load"].append(t)
        assert out == expected
        (d / "state.pt").unlink()

    def fnlight_block(d: Path) -> None:
        nonlocal first_async
        t, _ = timed(fnlight.save_checkpoint, d / "ckpt", state)
        times["fnlight_save"].append(t)
        t, out = timed(fnlight_load, d / "ckpt")
        times["fnlight_load"].append(t)
        assert out == expected
        shutil.rmtree(d / "ckpt")
        # async: the first save allocates the staging buffers; then the steady state is measured
        if first_async is None:
            first_async, _ = timed(writer.save, d / "async0", state)
            writer.wait()
            shutil.rmtree(d / "async0")
        t, _ = timed(writer.save, d / "async", state)
        times["fnlight_async_blocked"].append(t)
        writer.wait()
        assert fnlight_load(d / "async") == expected
        shutil.rmtree(d / "async")

    try:
        for r in range(args.repeats):
            d = root / f"round{r}"
            d.mkdir()
            # Each block deletes what it wrote before the next one writes, and the order alternates between
            # rounds: writing 1.2 GB is measurably faster right after 1.2 GB of files were deleted (their
            # page cache is reused) than when they are still there, and neither side should get that for free.
            for block in (torch_block, fnlight_block) if r % 2 == 0 else (fnlight_block, torch_block):
                block(d)
            shutil.rmtree(d)
    finally:
        writer.close()
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    if args.json:
        print(json.dumps(med | {"fnlight_async_blocked_first": first_async}))
        return
    print(f"state: {n / 1e6:.1f}M parameters + Adam moments = {nbytes / 1e9:.2f} GB; torch {torch.__version__}; "
          f"{args.repeats} rounds, median (min-max) seconds")
    for k, v in times.items():
        print(f"  {k:24s} {med[k]:7.3f}  ({min(v):.3f}-{max(v):.3f})")
    print(f"  {'fnlight_async_blocked_first':24s} {first_async:7.3f}  (allocates the staging buffers)")
    print("ratios (target):")
    print(f"  fnlight_save / torch_save_durable    {med['fnlight_save'] / med['torch_save_durable']:.2f}x  "
          "(<= 1.1x)")
    print(f"  fnlight_save / torch_save            {med['fnlight_save'] / med['torch_save']:.2f}x  (no fsync)")
    print(f"  fnlight_load / torch_load            {med['fnlight_load'] / med['torch_load']:.2f}x  (<= 1.0x)")
    print(f"  fnlight_async_blocked / fnlight_save {med['fnlight_async_blocked'] / med['fnlight_save']:.2f}x  "
          "(<= 0.3x)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
