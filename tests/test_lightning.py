"""PyTorch Lightning interop: ``to_lightning``, ``from_lightning``, and LightningModules trained by fnlight's step."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint  # noqa: E402

import fnlight  # noqa: E402
import fnlight.data as fd  # noqa: E402
import fnlight.lightning as fl  # noqa: E402
import fnlight.optim as fo  # noqa: E402
from fnlight.experiment import digits_datamodule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),  # (inside Lightning)
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:.*ckpt_path"),  # (Lightning, after an exception in fit)
    pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero"),  # (a stage without data)
    pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`"),
]


@pytest.fixture(autouse=True)
def _quiet_lightning():
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def lightning_trainer(**kwargs):
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**options, **kwargs})


def ids_datamodule(seed: int = 3) -> fnlight.DataModule:
    """80 training samples ``(x, id)`` in 10 shuffled batches of 8, and 20 validation samples."""
    pipeline = (fd.from_tensors(torch.linspace(-1, 1, 100)[:, None], torch.arange(100))
                >> fd.split({"train": 0.8, "val": 0.2}, seed=0) >> fd.shuffle(on="train") >> fd.batch(8))
    return fnlight.DataModule(pipeline, seed=seed)


def expected_ids(dm: fnlight.DataModule, epochs: int) -> list[tuple[int, int, list[int]]]:
    """(epoch, batch index, sample ids) of every training batch, from fnlight's own DataModule."""
    return [(e, b, ids.tolist()) for e in range(epochs) for b, (_, ids) in enumerate(dm.batches("train", e))]


class Recorder(L.LightningModule):
    """Fits y = 2x; records the sample ids of every batch it trains on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        x, ids = batch
        self.seen.append((self.current_epoch, batch_idx, ids.tolist()))
        return F.mse_loss(self.lin(x), 2 * x)

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.log("val_loss", F.mse_loss(self.lin(x), 2 * x))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class DigitsMLP(L.LightningModule):
    """A plain LightningModule, as in Lightning's docs (no dropout: the comparison is then exact)."""

    def __init__(self, seed: int = 0, lr: float = 3e-3):
        super().__init__()
        self.lr = lr
        with torch.random.fork_rng(devices=[]):
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


# -- the extra ------------------------------------------------------------------------------------------------

def test_import_without_lightning_says_what_to_install():
    code = textwrap.dedent("""
        import sys
        sys.modules["lightning"] = None  # as if it were not installed
        try:
            import fnlight.lightning
        except ImportError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'fnlight[lightning]'" in out.stdout


# -- to_lightning ---------------------------------------------------------------------------------------------

def test_lightning_trainer_on_to_lightning_matches_fnlight_trainer(tmp_path):
    """Acceptance: the same LightningModule, seed and epochs reach the same test accuracy
    with lightning.Trainer on to_lightning(dm) as with fnlight's Trainer."""
    epochs = 5
    lit = DigitsMLP()
    trainer = lightning_trainer(max_epochs=epochs)
    ldm = fl.to_lightning(digits_datamodule(seed=0))
    trainer.fit(lit, datamodule=ldm)
    lightning_acc = trainer.test(lit, datamodule=ldm, verbose=False)[0]["test_acc"]

    twin = DigitsMLP()
    optimizer = fo.adam(twin.lr)
    state = fnlight.TrainState.create(twin, optimizer, seed=0)
    ours = fnlight.Trainer(max_epochs=epochs, run_dir=tmp_path, loggers=(), progress=False)
    result = ours.fit(state, fl.train_step_from_module(twin, optimizer), digits_datamodule(seed=0))
    fnlight_acc = ours.test(result.state, fl.eval_step_from_module(twin, "test_step"), digits_datamodule(seed=0))

    assert lightning_acc >= 0.85, lightning_acc
    assert abs(lightning_acc - fnlight_acc["test_acc"]) <= 0.01, (lightning_acc, fnlight_acc)
    # the same batches in the same order, and torch.optim.Adam == fnlight.optim.adam: the same weights
    for name, p in lit.named_parameters():
        torch.testing.assert_close(result.state.params[name], p.detach(), atol=1e-4, rtol=1e-4)
    assert int(result.state.step) == trainer.global_step == epochs * 23


def test_epochs_follow_lightning_and_a_mid_epoch_checkpoint_resumes_exactly_the_remaining_batches(tmp_path):
    epochs = 3
    full = Recorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    trainer = lightning_trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[checkpoints])
    trainer.fit(full, datamodule=fl.to_lightning(ids_datamodule()))
    assert full.seen == expected_ids(ids_datamodule(), epochs)  # epoch e's batches are dm.batches("train", e)

    paths = sorted(tmp_path.glob("step=*.ckpt"), key=lambda p: int(p.stem[5:]))
    assert [int(p.stem[5:]) for p in paths] == [4, 8, 12, 16, 20, 24, 28]  # 20: the last batch of epoch 1
    for path in paths:
        step = int(path.stem[5:])
        saved = torch.load(path, weights_only=False)["ToLightning"]
        assert (saved["epoch"], saved["position"]) == ((step - 1) // 10, (step - 1) % 10 + 1)  # 10 batches an epoch
        resumed = Recorder()
        lightning_trainer(max_epochs=epochs).fit(resumed, datamodule=fl.to_lightning(ids_datamodule()),
                                                 ckpt_path=path)
        assert resumed.seen == full.seen[step:], f"resuming from {path.name}"
        assert torch.equal(resumed.lin.weight, full.lin.weight) and torch.equal(resumed.lin.bias, full.lin.bias)

    # The position is written once, as the datamodule's state (the train loader has no state of its own); a
    # checkpoint without it (of another datamodule) resumes at Lightning's own batch count of the epoch.
    ckpt = torch.load(tmp_path / "step=12.ckpt", weights_only=False)
    assert not ckpt["loops"]["fit_loop"]["state_dict"].get("combined_loader")
    assert sum(repr(v).count("'position'") for v in ckpt.values()) == 1  # written once
    for keep in ("datamodule", "neither"):
        ckpt = torch.load(tmp_path / "step=12.ckpt", weights_only=False)
        if keep != "datamodule":
            del ckpt["ToLightning"]
        torch.save(ckpt, tmp_path / f"{keep}.ckpt")
        resumed = Recorder()
        lightning_trainer(max_epochs=epochs).fit(resumed, datamodule=fl.to_lightning(ids_datamodule()),
                                                 ckpt_path=tmp_path / f"{keep}.ckpt")
        assert resumed.seen == full.seen[12:], keep


@pytest.mark.parametrize("how", ["max_steps", "should_stop"])
def test_a_checkpoint_after_max_steps_or_should_stop_mid_epoch_continues_that_epoch(tmp_path, how):
    """Lightning counts the epoch that max_steps (or should_stop) ended as done; resuming must still train
    the rest of it, exactly as the uninterrupted run does."""
    full = Recorder()
    lightning_trainer(max_epochs=3).fit(full, datamodule=fl.to_lightning(ids_datamodule()))

    class Stopping(Recorder):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.global_step == 13:
                self.trainer.should_stop = True

    cut = Recorder() if how == "max_steps" else Stopping()
    last = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    limits = {"max_steps": 13} if how == "max_steps" else {}
    lightning_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[last], **limits).fit(
        cut, datamodule=fl.to_lightning(ids_datamodule()))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert (saved["ToLightning"]["epoch"], saved["ToLightning"]["position"]) == (1, 3) and saved["epoch"] == 2
    assert cut.seen == full.seen[:13]
    resumed = Recorder()
    lightning_trainer(max_epochs=3).fit(resumed, datamodule=fl.to_lightning(ids_datamodule()),
                                        ckpt_path=tmp_path / "last.ckpt")
    assert resumed.seen == full.seen[13:]  # epoch 1 from its batch 3, then epoch 2
    assert torch.equal(resumed.lin.weight, full.lin.weight) and torch.equal(resumed.lin.bias, full.lin.bias)


def test_a_checkpoint_taken_during_a_step_resumes_at_that_batch(tmp_path):
    """On an exception inside training_step, Lightning saves a checkpoint in which that batch is not
    trained: the data position is Lightning's count of trained batches, not of batches handed out."""

    class Failing(Recorder):
        def training_step(self, batch, batch_idx):
            if self.global_step == 13:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    trainer = lightning_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[OnExceptionCheckpoint(tmp_path)])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Failing(), datamodule=fl.to_lightning(ids_datamodule()))
    saved = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)["ToLightning"]
    assert (saved["epoch"], saved["position"]) == (1, 3)
    resumed = Recorder()
    lightning_trainer(max_epochs=3).fit(resumed, datamodule=fl.to_lightning(ids_datamodule()),
                                        ckpt_path=tmp_path / "on_exception.ckpt")
    assert resumed.seen == expected_ids(ids_datamodule(), 3)[13:]


def test_state_dict_outside_lightning_and_a_foreign_checkpoint():
    ldm = fl.to_lightning(ids_datamodule())
    assert ldm.state_dict() == {}
    loader = ldm.train_dataloader()
    loader.sampler.set_epoch(2)  # what Lightning calls at the start of every epoch
    assert len(loader) == 10
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = ldm.state_dict()
    assert not hasattr(loader, "state_dict") and (state["epoch"], state["position"]) == (2, 3)
    rest = list(it)

    other = fl.to_lightning(ids_datamodule())
    other.load_state_dict(state)
    other_loader = other.train_dataloader()
    other_loader.sampler.set_epoch(2)
    assert fnlight.tree.tree_equal(list(other_loader), rest)
    assert fnlight.tree.tree_equal(first + rest, list(ids_datamodule().batches("train", 2)))
    with pytest.raises(ValueError, match="another data pipeline or seed"):
        fl.to_lightning(ids_datamodule(seed=4)).load_state_dict(state)


def test_setup_is_idempotent_and_stages_map_to_splits():
    ldm = fl.to_lightning(digits_datamodule(seed=0))
    ldm.prepare_data()
    ldm.setup("fit")
    dm = ldm.fnlight_datamodule()
    test_batches = list(ldm.test_dataloader())
    plans = dm.setup()
    ldm.setup("test")  # e.g. trainer.test after trainer.fit: the same split, not a new one
    assert dm.setup() is plans and fnlight.tree.tree_equal(list(ldm.test_dataloader()), test_batches)
    assert [len(ldm.val_dataloader()), len(ldm.test_dataloader())] == [dm.num_batches("val"), dm.num_batches("test")]
    assert "ToLightning(DataModule(" in str(ldm)

    only_train = fl.to_lightning(fnlight.DataModule(fd.from_tensors(torch.rand(20, 1), torch.arange(20))
                                                    >> fd.batch(5)))
    assert only_train.val_dataloader() == [] and only_train.predict_dataloader() == []
    with pytest.raises(KeyError, match="stage 'test' reads the split 'test'"):
        only_train.setup("test")
    lit = Recorder()
    lightning_trainer(max_epochs=1).fit(lit, datamodule=only_train)  # no val split: Lightning skips validation
    assert len(lit.seen) == 4


def test_ddp_ranks_read_their_shards():
    """A trainer with world_size=2 (faked): rank 1 reads rank 1's shard of every epoch."""
    pipeline = (fd.from_tensors(torch.rand(64, 1), torch.arange(64)) >> fd.shuffle() >> fd.shard() >> fd.batch(8))
    dm = fnlight.DataModule(pipeline, seed=0)
    seen = {}
    for rank in (0, 1):
        ldm = fl.to_lightning(dm)
        ldm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = ldm.train_dataloader()
        assert len(loader) == 4
        loader.sampler.set_epoch(1)
        seen[rank] = torch.cat([ids for _, ids in loader])
        mine = dm.replace(rank=rank, world_size=2)
        assert torch.equal(seen[rank], torch.cat([ids for _, ids in mine.batches("train", 1)]))
    assert sorted(torch.cat([seen[0], seen[1]]).tolist()) == list(range(64))


def test_pickles_for_ddp_spawn():
    """strategy="ddp_spawn" pickles the datamodule: it travels as its settings, and rebuilds the same splits."""
    ldm = fl.to_lightning(digits_datamodule(seed=1))
    list(ldm.train_dataloader())  # built, with a memo and a lock that do not pickle
    copy = pickle.loads(pickle.dumps(ldm))
    assert copy.datamodule.fingerprint == ldm.datamodule.fingerprint
    assert fnlight.tree.tree_equal(list(copy.datamodule.batches("train", 2)), list(ldm.datamodule.batches("train", 2)))


_DDP_SCRIPT = """
import json, logging, sys, warnings
import torch, torch.nn.functional as F, lightning as L
import fnlight, fnlight.data as fd, fnlight.lightning as fl
warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

class Lit(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.seen = []
    def training_step(self, batch, batch_idx):
        x, ids = batch
        self.seen.append([self.current_epoch, ids.tolist()])
        return F.mse_loss(self.lin(x), 2 * x)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

pipeline = fd.from_tensors(torch.rand(64, 1), torch.arange(64)) >> fd.shuffle() >> fd.shard() >> fd.batch(8)
lit = Lit()
trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(lit, datamodule=fl.to_lightning(fnlight.DataModule(pipeline, seed=0)))
with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as f:
    json.dump(lit.seen, f)
"""


@pytest.mark.slow
def test_real_lightning_ddp_on_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    pipeline = fd.from_tensors(torch.rand(64, 1), torch.arange(64)) >> fd.shuffle() >> fd.shard() >> fd.batch(8)
    dm = fnlight.DataModule(pipeline, seed=0)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        mine = dm.replace(rank=rank, world_size=2)
        assert seen == [[e, ids.tolist()] for e in range(2) for _, ids in mine.batches("train", e)]


# -- from_lightning -------------------------------------------------------------------------------------------

class TinyMNIST(torch.utils.data.Dataset):
    """Like torchvision's MNIST: ``download=True`` creates the file (here: 80 random 8x8 images)."""

    def __init__(self, root, train: bool = True, transform=None, download: bool = False):
        path = Path(root) / ("train.pt" if train else "test.pt")
        if download and not path.exists():
            g = torch.Generator().manual_seed(int(train))
            n = 60 if train else 20
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"images": torch.randint(0, 256, (n, 8, 8), generator=g, dtype=torch.uint8),
                        "labels": torch.randint(0, 10, (n,), generator=g)}, path)
        data = torch.load(path)
        self.images, self.labels, self.transform = data["images"], data["labels"], transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i][None].float() / 255
        return (self.transform(image) if self.transform else image), int(self.labels[i])


class MNISTDataModule(L.LightningDataModule):
    """Written the way Lightning's docs write one."""

    def __init__(self, data_dir: str, batch_size: int = 32):
        super().__init__()
        self.data_dir, self.batch_size = data_dir, batch_size
        self.transform = lambda image: (image - 0.5) / 0.5
        self.calls: list[str] = []

    def prepare_data(self):
        self.calls.append("prepare_data")
        TinyMNIST(self.data_dir, train=True, download=True)
        TinyMNIST(self.data_dir, train=False, download=True)

    def setup(self, stage: str):
        self.calls.append(f"setup({stage})")
        if stage == "fit":
            full = TinyMNIST(self.data_dir, train=True, transform=self.transform)
            self.mnist_train, self.mnist_val = torch.utils.data.random_split(
                full, [48, 12], generator=torch.Generator().manual_seed(42))
        if stage == "test":
            self.mnist_test = TinyMNIST(self.data_dir, train=False, transform=self.transform)
        if stage == "predict":
            self.mnist_predict = TinyMNIST(self.data_dir, train=False, transform=self.transform)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.mnist_train, batch_size=self.batch_size)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.mnist_val, batch_size=self.batch_size)

    def test_dataloader(self):
        return torch.utils.data.DataLoader(self.mnist_test, batch_size=self.batch_size)

    def predict_dataloader(self):
        return torch.utils.data.DataLoader(self.mnist_predict, batch_size=self.batch_size)


def _flip(sample):
    image, label = sample
    return image.flip(-1), label


def test_from_lightning_feeds_a_lightning_datamodule_through_fnlight_stages(tmp_path):
    ldm = MNISTDataModule(str(tmp_path / "data"))
    pipeline = fl.from_lightning(ldm) >> fd.transform(_flip) >> fd.shuffle(on="train") >> fd.batch(16)
    dm = fnlight.DataModule(pipeline, seed=0)
    dm.prepare()
    assert sorted(dm.split_names) == ["predict", "test", "train", "val"]
    assert ldm.calls == ["prepare_data", "setup(fit)", "setup(test)", "setup(predict)"]  # each once
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [48, 12, 20]

    # every training sample once an epoch, in a new order each epoch, transformed by the fnlight stage
    def rows(x, y):
        return sorted(map(tuple, torch.cat([x.flatten(1), y[:, None].float()], 1).tolist()))

    reference = rows(torch.stack([ldm.mnist_train[i][0].flip(-1) for i in range(48)]),
                     torch.tensor([ldm.mnist_train[i][1] for i in range(48)]))
    orders = []
    for epoch in (0, 1):
        batches = list(dm.batches("train", epoch))
        assert [len(y) for _, y in batches] == [16, 16, 16] and batches[0][0].shape == (16, 1, 8, 8)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        assert rows(x, y) == reference
        orders.append(x)
    assert not torch.equal(orders[0], orders[1])
    x, _ = next(iter(dm.batches("test")))  # unshuffled: the LightningDataModule's own order
    assert torch.equal(x[0], ldm.mnist_test[0][0].flip(-1))

    # and fnlight's Trainer trains on it
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    state = fnlight.TrainState.create(model, fo.sgd(0.1), seed=0)
    step = fnlight.make_train_step(model, lambda f, b, k: F.cross_entropy(f(b[0]), b[1]), fo.sgd(0.1))
    result = fnlight.Trainer(max_epochs=2, run_dir=tmp_path / "run", loggers=(), progress=False).fit(state, step, dm)
    assert int(result.state.step) == 6


def test_from_lightning_options_and_errors(tmp_path):
    ldm = MNISTDataModule(str(tmp_path / "data"))
    dm = fnlight.DataModule(fl.from_lightning(ldm, splits=["train"]) >> fd.batch(8))
    assert dm.split_names == ["train"] and ldm.calls == ["prepare_data", "setup(fit)"]  # prepared at the build
    with pytest.raises(fd.FingerprintError, match="fingerprint="):
        _ = dm.fingerprint
    named = fl.from_lightning(ldm, fingerprint="tiny-mnist-v1") >> fd.batch(8)
    assert named.fingerprint == (fl.from_lightning(MNISTDataModule("elsewhere"), fingerprint="tiny-mnist-v1")
                                 >> fd.batch(8)).fingerprint
    with pytest.raises(ValueError, match="reads the splits"):
        fl.from_lightning(ldm, splits=["training"])
    with pytest.raises(TypeError, match="needs a LightningDataModule"):
        fl.from_lightning(object())

    class Several(MNISTDataModule):
        def val_dataloader(self):
            return [super().val_dataloader(), super().val_dataloader()]

    with pytest.raises(TypeError, match="several dataloaders"):
        fnlight.DataModule(fl.from_lightning(Several(str(tmp_path / "data"))) >> fd.batch(8)).setup()

    # Lightning's own from_datasets sets the dataloader methods on the instance
    tds = torch.utils.data.TensorDataset(torch.rand(10, 2), torch.arange(10))
    made = L.LightningDataModule.from_datasets(train_dataset=tds, test_dataset=tds, batch_size=4)
    dm = fnlight.DataModule(fl.from_lightning(made) >> fd.batch(5))
    assert sorted(dm.split_names) == ["test", "train"] and dm.num_batches("train") == 2


# -- LightningModules trained by fnlight's step ---------------------------------------------------------------

def _digits_batch(n: int = 32):
    dm = digits_datamodule(seed=0, batch_size=n)
    return next(iter(dm.batches("train")))


def test_training_step_as_loss_logs_become_metrics_and_the_module_is_left_as_it_was():
    class WithDropout(DigitsMLP):
        def __init__(self):
            super().__init__()
            self.net.insert(2, torch.nn.Dropout(0.5))

        def training_step(self, batch):  # (no batch_idx: Lightning allows it)
            x, y = batch
            logits = self(x)
            loss = F.cross_entropy(logits, y)
            self.log_dict({"my_loss": loss, "acc": (logits.argmax(-1) == y).float().mean()})
            return {"loss": loss, "logits": logits}

    lit = WithDropout()
    before = dict(lit.__dict__)
    optimizer = fo.adam(1e-3)
    step = fl.train_step_from_module(lit, optimizer)
    state = fnlight.TrainState.create(lit, optimizer, seed=0)
    batch = _digits_batch()
    new, metrics = step(state, batch)
    again, metrics_again = step(state, batch)  # pure: dropout comes from the state's key
    assert fnlight.tree.tree_equal(new, again) and fnlight.tree.tree_equal(metrics, metrics_again)
    assert set(metrics) == {"loss", "my_loss", "acc"} and torch.equal(metrics["loss"], metrics["my_loss"])
    assert lit.__dict__ == before and "forward" not in lit.__dict__  # no attribute left behind
    assert not torch.equal(new.params["net.0.weight"], state.params["net.0.weight"])


def test_unsupported_lightning_features_say_so():
    class Manual(DigitsMLP):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(fl.UnsupportedModuleError, match="manual optimization"):
        fl.train_step_from_module(Manual(), fo.adam(1e-3))
    lit = DigitsMLP()
    with pytest.raises(TypeError, match="fnlight.optim"):
        fl.train_step_from_module(lit, torch.optim.Adam(lit.parameters()))
    with pytest.raises(fl.UnsupportedModuleError, match="compile"):
        fl.train_step_from_module(lit, fo.adam(1e-3), compile=True)

    class ReadsTrainer(DigitsMLP):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * (self.trainer.max_epochs or 1)

    class Skips(DigitsMLP):
        def training_step(self, batch, batch_idx):
            return None

    batch = _digits_batch()
    for cls, match in ((ReadsTrainer, "self.trainer"), (Skips, "returned None")):
        module = cls()
        step = fl.train_step_from_module(module, fo.adam(1e-3))
        with pytest.raises(fl.UnsupportedModuleError, match=match):
            step(fnlight.TrainState.create(module, fo.adam(1e-3)), batch)
        assert "forward" not in module.__dict__ and module._trainer is None

    # a loss_fn from one module in a step built on another
    other = torch.nn.Sequential(torch.nn.Linear(64, 10))
    step = fnlight.make_train_step(other, fl.loss_from_module(lit), fo.adam(1e-3))
    with pytest.raises(fl.UnsupportedModuleError, match="same module"):
        step(fnlight.TrainState.create(other, fo.adam(1e-3)), batch)


@pytest.mark.slow
def test_lightning_interop_example_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FNLIGHT_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "examples/lightning_interop.py", "--run-dir", str(tmp_path / "run")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout
    assert "lightning.Trainer on to_lightning(dm): test accuracy" in lines
    assert "fnlight.Trainer on the same LightningModule: test accuracy" in lines
    assert "from_lightning: fnlight.Trainer on a LightningDataModule's data: test accuracy" in lines


def test_from_datasets_takes_lightnings_names_and_refuses_lists_of_datasets():
    class DummyDS(torch.utils.data.Dataset):  # as in Lightning's own datamodule tests
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return torch.full((2,), float(i)), i

    dm = fnlight.DataModule.from_datasets(train_dataset=DummyDS(), val_dataset=DummyDS(), batch_size=16, seed=0)
    assert dm.num_batches("train") == 4 and dm.num_batches("val") == 4
    x, ids = next(iter(dm.batches("val", 0)))
    assert ids.tolist() == list(range(16)) and x.shape == (16, 2)  # one dataset per split, samples as they are
    with pytest.raises(TypeError, match="train is a list of 2 datasets; Lightning makes one dataloader of each, "
                                        "but a fnlight stage reads one split: concatenate them"):
        fnlight.DataModule.from_datasets(train_dataset=[DummyDS(), DummyDS()])
    with pytest.raises(TypeError, match="val is a dict of 2 datasets"):
        fnlight.DataModule.from_datasets(val={"a": DummyDS(), "b": DummyDS()})
    with pytest.raises(TypeError, match="give train= or train_dataset=, not both"):
        fnlight.DataModule.from_datasets(train=DummyDS(), train_dataset=DummyDS())
    # a list of samples is one dataset
    assert fnlight.DataModule.from_datasets(train=[(torch.zeros(2), 0)] * 6, batch_size=3).num_batches("train") == 2

    # to_lightning's class has Lightning's from_datasets, served by a fnlight DataModule, and trains
    ldm = fl.ToLightning.from_datasets(train_dataset=DummyDS(), val_dataset=DummyDS(), batch_size=16, seed=0)
    assert isinstance(ldm, fl.ToLightning) and ldm.hparams["batch_size"] == 16 and ldm.hparams["seed"] == 0

    class Fit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch[1].tolist())
            return self.lin(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    model = Fit()
    lightning_trainer(max_epochs=1).fit(model, datamodule=ldm)
    assert sorted(i for b in model.seen for i in b) == list(range(64))


def test_hparams_describe_the_datamodule():
    ldm = fl.to_lightning(ids_datamodule(seed=3))
    hp = dict(ldm.hparams)
    assert hp["seed"] == 3 and hp["batch_size"] == 8 and hp["fingerprint"] == ids_datamodule(seed=3).fingerprint
    assert [s["stage"] for s in hp["pipeline"]["stages"]] == ["from_tensors", "split", "shuffle", "batch"]
    assert hp["stages"]["fit"] == "train"


def test_overfit_batches_are_the_same_batches_every_epoch():
    model = Recorder()
    lightning_trainer(max_epochs=3, overfit_batches=2, num_sanity_val_steps=0).fit(
        model, datamodule=fl.to_lightning(ids_datamodule()))
    per_epoch = [[ids for e, _, ids in model.seen if e == epoch] for epoch in range(3)]
    assert len(per_epoch[0]) == 2 and per_epoch[0] == per_epoch[1] == per_epoch[2]
    assert per_epoch[0] == [ids.tolist() for _, ids in list(ids_datamodule().batches("train", 0))[:2]]
