"""Data-parallel training of an MLP on the bundled digits data, in one or several processes.

Run:
    torchrun --nproc-per-node 2 examples/train_distributed.py     # 2 processes (gloo on CPU, NCCL on GPUs)
    python examples/train_distributed.py                          # the same script in a single process
    python examples/train_distributed.py --max-steps 20           # shorter (see --help)

The script is written once for any number of processes:

- ``fnlight.distributed.init()`` joins the process group that torchrun describes
  in its environment variables; without them it does nothing (a world of one);
- ``fd.shard()`` gives each rank its part of every epoch (after the shuffle, which
  every rank computes alike), so the global batch is ``batch_size x ranks``;
- the Trainer starts every rank from rank 0's state, averages the gradients and
  the metrics across ranks, and writes logs and checkpoints on rank 0 only;
- we print on rank 0 only.

If one rank dies, torchrun stops the others; a rank left waiting in a collective
fails after ``timeout_s`` (or ``$FNLIGHT_DIST_TIMEOUT``) instead of hanging.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fnlight
import fnlight.data as fd
import fnlight.optim as fo
from fnlight import distributed


def scale(sample):
    """Pixels 0..16 -> [0, 1]."""
    x, y = sample
    return x / 16.0, y


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
    ap.add_argument("--max-epochs", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--run-dir", default="runs/train_distributed", help="logs and checkpoints (rank 0 writes them)")
    ap.add_argument("--timeout-s", type=float, default=60.0, help="how long a collective waits for the others")
    args = ap.parse_args()

    distributed.init(timeout_s=args.timeout_s)  # before the data is built: shard() reads the rank and world size
    rank, world = distributed.rank(), distributed.world_size()

    pipeline = (fd.digits()
                >> fd.split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=0, stratify_by=1)
                >> fd.transform(scale)
                >> fd.shuffle(on="train")
                >> fd.shard()            # this rank's part of every split
                >> fd.batch(args.batch_size))
    dm = fnlight.DataModule(pipeline, seed=0)

    torch.manual_seed(0)  # the initial weights (the Trainer starts every rank from rank 0's anyway)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = fo.adamw(2e-3 * world)  # the global batch grows with the world size: so does the step size
    state = fnlight.TrainState.create(model, optimizer, seed=0)
    train_step = fnlight.make_train_step(model, loss_fn, optimizer)  # averages gradients across ranks
    eval_step = fnlight.make_eval_step(model, metrics_fn)

    # a checkpoint every epoch and where training stops; run the script again and it resumes from the newest
    trainer = fnlight.Trainer(max_epochs=args.max_epochs, max_steps=args.max_steps, run_dir=args.run_dir,
                              ckpt_dir=f"{args.run_dir}/checkpoints", keep_last=2)
    result = trainer.fit(state, train_step, dm, eval_step=eval_step)
    test = trainer.test(result.state, eval_step, dm)  # each rank tests its shard; the metrics are reduced

    if rank == 0:
        print(f"{world} rank(s), {dm.num_batches('train')} batches of {args.batch_size} per rank and epoch")
        for row in result.history:
            print(f"epoch {row['epoch']}: train loss {row['train/loss']:.4f}  val acc {row['val/acc']:.4f}")
        print(f"test accuracy {test['acc']:.4f} after {int(result.state.step)} steps; logs in {result.run_dir}")
    if distributed.is_initialized():
        distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
