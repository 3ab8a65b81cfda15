"""Checkpoints of sharded optimizer states (ZeRO-1): every rank writes its own slice, in parallel.

:func:`save_sharded` is a collective (every rank calls it). The checkpoint is an ordinary fnlight
checkpoint directory (format version 3) whose tensor files are one per rank:
``tensors-0000{r+1}-of-0000N.safetensors`` holds rank ``r``'s pieces of the optimizer state (as
``<name>%zero<r>``: ``%`` never appears unescaped in a tensor name), and rank 0's file also the
parameters, buffers, step, key and the optimizer-state leaves every rank keeps whole (adafactor's
factored moments, counts; see :func:`fnlight.train.zero.kept_whole`). ``checkpoint.json`` (written
last, by rank 0, with the checksum of every rank's file: the one record) lists the pieces and the
whole tensors' shapes under ``"zero"``; :func:`merge` joins the pieces (a rank's pieces are
consecutive slices of the flat tensor) when the checkpoint is loaded, so it loads as the whole,
unsharded state: on any number of ranks, sharded or not, with :func:`fnlight.load_checkpoint` like
any checkpoint.

The directory is written as :func:`fnlight.save_checkpoint` writes one: into a temporary directory
beside it, renamed into place when complete (a rank killed meanwhile leaves no checkpoint, only a
temporary directory). Ranks must therefore see one file system at ``path``; when they do not (the
temporary directory rank 0 made is not there for some rank), the ranks gather the whole optimizer
state instead and rank 0 writes it alone.

Example:
    ```python
    save_sharded("runs/a/ckpt/step_000000100", state, meta={"epoch": 3})   # on every rank
    ```
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import distributed
from .._remote import is_remote
from . import _safetensors
from . import checkpoint_files as files
from .checkpoint_tree import CorruptCheckpointError
from .zero import check_layout, map_pieces, unshard

__all__ = ["merge", "save_sharded"]

SUFFIX = "%zero"


def _file(rank: int, world: int) -> str:
    return f"tensors-{rank + 1:05d}-of-{world:05d}.safetensors"


def save_sharded(path: str | os.PathLike, state: Any, *, meta: dict[str, Any] | None = None) -> Path:
    """Write a sharded ``TrainState`` as one checkpoint, each rank its slice (a collective).

    Example:
        ```python
        save_sharded(step_dir(ckpt_dir, step), state, meta=meta)
        ```
    """
    from .checkpoint import prepare, save_checkpoint

    rank, world = distributed.rank(), distributed.world_size()
    if is_remote(path):  # an object store: the ranks gather the whole state and rank 0 writes it
        whole = unshard(state)
        return save_checkpoint(path, whole, meta=meta) if rank == 0 else path
    path = Path(path)
    layout = check_layout(state)
    tmp = None
    if rank == 0:
        files.check_replaceable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-zero-{os.getpid()}-{uuid.uuid4().hex}")
        tmp.mkdir()
    tmp = distributed.broadcast_object(tmp)
    if not distributed.all_true(tmp.is_dir()):  # no shared file system: gather, and rank 0 writes
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        whole = unshard(state)
        return save_checkpoint(path, whole, meta=meta) if rank == 0 else path
    pieces: dict[int, tuple[int, ...]] = {}

    def note(i: int, leaf: torch.Tensor, p: tuple[Any, ...], what: str) -> torch.Tensor:
        pieces[id(leaf)] = tuple(layout.shapes[i])
        return leaf

    map_pieces(state.opt_state.inner, layout, note, "note")
    tensors, doc = prepare(state.replace(opt_state=state.opt_state.inner), meta)
    whole_shapes = {name: list(pieces[id(t)]) for name, t in tensors.items() if id(t) in pieces}
    mine = {f"{name}{SUFFIX}{rank}" if name in whole_shapes else name: t.detach().contiguous().cpu()
            for name, t in tensors.items() if name in whole_shapes or rank == 0}
    try:
        result: Any = _safetensors.write(tmp / _file(rank, world), mine)
    except OSError as e:
        result = OSError(e.errno, f"{e.strerror or e} (rank {rank})")
    results: list[Any] = [None] * world
    dist.all_gather_object(results, result)
    failed = next((r for r in results if isinstance(r, OSError)), None)
    outcome: Any = None
    if rank == 0:
        try:
            if failed is not None:
                raise failed
            files.write_doc(tmp, files.finish({**doc, "zero": {"world_size": world, "shapes": whole_shapes}},
                                              {_file(r, world): h for r, h in enumerate(results)}))
            files.install(tmp, path)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            outcome = e
    outcome = distributed.broadcast_object(None if outcome is None else repr(outcome))
    if outcome is not None:
        raise OSError(f"writing the sharded checkpoint {path} failed ({outcome}); what was there is unchanged")
    return path


def merge(doc: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint with its ranks' pieces joined into whole tensors (as they are when
    the checkpoint has no ``"zero"`` record)."""
    zero = doc.get("zero")
    if zero is None:
        return tensors
    try:
        world, shapes = int(zero["world_size"]), dict(zero["shapes"])
        out = dict(tensors)
        for name, shape in shapes.items():
            parts = [out.pop(f"{name}{SUFFIX}{r}").reshape(-1) for r in range(world)]
            out[name] = torch.cat(parts).view([int(s) for s in shape])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(f"{where / files.META}'s record of the ranks' pieces does not match its "
                                     f"tensor files ({type(e).__name__}: {e})") from None
    if left := sorted(k for k in out if SUFFIX in k):
        raise CorruptCheckpointError(f"{where} holds pieces its record does not list: {left[:3]}")
    return out
