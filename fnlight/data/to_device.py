"""``to_device``: move batches to the run's device.

Stages before it run on the host (in the prefetch thread or worker
processes); stages after it run on the device. This is what Lightning's
``on_before_batch_transfer`` / ``on_after_batch_transfer`` hooks are for; a
custom batch type only needs to be a registered pytree
(:func:`fnlight.tree.register_node`), which is what overriding
``transfer_batch_to_device`` is for.

Example:
    >>> import torch, fnlight.data as fd
    >>> p = fd.from_tensors(torch.zeros(4, 2)) >> fd.batch(2) >> fd.to_device("cpu")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..tree import device_put
from .stage import Context, Plans, SplitPlan, Stage, Where, normalize_on, plans_for


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ToDevice(Stage):
    name: ClassVar[str] = "to_device"
    device: str | None = None
    non_blocking: bool = True
    on: str | tuple[str, ...] | None = None

    def describe(self) -> dict[str, Any]:
        return {"stage": self.name}  # where batches go does not change what they are

    def build(self, plans: Plans, ctx: Context, where: Where) -> Plans:
        device = torch.device(self.device) if self.device is not None else (ctx.device or default_device())
        if device.type == "cuda" and device.index is None:
            # Resolve now, in the caller's thread: a prefetch thread's current device is cuda:0,
            # which would send every rank's batches to the first GPU.
            device = torch.device("cuda", torch.cuda.current_device())

        def move(x: Any, idx: torch.Tensor, epoch: int) -> Any:
            return device_put(x, device, self.non_blocking)

        def update(plan: SplitPlan) -> SplitPlan:
            if plan.batch is None:
                raise ValueError("to_device() moves whole batches; place it after batch().")
            return plan.replace(device_post=plan.device_post + (move,))

        return plans_for("to_device", self.on, plans, update)


def to_device(device: str | torch.device | None = None, non_blocking: bool = True,
              on: str | tuple[str, ...] | None = None) -> ToDevice:
    """Move each batch to ``device`` (default: the DataModule's device, else CUDA if
    available, else CPU), through pinned memory when the target is CUDA.

    Example:
        ```python
        p = batch(128) >> to_device() >> transform(augment_on_gpu, batched=True)
        ```
    """
    return ToDevice(None if device is None else str(torch.device(device)), non_blocking, normalize_on(on))
