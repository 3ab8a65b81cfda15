"""A nanoGPT-style character language model, trained with fnlight.

Run:
    python examples/gpt.py                                   # 4 layers, width 128, block 64: a few minutes on a CPU
    python examples/gpt.py --max-steps 50 --layers 2 --width 64
    python examples/gpt.py --precision bf16-mixed --compile  # autocast to bfloat16; one compiled graph

What it shows:

- the model: token and position embeddings, causal self-attention blocks with dropout
  (``scaled_dot_product_attention``), LayerNorm, a GELU MLP, and an LM head tied to the token
  embedding (one parameter, stored once in the state under its first name, ``wte.weight``);
- the corpus is generated here (a small seeded grammar: no download), encoded by characters,
  and cut into windows ``(x, y)`` of ``--block`` tokens with ``y`` shifted by one;
- AdamW on parameter groups through a weight-decay mask: decay on the 2-D weights of Linear
  layers, none on biases, LayerNorm weights and the embeddings (:func:`decay_mask`);
- warmup + cosine (``fo.warmup_cosine``), clipping at 1.0 (``clip=1.0``), gradient accumulation
  (``accumulate=``), optional ``bf16-mixed``; the Trainer evaluates on a held-out split;
- at the end it samples text from the trained model (``TrainState.write_to`` puts the trained
  parameters back into the module).

``tests/test_gpt_example.py`` checks that its first 50 steps (dropout off) are those of the plain
PyTorch loop with ``torch.optim.AdamW`` parameter groups, ``clip_grad_norm_`` and the same schedule.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fnlight
import fnlight.data as fd
import fnlight.optim as fo

# -- the corpus: generated on the machine ------------------------------------------------------

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the king", "a small bird", "the teacher", "we", "they"]
VERBS = ["sees", "likes", "finds", "carries", "paints", "follows", "remembers", "builds", "sings to"]
OBJECTS = ["the red house", "a green apple", "the river", "an open door", "the garden", "a long letter",
           "the moon", "a wooden boat", "the market"]
ENDINGS = ["in the morning", "at night", "every day", "with great care", "before the rain", "again", "quietly"]


def corpus(chars: int = 60_000, seed: int = 0) -> str:
    """``chars`` characters of sentences from a small grammar (seeded: the same text everywhere)."""
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < chars:
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        if rng.random() < 0.6:
            s += f" {rng.choice(ENDINGS)}"
        s = s[0].upper() + s[1:] + rng.choice([". ", ". ", "! ", ".\n"])
        out.append(s)
        size += len(s)
    return "".join(out)[:chars]


class Vocab:
    """Characters <-> token ids."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())


def windows(tokens: torch.Tensor, block: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window of ``block`` tokens starting at a multiple of ``stride``: inputs and next-token targets."""
    starts = torch.arange(0, tokens.numel() - block - 1 + 1, stride)
    offsets = torch.arange(block)
    x = tokens[starts[:, None] + offsets]
    return x, tokens[starts[:, None] + offsets + 1]


# -- the model ---------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.c_attn(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int = 64, layers: int = 4, width: int = 128, heads: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        self.block = block
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(block, width)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one parameter
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("c_proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


EMBEDDINGS = ("wte.weight", "wpe.weight")


def decay_mask(params: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Weight decay on the 2-D weights of Linear layers only: not on biases, LayerNorm weights or the
    embeddings (the tied LM head is the token embedding)."""
    return {k: v.dim() >= 2 and k not in EMBEDDINGS for k, v in params.items()}


def torch_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The same split as :func:`decay_mask`, as torch.optim parameter groups."""
    named = dict(model.named_parameters())  # the tied head appears once, as wte.weight
    decay = decay_mask({k: p.detach() for k, p in named.items()})
    return [{"params": [p for k, p in named.items() if decay[k]], "weight_decay": weight_decay},
            {"params": [p for k, p in named.items() if not decay[k]], "weight_decay": 0.0}]


def optimizer(peak_lr: float, warmup: int, steps: int, weight_decay: float = 0.1) -> fo.GradientTransformation:
    """AdamW (betas 0.9, 0.95, as nanoGPT) on a warmup + cosine schedule, decay limited by :func:`decay_mask`."""
    schedule = fo.warmup_cosine(peak_lr, warmup, steps, end=peak_lr / 10)
    return fo.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask)


def loss_fn(model_fn: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor],
            key: torch.Tensor) -> torch.Tensor:
    x, y = batch
    logits = model_fn(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def metrics_fn(model_fn: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    loss = loss_fn(model_fn, batch, torch.zeros((), dtype=torch.int64))
    return {"loss": loss, "ppl": loss.exp()}


@torch.no_grad()
def sample(model: GPT, vocab: Vocab, prompt: str, chars: int, temperature: float = 0.8, seed: int = 0) -> str:
    """``chars`` characters after ``prompt``, drawn one at a time from the model's softmax."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    idx = vocab.encode(prompt)[None]
    for _ in range(chars):
        logits = model(idx[:, -model.block:])[:, -1] / temperature
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=g)
        idx = torch.cat([idx, nxt], dim=1)
    return vocab.decode(idx[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--accumulate", type=int, default=2, help="micro-batches per batch")
    ap.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--chars", type=int, default=60_000, help="size of the generated corpus")
    ap.add_argument("--sample-chars", type=int, default=200)
    ap.add_argument("--run-dir", default="runs/gpt")
    args = ap.parse_args()

    text = corpus(args.chars)
    vocab = Vocab(text)
    x, y = windows(vocab.encode(text), args.block, stride=args.block // 2)
    pipeline = (fd.from_tensors(x, y) >> fd.split({"train": 0.9, "val": 0.1}, seed=0)
                >> fd.shuffle(on="train") >> fd.batch(args.batch_size))
    dm = fnlight.DataModule(pipeline, seed=0)

    torch.manual_seed(0)
    model = GPT(len(vocab), args.block, args.layers, args.width, args.heads, args.dropout)
    opt = optimizer(args.lr, warmup=max(1, args.max_steps // 10), steps=args.max_steps)
    state = fnlight.TrainState.create(model, opt, seed=0)
    decayed = decay_mask(state.params)
    print(f"{state.num_params:,} parameters; {len(vocab)} characters; {len(x):,} windows of {args.block}; "
          f"decay on {sum(decayed.values())} of {len(decayed)} tensors")
    train_step = fnlight.make_train_step(model, loss_fn, opt, clip=1.0, accumulate=args.accumulate,
                                         precision=args.precision, compile=args.compile)
    eval_step = fnlight.make_eval_step(model, metrics_fn, precision=args.precision)
    trainer = fnlight.Trainer(max_epochs=None, max_steps=args.max_steps, val_every_n_steps=max(1, args.max_steps // 4),
                              limit_val_batches=8, log_every_n_steps=max(1, args.max_steps // 10),
                              run_dir=args.run_dir)
    result = trainer.fit(state, train_step, dm, eval_step=eval_step)
    final = trainer.validate(result.state, eval_step, dm)
    print(f"val loss {final['loss']:.3f} (ppl {final['ppl']:.2f}) after {int(result.state.step)} steps")
    result.state.write_to(model)
    print("sample:", sample(model, vocab, "The ", args.sample_chars))


if __name__ == "__main__":
    main()
