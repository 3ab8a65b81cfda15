"""examples/gpt.py: it runs, and its training is the plain PyTorch loop's, step for step."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fnlight

from .conftest import cuda

ROOT = Path(__file__).resolve().parents[1]


def example():
    spec = importlib.util.spec_from_file_location("gpt_example", ROOT / "examples" / "gpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (Dynamo imports a traced function's module by name)
    spec.loader.exec_module(module)
    return module


def test_the_decay_mask_spares_biases_norms_and_embeddings():
    gpt = example()
    model = gpt.GPT(vocab=11, block=8, layers=2, width=16, heads=2)
    mask = gpt.decay_mask(fnlight.TrainState.create(model, gpt.optimizer(1e-3, 2, 10)).params)
    assert "lm_head.weight" not in mask  # tied: stored once, as wte.weight
    assert {k for k, v in mask.items() if v} == {
        f"h.{i}.{name}.weight" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.0", "mlp.2")}
    groups = gpt.torch_param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [8, len(mask) - 8]


@pytest.mark.slow
def test_the_first_50_steps_are_those_of_the_plain_torch_loop():
    """Dropout off, AdamW with parameter groups, clip_grad_norm_(1.0), the same warmup + cosine.

    fnlight's adamw runs torch's fused AdamW kernel, so its twin is AdamW(fused=True); on the CPU a
    scheduled learning rate reaches that kernel as a Python float at full precision, as torch's
    scheduler hands it over (``param_group["lr"] = float``).
    """
    gpt = example()
    steps, lr = 50, 3e-3
    text = gpt.corpus(20_000)
    vocab = gpt.Vocab(text)
    x, y = gpt.windows(vocab.encode(text), 16, stride=8)
    g = torch.Generator().manual_seed(0)
    batches = [(x[i], y[i]) for i in torch.randint(0, len(x), (steps, 8), generator=g)]

    torch.manual_seed(0)
    model = gpt.GPT(len(vocab), block=16, layers=2, width=32, heads=2, dropout=0.0)
    reference = gpt.GPT(len(vocab), block=16, layers=2, width=32, heads=2, dropout=0.0)
    reference.load_state_dict(model.state_dict())
    opt = gpt.optimizer(lr, warmup=5, steps=steps)
    state = fnlight.TrainState.create(model, opt, seed=0)
    step = fnlight.make_train_step(model, gpt.loss_fn, opt, clip=1.0)

    schedule = opt.learning_rate
    torch_opt = torch.optim.AdamW(gpt.torch_param_groups(reference, 0.1), lr=lr, betas=(0.9, 0.95), fused=True)
    for i, (bx, by) in enumerate(batches):
        state, metrics = step(state, (bx, by))
        for group in torch_opt.param_groups:
            group["lr"] = float(schedule(i))
        torch_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(reference(bx).flatten(0, 1), by.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        torch_opt.step()
        assert torch.equal(metrics["loss"], loss.detach()), i
    for k, p in reference.named_parameters():
        assert torch.equal(state.params[k], p.detach()), k  # bitwise, after 50 steps
    assert float(metrics["loss"]) < 2.7  # and it learned something (ln 31 = 3.43 at the start)


@pytest.mark.slow
def test_the_example_runs_and_samples_text(tmp_path):
    out = subprocess.run(
        [sys.executable, "examples/gpt.py", "--max-steps", "12", "--layers", "1", "--width", "32", "--block", "16",
         "--chars", "8000", "--sample-chars", "40", "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FNLIGHT_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    head, _, sample = out.stdout.partition("\nsample: ")
    lines = head.strip().splitlines()
    assert "decay on 4 of" in lines[0]
    assert lines[-1].startswith("val loss ") and "after 12 steps" in lines[-1]
    assert sample.startswith("The ") and len(sample) == len("The ") + 40 + 1  # (print's newline; it may hold more)


@cuda
def test_on_cuda_the_step_matches_the_plain_loop_and_bf16_compiles_to_one_graph():
    import warnings

    gpt = example()
    vocab, steps = 40, 10
    g = torch.Generator().manual_seed(0)
    batches = [(t[:, :-1].cuda(), t[:, 1:].cuda()) for t in (torch.randint(0, vocab, (8, 33), generator=g)
                                                               for _ in range(steps))]
    torch.manual_seed(0)
    model = gpt.GPT(vocab, block=32, layers=2, width=64, heads=2, dropout=0.0).cuda()
    reference = gpt.GPT(vocab, block=32, layers=2, width=64, heads=2, dropout=0.0).cuda()
    reference.load_state_dict(model.state_dict())
    opt = gpt.optimizer(3e-3, warmup=2, steps=steps)
    state = fnlight.TrainState.create(model, opt)
    step = fnlight.make_train_step(model, gpt.loss_fn, opt, clip=1.0)
    torch_opt = torch.optim.AdamW(gpt.torch_param_groups(reference, 0.1), lr=torch.tensor(3e-3, device="cuda"),
                                  betas=(0.9, 0.95), fused=True)
    for i, (bx, by) in enumerate(batches):
        state, _ = step(state, (bx, by))
        for group in torch_opt.param_groups:
            group["lr"] = opt.learning_rate(i).to(torch.float32).cuda()
        torch_opt.zero_grad(set_to_none=True)
        F.cross_entropy(reference(bx).flatten(0, 1), by.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        torch_opt.step()
    for k, p in reference.named_parameters():
        torch.testing.assert_close(state.params[k], p.detach(), rtol=1e-5, atol=1e-6)
    bf16 = fnlight.make_train_step(model, gpt.loss_fn, opt, clip=1.0, precision="bf16-mixed", compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fnlight.train.GraphBreakWarning)
        for b in batches[:3]:
            state, metrics = bf16(state, b)
    assert torch.isfinite(metrics["loss"])
