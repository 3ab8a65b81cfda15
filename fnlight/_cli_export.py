"""``fnlight export``: a trained state as a plain model file, checked against the functional model.

Every format is written, then read back and run on a batch; its outputs are
compared with the functional model's (``torch.func.functional_call`` with the
state's weights).

- ``safetensors``: the module's ``state_dict`` (load it with ``model.load_state_dict``);
- ``torchscript``: ``torch.jit.trace`` of the module on the batch (``torch.jit.load``);
- ``onnx``: ``torch.onnx.export`` with a dynamic batch dimension, run with onnxruntime
  (``pip install 'fnlight[onnx]'``).

Example:
    ```python
    path, diff = export(exp, state, batch, "torchscript", Path("model.pt"))
    ```
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch

from ._cli_common import CliError
from .experiment import Experiment
from .train import TrainState
from .tree import tree_leaves

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the exporter needs the first two; the check runs the third


def _run_safetensors(exp: Experiment, module: torch.nn.Module, inputs: tuple[Any, ...], out: Path,
                     metadata: dict[str, str]) -> Any:
    from safetensors.torch import load_file, save_file

    # clones: safetensors refuses tensors that share memory (tied weights are then stored twice)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}, out,
              metadata=metadata)
    fresh = copy.deepcopy(exp.model).to(inputs_device(inputs))
    fresh.load_state_dict(load_file(out, device=str(inputs_device(inputs))), strict=True)
    with torch.no_grad():
        return fresh.eval()(*inputs)


def _run_torchscript(module: torch.nn.Module, inputs: tuple[Any, ...], out: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # recent torch deprecates TorchScript; asked for here
        with torch.no_grad():
            traced = torch.jit.trace(module, inputs, strict=False)
        traced.save(str(out))
        loaded = torch.jit.load(str(out), map_location=inputs_device(inputs))
    with torch.no_grad():
        return loaded(*inputs)


def _run_onnx(module: torch.nn.Module, inputs: tuple[Any, ...], out: Path) -> Any:
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise CliError(f"exporting to ONNX needs {', '.join(ONNX_PACKAGES)} (missing: {', '.join(missing)}): "
                       "pip install 'fnlight[onnx]'")
    import onnxruntime

    batch = torch.export.Dim("batch")
    with torch.no_grad():
        torch.onnx.export(module, inputs, str(out), dynamo=True, external_data=False,
                          dynamic_shapes=tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() else None
                                               for x in inputs))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def inputs_device(inputs: tuple[Any, ...]) -> torch.device:
    return next((x.device for x in tree_leaves(inputs) if isinstance(x, torch.Tensor)), torch.device("cpu"))


def max_difference(expected: Any, got: Any) -> tuple[float, bool]:
    """The largest absolute difference between two outputs' tensors, and whether they are allclose
    (rtol 1e-4, atol 1e-5: traced and ONNX graphs may fuse ops and round differently)."""
    a = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    b = [t for t in tree_leaves(got) if isinstance(t, torch.Tensor)]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=False)):
        return float("inf"), False
    worst, close = 0.0, True
    for x, y in zip(a, b, strict=True):
        x, y = x.detach().cpu().double(), y.detach().cpu().double()
        if x.numel():
            worst = max(worst, float((x - y).abs().max()))
        close = close and torch.allclose(x, y, rtol=1e-4, atol=1e-5)
    return worst, close


def export(exp: Experiment, state: TrainState, batch: Any, fmt: str, out: Path,
           metadata: dict[str, str] | None = None) -> tuple[float, bool]:
    """Write the trained model to ``out`` in ``fmt``, run the file on ``batch``: ``(max abs difference, ok)``."""
    if fmt not in FORMATS:
        raise CliError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    module = exp.module(state)
    inputs = exp.inputs(batch)
    expected = exp.forward(state, batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        got = _run_safetensors(exp, module, inputs, out, metadata or {})
    elif fmt == "torchscript":
        got = _run_torchscript(module, inputs, out)
    else:
        got = _run_onnx(module, inputs, out)
    return max_difference(expected, got)
