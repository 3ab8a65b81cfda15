"""``to_lightning``: an fnlight DataModule as a ``LightningDataModule``.

Example:
    ```python
    import lightning, fnlight.lightning as fl
    ldm = fl.to_lightning(fnlight.DataModule(pipeline, seed=0))
    lightning.Trainer(max_epochs=5).fit(lit_model, datamodule=ldm)
    ```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl

from ..data import FingerprintError
from ..data.datamodule import DataModule


class _Cursor:
    """Where training is in the fit split; shared by a :class:`ToLightning` and its train loaders."""

    def __init__(self) -> None:
        self.epoch = 0  # set by Lightning through ``loader.sampler.set_epoch``
        self.served: list[int] | None = None  # [epoch, batches yielded] of the latest training pass
        self.pending: tuple[int, int] | None = None  # a loaded (epoch, position), used by the next pass


class BatchLoader:
    """What ``val/test/predict_dataloader()`` return: a split's batches as a sized iterable.

    fnlight batches are already batched, so Lightning uses the loader as it is:
    it is no ``torch.utils.data.DataLoader``, so Lightning adds no sampler and no
    collation. Evaluation splits are read as in epoch 0, as fnlight's Trainer does.
    """

    batch_sampler = None  # (Lightning looks for samplers on .batch_sampler and .sampler)

    def __init__(self, owner: ToLightning, split: str):
        self.owner, self.split = owner, split

    def __len__(self) -> int:
        return self.owner.fnlight_datamodule().num_batches(self.split)

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        with self.owner.fnlight_datamodule().batches(self.split, 0) as it:
            yield from it

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, batches={len(self)})"


class TrainLoader(BatchLoader):
    """What ``train_dataloader()`` returns: the fit split's batches of the current epoch.

    Lightning calls ``loader.sampler.set_epoch(epoch)`` at the start of every
    epoch (as it does for a ``DistributedSampler``): the loader is its own
    sampler, so it yields ``DataModule.batches(split, epoch)``, shuffled anew
    each epoch exactly as fnlight's Trainer would. The pass is decided at its
    first batch, not at ``iter()``: Lightning calls ``iter()`` before it has
    restored its epoch counters from a checkpoint.

    The position in the epoch is saved once per checkpoint, as the owner's
    ``state_dict`` (the loader has none of its own), so a resumed run starts the
    interrupted epoch at the batch after the last one trained.
    """

    @property
    def sampler(self) -> TrainLoader:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.owner._cursor.epoch = int(epoch)

    def _batches(self) -> Iterator[Any]:
        cursor, dm = self.owner._cursor, self.owner.fnlight_datamodule()
        epoch, start = cursor.epoch, 0
        pending, cursor.pending = cursor.pending, None
        if pending is not None and pending[0] == epoch:  # (a position in an epoch that is over is of no use)
            start = pending[1]
            self.owner._check_resume(epoch, start)
        else:  # a checkpoint without our state (another datamodule's): Lightning's count of the epoch's batches
            start = self.owner._lightning_count("ready", epoch) or 0
        # Lightning's overfit_batches means the same batches every epoch (it turns a DataLoader's shuffling
        # off): epoch 0's, whatever the epoch
        data_epoch = 0 if self.owner._overfitting() else epoch
        with dm.batches(self.split, data_epoch, start=start) as it:
            cursor.served = [epoch, start]
            for batch in it:
                cursor.served[1] += 1  # counted when handed over: a checkpoint after this batch skips it
                yield batch


class ToLightning(pl.LightningDataModule):
    """A ``LightningDataModule`` over an fnlight :class:`~fnlight.DataModule`; see :func:`to_lightning`."""

    def __init__(self, datamodule: DataModule):
        super().__init__()
        if not isinstance(datamodule, DataModule):
            raise TypeError(f"to_lightning needs a fnlight DataModule, got {type(datamodule).__name__}")
        self.datamodule = datamodule
        self._cursor = _Cursor()
        self._ranked: tuple[tuple[int, int], DataModule] | None = None
        # what Lightning's loggers record as the datamodule's hyperparameters (its hparams)
        self.save_hyperparameters(_describable_hparams(datamodule), logger=True)

    @classmethod
    def from_datasets(cls, train_dataset: Any = None, val_dataset: Any = None, test_dataset: Any = None,
                      predict_dataset: Any = None, batch_size: int = 1, num_workers: int = 0,
                      **datamodule_kwargs: Any) -> ToLightning:
        """Lightning's ``LightningDataModule.from_datasets``, served by a fnlight DataModule: one
        map-style dataset per stage, the train split shuffled (by the DataModule's ``seed``), batches
        of ``batch_size``; ``datamodule_kwargs`` go to :class:`~fnlight.DataModule` (``seed``,
        ``fingerprint``...). Lists or dicts of datasets are refused with an explanation.

        Example:
            ```python
            ldm = ToLightning.from_datasets(train_dataset=tds, val_dataset=vds, batch_size=32, seed=0)
            ```
        """
        return cls(DataModule.from_datasets(train_dataset=train_dataset, val_dataset=val_dataset,
                                            test_dataset=test_dataset, predict_dataset=predict_dataset,
                                            batch_size=batch_size, num_workers=num_workers, **datamodule_kwargs))

    def fnlight_datamodule(self) -> DataModule:
        """The DataModule for this process: with the trainer's rank and world size under DDP,
        so that a pipeline's ``shard()`` deals each rank its part."""
        world = int(getattr(self.trainer, "world_size", 1) or 1)
        if world <= 1:
            return self.datamodule
        where = (int(self.trainer.global_rank), world)
        if self._ranked is None or self._ranked[0] != where:  # one DataModule (and one build) per rank
            self._ranked = (where, self.datamodule.replace(rank=where[0], world_size=world))
        return self._ranked[1]

    # -- Lightning's hooks -------------------------------------------------------
    def prepare_data(self) -> None:
        """Downloads and disk caches. Lightning calls it in one process (per node with
        ``prepare_data_per_node``) while the others wait, so no barrier here."""
        dm = self.fnlight_datamodule()
        dm.pipeline.prepare(dm.context)

    def setup(self, stage: str) -> None:
        """Build the splits (once: ``setup("fit")`` then ``setup("test")`` share one split)."""
        dm = self.fnlight_datamodule()
        splits = dm.setup()
        needed = dm.split_for(stage)
        if needed not in splits:
            raise KeyError(f"Lightning's stage {stage!r} reads the split {needed!r}, but the fnlight pipeline has "
                           f"the splits {sorted(splits)}; map stages to splits with DataModule(stages=...)")

    def teardown(self, stage: str) -> None:
        self.fnlight_datamodule().close()

    def train_dataloader(self) -> TrainLoader:
        self._continue_stopped_epoch()
        return TrainLoader(self, self.fnlight_datamodule().split_for("fit"))

    def val_dataloader(self) -> BatchLoader | list[Any]:
        return self._eval_loader("validate")

    def test_dataloader(self) -> BatchLoader | list[Any]:
        return self._eval_loader("test")

    def predict_dataloader(self) -> BatchLoader | list[Any]:
        return self._eval_loader("predict")

    def _eval_loader(self, stage: str) -> BatchLoader | list[Any]:
        dm = self.fnlight_datamodule()
        split = dm.split_for(stage)
        return BatchLoader(self, split) if split in dm.setup() else []  # []: Lightning skips the stage

    # -- the data position in Lightning's checkpoints ------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position", "fingerprint"}``: the epoch being trained and how many of its
        batches were trained (Lightning stores it in its checkpoints)."""
        cursor = self._cursor
        if cursor.served is None:  # nothing trained yet (or restored but not yet resumed)
            if cursor.pending is None:
                return {}
            epoch, position = cursor.pending
        else:
            epoch, position = cursor.served
            trained = self._lightning_count("processed", epoch)
            if trained is not None:  # a checkpoint taken during a step: that batch was not trained
                position = min(position, trained)
        return {"epoch": epoch, "position": position, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume the epoch of ``state_dict`` at its position (at the loader's next pass)."""
        if not state_dict:
            return
        saved, ours = state_dict.get("fingerprint"), self._fingerprint()
        if saved is not None and ours is not None and saved != ours:
            raise ValueError(f"this checkpoint was taken with another data pipeline or seed (fingerprint "
                             f"{saved[:16]}..., this DataModule has {ours[:16]}...): its data position does not "
                             "apply; resume with the DataModule it was trained with")
        self._cursor.pending = (int(state_dict["epoch"]), int(state_dict["position"]))
        self._cursor.served = None

    def _fingerprint(self) -> str | None:
        try:
            return self.datamodule.fingerprint
        except FingerprintError:  # (e.g. from_torch without fingerprint=): no check, not an error
            return None

    def _lightning_count(self, what: str, epoch: int) -> int | None:
        """Lightning's own count of the batches of ``epoch`` (``"ready"``: fetched, ``"processed"``:
        trained), when this datamodule is being fitted in that epoch."""
        trainer = self.trainer
        try:
            fit_loop = trainer.fit_loop  # type: ignore[union-attr]
            if trainer.state.fn != "fit" or fit_loop.epoch_progress.current.processed != epoch:  # type: ignore
                return None
            return int(getattr(fit_loop.epoch_loop.batch_progress.current, what))
        except AttributeError:  # no trainer, or another Lightning version: our own count stands
            return None

    def _overfitting(self) -> bool:
        try:
            return bool(self.trainer.overfit_batches)  # type: ignore[union-attr]
        except (AttributeError, RuntimeError):  # no trainer attached
            return False

    def _continue_stopped_epoch(self) -> None:
        """Resuming from a checkpoint written when ``max_steps`` or ``should_stop`` ended a run mid-epoch:
        Lightning has counted that epoch as done (its epoch progress says E + 1, its batch progress that
        epoch E's last batch was not reached), while the data position says (E, P). Count it as not done,
        as in a checkpoint taken mid-epoch, so that Lightning continues epoch E at batch P: exactly the
        batches an uninterrupted run sees. (Called from ``train_dataloader``, which Lightning calls after
        restoring its loops and before resetting them.)"""
        pending = self._cursor.pending
        if pending is None:
            return
        epoch, position = pending
        try:
            fit_loop = self.trainer.fit_loop  # type: ignore[union-attr]
            if self.trainer.state.fn != "fit":  # type: ignore[union-attr]
                return
            epochs, batches = fit_loop.epoch_progress, fit_loop.epoch_loop.batch_progress
            if (epochs.current.completed != epoch + 1 or epochs.current.processed != epoch + 1
                    or batches.is_last_batch or batches.current.completed != position or position == 0):
                return
        except AttributeError:  # no trainer, or another Lightning version
            return
        for progress in (epochs.current, epochs.total):
            progress.processed -= 1
            progress.completed -= 1
        fit_loop.restarting = True  # (Lightning had decided that a finished epoch needs no restart)

    def _check_resume(self, epoch: int, start: int) -> None:
        ready = self._lightning_count("ready", epoch)
        if ready is not None and ready != start:
            raise RuntimeError(f"Lightning resumes epoch {epoch} after {ready} batches, but the datamodule's state "
                               f"says {start}: the checkpoint's loop state and data position disagree")

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for strategy="ddp_spawn": the DataModule travels as its settings (the built splits,
        # locks and live iterations stay behind; each process builds its own).
        state = {**self.__dict__, "_ranked": None}
        dm = state.pop("datamodule")
        state["_datamodule_settings"] = {f.name: getattr(dm, f.name) for f in dataclasses.fields(dm) if f.init}
        state["_datamodule_settings"]["stages"] = dict(dm.stages)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        settings = state.pop("_datamodule_settings")
        self.__dict__.update(state)
        self.datamodule = DataModule(**settings)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.datamodule!r})"

    __str__ = __repr__  # (Lightning's __str__ builds every dataloader)


def _describable_hparams(dm: DataModule) -> dict[str, Any]:
    """The DataModule's hyperparameters as Lightning's loggers record them: seed, batch size, the stage
    mapping, the pipeline's description and fingerprint (None where the data cannot be fingerprinted)."""
    try:
        description: Any = dm.pipeline.describe()
    except FingerprintError:
        description = None
    try:
        fingerprint: str | None = dm.fingerprint
    except FingerprintError:
        fingerprint = None
    stages = (description or {}).get("stages", []) if isinstance(description, dict) else []
    sizes = [st.get("size") for st in stages if isinstance(st, dict) and st.get("stage") == "batch"]
    return {"seed": dm.seed, "batch_size": sizes[-1] if sizes else None, "stages": dict(dm.stages),
            "pipeline": description, "fingerprint": fingerprint}


def to_lightning(datamodule: DataModule) -> ToLightning:
    """A ``LightningDataModule`` that serves ``datamodule``'s batches to ``lightning.Trainer``.

    * ``prepare_data`` runs the pipeline's downloads and disk caches; ``setup(stage)``
      builds the splits, once (``fit`` then ``test`` never re-split differently).
    * ``train_dataloader()`` yields ``datamodule.batches("train", epoch)`` for Lightning's
      current epoch; ``val/test/predict_dataloader()`` those of their splits (epoch 0).
      A stage whose split the pipeline lacks gets no dataloader (``[]``: Lightning skips it).
    * ``state_dict`` / ``load_state_dict`` carry (epoch, position in the epoch): resuming
      from a Lightning checkpoint taken mid-epoch yields exactly the remaining batches.
    * Under DDP each rank reads its ``shard()`` of every split (the loaders are no torch
      ``DataLoader``, so Lightning adds no ``DistributedSampler`` of its own).

    Batches are moved to the device by Lightning. Loaders follow Lightning's epoch
    (``limit_train_batches``, ``reload_dataloaders_every_n_epochs`` and the like work as usual);
    ``DataModule(workers=...)`` replaces ``DataLoader(num_workers=...)``.

    Example:
        ```python
        ldm = to_lightning(fnlight.experiment.digits_datamodule(seed=0))
        trainer = lightning.Trainer(max_epochs=10, callbacks=[ModelCheckpoint(every_n_train_steps=100)])
        trainer.fit(lit_model, datamodule=ldm)
        trainer.fit(lit_model, datamodule=to_lightning(dm), ckpt_path="last.ckpt")  # resumes mid-epoch
        ```
    """
    return ToLightning(datamodule)
