"""Gradient accumulation with a warmup-cosine learning-rate schedule, logged by ``LearningRateMonitor``.

Run:
    python examples/accumulate_warmup_cosine.py                    # batches of 256 in 4 micro-batches of 64
    python examples/accumulate_warmup_cosine.py --max-epochs 2 --accumulate 8

What it shows:

- ``make_train_step(..., accumulate=k)`` splits every batch into k
  micro-batches and averages their gradients weighted by size: one update on the
  whole batch with the activation memory of a micro-batch. The script checks
  this on one batch: the state after one accumulated step equals the state after
  one plain step on the whole batch, up to float rounding;
- ``fo.warmup_cosine(peak, warmup_steps, decay_steps)``: a schedule is a plain
  function of the optimizer's update count, so it lives in no object that could
  get out of step, and a resumed run continues it where it stopped;
- ``LearningRateMonitor()`` adds the learning rate of each logged step
  (``log_every_n_steps``) to the step rows, which go to ``steps.csv`` and
  ``metrics.jsonl`` in the run directory; the script reads them back.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import fnlight
import fnlight.data as fd
import fnlight.optim as fo
from fnlight.tree import tree_leaves


def scale(sample):
    x, y = sample
    return x / 16.0, y


def loss_fn(model_fn, batch, key):
    x, y = batch
    logits = model_fn(x)  # a mean-reduced loss: the weighted mean of the micro-batch gradients is its gradient
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def metrics_fn(model_fn, batch):
    x, y = batch
    logits = model_fn(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--accumulate", type=int, default=4, help="micro-batches per batch")
    ap.add_argument("--peak-lr", type=float, default=1e-2)
    ap.add_argument("--run-dir", default="runs/accumulate_warmup_cosine")
    args = ap.parse_args()

    pipeline = (fd.digits()
                >> fd.split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=0, stratify_by=1)
                >> fd.transform(scale)
                >> fd.shuffle(on="train")
                >> fd.batch(args.batch_size))
    dm = fnlight.DataModule(pipeline, seed=0)
    total_steps = args.max_epochs * dm.num_batches("train")
    warmup = max(1, total_steps // 10)
    schedule = fo.warmup_cosine(args.peak_lr, warmup_steps=warmup, decay_steps=total_steps)
    optimizer = fo.adamw(schedule, weight_decay=1e-2, mask=fo.default_decay_mask)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    state = fnlight.TrainState.create(model, optimizer, seed=0)
    train_step = fnlight.make_train_step(model, loss_fn, optimizer, accumulate=args.accumulate)
    eval_step = fnlight.make_eval_step(model, metrics_fn)

    # One accumulated step is one step on the whole batch (steps are pure: `state` is unchanged by both calls).
    batch = next(iter(dm.batches("train", epoch=0)))
    whole, _ = fnlight.make_train_step(model, loss_fn, optimizer)(state, batch)
    accumulated, _ = train_step(state, batch)
    diff = max(float((a - b).abs().max()) for a, b in zip(tree_leaves(whole.params), tree_leaves(accumulated.params),
                                                          strict=True))
    print(f"accumulate={args.accumulate} vs one whole batch of {args.batch_size}: max |param difference| {diff:.1e}")

    trainer = fnlight.Trainer(max_epochs=args.max_epochs, run_dir=args.run_dir, log_every_n_steps=1,
                              callbacks=(fnlight.LearningRateMonitor(),))
    result = trainer.fit(state, train_step, dm, eval_step=eval_step)
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["lr"] for row in rows if row["kind"] == "step"]
    peak_at = max(range(len(lrs)), key=lrs.__getitem__)
    print(f"{total_steps} steps, {warmup} of warmup: lr {lrs[0]:.2e} at step 1, peak {lrs[peak_at]:.2e} "
          f"at step {peak_at + 1}, {lrs[-1]:.2e} at step {len(lrs)}")
    print("val acc by epoch:", " ".join(f"{row['val/acc']:.3f}" for row in result.history))
    test = trainer.test(result.state, eval_step, dm)
    print(f"test accuracy {test['acc']:.4f} after {int(result.state.step)} steps")


if __name__ == "__main__":
    main()
