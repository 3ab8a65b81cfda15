"""fnlight.data: immutable data pipelines composed with ``>>``.

Example:
    >>> import fnlight, fnlight.data as fd
    >>> pipeline = (fd.digits() >> fd.split({"train": 0.8, "val": 0.1, "test": 0.1}, stratify_by=1)
    ...             >> fd.shuffle() >> fd.batch(64))
    >>> dm = fnlight.DataModule(pipeline, seed=0)
    >>> x, y = next(iter(dm.batches("train", epoch=0)))
"""

from .batch import Batch, batch
from .cache import Cache, cache
from .datamodule import DataModule
from .dataset import Dataset, MapDataset, ShapeError, Splits, SubsetDataset, TensorDataset, TorchDataset
from .describe import FingerprintError
from .digits import digits
from .download import ChecksumError, Download, DownloadError, download
from .hf import FromHF, HFDataset, from_hf
from .loader import BatchIterator, WorkerError
from .read_tokens import ReadTokens, TokenDataset, read_tokens
from .readers import Reader, read_csv, read_npz, read_safetensors
from .shard import Shard, shard
from .shuffle import Shuffle, shuffle
from .sources import FromTensors, FromTorch, Source, from_tensors, from_torch
from .split import Split, split
from .stage import Context, Pipeline, SplitPlan, Stage
from .to_device import ToDevice, to_device
from .transform import Transform, TransformError, transform
from .windows import WindowDataset, Windows, windows

__all__ = [
    "Batch",
    "BatchIterator",
    "Cache",
    "ChecksumError",
    "Context",
    "DataModule",
    "Dataset",
    "Download",
    "DownloadError",
    "FingerprintError",
    "FromHF",
    "FromTensors",
    "FromTorch",
    "HFDataset",
    "MapDataset",
    "Pipeline",
    "ReadTokens",
    "Reader",
    "ShapeError",
    "Shard",
    "Shuffle",
    "Source",
    "Split",
    "SplitPlan",
    "Splits",
    "Stage",
    "SubsetDataset",
    "TensorDataset",
    "ToDevice",
    "TokenDataset",
    "TorchDataset",
    "Transform",
    "TransformError",
    "WindowDataset",
    "Windows",
    "WorkerError",
    "batch",
    "cache",
    "digits",
    "download",
    "from_hf",
    "from_tensors",
    "from_torch",
    "read_csv",
    "read_npz",
    "read_safetensors",
    "read_tokens",
    "shard",
    "shuffle",
    "split",
    "to_device",
    "transform",
    "windows",
]
assert sorted(__all__) == __all__
