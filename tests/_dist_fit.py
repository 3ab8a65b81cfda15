"""A Trainer.fit run as one rank of a gloo process group (launched by tests/test_distributed_fit.py).

Usage: python -m tests._dist_fit OUT_DIR --batch B [--bn] [--slow] [--epochs N]
With torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) it joins
the group; without them it is a single process. Each rank writes
OUT_DIR/rank<r>.json: the hash of (params, buffers) after every step and the history.
"""

import argparse
import json
import sys
import time

import torch

import fnlight
import fnlight.data as fd
import fnlight.optim as fo
from fnlight import distributed
from tests.models import data, loss_fn, metrics_fn, mlp


def make_datamodule(batch: int) -> fnlight.DataModule:
    """97 samples: 72 to train on (shuffled), 25 to validate and predict on (on 2 ranks shard() repeats
    one as padding); each rank reads its shard."""
    x, y = data(97)
    pipeline = (fd.from_tensors(x, y) >> fd.split({"train": 72 / 97, "val": 25 / 97}, stratify_by=1) >> fd.shuffle()
                >> fd.shard() >> fd.batch(batch))
    return fnlight.DataModule(pipeline, seed=1, stages={"fit": "train", "validate": "val", "test": "val",
                                                         "predict": "val"})


def predict_fn(model):
    return lambda s, b: {"logits": torch.func.functional_call(model, (s.params, s.buffers), (b[0],)), "y": b[1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, required=True, help="batch size per rank")
    ap.add_argument("--bn", action="store_true")
    ap.add_argument("--slow", action="store_true", help="sleep after each step (to be killed mid-run)")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    distributed.init(backend="gloo", timeout_s=30)
    rank = distributed.rank()
    dm = make_datamodule(args.batch)
    model = mlp(bn=args.bn)
    opt = fo.adam(1e-2)
    # every rank builds a different state: the Trainer must start them all from rank 0's
    state = fnlight.TrainState.create(mlp(seed=rank, bn=args.bn), opt, seed=rank)
    hashes: list[str] = []

    def on_step(s, m):
        hashes.append(fnlight.tree.tree_hash((s.params, s.buffers)))
        if args.slow:
            time.sleep(0.1)

    trainer = fnlight.Trainer(max_epochs=args.epochs, run_dir=f"{args.out}/run", ckpt_dir=f"{args.out}/ck",
                              ckpt_every_n_steps=2, log_every_n_steps=1, progress=False,
                              callbacks=(fnlight.LambdaCallback(on_step=on_step),))
    try:
        result = trainer.fit(state, fnlight.make_train_step(model, loss_fn, opt), dm,
                             fnlight.make_eval_step(model, metrics_fn))
    except fnlight.train.Interrupted as e:  # a signal on any rank: every rank stops at the same step
        with open(f"{args.out}/interrupted{rank}.json", "w") as f:
            json.dump({"signal": e.signal.name, "step": e.step, "epoch": e.epoch, "position": e.position,
                       "checkpoint": str(e.checkpoint)}, f)
        distributed.barrier()
        import torch.distributed

        torch.distributed.destroy_process_group()
        sys.exit(e.exit_code)
    with open(f"{args.out}/rank{rank}.json", "w") as f:
        json.dump({"hashes": hashes, "history": result.history, "world": distributed.world_size(),
                   "final": fnlight.tree.tree_hash(result.state)}, f)
    fnlight.save_checkpoint(f"{args.out}/final{rank}", result.state)
    fnlight.save_checkpoint(f"{args.out}/predictions{rank}", trainer.predict(result.state, predict_fn(model), dm))
    if distributed.is_initialized():
        distributed.barrier()
        import torch.distributed

        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
