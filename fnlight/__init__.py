"""fnlight: pure-functional, JAX-style training for PyTorch.

Everything a run depends on is an explicit value: the data pipeline is an
immutable descriptor (:mod:`fnlight.data`), randomness flows from keys
(:mod:`fnlight.random`), and trees of tensors are handled with optree
(:mod:`fnlight.tree`).

Example:
    >>> import fnlight, fnlight.data as fd
    >>> dm = fnlight.DataModule(fd.digits() >> fd.batch(64))
"""

from . import distributed, random, tree
from .data.datamodule import DataModule
from .tree import device_put

__version__ = "0.1.0"

__all__ = ["DataModule", "__version__", "device_put", "distributed", "random", "tree"]
