"""fnlight.lightning: PyTorch Lightning interop, one piece at a time (``pip install 'fnlight[lightning]'``).

* :func:`to_lightning` turns an fnlight :class:`~fnlight.DataModule` into a
  ``LightningDataModule`` for ``lightning.Trainer`` (with exact mid-epoch resume
  from Lightning's checkpoints, and sharding by rank under DDP);
* :func:`from_lightning` turns an existing ``LightningDataModule`` into a source
  stage, so its splits flow through fnlight stages;
* :func:`train_step_from_module` (and :func:`loss_from_module`,
  :func:`metrics_from_module`, :func:`eval_step_from_module`) train a
  ``LightningModule`` with fnlight's functional step, its ``training_step`` as the loss.

Example:
    ```python
    import lightning, fnlight.lightning as fl
    trainer = lightning.Trainer(max_epochs=3)
    trainer.fit(lit_model, datamodule=fl.to_lightning(dm))
    pipeline = fl.from_lightning(MNISTDataModule()) >> fd.shuffle(on="train") >> fd.batch(64)
    ```
"""

try:
    import lightning.pytorch  # noqa: F401
except ImportError as e:  # the optional extra is not installed
    raise ImportError(
        "fnlight.lightning needs PyTorch Lightning (the `lightning` package), which is not installed: "
        "pip install 'fnlight[lightning]'"
    ) from e

from ._datamodule import BatchLoader, ToLightning, TrainLoader, to_lightning
from ._module import (
    UnsupportedModuleError,
    eval_step_from_module,
    loss_from_module,
    metrics_from_module,
    train_step_from_module,
)
from ._source import FromLightning, from_lightning

__all__ = [
    "BatchLoader",
    "FromLightning",
    "ToLightning",
    "TrainLoader",
    "UnsupportedModuleError",
    "eval_step_from_module",
    "from_lightning",
    "loss_from_module",
    "metrics_from_module",
    "to_lightning",
    "train_step_from_module",
]
assert sorted(__all__) == __all__
