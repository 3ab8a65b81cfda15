"""Pipelines and transforms defined in a module, importable from subprocesses."""

import torch

import fnlight.data as fd
import fnlight.random as fr

CALLS = {"n": 0}  # a call counter for tests that check what runs when


def normalize(x):
    return (x - 0.5) / 0.25


def hflip(x, key):
    return torch.where(fr.bernoulli(key, 0.5), x.flip(-1), x)


def noisy(sample, key):
    x, y = sample
    return x + 0.1 * fr.normal(key, x.shape), y


def scale_by(factor):
    def scale(x):
        return x * factor

    return scale


def data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


def make(batch_size=8, seed=0, fractions=(0.75, 0.25), drop_last=False, factor=2.0):
    x, y = data()
    return (fd.from_tensors(x, y)
            >> fd.split({"train": fractions[0], "val": fractions[1]}, seed=seed)
            >> fd.transform(noisy, on="train")
            >> fd.transform(lambda s: (scale_by(factor)(s[0]), s[1]))
            >> fd.shuffle()
            >> fd.batch(batch_size, drop_last=drop_last))
