"""A tour of fnlight.data on the bundled digits data.

Run: python examples/data_pipeline.py

It builds `source >> split >> transform >> shuffle >> batch`, prints the
pipeline's description and fingerprint, shows that a random augmentation is a
function of (seed, epoch, index), and resumes an epoch mid-way.
"""

from __future__ import annotations

import torch

import fnlight
import fnlight.data as fd
import fnlight.random as fr
from fnlight.tree import tree_equal


def scale(sample):
    """Pixels 0..16 -> [0, 1]."""
    x, y = sample
    return x / 16.0, y


def shift(sample, key):
    """Random augmentation: roll the 8x8 image by -1, 0 or 1 pixel horizontally."""
    x, y = sample
    k = fr.randint(key, (), -1, 2)
    rolled = torch.stack([x.reshape(8, 8).roll(s, dims=1).reshape(64) for s in (-1, 0, 1)])
    return rolled[k + 1], y


def main() -> None:
    pipeline = (fd.digits()
                >> fd.split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=0, stratify_by=1)
                >> fd.transform(scale)
                >> fd.transform(shift, on="train")
                >> fd.shuffle(on="train")
                >> fd.batch(128))
    print("fingerprint:", pipeline.fingerprint)
    with fnlight.DataModule(pipeline, seed=0) as dm:
        for split in dm.split_names:
            print(f"{split:>5}: {len(dm.dataset(split))} samples in {dm.num_batches(split)} batches")
        epoch1 = list(dm.batches("train", epoch=1))
        resumed = list(dm.batches("train", epoch=1, start=5))
        print("resuming at batch 5 gives the same remaining batches:", tree_equal(resumed, epoch1[5:]))
        other = list(dm.batches("train", epoch=2))
        print("another epoch shuffles and augments differently:", not tree_equal(other, epoch1))
        x, y = epoch1[0]
        print("first batch:", tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)


if __name__ == "__main__":
    main()
