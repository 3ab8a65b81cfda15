"""A Trainer.fit run as one rank of a gloo group, recording which samples every step trains
(launched by tests/test_distributed_elastic.py).

Usage: python -m tests._elastic_fit OUT_DIR --batch B [--zero] [--opt adam|adafactor] [--max-steps S] [--epochs E]
[--slow]
Each rank appends ``{"step", "epoch", "ids"}`` per step to OUT_DIR/samples<r>.jsonl (flushed at once,
so a rank killed with SIGKILL leaves the steps it finished) and, at the end, writes OUT_DIR/final<r>.json
with the hash of the parameters. Checkpoints go to OUT_DIR/ck every step.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

import fnlight
import fnlight.data as fd
import fnlight.optim as fo
from fnlight import distributed
from fnlight.train.callbacks import NOTHING, Callback

N_TRAIN = 61  # prime: the epoch never divides evenly among 2, 3 or 4 ranks


def make_datamodule(batch: int) -> fnlight.DataModule:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN, 6, generator=g)
    y = (x[:, 0] > 0).long()
    ids = torch.arange(N_TRAIN)
    return fnlight.DataModule(fd.from_tensors(x, y, ids) >> fd.shuffle() >> fd.shard() >> fd.batch(batch), seed=3)


def loss_fn(model_fn, batch, key):
    x, y, _ = batch
    return F.cross_entropy(model_fn(x), y)


OPTIMIZERS = {
    "adam": lambda: fo.adam(1e-2),
    # both weights factored (row and column moments kept whole on every rank), per-row gradient clipping
    "adafactor": lambda: fo.chain(fo.adaptive_grad_clip(0.1), fo.adafactor(1e-2, min_dim_size_to_factor=2,
                                                                          momentum=0.9)),
}


class Record(Callback):
    def __init__(self, path):
        self.path = path
        self.last = None

    def on_step(self, cb_state, state, metrics, ctx):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(state.step), "epoch": ctx.epoch, "ids": self.last}) + "\n")
            f.flush()
        return cb_state, NOTHING


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--zero", action="store_true", help="shard the optimizer state")
    ap.add_argument("--opt", choices=sorted(OPTIMIZERS), default="adam")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--slow", action="store_true", help="sleep after each step (to be killed mid-run)")
    args = ap.parse_args()
    distributed.init(backend="gloo", timeout_s=30)
    rank = distributed.rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = OPTIMIZERS[args.opt]()
    record = Record(f"{args.out}/samples{rank}.jsonl")

    def recording_loss(model_fn, batch, key):
        record.last = batch[2].tolist()
        if args.slow:
            time.sleep(0.2)
        return loss_fn(model_fn, batch, key)

    step = fnlight.make_train_step(model, recording_loss, opt, shard_optimizer_state=args.zero)
    trainer = fnlight.Trainer(max_epochs=args.epochs, max_steps=args.max_steps, run_dir=f"{args.out}/run",
                              ckpt_dir=f"{args.out}/ck", ckpt_every_n_steps=1, keep_last=100, progress=False,
                              callbacks=(record,))
    result = trainer.fit(fnlight.TrainState.create(model, opt), step, make_datamodule(args.batch))
    with open(f"{args.out}/final{rank}.json", "w") as f:
        json.dump({"params": {k: v.tolist() for k, v in result.state.params.items()}}, f)
    if distributed.is_initialized():
        distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
