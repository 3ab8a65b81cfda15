"""A small CNN on an image dataset downloaded from a URL, with a random augmentation drawn from each sample's key.

Run:
    python examples/cnn_images.py --url https://example.org/images.npz --sha256 <its sha256>
    python examples/cnn_images.py --make-data /tmp/stripes.npz    # no dataset at hand? write a synthetic one,
                                                                  # and it prints the command that trains on it

The dataset is an ``.npz`` archive with ``images`` (``uint8``, ``[N, C, H, W]``)
and ``labels`` (integers ``[N]``). What it shows:

- ``fd.download(url, sha256=..., read=fd.read_npz(...))``: the pipeline's one side
  effect. The file is fetched once into the cache (``--data-root``, else
  ``$FNLIGHT_HOME`` or ``~/.cache/fnlight``), verified against its sha256 and
  renamed into place atomically; later runs read the cached copy. The URL and
  digest are part of the pipeline's fingerprint;
- a random augmentation ``augment(sample, key)`` (a horizontal flip with
  probability 1/2 and a little Gaussian noise) that draws only from the key it is
  given: ``fold_in(fold_in(stage_key, epoch), index)``, so it is the same whatever
  the batch size and however the epoch is resumed, and never touches torch's
  global generator. fnlight runs it vectorized with ``torch.func.vmap``;
- a ``Conv2d`` network trained with the same ``make_train_step`` / ``Trainer``
  as any other model.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import fnlight
import fnlight.data as fd
import fnlight.optim as fo
import fnlight.random as fr


def make_stripes(path: str | Path, n: int = 512, size: int = 16, seed: int = 0) -> str:
    """Write a synthetic two-class image set (class 0: horizontal stripes, 1: vertical) to ``path``.

    Returns its sha256. Random stripe periods and phases, plus pixel noise.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    coord = np.arange(size)
    period = rng.integers(3, 7, (n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    across = np.where(labels[:, None, None] == 0, coord[None, :, None], coord[None, None, :])
    images = 0.5 + 0.35 * np.sin(2 * np.pi * across / period + phase) + rng.normal(0, 0.15, (n, size, size))
    images = (np.clip(images, 0, 1) * 255).astype(np.uint8)[:, None]  # [N, 1, H, W]
    np.savez(path, images=images, labels=labels.astype(np.int64))
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def to_float(sample):
    """uint8 pixels -> float32 in [0, 1]."""
    x, y = sample
    return x.float() / 255.0, y


def augment(sample, key):
    """Flip horizontally with probability 1/2, add Gaussian noise (std 0.05): all drawn from ``key``."""
    x, y = sample
    flip_key, noise_key = fr.split(key)
    x = torch.where(fr.bernoulli(flip_key, 0.5), x.flip(-1), x)
    return x + 0.05 * fr.normal(noise_key, x.shape), y


def loss_fn(model_fn, batch, key):
    x, y = batch
    logits = model_fn(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def metrics_fn(model_fn, batch):
    x, y = batch
    logits = model_fn(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="http(s):// or file:// URL of an .npz with 'images' and 'labels'")
    ap.add_argument("--sha256", help="the file's sha256 (the download is refused if it differs)")
    ap.add_argument("--make-data", metavar="PATH", help="write a synthetic dataset to PATH and exit")
    ap.add_argument("--data-root", default=None, help="download cache (default $FNLIGHT_HOME or ~/.cache/fnlight)")
    ap.add_argument("--max-epochs", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default="runs/cnn_images")
    args = ap.parse_args()

    if args.make_data:
        path = Path(args.make_data).resolve()
        digest = make_stripes(path)
        print(f"wrote {path}; train on it with:\n"
              f"  python examples/cnn_images.py --url {path.as_uri()} --sha256 {digest}")
        return
    if not (args.url and args.sha256):
        ap.error("give --url and --sha256 (or --make-data PATH to write a synthetic dataset first)")

    source = fd.download(args.url, sha256=args.sha256, read=fd.read_npz(("images", "labels")))
    pipeline = (source
                >> fd.split({"train": 0.75, "val": 0.125, "test": 0.125}, seed=0, stratify_by=1)
                >> fd.transform(to_float)
                >> fd.transform(augment, on="train")   # random: a function of (seed, epoch, sample index)
                >> fd.shuffle(on="train")
                >> fd.batch(args.batch_size))
    dm = fnlight.DataModule(pipeline, seed=args.seed, root=args.data_root)
    dm.prepare()  # downloads (once) and verifies; Trainer.fit would do it too
    train = dm.dataset("train")  # lazy and index-based: a tensor of indices reads many samples at once
    images, labels = train[torch.arange(len(train))]
    print(f"data: {source.path(dm.context)} ({len(train)} training images of shape "
          f"{tuple(images.shape[1:])}), fingerprint {dm.fingerprint[:16]}")

    torch.manual_seed(args.seed)
    channels, classes = images.shape[1], int(labels.max()) + 1
    model = torch.nn.Sequential(
        torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, classes),
    )
    optimizer = fo.adam(3e-3)
    state = fnlight.TrainState.create(model, optimizer, seed=args.seed)
    train_step = fnlight.make_train_step(model, loss_fn, optimizer)
    eval_step = fnlight.make_eval_step(model, metrics_fn)

    trainer = fnlight.Trainer(max_epochs=args.max_epochs, max_steps=args.max_steps, run_dir=args.run_dir)
    result = trainer.fit(state, train_step, dm, eval_step=eval_step)
    for row in result.history:
        print(f"epoch {row['epoch']}: train loss {row['train/loss']:.4f}  val acc {row['val/acc']:.4f}")
    test = trainer.test(result.state, eval_step, dm)
    print(f"test accuracy {test['acc']:.4f} after {int(result.state.step)} steps")


if __name__ == "__main__":
    main()
