"""``from_lightning``: an existing ``LightningDataModule`` as an fnlight source stage.

Example:
    ```python
    import fnlight.data as fd, fnlight.lightning as fl
    pipeline = fl.from_lightning(MNISTDataModule("data/")) >> fd.shuffle(on="train") >> fd.batch(64)
    ```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..data.dataset import Splits, TorchDataset
from ..data.describe import UNSTABLE
from ..data.sources import Source
from ..data.stage import Context

#: The split names fnlight reads, each from ``<split>_dataloader()`` after ``setup(<stage>)``
#: (what ``lightning.Trainer`` calls before it asks for that dataloader).
STAGE_OF_SPLIT: dict[str, str] = {"train": "fit", "val": "fit", "test": "test", "predict": "predict"}


def _defines(obj: Any, method: str) -> bool:
    """Does ``obj`` implement ``method`` (rather than inherit Lightning's placeholder)?
    ``LightningDataModule.from_datasets`` sets them on the instance."""
    if method in getattr(obj, "__dict__", {}):
        return True
    for cls in type(obj).__mro__:
        if method in vars(cls):
            return not cls.__module__.startswith(("lightning.", "pytorch_lightning."))
    return False


def _dataset_of(loader: Any, split: str, owner: str) -> Any:
    if isinstance(loader, list | tuple | dict):
        raise TypeError(f"{owner}.{split}_dataloader() returns several dataloaders; fnlight reads one dataset per "
                        "split: name the splits you want with from_lightning(ldm, splits=...) or wrap the datasets "
                        "with fnlight.data.from_torch(name=dataset, ...)")
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise TypeError(f"{owner}.{split}_dataloader() returned a {type(loader).__name__} without a .dataset; "
                        "from_lightning reads the map-style dataset of a torch DataLoader")
    return dataset


@dataclass(frozen=True, eq=False)  # holds a datamodule object: identity equality and hash
class FromLightning(Source):
    """A source over a ``LightningDataModule``; see :func:`from_lightning`."""

    name: ClassVar[str] = "from_lightning"
    datamodule: Any
    splits: tuple[str, ...] | None = None
    fingerprint: str | None = None
    # whether prepare_data ran in this process
    _prepared: list[bool] = field(default_factory=lambda: [False], init=False, repr=False)

    @property
    def content_hashed(self) -> bool:  # type: ignore[override]
        return self.fingerprint is not None

    def prepare(self, ctx: Context) -> None:
        self.datamodule.prepare_data()
        self._prepared[0] = True

    def load(self, ctx: Context) -> Splits:
        if not self._prepared[0] and ctx.world_size == 1:
            self.prepare(ctx)  # a single process builds without DataModule.prepare(): prepare here, once
        ldm, owner = self.datamodule, type(self.datamodule).__name__
        names = self.splits or tuple(s for s in STAGE_OF_SPLIT if _defines(ldm, f"{s}_dataloader"))
        if not names:
            raise ValueError(f"{owner} defines none of train/val/test/predict_dataloader()")
        set_up: set[str] = set()
        out = {}
        for split in names:
            stage = STAGE_OF_SPLIT[split]
            if stage not in set_up:
                ldm.setup(stage)
                set_up.add(stage)
            loader = getattr(ldm, f"{split}_dataloader")()
            if loader is None or (isinstance(loader, list | tuple) and not loader):
                if self.splits:
                    raise ValueError(f"{owner}.{split}_dataloader() returned no dataloader")
                continue  # (a datamodule may define a loader it has no data for)
            out[split] = TorchDataset(_dataset_of(loader, split, owner))
        return Splits(out)

    def describe(self) -> dict[str, Any]:
        cls = type(self.datamodule)
        out: dict[str, Any] = {"stage": self.name, "datamodule": f"{cls.__module__}.{cls.__qualname__}",
                               "splits": list(self.splits) if self.splits else None}
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        else:
            out[UNSTABLE] = ("the data of a LightningDataModule cannot be hashed without loading it; pass "
                             "from_lightning(ldm, fingerprint='<a name for this data version>') to identify it")
        return out


def from_lightning(datamodule: Any, *, splits: tuple[str, ...] | list[str] | None = None,
                   fingerprint: str | None = None) -> FromLightning:
    """A source stage over an existing ``LightningDataModule``: its splits flow through fnlight stages.

    ``prepare_data()`` runs when the fnlight DataModule prepares (``DataModule.prepare()``,
    which fnlight's Trainer calls: rank 0 while the other ranks wait), or at the first
    build in a single process. Building then calls ``setup("fit")`` for the ``train``
    and ``val`` splits, ``setup("test")`` and ``setup("predict")`` for the others (each
    once), and takes the map-style ``.dataset`` of each ``<split>_dataloader()``.
    The dataloaders' batch size, shuffling, sampler, collation and workers are not used:
    fnlight's ``shuffle()``, ``batch()`` and ``DataModule(workers=...)`` take their place.

    Args:
        datamodule: a ``LightningDataModule`` (or any object with ``prepare_data``,
            ``setup(stage)`` and ``*_dataloader()`` methods).
        splits: the splits to read, among ``train``, ``val``, ``test``, ``predict``
            (default: those whose dataloader method the datamodule defines).
        fingerprint: a name for the data's version, which goes into the pipeline's
            fingerprint; without it the pipeline has none (no disk cache, no
            fnlight checkpoints), as for :func:`~fnlight.data.from_torch`.

    Example:
        ```python
        pipeline = (from_lightning(MNISTDataModule("data/"), fingerprint="mnist-v1")
                    >> fd.transform(augment, on="train") >> fd.shuffle(on="train") >> fd.batch(64))
        dm = fnlight.DataModule(pipeline, seed=0)
        ```
    """
    for method in ("prepare_data", "setup"):
        if not callable(getattr(datamodule, method, None)):
            raise TypeError(f"from_lightning needs a LightningDataModule, got {type(datamodule).__name__} "
                            f"(no {method}() method)")
    if splits is not None:
        splits = tuple(splits)
        unknown = [s for s in splits if s not in STAGE_OF_SPLIT]
        if unknown or not splits:
            raise ValueError(f"from_lightning reads the splits {list(STAGE_OF_SPLIT)}, got {list(splits)}")
    return FromLightning(datamodule, splits, fingerprint)
