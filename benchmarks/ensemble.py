"""Ensemble throughput: 8 members trained by one vectorized step vs 8 separate fnlight steps.

What it measures, on the CPU: member-steps/s of Adam (lr 1e-3) on cross-entropy for
8 members of the MLP 784-256-256-10 (ReLU), batch 128, every member on the same batch
(a pool of 8 random batches, cycled), all variants from the same 8 initial states:

* ``sequential``: 8 separate ``make_train_step(model, loss_fn, fo.adam(1e-3), donate=True)`` steps,
  one per member, per batch (what you would write without ensembles; donate, as the Trainer does);
* ``ensemble``: one ``make_train_step(..., ensemble=True)`` step on the stacked state;
* ``ensemble_compile``: the same with ``compile=True`` (inductor; the forward and backward are compiled);
* ``ensemble_chunk2``: the ensemble step with ``member_chunk=2`` (4 vectorized passes of 2 members: the
  step's working memory is 2 members' gradients and activations instead of 8);
* ``products``: the ensemble step's matrix products alone (``torch.bmm`` with the shapes and layouts vmap
  gives them, see :class:`Products`), in member-steps/s: a bound on any ensemble step that computes them.

Peak memory: ``sequential``, ``ensemble`` and ``ensemble_chunk2`` also run in fresh subprocesses that report the memory
their states take (``states_mb.<variant>``) and the peak that the states and the training steps take
(``peak_mb.<variant>``: Linux's ``VmHWM``, reset through ``/proc/self/clear_refs`` once the states are
made, minus the resident set before they were made; see :func:`peak_memory`). The target compares
the ensemble's peak with that of the 8 separate states trained one after the other.

Targets (from the issue) on a 2-core CPU: ensemble >= 3x sequential, ensemble_compile >= 4x
sequential, ensemble peak memory <= 1.2x that of the 8 separate states.

Timing: each variant is warmed up (the compile happens there), then the variants are timed in
``--repeats`` interleaved rounds of ``--steps`` steps each; every timed block ends by reading the
loss with ``float()``. Reported: medians and min-max, with the machine's load average.

Run:
    .venv/bin/python benchmarks/ensemble.py             # table
    .venv/bin/python benchmarks/ensemble.py --json      # keys: sequential, ensemble, ensemble_compile,
                                                        # ensemble_chunk2, products, products_x (products /
                                                        # sequential), peak_mb.*, states_mb.*, gflops.* and
                                                        # ceiling_x (matmul peak / sequential's GFLOP/s)
    .venv/bin/python benchmarks/ensemble.py --quick     # smoke test: 1 round, few steps, no compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import fnlight
import fnlight.optim as fo

MEMBERS, BATCH, POOL = 8, 128, 8
VARIANTS = ("sequential", "ensemble", "ensemble_compile", "ensemble_chunk2")


def model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10))


def loss_fn(model_fn: Callable[..., Any], batch: Any, key: torch.Tensor) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model_fn(x), y)


def pool() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, 784, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(POOL)]


class Runner:
    """One variant: ``run(n)`` trains n steps (n * MEMBERS member-steps) and returns the wall time."""

    def __init__(self, variant: str):
        opt = fo.adam(1e-3)
        torch.manual_seed(0)
        states = [fnlight.TrainState.create(model(), opt, seed=s) for s in range(MEMBERS)]
        self.data, self.i = pool(), 0
        if variant == "sequential":
            step = fnlight.make_train_step(model(), loss_fn, opt, donate=True)
            self.states = states

            def once(batch: Any) -> torch.Tensor:
                out = None
                for j, s in enumerate(self.states):
                    self.states[j], m = step(s, batch)
                    out = m["loss"]
                return out
        else:
            step = fnlight.make_train_step(model(), loss_fn, opt, ensemble=True, donate=True,
                                           compile=variant == "ensemble_compile",
                                           member_chunk=2 if variant == "ensemble_chunk2" else None)
            self.state = fnlight.stack_states(states)
            del states

            def once(batch: Any) -> torch.Tensor:
                self.state, m = step(self.state, batch)
                return m["loss"]
        self.once = once

    def run(self, n: int) -> float:
        t = time.perf_counter()
        loss = None
        for _ in range(n):
            loss = self.once(self.data[self.i % POOL])
            self.i += 1
        float(loss.sum())
        return time.perf_counter() - t


def peak_memory(variant: str, steps: int) -> tuple[float, float]:
    """(states MB, peak MB) of ``variant`` in a fresh process: the resident set the states add, and the
    peak the states and ``steps`` training steps add, over the resident set before the states were made.

    The child first runs the variant's code path once on a tiny model (one-time costs such as the
    modules that vmap imports are not per-model memory), and runs with a fixed glibc mmap threshold
    (``MALLOC_MMAP_THRESHOLD_=65536``) so that freed tensors leave the resident set at once and it
    measures live memory rather than the allocator's retention.
    """
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import ensemble as e; "
            f"e.warm({variant!r}); base = e.reset_peak(); r = e.Runner({variant!r}); made = e.rss_mb(); "
            f"e.reset_peak(); r.run({steps}); print(made - base, e.peak_mb() - base)")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=900,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    states, peak = out.stdout.strip().splitlines()[-1].split()
    return float(states), float(peak)


def warm(variant: str) -> None:
    """Run ``variant``'s code path once on a tiny model."""
    m, opt = torch.nn.Linear(3, 2), fo.adam(1e-3)
    states = [fnlight.TrainState.create(m, opt, seed=s) for s in range(2)]
    ensemble = variant != "sequential"
    state = fnlight.stack_states(states) if ensemble else states[0]
    step = fnlight.make_train_step(m, lambda mf, b, k: mf(b).sum(), opt, ensemble=ensemble, donate=True)
    step(state, torch.randn(4, 3))


def rss_mb() -> float:
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (Linux: ``5`` into ``clear_refs``) and return the current RSS (MB)."""
    torch.ones(4) + 1  # noqa: B018  (the first op's allocations belong to the baseline)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """The peak resident set (MB) since :func:`reset_peak`."""
    return _status_mb("VmHWM")


def member_step_flops() -> float:
    """Floating-point operations of one member's matrix products in a step (2 per multiply-add): the
    forward, the weights' gradients, and the inputs' gradients of every layer but the first (whose
    input is the data, which needs no gradient)."""
    sizes = [m.in_features * m.out_features for m in model() if isinstance(m, torch.nn.Linear)]
    return 2.0 * BATCH * (2 * sum(sizes) + sum(sizes[1:]))


class Products:
    """The ensemble step's matrix products alone, batched over the members as vmap batches them
    (``torch.bmm``, the same shapes and layouts): per layer the forward and the weights' gradient, and
    the inputs' gradient of every layer but the first. ``run(n)`` times n steps' worth. No ensemble step
    that computes these products can train faster than this."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ops = []
        for i, m in enumerate(x for x in model() if isinstance(x, torch.nn.Linear)):
            x = torch.randn(BATCH, m.in_features, generator=g).expand(MEMBERS, -1, -1) if i == 0 else \
                torch.randn(MEMBERS, BATCH, m.in_features, generator=g)
            w = torch.randn(MEMBERS, m.out_features, m.in_features, generator=g)
            dy = torch.randn(MEMBERS, BATCH, m.out_features, generator=g)
            self.ops += [(x, w.transpose(1, 2)), (dy.transpose(1, 2), x)] + ([(dy, w)] if i > 0 else [])

    def run(self, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            for a, b in self.ops:
                torch.bmm(a, b)
        return time.perf_counter() - t


def matmul_gflops(repeats: int = 5) -> float:
    """This machine's float32 matrix-product throughput (GFLOP/s): the best of ``repeats`` 1024^3 products.
    No variant can train faster than its matrix products allow, so ``peak / sequential``'s achieved
    GFLOP/s bounds what vectorizing the members can gain."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b  # noqa: B018  (warm-up)
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * 1024**3 / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description="fnlight ensemble-step throughput benchmark")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timing (default 20)")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 steps, no compile: a smoke test")
    parser.add_argument("--no-compile", action="store_true", help="skip ensemble_compile")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    steps = args.steps or (2 if args.quick else 20)
    variants = [v for v in VARIANTS if v != "ensemble_compile" or not (args.quick or args.no_compile)]
    load, t0 = os.getloadavg()[0], time.perf_counter()
    runners: dict[str, Runner | Products] = {v: Runner(v) for v in variants}
    runners["products"] = Products()
    variants.append("products")
    for r in runners.values():
        r.run(3)  # warm-up (and compile)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for rnd in range(repeats):
        for v in variants[rnd % len(variants):] + variants[:rnd % len(variants)]:
            rates[v].append(steps * MEMBERS / runners[v].run(steps))
    del runners
    peak = matmul_gflops()
    achieved = {v: med_ * member_step_flops() / 1e9 for v, med_ in
                ((v, statistics.median(r)) for v, r in rates.items()) if v != "products"}
    memory = {v: peak_memory(v, steps) for v in ("sequential", "ensemble", "ensemble_chunk2")}
    med = {v: statistics.median(r) for v, r in rates.items()}
    if args.json:
        out: dict[str, Any] = {v: round(med[v], 2) if v in med else None for v in (*VARIANTS, "products")}
        out["products_x"] = round(med["products"] / med["sequential"], 2)
        out.update({f"peak_mb.{v}": round(p, 1) for v, (_, p) in memory.items()})
        out.update({f"states_mb.{v}": round(st, 1) for v, (st, _) in memory.items()})
        out.update({f"gflops.{v}": round(g, 1) for v, g in achieved.items()})
        out["gflops.matmul_peak"] = round(peak, 1)
        out["ceiling_x"] = round(peak / achieved["sequential"], 2)
        print(json.dumps(out))
        return
    print(f"ensemble benchmark: {MEMBERS} members of MLP 784-256-256-10, batch {BATCH}, Adam; "
          f"{repeats} rounds x {steps} steps; load average {load:.2f}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {time.perf_counter() - t0:.0f} s")
    base = med["sequential"]
    for v in variants:
        print(f"  {v:17s} {med[v]:8.1f} member-steps/s  ({min(rates[v]):.1f}-{max(rates[v]):.1f})  "
              f"{med[v] / base:5.2f}x sequential")
    print(f"  bound: the ensemble step's matrix products alone (`products`) run at {med['products'] / base:.2f}x "
          "sequential; no ensemble step that computes them can be faster")
    print(f"  compute: sequential's step achieves {achieved['sequential']:.1f} GFLOP/s (its products' FLOPs over its "
          f"time), a 1024^3 matrix product {peak:.1f} GFLOP/s: products at that peak taking all the time would give "
          f"{peak / achieved['sequential']:.2f}x sequential")
    for v, (st, p) in memory.items():
        print(f"  memory {v:11s} states {st:6.1f} MB, peak {p:6.1f} MB  ({p / memory['sequential'][1]:4.2f}x "
              "sequential's peak)")
    print("targets: ensemble >= 3x, ensemble_compile >= 4x sequential; ensemble peak memory <= 1.2x sequential")


if __name__ == "__main__":
    main()
