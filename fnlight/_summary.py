"""The summary of an experiment that ``fnlight fit`` prints when it starts and ``fnlight summary`` prints alone:
its modules (type, parameters, trainable or frozen, output shape on one batch), totals, the size of the
training state in bytes (optimizer state included), and its data (splits, sizes, batches per epoch, the
pipeline).

Example:
    ```python
    from fnlight.experiment import digits
    print("\\n".join(summary_lines(digits(hidden=64))))
    ```
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from .experiment import Experiment
from .train.state import TrainState
from .tree import tree_leaves


def _shape(out: Any) -> str:
    """An output's shape: ``[64, 10]`` for a tensor, ``([..], [..])`` for a tuple, ``{k: [..]}`` for a dict."""
    if isinstance(out, torch.Tensor):
        return str(list(out.shape))
    if isinstance(out, tuple | list):
        return "(" + ", ".join(_shape(o) for o in out) + ")"
    if isinstance(out, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in out.items()) + "}"
    return type(out).__name__


def _nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree)
               if isinstance(t, torch.Tensor))


def module_rows(exp: Experiment, state: TrainState, batch: Any, depth: int = 1) -> list[dict[str, Any]]:
    """One row per module down to ``depth`` (1: the model's children): name, type, parameters, mode
    (trainable, frozen, mixed or - without parameters) and the output shape on ``batch``, read by forward
    hooks while the model runs once in eval mode with the state's weights.

    Example:
        ```python
        module_rows(digits(), state, batch)[0]
        # {'name': '0', 'type': 'Linear', 'params': 16640, 'mode': 'trainable', 'output': '[64, 256]'}
        ```
    """
    model = exp.model
    named = [(n, m) for n, m in model.named_modules() if n and n.count(".") < depth] or [("(model)", model)]
    outputs: dict[str, list[str]] = {n: [] for n, _ in named}

    def hook(name: str) -> Callable[..., None]:
        return lambda _module, _inputs, out: outputs[name].append(_shape(out))

    handles = [m.register_forward_hook(hook(n)) for n, m in named]
    try:
        exp.forward(state, batch)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, module in named:
        params = list(module.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frozen = sum(p.numel() for p in params if not p.requires_grad)
        mode = "-" if not params else "trainable" if not frozen else "frozen" if not trainable else "mixed"
        seen = outputs[name]
        output = "(not called)" if not seen else seen[0] + (f" (x{len(seen)} calls)" if len(seen) > 1 else "")
        rows.append({"name": name, "type": type(module).__name__, "params": trainable + frozen, "mode": mode,
                     "output": output})
    return rows


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                             enumerate(zip(r, widths, strict=True))).rstrip() for r in [header, *rows]]


def _value(v: Any) -> str:
    """A hyperparameter as JSON, with a function as its name and hashes shortened (``--json`` has them whole)."""
    if isinstance(v, dict) and "function" in v:
        sha = v.get("source_sha256") or v.get("sha256")
        return str(v["function"]) + (f"[{sha[:12]}]" if isinstance(sha, str) else "")
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return f'"{v[:12]}…"'
    return json.dumps(v, separators=(", ", ": "), ensure_ascii=False)


def pipeline_tree(desc: dict[str, Any], indent: str = "") -> list[str]:
    """A pipeline description as a tree: a stage per line with all its hyperparameters; nested pipelines
    as branches.

    Example:
        ```python
        pipeline_tree(dm.pipeline.describe())[0]
        # '├── digits()'
        ```
    """
    lines = []
    stages = desc["stages"]
    for i, st in enumerate(stages):
        last = i == len(stages) - 1
        nested = {k: v for k, v in st.items() if isinstance(v, dict) and "stages" in v}
        params = ", ".join(f"{k}={_value(v)}" for k, v in st.items() if k != "stage" and k not in nested)
        lines.append(f"{indent}{'└── ' if last else '├── '}{st['stage']}({params})")
        for k, sub in nested.items():
            lines.append(f"{indent}{'    ' if last else '│   '}{k}:")
            lines += pipeline_tree(sub, indent + ("    " if last else "│   ") + "    ")
    return lines


def summary_lines(exp: Experiment, state: TrainState | None = None, depth: int = 1) -> list[str]:
    """The summary as lines: the module table and totals, the state's size, the data's splits and pipeline.

    ``state`` defaults to ``exp.init_state()`` (its optimizer state is part of the size); the output shapes
    come from one batch of the fit split (the first of epoch 0), run on the state's device.

    Example:
        >>> from fnlight.experiment import digits
        >>> lines = summary_lines(digits(hidden=64), depth=2)
        >>> lines[0], next(line for line in lines if line.startswith("total"))
        ('model: digits MLP (Sequential)', 'total: 8,970 parameters (8,970 trainable, 0 frozen), 0 buffer values')
    """
    state = exp.init_state() if state is None else state
    dm = exp.datamodule
    split = dm.split_for("fit") if "fit" in dm.stages else dm.split_names[0]
    with dm.replace(device=str(state.step.device)).batches(split, 0) as batches:
        batch = next(iter(batches))
    rows = module_rows(exp, state, batch, depth)
    lines = [f"model: {exp.name} ({type(exp.model).__name__})"]
    lines += _table(["name", "type", "params", "mode", "output"],
                    [[r["name"], r["type"], f"{r['params']:,}", r["mode"], r["output"]] for r in rows], {2})
    trainable, frozen = state.num_params, sum(p.numel() for p in exp.model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for b in exp.model.buffers())
    lines.append(f"total: {trainable + frozen:,} parameters ({trainable:,} trainable, {frozen:,} frozen), "
                 f"{buffers:,} buffer values")
    params_b, opt_b, buf_b = _nbytes(state.params), _nbytes(state.opt_state), _nbytes(state.buffers)
    total = _nbytes(state)
    lines.append(f"state: {total:,} bytes (parameters {params_b:,}, optimizer state {opt_b:,}, buffers and frozen "
                 f"parameters {buf_b:,}, step and key {total - params_b - opt_b - buf_b:,})")
    lines.append(f"data: seed {dm.seed}, fingerprint {dm.fingerprint[:16]}; stages "
                 + ", ".join(f"{k} -> {v}" for k, v in dm.stages.items()))
    split_rows = [[name, f"{len(dm.dataset(name)):,}", f"{dm.num_batches(name):,}"] for name in dm.split_names]
    lines += _table(["split", "samples", "batches/epoch"], split_rows, {1, 2})
    lines.append("pipeline:")
    lines += ["  " + line for line in pipeline_tree(dm.pipeline.describe())]
    return lines
