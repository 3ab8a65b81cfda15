"""Small models, data and losses shared by the training tests."""

import torch
import torch.nn.functional as F

import fnlight
import fnlight.data as fd


def mlp(seed=0, dropout=0.0, bn=False, din=6, dout=3):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(din, 16)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(16))
    layers += [torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(16, dout)]
    return torch.nn.Sequential(*layers)


def data(n=64, din=6, dout=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, din, generator=g)
    y = (x[:, :dout].argmax(-1) + (x[:, -1] > 1).long()) % dout
    return x, y


def loss_fn(model_fn, batch, key):
    x, y = batch
    logits = model_fn(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def metrics_fn(model_fn, batch):
    x, y = batch
    logits = model_fn(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


def datamodule(n=64, batch=16, seed=0):
    x, y = data(n)
    p = (fd.from_tensors(x, y) >> fd.split({"train": 0.75, "val": 0.25}, stratify_by=1)
         >> fd.shuffle() >> fd.batch(batch))
    return fnlight.DataModule(p, seed=seed, stages={"fit": "train", "validate": "val", "test": "val",
                                                    "predict": "val"})


def train_on_part(rank=0, world=1, steps=4, batch=16):
    """Adam on an MLP for ``steps`` batches, this rank seeing its ``1/world`` of each batch."""
    import fnlight.optim as fo

    model = mlp(bn=False)
    opt = fo.adam(1e-2)
    state = fnlight.TrainState.create(model, opt)
    step = fnlight.make_train_step(model, loss_fn, opt)
    x, y = data(steps * batch)
    for i in range(steps):
        b = slice(batch * i, batch * (i + 1))
        state, _ = step(state, (x[b].chunk(world)[rank], y[b].chunk(world)[rank]))
    return state


def resume_setup(n=60, batch=10, warmup=3, decay_steps=20):
    """What exact resume is hard for: dropout, BatchNorm, a random transform, shuffling and a schedule.

    Returns ``(dm, state, train_step, eval_step)``.
    """
    import fnlight.optim as fo

    from . import pipelines

    x, y = data(n)
    pipeline = (fd.from_tensors(x, y) >> fd.split({"train": 0.8, "val": 0.2}, stratify_by=1)
                >> fd.transform(pipelines.noisy, on="train") >> fd.shuffle() >> fd.batch(batch))
    dm = fnlight.DataModule(pipeline, seed=3)
    model = mlp(dropout=0.3, bn=True)
    opt = fo.adamw(fo.warmup_cosine(1e-2, warmup, decay_steps), weight_decay=0.1)
    state = fnlight.TrainState.create(model, opt, seed=5)
    return dm, state, fnlight.make_train_step(model, loss_fn, opt), fnlight.make_eval_step(model, metrics_fn)
