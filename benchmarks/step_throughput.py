"""Training-step throughput: fnlight's ``make_train_step`` vs a plain PyTorch loop vs Lightning.

What it measures: steps/s of Adam (lr 1e-3) on cross-entropy for two MLPs on
the CPU, all variants on the same model (same initial weights) and the same data:

* ``small``: MLP 784-256-256-10 (ReLU), batch 128;
* ``large``: MLP 784-2048-2048-10 (ReLU), batch 512.

The data is a pool of 8 random batches (``x`` normal, ``y`` uniform class
labels; fixed ``torch.Generator`` seed), cycled in the same order by every variant.

Variants:

* ``torch_foreach`` / ``torch_fused``: ``opt.zero_grad(set_to_none=True);
  loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()`` with
  ``torch.optim.Adam(foreach=True)`` / ``Adam(fused=True)``;
* ``lightning``: a ``LightningModule`` with the same model, ``training_step``
  returning the loss and ``configure_optimizers`` returning
  ``Adam(lr=1e-3, foreach=True)``, run by ``lightning.Trainer(max_steps=...,
  accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
  enable_progress_bar=False, enable_model_summary=False)`` over a
  ``DataLoader(batch_size=None)`` of the pool (one epoch per fit, so no epoch
  boundary inside the timing). Steady state: each round is one fit of
  ``LIGHTNING_WARM + steps`` steps, and a Callback timestamps
  ``on_train_batch_end`` of step ``LIGHTNING_WARM`` and of the last step, so
  Lightning's per-fit setup and teardown are excluded (its per-step hooks,
  closure and data fetching are included);
* ``fnlight_eager``: ``make_train_step(model, loss_fn, fo.adam(1e-3))``, pure
  (out of place), threading ``state, metrics = step(state, batch)``;
* ``fnlight_compile``: the same with ``compile=True`` (inductor);
* ``fnlight_donate``: the same, eager, with ``donate=True`` (in-place updates).

Each variant is warmed up first (a few steps; the cold inductor compile of
``fnlight_compile`` takes ~10-15 s per workload; Lightning gets one warm-up
fit), then the variants are timed in ``--repeats`` interleaved rounds
(round-robin, the starting variant rotated each round), a fixed number of
steps each (small: 400, large: 10; >= ~0.5 s per timing on a 2-core machine).
Every timed block ends by reading its final loss with ``float()``, so all of
its work is done. Reported: median steps/s and min-max.

Workload ``groups`` (``--workload groups``): AdamW (lr 1e-3) with two parameter groups on
the large MLP, the weights with weight decay 0.1 and the biases without (torch's param groups;
fnlight's ``multi_transform`` of two ``adamw``); variants ``torch_foreach``, ``torch_fused``,
``fnlight_eager``, ``fnlight_donate`` (targets: eager >= 0.95x and donate >= 1.0x torch_foreach).

Targets (from the issue), on the CPU: small: fnlight_eager >= 0.9x torch_foreach,
fnlight_compile >= 1.1x torch_fused, fnlight_eager >= 1.0x and fnlight_compile
>= 1.4x lightning; large: fnlight_eager >= 0.85x and fnlight_donate >= 0.95x the
best plain loop (``best_plain`` = the faster of the torch_foreach / torch_fused medians).

The ``gpt`` workload (``--workload gpt``, not in the default run) trains examples/gpt.py's
nanoGPT-style model (4 layers, width 128, block 64, batch 16 of random tokens, dropout 0) with
AdamW (decay on the 2-D non-embedding weights) and clipping at 1.0: ``torch_default`` is the plain
loop with ``torch.optim.AdamW``'s default (foreach) implementation and ``clip_grad_norm_``, against
``fnlight_eager``, ``fnlight_donate`` and ``fnlight_compile``; it also reports each variant's peak
memory (measured in a fresh process, see ``gpt_peak_memory``), on ``--device`` (``cuda`` too) and in
``--precision`` (``bf16-mixed`` too). Targets: fnlight_eager >= 0.95x and fnlight_compile >= 1.1x
torch_default's steps/s; fnlight_eager's peak memory <= 1.05x torch_default's.

The ``hf`` workload (``--workload hf``, not in the default run; needs ``transformers``) trains
examples/hf_gpt2.py's Hugging Face GPT-2 (``gpt2``: from a GPT2Config, 2 layers, width 64, block 64,
dropout as configured, ``loss_type="ForCausalLM"``), batch 16 of random tokens, the loss
``model(**batch).loss``, AdamW with the default decay mask and clipping at 1.0: ``torch_default``,
``fnlight_eager``, ``fnlight_compile``. It reports the compiled step against the eager one (the issue's
claim: 1.4x), the first call's seconds (the cold compile) and Dynamo's graph, graph-break and recompile
counts (``--json``: ``hf.fnlight_eager``, ``hf.fnlight_compile``, ``hf.compile_s``, ``hf.graphs``...).

Run:
    .venv/bin/python benchmarks/step_throughput.py              # table, 5 rounds
    .venv/bin/python benchmarks/step_throughput.py --workload gpt --json   # {"gpt": {variant: steps/s, "peak_mb": ...}}
    .venv/bin/python benchmarks/step_throughput.py --workload hf --json    # {"hf": {variant: steps/s, "graphs": ...}}
    .venv/bin/python benchmarks/step_throughput.py --repeats 9
    .venv/bin/python benchmarks/step_throughput.py --quick      # smoke test: 1 round, few steps, no compile
    .venv/bin/python benchmarks/step_throughput.py --json       # one JSON object of median steps/s

Timings use torch's default settings (its intra-op thread count included). On a
small shared machine out-of-place updates and OpenMP threads make single timings
noisy; the min-max columns show it, and ``OMP_NUM_THREADS=1`` is a useful control.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import fnlight
import fnlight.optim as fo

LR, POOL, WARMUP, LIGHTNING_WARM = 1e-3, 8, 3, 3
VARIANTS = ("torch_foreach", "torch_fused", "lightning", "fnlight_eager", "fnlight_compile", "fnlight_donate")
#: (workload, ours, baseline, target); baseline "best_plain" is the faster plain loop
TARGETS = (
    ("small", "fnlight_eager", "torch_foreach", 0.9),
    ("small", "fnlight_compile", "torch_fused", 1.1),
    ("small", "fnlight_eager", "lightning", 1.0),
    ("small", "fnlight_compile", "lightning", 1.4),
    ("large", "fnlight_eager", "best_plain", 0.85),
    ("large", "fnlight_donate", "best_plain", 0.95),
    ("groups", "fnlight_eager", "torch_foreach", 0.95),
    ("groups", "fnlight_donate", "torch_foreach", 1.0),
)

Batch = tuple[torch.Tensor, torch.Tensor]
#: runs n training steps; returns (seconds for them, final loss)
Runner = Callable[[int], tuple[float, float]]


@dataclass(frozen=True)
class Workload:
    name: str
    sizes: tuple[int, ...]
    batch: int
    steps: int  # per timed block


WORKLOADS = (Workload("small", (784, 256, 256, 10), 128, 400), Workload("large", (784, 2048, 2048, 10), 512, 10))


def mlp(sizes: tuple[int, ...]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def batches(w: Workload) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(w.batch, w.sizes[0], generator=g), torch.randint(0, w.sizes[-1], (w.batch,), generator=g))
            for _ in range(POOL)]


def loss_fn(model_fn: Callable[..., Any], batch: Batch, key: torch.Tensor) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model_fn(x), y)


def torch_runner(opt: torch.optim.Optimizer, loss_of: Callable[[Any], torch.Tensor], data: Iterator[Any],
                 clip: list[torch.nn.Parameter] | None = None) -> Runner:
    """Runs ``n`` steps of the plain PyTorch loop (``zero_grad``, ``loss_of(batch).backward()``, optionally
    ``clip_grad_norm_(clip, 1.0)``, ``opt.step()``) on batches of ``data``: seconds and the last loss."""

    def run(n: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(next(data))
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(clip, 1.0)
            opt.step()
        final = float(loss.detach())
        return time.perf_counter() - t0, final

    return run


def mlp_loss(model: torch.nn.Module) -> Callable[[Batch], torch.Tensor]:
    return lambda batch: F.cross_entropy(model(batch[0]), batch[1])


def torch_loop(model: torch.nn.Module, pool: list[Batch], fused: bool) -> Runner:
    opt = torch.optim.Adam(model.parameters(), lr=LR, foreach=not fused, fused=fused)
    return torch_runner(opt, mlp_loss(model), itertools.cycle(pool))


def step_runner(step: Callable[..., Any], state: fnlight.TrainState, data: Iterator[Any]) -> Runner:
    """Runs ``n`` fnlight steps from ``state`` (carried from block to block) on batches of ``data``: seconds and
    the last loss (read with ``float``, which waits for the step)."""

    def run(n: int) -> tuple[float, float]:
        nonlocal state
        t0 = time.perf_counter()
        for _ in range(n):
            state, metrics = step(state, next(data))
        final = float(metrics["loss"])
        return time.perf_counter() - t0, final

    return run


def rounds(runners: dict[str, Runner], steps: int, repeats: int, label: str, log: bool) -> dict[str, list[float]]:
    """steps/s of every timed block of ``steps`` steps, per variant: ``repeats`` rounds, each running every
    variant once, the order rotated from round to round (no variant always first after the collector)."""
    names = list(runners)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            dt, loss = runners[name](steps)
            assert loss == loss, f"{label}/{name}: loss is NaN"
            rates[name].append(steps / dt)
        if log:
            print(f"{label}: round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return rates


def fnlight_loop(model: torch.nn.Module, pool: list[Batch], **options: Any) -> Runner:
    opt = fo.adam(LR)
    step = fnlight.make_train_step(model, loss_fn, opt, **options)
    return step_runner(step, fnlight.TrainState.create(model, opt), itertools.cycle(pool))


class LitMLP(lightning.LightningModule):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=LR, foreach=True)


class Cycle(Dataset[Batch]):
    def __init__(self, pool: list[Batch], length: int):
        self.pool, self.length = pool, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Batch:
        return self.pool[i % len(self.pool)]


class StepClock(lightning.Callback):
    """Timestamps the end of step ``start`` and of step ``end`` (1-based); reads the last loss."""

    def __init__(self, start: int, end: int):
        self.start, self.end, self.t0, self.t1, self.loss = start, end, 0.0, 0.0, float("nan")

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 == self.start:
            self.t0 = time.perf_counter()
        elif batch_idx + 1 == self.end:
            self.loss = float(outputs["loss"] if isinstance(outputs, Mapping) else outputs)
            self.t1 = time.perf_counter()


def lightning_loop(model: torch.nn.Module, pool: list[Batch]) -> Runner:
    module = LitMLP(model)

    def run(n: int) -> tuple[float, float]:
        total = LIGHTNING_WARM + n
        clock = StepClock(LIGHTNING_WARM, total)
        trainer = lightning.Trainer(max_steps=total, accelerator="cpu", devices=1, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, callbacks=[clock])
        trainer.fit(module, DataLoader(Cycle(pool, total), batch_size=None))
        assert trainer.global_step == total, f"lightning ran {trainer.global_step} steps, expected {total}"
        return clock.t1 - clock.t0, clock.loss

    return run


def measure(w: Workload, steps: int, repeats: int, compile: bool, log: bool) -> dict[str, list[float]]:
    """steps/s of every timed block, per variant."""
    torch._dynamo.reset()  # no compiled code (nor dynamic-shape decisions) carried over from the other workload
    torch.manual_seed(0)
    template, pool = mlp(w.sizes), batches(w)
    factories: dict[str, Callable[[torch.nn.Module], Runner]] = {
        "torch_foreach": lambda m: torch_loop(m, pool, fused=False),
        "torch_fused": lambda m: torch_loop(m, pool, fused=True),
        "lightning": lambda m: lightning_loop(m, pool),
        "fnlight_eager": lambda m: fnlight_loop(m, pool),
        "fnlight_compile": lambda m: fnlight_loop(m, pool, compile=True),
        "fnlight_donate": lambda m: fnlight_loop(m, pool, donate=True),
    }
    if not compile:
        del factories["fnlight_compile"]
    runners = {name: make(copy.deepcopy(template)) for name, make in factories.items()}
    for name, run in runners.items():
        t0 = time.perf_counter()
        run(1 if name == "lightning" else WARMUP)
        if log:
            print(f"{w.name}: warmed up {name} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return rounds(runners, steps, repeats, w.name, log)


# -- the "groups" workload: AdamW with two parameter groups ------------------------------------

GROUPS = Workload("groups", (784, 2048, 2048, 10), 512, 10)
GROUP_VARIANTS = ("torch_foreach", "torch_fused", "fnlight_eager", "fnlight_donate")


def torch_groups_loop(model: torch.nn.Module, pool: list[Batch], fused: bool) -> Runner:
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, foreach=not fused, fused=fused)
    return torch_runner(opt, mlp_loss(model), itertools.cycle(pool))


def fnlight_groups_loop(model: torch.nn.Module, pool: list[Batch], **options: Any) -> Runner:
    labels = fo.label_by_name({"*.bias": "no_decay"}, default="decay")
    opt = fo.multi_transform({"decay": fo.adamw(LR, weight_decay=0.1), "no_decay": fo.adamw(LR, weight_decay=0.0)},
                             labels)
    step = fnlight.make_train_step(model, loss_fn, opt, **options)
    return step_runner(step, fnlight.TrainState.create(model, opt), itertools.cycle(pool))


def measure_groups(steps: int, repeats: int, log: bool) -> dict[str, list[float]]:
    """steps/s of every timed block of the groups workload, per variant (interleaved as :func:`measure`)."""
    torch.manual_seed(0)
    template, pool = mlp(GROUPS.sizes), batches(GROUPS)
    factories: dict[str, Callable[[torch.nn.Module], Runner]] = {
        "torch_foreach": lambda m: torch_groups_loop(m, pool, fused=False),
        "torch_fused": lambda m: torch_groups_loop(m, pool, fused=True),
        "fnlight_eager": lambda m: fnlight_groups_loop(m, pool),
        "fnlight_donate": lambda m: fnlight_groups_loop(m, pool, donate=True),
    }
    runners = {name: make(copy.deepcopy(template)) for name, make in factories.items()}
    for run in runners.values():
        run(WARMUP)
    return rounds(runners, steps, repeats, "groups", log)


def report(results: dict[str, dict[str, list[float]]], steps: dict[str, int], repeats: int, wall: float,
           load: float) -> None:
    print(f"\nsteps/s, median of {repeats} interleaved round(s); Adam lr {LR:g}, cross-entropy, random data; "
          f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), lightning {lightning.__version__}; "
          f"load average at start {load:.2f} (other work on the machine makes timings noisy).")
    med = {wl: {k: statistics.median(v) for k, v in rates.items()} for wl, rates in results.items()}
    for w in (*WORKLOADS, GROUPS):
        if w.name not in results:
            continue
        print(f"\n{w.name}: MLP {'-'.join(map(str, w.sizes))}, batch {w.batch}, {steps[w.name]} steps per timing")
        print(f"{'variant':<18}{'median steps/s':>16}{'min':>10}{'max':>10}{'ms/step':>10}{'vs foreach':>12}")
        for k, v in results[w.name].items():
            x = med[w.name][k]
            print(f"{k:<18}{x:>16,.1f}{min(v):>10,.1f}{max(v):>10,.1f}{1e3 / x:>10.2f}"
                  f"{x / med[w.name]['torch_foreach']:>11.2f}x")
    print(f"\n{'ratio (median steps/s)':<50}{'value':>8}{'target':>9}")
    for wl, ours, base, target in TARGETS:
        m = med.get(wl, {})
        plain = max(m.get("torch_foreach", 0.0), m.get("torch_fused", 0.0))
        b = plain if base == "best_plain" else m.get(base)
        label = f"{wl}: {ours} / {base}"
        if ours not in m or not b:
            print(f"{label:<50}{'skipped':>8}")
            continue
        ratio = m[ours] / b
        print(f"{label:<50}{ratio:>7.2f}x{'>= ' + f'{target:g}x':>9}  {'ok' if ratio >= target else 'MISSED'}")
    print(f"\ntotal wall time: {wall:.1f} s")


# -- the gpt workload: examples/gpt.py's nanoGPT-style model ---------------------------------------

GPT_VARIANTS = ("torch_default", "fnlight_eager", "fnlight_donate", "fnlight_compile")
GPT_SHAPE = {"layers": 4, "width": 128, "heads": 4, "block": 64, "batch": 16, "vocab": 65}
GPT_STEPS = 20  # per timed block (~1 s on a 2-core CPU)
#: (ours, target x torch_default) for steps/s; eager peak memory <= 1.05x torch_default's
GPT_TARGETS = (("fnlight_eager", 0.95), ("fnlight_compile", 1.1))


def gpt_runner(variant: str, device: str, precision: str) -> Runner:
    """One variant of the gpt workload: examples/gpt.py's GPT (4 layers, width 128, block 64, dropout 0 as
    nanoGPT pretrains), batch 16 of random tokens, AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1 on
    the 2-D non-embedding weights), clipping at 1.0. ``torch_default``: ``torch.optim.AdamW`` (its default,
    foreach implementation) on the same parameter groups, ``clip_grad_norm_``, ``loss.backward()``."""
    gpt, shape = _example("gpt"), GPT_SHAPE
    torch.manual_seed(0)
    model = gpt.GPT(shape["vocab"], shape["block"], shape["layers"], shape["width"], shape["heads"],
                    dropout=0.0).to(device)
    g = torch.Generator().manual_seed(0)
    pool = [(t[:, :-1].to(device), t[:, 1:].to(device))
            for t in (torch.randint(0, shape["vocab"], (shape["batch"], shape["block"] + 1), generator=g)
                      for _ in range(POOL))]
    data = itertools.cycle(pool)
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) \
        if precision == "bf16-mixed" else contextlib.nullcontext
    if variant == "torch_default":
        opt = torch.optim.AdamW(gpt.torch_param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))

        def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            with autocast():
                return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())

        return torch_runner(opt, loss_of, data, clip=list(model.parameters()))
    fopt = fo.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1, mask=gpt.decay_mask)
    step = fnlight.make_train_step(model, gpt.loss_fn, fopt, clip=1.0, precision=precision,
                                   compile=variant == "fnlight_compile", donate=variant == "fnlight_donate")
    return step_runner(step, fnlight.TrainState.create(model, fopt), data)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def gpt_peak_memory(variant: str, device: str, precision: str, steps: int = 4) -> float:
    """MB of memory a few training steps of ``variant`` need, measured in a fresh process: on CUDA the
    peak of ``torch.cuda.max_memory_allocated``; on the CPU the peak resident memory (VmHWM) over the
    steps minus the resident memory before the model was made (model, optimizer state, gradients,
    activations). There glibc's malloc serves blocks of 64 KiB and more with mmap and returns them to
    the system when freed (``MALLOC_MMAP_THRESHOLD_``), so that resident memory follows the live
    tensors instead of what the allocator keeps (which differs from run to run by several MB).
    The baseline is taken after the code both variants run is imported (fnlight.train, imported on first
    use, is ~4 MB of Python objects: not memory the steps need). The runner's module is local: the plain
    loop trains its tensors; fnlight's steps keep it without them (``stateless_template``), so there the
    state's tensors are the only copy, as ``del model`` would make them in a script."""
    out = subprocess.run([sys.executable, __file__, "--gpt-memory", variant, "--device", device,
                          "--precision", precision, "--steps", str(steps)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    return float(out.stdout.strip().splitlines()[-1])


def _gpt_memory_main(variant: str, device: str, precision: str, steps: int) -> None:
    if device.startswith("cuda"):
        torch.cuda.init()
        base = torch.cuda.memory_allocated()
        run = gpt_runner(variant, device, precision)
        run(1)  # compiles, and allocates the optimizer state
        torch.cuda.reset_peak_memory_stats()
        run(steps)
        print(round((torch.cuda.max_memory_allocated() - base) / 2**20, 1))
        return
    # fnlight imports fnlight.train (~4 MB of Python code and objects) on first use of make_train_step:
    # the code both variants run is imported before the baseline, so only what the steps need is counted.
    import fnlight.train  # noqa: F401

    before = _rss_mb("VmRSS")
    run = gpt_runner(variant, device, precision)
    run(1)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the compile's peak is not the step's)
    run(steps)
    print(round(_rss_mb("VmHWM") - before, 1))


def measure_gpt(steps: int, repeats: int, compile: bool, device: str, precision: str,
                log: bool, quick: bool = False) -> tuple[dict[str, list[float]], dict[str, float]]:
    """steps/s of every timed block per variant (interleaved rounds, as ``measure``), and peak memory."""
    torch._dynamo.reset()
    variants = [v for v in GPT_VARIANTS if compile or v != "fnlight_compile"]
    runners = {v: gpt_runner(v, device, precision) for v in variants}
    for name, run in runners.items():
        t0 = time.perf_counter()
        run(1 if quick else WARMUP)
        if log:
            print(f"gpt: warmed up {name} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    rates = rounds(runners, steps, repeats, "gpt", log)
    del runners
    memory = {v: gpt_peak_memory(v, device, precision, steps=1 if quick else 4) for v in variants}
    return rates, memory


def report_gpt(rates: dict[str, list[float]], memory: dict[str, float], steps: int, device: str,
               precision: str) -> None:
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["torch_default"]
    print(f"\ngpt: examples/gpt.py's GPT, {GPT_SHAPE}, AdamW + clip 1.0, {device}, precision {precision}, "
          f"{steps} steps per timing")
    print(f"{'variant':<18}{'median steps/s':>16}{'min':>10}{'max':>10}{'vs torch':>10}{'peak MB':>10}")
    for k, v in rates.items():
        print(f"{k:<18}{med[k]:>16,.2f}{min(v):>10,.2f}{max(v):>10,.2f}{med[k] / base:>9.2f}x{memory[k]:>10,.1f}")
    for ours, target in GPT_TARGETS:
        if ours in med:
            ratio = med[ours] / base
            verdict = "ok" if ratio >= target else "MISSED"
            print(f"gpt: {ours} / torch_default {ratio:.2f}x (target >= {target:g}x) {verdict}")
    ratio = memory["fnlight_eager"] / memory["torch_default"]
    print(f"gpt: fnlight_eager peak memory / torch_default {ratio:.2f}x (target <= 1.05x) "
          f"{'ok' if ratio <= 1.05 else 'MISSED'}")


# -- the hf workload: examples/hf_gpt2.py's Hugging Face GPT-2 ---------------------------------------

HF_VARIANTS = ("torch_default", "fnlight_eager", "fnlight_compile")
HF_SHAPE = {"layers": 2, "width": 64, "heads": 4, "block": 64, "batch": 16}  # the example's defaults
HF_STEPS = 40  # per timed block (~0.5-1 s on a 2-core CPU)


def _example(name: str) -> Any:
    """examples/<name>.py as a module (registered in sys.modules: Dynamo imports a traced function's module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_example", Path(__file__).resolve().parents[1]
                                                  / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def hf_runner(variant: str) -> Runner:
    """One variant of the hf workload: examples/hf_gpt2.py's model (``gpt2``: GPT2LMHeadModel from a GPT2Config,
    random init, ``loss_type="ForCausalLM"``, the example's default shape and vocabulary), batch 16 of random
    token windows as ``{"input_ids", "labels"}``, the loss ``model(**batch).loss``, AdamW (lr 1e-3, b2 0.95,
    weight decay 0.1 under ``fo.default_decay_mask``) and clipping at 1.0, as the example trains it (with a
    constant learning rate). ``torch_default``: the plain loop with ``torch.optim.AdamW`` on the same
    parameter groups (the mask's), ``clip_grad_norm_``, ``loss.backward()``."""
    hf = _example("hf_gpt2")
    vocab, shape = len(set(hf.corpus(40_000))), HF_SHAPE
    torch.manual_seed(0)
    model = hf.gpt2(vocab, shape["block"], shape["layers"], shape["width"], shape["heads"])
    g = torch.Generator().manual_seed(0)
    pool = [{"input_ids": t, "labels": t} for t in (torch.randint(0, vocab, (shape["batch"], shape["block"]),
                                                                  generator=g) for _ in range(POOL))]
    data = itertools.cycle(pool)
    fopt = fo.adamw(1e-3, b2=0.95, weight_decay=0.1, mask=fo.default_decay_mask)
    if variant == "torch_default":
        named = dict(model.named_parameters())
        mask = fo.default_decay_mask(named)
        groups = [{"params": [p for k, p in named.items() if mask[k]], "weight_decay": 0.1},
                  {"params": [p for k, p in named.items() if not mask[k]], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
        model.train()
        return torch_runner(opt, lambda batch: model(**batch).loss, data, clip=list(model.parameters()))
    step = fnlight.make_train_step(model, hf.loss_fn, fopt, clip=1.0, compile=variant == "fnlight_compile")
    return step_runner(step, fnlight.TrainState.create(model, fopt), data)


def measure_hf(steps: int, repeats: int, compile: bool, log: bool,
               quick: bool = False) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """steps/s of every timed block per variant (interleaved rounds, as ``measure``), and what the compile
    did: the seconds of the first (compiling) call, and Dynamo's counts of graphs, graph breaks and
    recompilations over the whole run (after the warm-up, a recompile would show in the timings)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    variants = [v for v in HF_VARIANTS if compile or v != "fnlight_compile"]
    runners = {v: hf_runner(v) for v in variants}
    info: dict[str, Any] = {}
    for name, run in runners.items():
        t0 = time.perf_counter()
        run(1)
        first = time.perf_counter() - t0
        if not quick:
            run(WARMUP - 1)
        if name == "fnlight_compile":
            info["compile_s"] = round(first, 1)
        if log:
            print(f"hf: warmed up {name} (first call {first:.1f} s)", file=sys.stderr, flush=True)
    rates = rounds(runners, steps, repeats, "hf", log)
    if compile:
        info["graphs"] = counters["stats"]["unique_graphs"]
        info["graph_breaks"] = sum(counters["graph_break"].values())
        info["recompiles"] = sum(n for k, n in counters["recompiles"].items()) if "recompiles" in counters else 0
    return rates, info


def report_hf(rates: dict[str, list[float]], info: dict[str, Any], steps: int) -> None:
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nhf: examples/hf_gpt2.py's GPT-2, {HF_SHAPE}, AdamW + clip 1.0, cpu, {steps} steps per timing")
    print(f"{'variant':<18}{'median steps/s':>16}{'min':>10}{'max':>10}{'vs eager':>10}")
    for k, v in rates.items():
        print(f"{k:<18}{med[k]:>16,.2f}{min(v):>10,.2f}{max(v):>10,.2f}{med[k] / med['fnlight_eager']:>9.2f}x")
    if "fnlight_compile" in med:
        print(f"hf: fnlight_compile / fnlight_eager {med['fnlight_compile'] / med['fnlight_eager']:.2f}x "
              f"(the issue's figure: 1.4x); first call {info['compile_s']} s, {info['graphs']} graph(s), "
              f"{info['graph_breaks']} graph break(s), {info['recompiles']} recompile(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description="fnlight training-step throughput benchmark")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5)")
    parser.add_argument("--workload", choices=[w.name for w in WORKLOADS] + [GROUPS.name, "gpt", "hf"],
                        action="append",
                        help="run only this workload (repeatable; default all)")
    parser.add_argument("--quick", action="store_true", help="1 round, few steps, no compile: a smoke test")
    parser.add_argument("--no-compile", action="store_true", help="skip fnlight_compile")
    parser.add_argument("--json", action="store_true", help="print one JSON object of median steps/s")
    parser.add_argument("--device", default="cpu", help="gpt workload: the device (e.g. cuda)")
    parser.add_argument("--precision", choices=["32", "bf16-mixed"], default="32", help="gpt workload: precision")
    parser.add_argument("--gpt-memory", choices=GPT_VARIANTS, help=argparse.SUPPRESS)  # one memory measurement
    parser.add_argument("--steps", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpt_memory:
        _gpt_memory_main(args.gpt_memory, args.device, args.precision, args.steps)
        return
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    warnings.filterwarnings("ignore", ".*(does not have many workers|LeafSpec).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    load, t0 = os.getloadavg()[0], time.perf_counter()
    results: dict[str, dict[str, list[float]]] = {}
    steps: dict[str, int] = {}
    for w in WORKLOADS:
        if not args.workload or w.name in args.workload:
            steps[w.name] = max(2, w.steps // 10) if args.quick else w.steps
            results[w.name] = measure(w, steps[w.name], repeats, not (args.quick or args.no_compile), not args.json)
    if args.workload and GROUPS.name in args.workload:  # only when asked for (it repeats the large model)
        steps[GROUPS.name] = 2 if args.quick else GROUPS.steps
        results[GROUPS.name] = measure_groups(steps[GROUPS.name], repeats, not args.json)
    gpt: tuple[dict[str, list[float]], dict[str, float]] | None = None
    if args.workload and "gpt" in args.workload:  # (not in the default run: it has targets of its own)
        steps["gpt"] = 2 if args.quick else GPT_STEPS
        gpt = measure_gpt(steps["gpt"], repeats, not (args.quick or args.no_compile), args.device, args.precision,
                          not args.json, quick=args.quick)
    hf: tuple[dict[str, list[float]], dict[str, Any]] | None = None
    if args.workload and "hf" in args.workload:  # (needs transformers: the hf extra)
        steps["hf"] = 2 if args.quick else HF_STEPS
        hf = measure_hf(steps["hf"], repeats, not (args.quick or args.no_compile), not args.json, quick=args.quick)
    if args.json:
        out: dict[str, Any] = {wl: {k: round(statistics.median(r[k]), 2) if k in r else None
                                    for k in (GROUP_VARIANTS if wl == GROUPS.name else VARIANTS)}
                               for wl, r in results.items()}
        if gpt is not None:
            out["gpt"] = {k: round(statistics.median(gpt[0][k]), 3) if k in gpt[0] else None for k in GPT_VARIANTS}
            out["gpt"]["peak_mb"] = gpt[1]
            out["gpt"]["device"], out["gpt"]["precision"] = args.device, args.precision
        if hf is not None:
            out["hf"] = {k: round(statistics.median(hf[0][k]), 3) if k in hf[0] else None for k in HF_VARIANTS}
            out["hf"].update(hf[1])
        print(json.dumps(out))
    else:
        if results:
            report(results, steps, repeats, time.perf_counter() - t0, load)
        if gpt is not None:
            report_gpt(*gpt, steps["gpt"], args.device, args.precision)
        if hf is not None:
            report_hf(*hf, steps["hf"])


if __name__ == "__main__":
    main()
