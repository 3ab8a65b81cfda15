"""A Hugging Face GPT-2 (``transformers``, built from a config: random init, nothing downloaded) trained by
fnlight on a 🤗 ``datasets.Dataset``.

Run (``pip install 'fnlight[hf]'``):
    python examples/hf_gpt2.py
    python examples/hf_gpt2.py --max-steps 200 --layers 4 --width 128
    python examples/hf_gpt2.py --compile        # one compiled graph (model.loss_type is set below)

What it shows:

- ``GPT2LMHeadModel(GPT2Config(...))`` is an ordinary ``nn.Module``: ``TrainState.create`` takes its
  parameters (the tied LM head is stored once), and ``loss_fn`` returns ``model_fn(**batch).loss``
  (the model shifts the labels itself). Returning the ModelOutput itself is an error that says so;
- the data is a ``datasets.Dataset`` of token ids (``input_ids``/``labels`` columns, built here from a
  generated character corpus, saved with ``save_to_disk`` and read back memory-mapped), fed by
  ``fd.from_hf`` into an ordinary pipeline (split, shuffle, batch): batches are dicts of tensors,
  which ``model_fn(**batch)`` takes as keyword arguments;
- ``model.loss_type = "ForCausalLM"``: without it, transformers logs a warning inside the loss, which
  breaks ``torch.compile``'s graph (fnlight warns about that, naming the line, and runs eagerly).
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections.abc import Callable
from typing import Any

import datasets
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import fnlight
import fnlight.data as fd
import fnlight.optim as fo


def corpus(chars: int, seed: int = 0) -> str:
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "red", "house", "by", "river"]
    rng = random.Random(seed)
    text = ""
    while len(text) < chars:
        text += " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + ". "
    return text[:chars]


def token_dataset(text: str, block: int, directory: str) -> tuple[datasets.Dataset, list[str]]:
    """Windows of ``block`` character ids as a 🤗 dataset, saved to ``directory`` and loaded back."""
    chars = sorted(set(text))
    ids = [chars.index(c) for c in text]
    rows = [ids[i:i + block] for i in range(0, len(ids) - block, block // 2)]
    datasets.Dataset.from_dict({"input_ids": rows, "labels": rows}).save_to_disk(directory)
    return datasets.load_from_disk(directory), chars


def gpt2(vocab: int, block: int = 64, layers: int = 2, width: int = 64, heads: int = 4) -> GPT2LMHeadModel:
    """The example's model: a GPT-2 built from a config (random init from torch's global generator), with its
    loss type set, so that a compiled step is one graph (benchmarks/step_throughput.py --workload hf times it)."""
    config = GPT2Config(vocab_size=vocab, n_positions=block, n_embd=width, n_layer=layers, n_head=heads,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # the loss transformers would pick anyway, without a warning in the graph
    return model


def loss_fn(model_fn: Callable[..., Any], batch: dict[str, torch.Tensor], key: torch.Tensor) -> torch.Tensor:
    return model_fn(**batch).loss


def metrics_fn(model_fn: Callable[..., Any], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    loss = model_fn(**batch).loss
    return {"loss": loss, "ppl": loss.exp()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--chars", type=int, default=40_000)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--run-dir", default="runs/hf_gpt2")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()

    with tempfile.TemporaryDirectory() as tmp:
        ds, chars = token_dataset(corpus(args.chars), args.block, tmp)
        pipeline = (fd.from_hf(ds, columns=["input_ids", "labels"]) >> fd.split({"train": 0.9, "val": 0.1}, seed=0)
                    >> fd.shuffle(on="train") >> fd.batch(args.batch_size))
        dm = fnlight.DataModule(pipeline, seed=0)

        torch.manual_seed(0)
        model = gpt2(len(chars), args.block, args.layers, args.width, args.heads)
        opt = fo.adamw(fo.warmup_cosine(args.lr, max(1, args.max_steps // 10), args.max_steps), b2=0.95,
                       weight_decay=0.1, mask=fo.default_decay_mask)
        state = fnlight.TrainState.create(model, opt, seed=0)
        print(f"GPT-2 with {state.num_params:,} parameters; {len(ds):,} rows of {args.block} tokens "
              f"(🤗 fingerprint {ds._fingerprint})")
        train_step = fnlight.make_train_step(model, loss_fn, opt, clip=1.0, compile=args.compile)
        eval_step = fnlight.make_eval_step(model, metrics_fn)
        trainer = fnlight.Trainer(max_epochs=None, max_steps=args.max_steps, val_every_n_steps=args.max_steps,
                                  limit_val_batches=4, log_every_n_steps=max(1, args.max_steps // 5),
                                  run_dir=args.run_dir)
        first = trainer.validate(state, eval_step, dm)
        result = trainer.fit(state, train_step, dm, eval_step=eval_step)
        final = trainer.validate(result.state, eval_step, dm)
    print(f"val loss {first['loss']:.3f} -> {final['loss']:.3f} after {int(result.state.step)} steps")


if __name__ == "__main__":
    main()
