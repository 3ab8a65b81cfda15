"""Data-pipeline throughput: fnlight vs torch DataLoader vs a hand-written vectorized loop.

What it measures: samples/s of one full epoch over ``--samples`` (default 60,000)
in-memory 1x28x28 float32 samples (random data from a fixed torch generator;
no labels), each normalized, ``(x - 0.1307) / 0.3081``, then flipped
horizontally with probability 0.5, in shuffled batches of 128:

* ``dataloader_w0``: ``torch.utils.data.DataLoader(num_workers=0, shuffle=True)``
  over a map-style dataset that transforms one sample per ``__getitem__``;
* ``dataloader_w2``: the same with ``num_workers=2`` (not persistent: the
  worker start-up is part of every epoch, as a user sees it);
* ``handwritten_vectorized``: the practical limit; seeded ``randperm``, then
  ``data[idx]``, normalize and a ``torch.where`` flip on whole batches;
* ``handwritten_index_select``: the same with ``torch.index_select`` for the
  gather (what fnlight's fast path uses; ~3x faster than ``data[idx]`` on CPU),
  shown so that the gain from the gather alone is visible;
* ``fnlight``: ``from_tensors >> transform(normalize, batched=True) >>
  transform(hflip, batched=True) >> shuffle() >> batch(128)`` in a
  ``DataModule`` with its defaults (no prefetch thread on the CPU): the
  vectorized form fnlight recommends for hot transforms;
* ``fnlight_per_sample``: the same pipeline written with per-sample functions,
  which fnlight vectorizes with ``torch.func.vmap`` (convenience, at the cost
  of vmap's per-call overhead);
* ``fnlight_prefetch``: ``fnlight`` with ``DataModule(prefetch=2)``, to show
  what a prefetch thread costs when the consumer does no work on the CPU.

Every variant runs full epochs (no extrapolation from a subset of batches);
each consumer loop counts the samples it receives and checks the total.
Each variant is warmed up once (one epoch; a few batches for the DataLoader
variants), then the variants are timed in ``--repeats`` interleaved rounds
(round-robin, with the starting variant rotated each round), one epoch each,
with a new epoch number every time. Reported: median samples/s and min-max.

Targets (from the issue): fnlight / dataloader_w0 >= 10x, fnlight /
dataloader_w2 >= 10x, fnlight / handwritten_vectorized >= 0.8x; the same
ratios are shown for fnlight_per_sample.

Index plans that do not grow with the data (``plan.<n>.*``): for n = 1e6 and
1e8 samples, a fresh process builds ``read_tokens(f) >> windows(64, stride=1)
>> shuffle() >> batch(128)`` over a sparse token file of n + 64 tokens (no
disk or memory used by the data itself) and reads the first batch of epoch 0,
then 10 more batches. ``first_batch_s``: from making the DataModule to the
first batch; ``peak_mb``: the growth of the process's peak resident memory
over the same span (its baseline taken after torch is imported and the file
made). Targets: first batch < 0.5 s and growth < 100 MB at 1e8. (Before lazy
plans the epoch's order was materialized: over 1e8 in-memory samples the first
batch took 74 s and 4.6 GB, against 0.12 s and 10 MB after, on the 2-core VM
under a load of 12.)

Run:
    .venv/bin/python benchmarks/data_throughput.py              # table, 5 rounds
    .venv/bin/python benchmarks/data_throughput.py --repeats 9
    .venv/bin/python benchmarks/data_throughput.py --quick      # smoke test
    .venv/bin/python benchmarks/data_throughput.py --json       # one JSON object
    .venv/bin/python benchmarks/data_throughput.py --no-plans   # without the index-plan figures

Timings use torch's default settings (its intra-op thread count included). On a
small shared machine single epochs can be several times slower at random (torch's
OpenMP threads are sensitive to it); the min-max columns show it, and a run
under ``OMP_NUM_THREADS=1`` is a useful control.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

import fnlight
import fnlight.data as fd
import fnlight.random as fr

MEAN, STD, BATCH = 0.1307, 0.3081, 128
DATALOADER_WARMUP_BATCHES = 20
TARGETS = {"dataloader_w0": 10.0, "dataloader_w2": 10.0, "handwritten_vectorized": 0.8}
PLAN_SIZES = {"1e6": 10**6, "1e8": 10**8}
PLAN_TARGETS = {"first_batch_s": 0.5, "peak_mb": 100.0}  # at 1e8
PLAN_BLOCK, PLAN_MORE_BATCHES = 64, 10

#: runs one epoch (by number), optionally only its first ``max_batches``; returns the samples seen
EpochFn = Callable[[int, int | None], int]


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def hflip(x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return torch.where(fr.bernoulli(key, 0.5), x.flip(-1), x)


def hflip_batch(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.where(fr.bernoulli(keys, 0.5)[:, None, None, None], x.flip(-1), x)


class FlipDataset(Dataset[torch.Tensor]):
    """The per-sample torch idiom: transform in ``__getitem__``, global RNG."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = normalize(self.data[i])
        return x.flip(-1) if torch.rand(()) < 0.5 else x


def dataloader(data: torch.Tensor, workers: int) -> EpochFn:
    loader = DataLoader(FlipDataset(data), batch_size=BATCH, shuffle=True, num_workers=workers,
                        persistent_workers=False, generator=torch.Generator().manual_seed(0))

    def run(epoch: int, max_batches: int | None) -> int:
        seen = 0
        for i, b in enumerate(loader):  # iter() starts the workers: inside the timing
            seen += b.shape[0]
            if max_batches is not None and i + 1 >= max_batches:
                break
        return seen

    return run


def handwritten(data: torch.Tensor, index_select: bool = False) -> EpochFn:
    """The practical limit: whole-batch ops; ``index_select`` gathers as fnlight does
    (instead of ``data[idx]``)."""

    def run(epoch: int, max_batches: int | None) -> int:
        g = torch.Generator().manual_seed(epoch)
        seen = 0
        for idx in torch.randperm(len(data), generator=g).split(BATCH)[:max_batches]:
            x = normalize(torch.index_select(data, 0, idx) if index_select else data[idx])
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            seen += x.shape[0]
        return seen

    return run


def fnlight_dm(data: torch.Tensor, batched: bool, prefetch: int | None) -> EpochFn:
    flip = hflip_batch if batched else hflip
    pipeline = (fd.from_tensors(data) >> fd.transform(normalize, batched=batched)
                >> fd.transform(flip, batched=batched) >> fd.shuffle() >> fd.batch(BATCH))
    dm = fnlight.DataModule(pipeline, seed=0, prefetch=prefetch)
    dm.setup()  # build once, outside the timing

    def run(epoch: int, max_batches: int | None) -> int:
        seen = 0
        for i, b in enumerate(dm.batches("train", epoch=epoch)):
            seen += b.shape[0]
            if max_batches is not None and i + 1 >= max_batches:
                break
        return seen

    return run


def measure(samples: int, repeats: int, log: bool) -> dict[str, list[float]]:
    """samples/s of every timed epoch, per variant."""
    torch.manual_seed(0)  # the DataLoader's per-sample flips draw from the global RNG
    data = torch.rand(samples, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    variants: dict[str, EpochFn] = {
        "dataloader_w0": dataloader(data, 0),
        "dataloader_w2": dataloader(data, 2),
        "handwritten_vectorized": handwritten(data),
        "handwritten_index_select": handwritten(data, index_select=True),
        "fnlight": fnlight_dm(data, batched=True, prefetch=None),
        "fnlight_per_sample": fnlight_dm(data, batched=False, prefetch=None),
        "fnlight_prefetch": fnlight_dm(data, batched=True, prefetch=2),
    }
    names = list(variants)
    for name, run in variants.items():  # warm-up: epoch 0
        run(0, DATALOADER_WARMUP_BATCHES if name.startswith("dataloader") else None)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            t0 = time.perf_counter()
            seen = variants[name](r + 1, None)
            dt = time.perf_counter() - t0
            assert seen == samples, f"{name} yielded {seen} samples, expected {samples}"
            rates[name].append(seen / dt)
        if log:
            print(f"round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return rates


def _memory_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def plan_child(n: int) -> None:
    """In a fresh process: time to the first batch and peak memory growth of a lazy
    plan over ``n`` windows of a sparse token file; prints one JSON object."""
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "tokens.bin"
        with open(f, "wb") as fh:
            fh.truncate(2 * (n + PLAN_BLOCK))  # uint16 tokens, all zero, no disk blocks
        gc.collect()
        with contextlib.suppress(OSError):  # reset the peak to the current resident size (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        base = _memory_mb("VmRSS")
        t0 = time.perf_counter()
        pipeline = fd.read_tokens(f) >> fd.windows(PLAN_BLOCK, stride=1) >> fd.shuffle() >> fd.batch(BATCH)
        dm = fnlight.DataModule(pipeline, seed=0)
        it = dm.batches("train", epoch=0)
        x, _ = next(it)
        first = time.perf_counter() - t0
        assert x.shape == (BATCH, PLAN_BLOCK) and len(dm.dataset("train")) == n
        for _, _batch in zip(range(PLAN_MORE_BATCHES), it, strict=False):
            pass
        it.close()
        print(json.dumps({"first_batch_s": first, "peak_mb": _memory_mb("VmHWM") - base}))


def measure_plans() -> dict[str, float]:
    """``plan.<size>.first_batch_s`` and ``plan.<size>.peak_mb``, each size in its own process."""
    out: dict[str, float] = {}
    if not sys.platform.startswith("linux"):
        return out  # peak memory is read from /proc
    for label, n in PLAN_SIZES.items():
        res = subprocess.run([sys.executable, __file__, "--plan-child", str(n)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"the plan measurement for {label} failed:\n{res.stderr[-3000:]}")
        for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items():
            out[f"plan.{label}.{k}"] = round(v, 4 if k.endswith("_s") else 1)
    return out


def report_plans(plans: dict[str, float]) -> None:
    if not plans:
        print("\n(index-plan figures need Linux's /proc; skipped)")
        return
    print(f"\nIndex plan: read_tokens >> windows({PLAN_BLOCK}, stride=1) >> shuffle() >> batch({BATCH}), "
          "a fresh process per size")
    print(f"{'samples':<10}{'first batch s':>15}{'peak growth MB':>16}")
    for label in PLAN_SIZES:
        print(f"{label:<10}{plans[f'plan.{label}.first_batch_s']:>15.3f}{plans[f'plan.{label}.peak_mb']:>16.1f}")
    ok = (plans["plan.1e8.first_batch_s"] < PLAN_TARGETS["first_batch_s"]
          and plans["plan.1e8.peak_mb"] < PLAN_TARGETS["peak_mb"])
    print(f"targets at 1e8: first batch < {PLAN_TARGETS['first_batch_s']} s, growth < "
          f"{PLAN_TARGETS['peak_mb']:g} MB  {'ok' if ok else 'MISSED'}")


def report(rates: dict[str, list[float]], samples: int, repeats: int, wall: float) -> None:
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nOne epoch of {samples} samples (1x28x28 float32), batch {BATCH}, normalize + "
          f"random hflip; median of {repeats} interleaved round(s), full epochs (no extrapolation)"
          f"; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads.\n")
    print(f"{'variant':<24}{'median samples/s':>18}{'min':>12}{'max':>12}{'epoch s':>10}")
    for k, v in rates.items():
        print(f"{k:<24}{med[k]:>18,.0f}{min(v):>12,.0f}{max(v):>12,.0f}{samples / med[k]:>10.3f}")
    print(f"\n{'ratio (median samples/s)':<50}{'value':>8}{'target':>9}")
    for ours in ("fnlight", "fnlight_per_sample"):
        for base, target in {**TARGETS, "handwritten_index_select": 0.8}.items():
            ratio = med[ours] / med[base]
            verdict = "ok" if ratio >= target else "MISSED"
            print(f"{ours + ' / ' + base:<50}{ratio:>7.2f}x{'>= ' + f'{target:g}x':>9}  {verdict}")
    print(f"\ntotal wall time: {wall:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description="fnlight data-pipeline throughput benchmark")
    parser.add_argument("--samples", type=int, default=None, help="epoch size (default 60000)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="6000 samples, 1 round: a smoke test")
    parser.add_argument("--json", action="store_true", help="print one JSON object of medians")
    parser.add_argument("--no-plans", action="store_true", help="skip the index-plan measurements")
    parser.add_argument("--plan-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plan_child is not None:
        plan_child(args.plan_child)
        return
    samples = args.samples if args.samples is not None else (6000 if args.quick else 60000)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    if samples < 1 or repeats < 1:
        parser.error("--samples and --repeats must be >= 1")
    t0 = time.perf_counter()
    rates = measure(samples, repeats, log=not args.json)
    plans = {} if args.no_plans else measure_plans()
    if args.json:
        print(json.dumps({**{k: round(statistics.median(v), 1) for k, v in rates.items()}, **plans}))
    else:
        report(rates, samples, repeats, time.perf_counter() - t0)
        if not args.no_plans:
            report_plans(plans)


if __name__ == "__main__":
    main()
