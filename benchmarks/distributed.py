"""Distributed training throughput (gloo on 127.0.0.1, CPU) and flat vs per-tensor all-reduce.

What it measures:

* ``steps_per_s_1rank``: ``make_train_step`` (Adam, MLP 784-512-512-10, batch
  ``--batch``) in one process;
* ``steps_per_s_2ranks``: the same step in 2 processes of a gloo group, each
  with its own batch of ``--batch`` (so twice the samples per step), gradients
  averaged across ranks in one flat all-reduce inside the step. Steps/s of the
  slowest rank. The table prints 2 x steps_per_s_2ranks / steps_per_s_1rank,
  the scaling of throughput in samples/s (2.0 is perfect);
* ``allreduce_flat_s`` / ``allreduce_per_tensor_s``: the time of averaging the
  gradients of a model with 160 parameter tensors (80 Linear(64, 64) layers)
  across the 2 ranks: ``fnlight.distributed.all_reduce_mean`` (one flat buffer
  per dtype) vs one ``torch.distributed.all_reduce`` per tensor (what a naive
  loop does). Median of ``--repeats`` x 20 calls.
* ``zero1.*`` / ``replicated.*``: on the 2 ranks, Adam on the large MLP (784-2048-2048-10, batch
  512 per rank, ``donate=True``) with ``make_train_step(shard_optimizer_state=True)`` (ZeRO-1) and
  with the replicated optimizer state: ``peak_optimizer_bytes_per_rank`` (the largest, over the
  timed steps, of the bytes of the optimizer-state tensors a rank holds; the larger of the two
  ranks) and ``samples_per_s`` (2 x 512 samples per step over the slowest rank's time; median of
  ``--repeats`` runs of ``--steps / 10`` steps). Targets: zero1 bytes <= 0.55x, samples/s >= 0.9x.

Every process uses ``OMP_NUM_THREADS=1`` (one core per rank; the 1-rank run too,
so the comparison is per core). On a machine with fewer than 2 free cores the
2-rank figures measure contention, not scaling.

Run:
    .venv/bin/python benchmarks/distributed.py
    .venv/bin/python benchmarks/distributed.py --steps 20 --repeats 1 --json    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fnlight  # noqa: E402
import fnlight.optim as fo  # noqa: E402
from fnlight import distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def loss_fn(model_fn, batch, key):
    x, y = batch
    return F.cross_entropy(model_fn(x), y)


def steps_per_s(batch: int, steps: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 10))
    opt = fo.adam(1e-3)
    step = fnlight.make_train_step(model, loss_fn, opt, donate=True)
    state = fnlight.TrainState.create(model, opt)
    g = torch.Generator().manual_seed(distributed.rank())
    data = [(torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(4)]
    for i in range(5):  # warm-up
        state, m = step(state, data[i % 4])
    rates = []
    for _ in range(repeats):
        distributed.barrier()
        t0 = time.perf_counter()
        for i in range(steps):
            state, m = step(state, data[i % 4])
        float(m["loss"])
        rates.append(steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def allreduce_times(repeats: int) -> tuple[float, float]:
    grads = {f"{i}.{k}": torch.randn(64, 64) if k == "weight" else torch.randn(64)
             for i in range(80) for k in ("weight", "bias")}
    flat_t, per_t = [], []
    for _ in range(repeats):
        for _ in range(20):
            distributed.barrier()
            t0 = time.perf_counter()
            distributed.all_reduce_mean(grads)
            flat_t.append(time.perf_counter() - t0)
            distributed.barrier()
            t0 = time.perf_counter()
            out = {}
            for k, v in grads.items():
                c = v.clone()
                torch.distributed.all_reduce(c)
                out[k] = c / 2
            per_t.append(time.perf_counter() - t0)
    return statistics.median(flat_t), statistics.median(per_t)


def opt_bytes(state: fnlight.TrainState) -> int:
    return sum(t.numel() * t.element_size() for t in fnlight.tree.tree_leaves(state.opt_state)
               if isinstance(t, torch.Tensor))


def zero1_vs_replicated(args: argparse.Namespace) -> dict[str, float]:
    """ZeRO-1 vs replicated optimizer state on the large MLP (both ranks run this)."""
    batch, steps = 512, max(2, args.steps // 10)
    res: dict[str, float] = {}
    for name, shard in (("replicated", False), ("zero1", True)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(784, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                                    torch.nn.ReLU(), torch.nn.Linear(2048, 10))
        opt = fo.adam(1e-3)
        step = fnlight.make_train_step(model, loss_fn, opt, donate=True, shard_optimizer_state=shard)
        state = fnlight.TrainState.create(model, opt)
        g = torch.Generator().manual_seed(distributed.rank())
        data = [(torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(2)]
        for i in range(2):  # warm-up (the first sharded step shards the state)
            state, m = step(state, data[i % 2])
        peak, rates = opt_bytes(state), []
        for _ in range(args.repeats):
            distributed.barrier()
            t0 = time.perf_counter()
            for i in range(steps):
                state, m = step(state, data[i % 2])
                peak = max(peak, opt_bytes(state))
            float(m["loss"])
            elapsed = max(distributed.all_reduce_sum([time.perf_counter() - t0 if r == distributed.rank() else 0.0
                                                      for r in range(2)]))
            rates.append(2 * batch * steps / elapsed)
        res[f"{name}.peak_optimizer_bytes_per_rank"] = max(distributed.all_reduce_sum(
            [float(peak) if r == distributed.rank() else 0.0 for r in range(2)]))
        res[f"{name}.samples_per_s"] = statistics.median(rates)
        del state
    return res


def rank_main(args: argparse.Namespace) -> None:
    """One rank of the 2-rank group: its own steps/s and (rank 0) the all-reduce timings."""
    distributed.init(backend="gloo", timeout_s=120)
    rate = steps_per_s(args.batch, args.steps, args.repeats)
    rates = distributed.all_reduce_sum([rate if r == distributed.rank() else 0.0 for r in range(2)])  # each rank's
    flat, per = allreduce_times(args.repeats)
    zero1 = zero1_vs_replicated(args)
    if distributed.rank() == 0:
        Path(args.out).write_text(json.dumps({"steps_per_s_2ranks": min(rates), "allreduce_flat_s": flat,
                                              "allreduce_per_tensor_s": per, **zero1}))
    distributed.barrier()  # as fnlight's CLI: no rank tears the group down while the other is still busy
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)  # set for the ranks
    args = ap.parse_args()
    if "RANK" in os.environ:
        rank_main(args)
        return
    one = steps_per_s(args.batch, args.steps, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "two.json"
        port = distributed.free_port()
        procs = [subprocess.Popen([sys.executable, __file__, "--batch", str(args.batch), "--steps", str(args.steps),
                                   "--repeats", str(args.repeats), "--out", str(out)],
                                  env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                       "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                       "PYTHONPATH": str(ROOT)})
                 for r in range(2)]
        if any(p.wait(timeout=900) for p in procs):
            raise SystemExit("a rank failed")
        two = json.loads(out.read_text())
    res = {"steps_per_s_1rank": one, **two}
    if args.json:
        print(json.dumps(res))
        return
    print(f"MLP 784-512-512-10, Adam, batch {args.batch} per rank, gloo on 127.0.0.1, OMP_NUM_THREADS=1, "
          f"torch {torch.__version__}, median of {args.repeats}")
    print(f"  1 rank:  {one:8.1f} steps/s")
    print(f"  2 ranks: {two['steps_per_s_2ranks']:8.1f} steps/s (each step: 2 x {args.batch} samples)")
    print(f"  samples/s, 2 ranks / 1 rank: {2 * two['steps_per_s_2ranks'] / one:.2f}x  (2.0 ideal)")
    print(f"  all-reduce of 160 tensors: flat {two['allreduce_flat_s'] * 1e3:.3f} ms, per tensor "
          f"{two['allreduce_per_tensor_s'] * 1e3:.3f} ms -> flat is "
          f"{two['allreduce_per_tensor_s'] / two['allreduce_flat_s']:.1f}x faster")
    z, r = "zero1.", "replicated."
    print("Adam, MLP 784-2048-2048-10, batch 512 per rank, 2 ranks, replicated vs ZeRO-1 optimizer state:")
    zb, rb = two[z + "peak_optimizer_bytes_per_rank"], two[r + "peak_optimizer_bytes_per_rank"]
    print(f"  optimizer state per rank: {rb / 2**20:.1f} MiB vs {zb / 2**20:.1f} MiB -> {zb / rb:.2f}x "
          "(target <= 0.55x)")
    print(f"  samples/s: {two[r + 'samples_per_s']:.0f} vs {two[z + 'samples_per_s']:.0f} -> "
          f"{two[z + 'samples_per_s'] / two[r + 'samples_per_s']:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
