"""The bundled digits data: a ready source stage for examples, tests and ``fnlight fit``.

Data: the UCI "Optical Recognition of Handwritten Digits" set (test part,
1797 samples of 8x8 images with pixel values 0..16, labels 0..9), by
E. Alpaydin and C. Kaynak (1998), UCI Machine Learning Repository,
https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits,
licensed CC BY 4.0 (see the NOTICE file next to the data).

Example:
    >>> import fnlight.data as fd
    >>> p = fd.digits() >> fd.split({"train": 0.8, "val": 0.1, "test": 0.1}, stratify_by=1)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from .dataset import Dataset
from .readers import read_csv
from .sources import Source
from .stage import Context

DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"


@dataclass(frozen=True)
class Digits(Source):
    name: ClassVar[str] = "digits"

    def describe(self) -> dict[str, Any]:
        return {"stage": self.name, "sha256": DIGITS_SHA256}

    def load(self, ctx: Context) -> Dataset:
        with resources.as_file(resources.files("fnlight.data") / "digits.csv.gz") as path:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            if digest != DIGITS_SHA256:
                raise RuntimeError(f"the bundled digits data is corrupted (sha256 {digest}); reinstall fnlight")
            return read_csv(label=-1)(Path(path))


def digits() -> Digits:
    """1797 samples ``(pixels, label)``: pixels float32 of shape (64,) in 0..16, label int64 0..9.

    Example:
        >>> ds = digits().load(Context())
        >>> len(ds), ds[0][0].shape
        (1797, torch.Size([64]))
    """
    return Digits()
