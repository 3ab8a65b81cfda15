"""fnlight inside a PyTorch Lightning project, and a Lightning project's pieces inside fnlight.

Run (needs ``pip install 'fnlight[lightning]'``):
    python examples/lightning_interop.py                  # 3 epochs each way: a few seconds on a CPU
    python examples/lightning_interop.py --max-epochs 10

1. ``to_lightning``: ``lightning.Trainer`` trains a plain ``LightningModule`` on an
   fnlight DataModule (the bundled digits pipeline).
2. ``train_step_from_module``: fnlight's Trainer trains the same ``LightningModule``;
   its ``training_step`` is the loss, its ``self.log`` values the metrics.
3. ``from_lightning``: an existing ``LightningDataModule`` feeds fnlight stages
   (``>> transform >> shuffle >> batch``) and fnlight's Trainer.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning as L
import torch
import torch.nn.functional as F

import fnlight
import fnlight.data as fd
import fnlight.lightning as fl
import fnlight.optim as fo
from fnlight.experiment import digits_datamodule


class DigitsMLP(L.LightningModule):
    """A LightningModule as Lightning's docs write one."""

    def __init__(self, seed: int = 0, lr: float = 3e-3):
        super().__init__()
        self.lr = lr
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsLightningDataModule(L.LightningDataModule):
    """An existing LightningDataModule: prepare_data / setup / *_dataloader over torch datasets."""

    def prepare_data(self):
        pass  # (a download would go here; the digits data ships with fnlight)

    def setup(self, stage: str):
        x, y = fd.digits().load(fd.Context())[torch.arange(1797)]
        data = torch.utils.data.TensorDataset(x / 16.0, y)
        self.train_set, self.test_set = torch.utils.data.random_split(
            data, [1597, 200], generator=torch.Generator().manual_seed(42))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=32, shuffle=True)

    def test_dataloader(self):
        return torch.utils.data.DataLoader(self.test_set, batch_size=32)


def noise(sample, key):
    """A random augmentation as an fnlight stage: a function of (seed, epoch, sample index)."""
    x, y = sample
    return x + 0.05 * fnlight.random.normal(key, x.shape), y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-epochs", type=int, default=3)
    ap.add_argument("--run-dir", default="runs/lightning_interop")
    args = ap.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")

    # 1. an fnlight DataModule in lightning.Trainer
    ldm = fl.to_lightning(digits_datamodule(seed=0))
    lit = DigitsMLP()
    trainer = L.Trainer(max_epochs=args.max_epochs, accelerator="cpu", default_root_dir=args.run_dir, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, datamodule=ldm)
    acc = trainer.test(lit, datamodule=ldm, verbose=False)[0]["test_acc"]
    print(f"lightning.Trainer on to_lightning(dm): test accuracy {acc:.4f} after {trainer.global_step} steps")

    # 2. the same LightningModule in fnlight's Trainer
    twin = DigitsMLP()
    optimizer = fo.adam(twin.lr)  # configure_optimizers is not used: the optimizer is a value
    state = fnlight.TrainState.create(twin, optimizer, seed=0)
    ours = fnlight.Trainer(max_epochs=args.max_epochs, run_dir=f"{args.run_dir}/fnlight", progress=False)
    result = ours.fit(state, fl.train_step_from_module(twin, optimizer), digits_datamodule(seed=0))
    test = ours.test(result.state, fl.eval_step_from_module(twin, "test_step"), digits_datamodule(seed=0))
    print(f"fnlight.Trainer on the same LightningModule: test accuracy {test['test_acc']:.4f} "
          f"after {int(result.state.step)} steps (train_loss logged: {result.history[-1]['train/train_loss']:.4f})")
    result.state.write_to(twin)  # the weights back in the LightningModule, e.g. to save a Lightning checkpoint

    # 3. a LightningDataModule's data through fnlight stages
    pipeline = (fl.from_lightning(DigitsLightningDataModule())
                >> fd.transform(noise, on="train") >> fd.shuffle(on="train") >> fd.batch(64))
    dm = fnlight.DataModule(pipeline, seed=0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    state = fnlight.TrainState.create(model, optimizer, seed=0)
    step = fnlight.make_train_step(model, lambda model_fn, b, key: F.cross_entropy(model_fn(b[0]), b[1]), optimizer)
    eval_step = fnlight.make_eval_step(model, lambda model_fn, b: {"acc": (model_fn(b[0]).argmax(-1) == b[1]).float()
                                                                   .mean()})
    theirs = fnlight.Trainer(max_epochs=args.max_epochs, run_dir=f"{args.run_dir}/from_lightning", progress=False)
    result = theirs.fit(state, step, dm)
    acc = theirs.test(result.state, eval_step, dm)["acc"]
    print(f"from_lightning: fnlight.Trainer on a LightningDataModule's data: test accuracy {acc:.4f} "
          f"after {int(result.state.step)} steps")


if __name__ == "__main__":
    main()
