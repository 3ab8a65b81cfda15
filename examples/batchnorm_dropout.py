"""BatchNorm and dropout in a pure step, with validation, testing, checkpoints and exact resume.

Run:
    python examples/batchnorm_dropout.py --max-steps 30     # stops after 30 steps, mid-epoch, and saves there
    python examples/batchnorm_dropout.py                    # resumes at step 30 and finishes the 4 epochs
    python examples/batchnorm_dropout.py --run-dir runs/bn  # uninterrupted: the same final state hash

What it shows:

- BatchNorm's running statistics live in ``state.buffers``: the step updates
  copies of them and returns them in the new state; dropout draws from torch's
  generator seeded from ``fold_in(state.key, state.step)`` inside the step, so
  the masks of step n are the same in every run, resumed or not;
- ``make_eval_step`` runs the model in eval mode (running statistics, no
  dropout); ``Trainer.validate`` and ``Trainer.test`` average its metrics;
- ``Trainer(ckpt_dir=...)`` saves a checkpoint every epoch and where training
  stops (``max_steps`` mid-epoch included) and, by default, resumes from the
  newest one: the state, the epoch, the position in it, the partial metric sums,
  the callbacks' states and the history. The resumed run ends bitwise where an
  uninterrupted one ends: compare the printed ``final state hash``;
- ``ModelCheckpoint`` keeps the best checkpoint by validation accuracy;
  ``load_checkpoint`` reads it back (verified, never unpickled).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import fnlight
import fnlight.data as fd
import fnlight.optim as fo
from fnlight.tree import tree_hash


def scale(sample):
    x, y = sample
    return x / 16.0, y


def loss_fn(model_fn, batch, key):
    x, y = batch
    logits = model_fn(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def metrics_fn(model_fn, batch):
    x, y = batch
    logits = model_fn(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-epochs", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (a later run resumes)")
    ap.add_argument("--run-dir", default="runs/batchnorm_dropout", help="logs, and checkpoints in <run-dir>/ckpt")
    args = ap.parse_args()

    pipeline = (fd.digits()
                >> fd.split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=0, stratify_by=1)
                >> fd.transform(scale)
                >> fd.shuffle(on="train")
                >> fd.batch(64))
    dm = fnlight.DataModule(pipeline, seed=0)

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Linear(128, 128), torch.nn.BatchNorm1d(128), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Linear(128, 10),
    )
    optimizer = fo.adamw(fo.warmup_cosine(3e-3, 10, args.max_epochs * dm.num_batches("train")), weight_decay=1e-2,
                         mask=fo.default_decay_mask)  # no weight decay on biases and BatchNorm scales
    state = fnlight.TrainState.create(model, optimizer, seed=0)
    print(f"buffers (BatchNorm statistics) in the state: {sorted(state.buffers)}")
    train_step = fnlight.make_train_step(model, loss_fn, optimizer)
    eval_step = fnlight.make_eval_step(model, metrics_fn)

    ckpt_dir = Path(args.run_dir) / "ckpt"
    existing = sorted(ckpt_dir.glob("step_*"))  # the Trainer resumes from the newest valid one
    print(f"resuming from {existing[-1].name}" if existing else "starting from step 0")
    best = fnlight.ModelCheckpoint("val/acc", mode="max", save_top_k=1)
    trainer = fnlight.Trainer(max_epochs=args.max_epochs, max_steps=args.max_steps, run_dir=args.run_dir,
                              ckpt_dir=ckpt_dir, keep_last=2, callbacks=(best,))
    result = trainer.fit(state, train_step, dm, eval_step=eval_step)
    for row in result.history:
        print(f"epoch {row['epoch']}: train loss {row['train/loss']:.4f}  val acc {row['val/acc']:.4f}")
    print(f"checkpoints: {sorted(p.name for p in ckpt_dir.glob('step_*'))}")

    if result.history:  # a run stopped before its first epoch ended has no validation yet
        best_state, _ = fnlight.load_checkpoint(best.best_path(result), like=state)
        print(f"best checkpoint: step {int(best_state.step)}, "
              f"val acc {trainer.validate(best_state, eval_step, dm)['acc']:.4f}")
    test = trainer.test(result.state, eval_step, dm)
    print(f"final state hash {tree_hash(result.state)[:16]}")
    print(f"test accuracy {test['acc']:.4f} after {int(result.state.step)} steps")


if __name__ == "__main__":
    main()
