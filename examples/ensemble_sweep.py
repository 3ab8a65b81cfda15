"""A seed ensemble and a learning-rate sweep on the digits data, each trained in one vectorized step.

Run:
    python examples/ensemble_sweep.py                       # 4 seeds, then 4 learning rates; 15 epochs each
    python examples/ensemble_sweep.py --max-epochs 3 --out runs/ensemble_sweep

What it shows:

- ``fnlight.stack_states``: states with the same structure stacked leaf by leaf into one state
  whose leaves have a leading member axis; ``make_train_step(..., ensemble=True)`` trains all
  members on each batch in one step built with ``torch.func.vmap`` (metrics of shape ``[members]``);
- a seed ensemble: members made with different seeds (initial weights and dropout keys);
- a sweep: ``fo.inject_hyperparams`` puts the learning rate into the optimizer state as a number,
  so ``fo.set_hyperparams`` gives each member its own value and the one step trains the whole grid;
- the Trainer logs every member (``val/acc/0``, ``val/acc/1``, ... and the mean ``val/acc``),
  checkpoints the stacked state and resumes it exactly like any other;
- the script draws the members' validation accuracy per epoch, both runs side by side, into one
  figure (``ensemble_sweep.png``); ``fnlight plot RUN_DIR`` draws the same per-member lines.

The same from the command line: ``fnlight fit --seeds 0,1,2,3`` and ``fnlight fit --sweep lr=1e-3,3e-3``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import fnlight
import fnlight.data as fd
import fnlight.optim as fo


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


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the initial weights come from the seed
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(128, 10))


def train(name: str, states: list[fnlight.TrainState], optimizer, dm, args) -> fnlight.FitResult:
    """Stack the members, train them together, print one line per member; the fit result."""
    model = make_model(0)  # the template: the members' weights live in their states
    train_step = fnlight.make_train_step(model, loss_fn, optimizer, ensemble=True)
    eval_step = fnlight.make_eval_step(model, metrics_fn, ensemble=True)
    trainer = fnlight.Trainer(max_epochs=args.max_epochs, run_dir=args.out / name, ckpt_dir=args.out / name / "ck")
    result = trainer.fit(fnlight.stack_states(states), train_step, dm, eval_step=eval_step)
    test = trainer.test(result.state, eval_step, dm)
    for i in range(len(states)):
        print(f"{name} member {i}: val acc {result.history[-1][f'val/acc/{i}']:.4f}, test acc {test[f'acc/{i}']:.4f}")
    return result


def plot(results: dict[str, tuple[fnlight.FitResult, list[str]]], out: Path) -> Path:
    from matplotlib.figure import Figure  # the object API: no GUI backend needed

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    for ax, (name, (result, labels)) in zip(fig.subplots(1, len(results)), results.items(), strict=True):
        epochs = [row["epoch"] for row in result.history]
        for i, label in enumerate(labels):
            ax.plot(epochs, [row[f"val/acc/{i}"] for row in result.history], marker="o", markersize=3, label=label)
        ax.plot(epochs, [row["val/acc"] for row in result.history], "k--", label="mean")
        ax.set(title=name, xlabel="epoch", ylabel="validation accuracy")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(out, dpi=100)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-epochs", type=int, default=15)
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    ap.add_argument("--out", type=Path, default=Path("runs/ensemble_sweep"))
    args = ap.parse_args()
    pipeline = (fd.digits() >> fd.split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=0, stratify_by=1)
                >> fd.transform(scale) >> fd.shuffle(on="train") >> fd.batch(64))
    dm = fnlight.DataModule(pipeline, seed=0)

    # 1. a seed ensemble: the same optimizer, members from different seeds
    seeds = [int(s) for s in args.seeds.split(",")]
    opt = fo.adamw(1e-3, weight_decay=1e-2)
    seed_run = train("seeds", [fnlight.TrainState.create(make_model(s), opt, seed=s) for s in seeds], opt, dm, args)

    # 2. a learning-rate sweep: the rate lives in the optimizer state, one value per member
    lrs = [float(v) for v in args.lrs.split(",")]
    swept = fo.inject_hyperparams(fo.adamw)(learning_rate=lrs[0], weight_decay=1e-2)
    base = fnlight.TrainState.create(make_model(0), swept, seed=0)
    members = [base.replace(opt_state=fo.set_hyperparams(base.opt_state, learning_rate=lr)) for lr in lrs]
    sweep_run = train("sweep", members, swept, dm, args)
    best = max(range(len(lrs)), key=lambda i: sweep_run.history[-1][f"val/acc/{i}"])
    print(f"best learning rate: {lrs[best]:g} (val acc {sweep_run.history[-1][f'val/acc/{best}']:.4f})")

    figure = plot({"seed ensemble": (seed_run, [f"seed {s}" for s in seeds]),
                   "learning-rate sweep": (sweep_run, [f"lr {lr:g}" for lr in lrs])}, args.out / "ensemble_sweep.png")
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
