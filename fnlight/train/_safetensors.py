"""The safetensors file format, written and read with its checksum computed on the way.

A checkpoint records a checksum of each of its tensor files (shards of a large
state, see ``checkpoint_files.shards``), computed while the bytes are written
or read, never in a second pass. Local checkpoints use XXH128 (``xxhash``'s
``xxh3_128``, what ``xxh128sum`` prints, recorded as ``"xxh128:<hex>"``): at
~15 GB/s it costs a few percent of a write or read, where sha256 (~1.3 GB/s per
core with SHA instructions) cost as much as the I/O itself (a load took 1.6x
``torch.load``; with XXH128, 0.95x). The checksum guards against damage (a
flipped bit, a cut-short copy), not against someone who rewrites both a file
and ``checkpoint.json``; for that, nothing recorded next to the data helps.
sha256 stays for what records it (checkpoints written before, remote
manifests) and is computed by a second thread while the I/O goes on.

A read copies the file into memory (one pass, checksummed as it goes), so the
tensors it gives never depend on the file again: overwriting or truncating it
afterwards changes nothing. The format is the standard one (8-byte
little-endian header length, JSON header, raw little-endian data), so
``safetensors.safe_open`` reads these files and tests check that it does.

Tensors are laid out by decreasing element size, so every tensor's data starts
at a multiple of its element size and loads as a view of one buffer.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import struct
import threading
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

_CHUNK = 1 << 26  # 64 MiB: big enough for few syscalls, small enough to overlap writing with hashing

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = _code
_FROM_CODE = {v: k for k, v in DTYPES.items()}


SHA256, XXH128 = "sha256", "xxh128"  # the checksums a checkpoint may record (XXH128 for what fnlight writes now)


def kind(recorded: str) -> str:
    """The checksum a recorded value is: ``"xxh128:<32 hex>"`` is XXH128, a bare hex digest is sha256.

    Example:
        >>> kind("xxh128:" + "0" * 32), kind("0" * 64)
        ('xxh128', 'sha256')
    """
    return XXH128 if recorded.startswith(XXH128 + ":") else SHA256


class _Hasher:
    """The checksum (``XXH128`` or ``SHA256``) of the chunks handed to ``add``, in order.

    XXH128 is computed inline (it is an order of magnitude faster than the I/O); sha256 by a background
    thread while the caller goes on with its I/O (both ``hashlib`` and file I/O release the GIL).
    """

    def __init__(self, algorithm: str = XXH128) -> None:
        self._algorithm = algorithm
        self._h: Any = xxhash.xxh3_128() if algorithm == XXH128 else hashlib.sha256()
        self._q: queue.SimpleQueue[memoryview | None] | None = None
        self._t: threading.Thread | None = None
        if algorithm == SHA256:
            self._q = queue.SimpleQueue()
            self._t = threading.Thread(target=self._run, name="fnlight-sha256", daemon=True)
            self._t.start()

    def _run(self) -> None:
        assert self._q is not None
        while (chunk := self._q.get()) is not None:
            self._h.update(chunk)

    def add(self, chunk: memoryview) -> None:
        if self._q is None:
            self._h.update(chunk)
        else:
            self._q.put(chunk)

    def close(self) -> None:
        """Stop the thread, if any (idempotent); every ``add``-ed chunk is hashed first."""
        if self._t is not None and self._t.is_alive():
            assert self._q is not None
            self._q.put(None)
            self._t.join()

    def hexdigest(self) -> str:
        """The checksum as recorded: ``"xxh128:<hex>"``, or the bare sha256 hex digest."""
        self.close()
        digest = self._h.hexdigest()
        return f"{XXH128}:{digest}" if self._algorithm == XXH128 else digest


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def pieces(tensors: dict[str, torch.Tensor]) -> list[memoryview]:
    """The bytes of the safetensors file of contiguous CPU ``tensors``, in order, as views (no copy of the data):
    the length, the JSON header, then each tensor's data in chunks of at most 64 MiB."""
    for name, t in tensors.items():
        if name == "__metadata__":
            raise ValueError("a tensor cannot be named __metadata__ (safetensors reserves that name)")
        if t.dtype not in DTYPES:
            raise TypeError(f"cannot save {name}: dtype {t.dtype} has no safetensors code")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset, blobs = {}, 0, []
    for name in order:
        t = tensors[name]
        raw = _bytes_of(t)
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + raw.nbytes]}
        offset += raw.nbytes
        blobs.append(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-aligned
    return [memoryview(struct.pack("<Q", len(head))), memoryview(head)] + [
        blob[i:i + _CHUNK] for blob in blobs for i in range(0, blob.nbytes, _CHUNK)]


def write_stream(f: BinaryIO, tensors: dict[str, torch.Tensor], algorithm: str = SHA256) -> tuple[str, int]:
    """Write contiguous CPU ``tensors`` in the safetensors format to the open binary file ``f`` (e.g. an
    fsspec file); return their checksum (sha256 by default: what remote manifests record) and size."""
    hasher, size = _Hasher(algorithm), 0
    try:
        for piece in pieces(tensors):
            hasher.add(piece)
            f.write(piece)
            size += piece.nbytes
    finally:
        hasher.close()
    return hasher.hexdigest(), size


def write(path: Path, tensors: dict[str, torch.Tensor], algorithm: str = XXH128) -> str:
    """Write contiguous CPU ``tensors`` to ``path`` in the safetensors format, fsync it, return its checksum
    (as :meth:`_Hasher.hexdigest` gives it), computed while written."""
    parts = pieces(tensors)
    hasher = _Hasher(algorithm)
    try:  # the hashing thread stops whatever happens (a full disk, a kill signal's exception)
        with open(path, "wb", buffering=0) as f:
            for piece in parts:
                hasher.add(piece)
                while piece.nbytes:  # a raw write may be short
                    piece = piece[f.write(piece):]
            os.fsync(f.fileno())
    finally:
        hasher.close()
    return hasher.hexdigest()


_READ_CHUNK = 1 << 22  # 4 MiB: each chunk is checksummed right after it is read, while it is still in cache


def _buffer(size: int) -> tuple[torch.Tensor, memoryview]:
    """``size`` bytes of fresh private memory as a uint8 tensor, and a view to write them.

    An anonymous mapping of its own (not the allocator's heap): its memory goes back to the OS with the
    last tensor viewing it, and its pages are made in one call (MAP_POPULATE, where there is one)
    rather than by one fault per 4 KiB page while it is filled (about 10% faster to fill, measured).
    No MADV_HUGEPAGE: under memory pressure that makes the kernel compact memory on every fault,
    measured 2x slower on a loaded machine.
    """
    if size == 0:
        return torch.empty(0, dtype=torch.uint8), memoryview(bytearray())
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))
    return torch.frombuffer(mem, dtype=torch.uint8), memoryview(mem)  # the tensor keeps `mem` alive


def read_fd(fd: int, size: int, algorithm: str = XXH128) -> tuple[torch.Tensor, str]:
    """The first ``size`` bytes of the open file ``fd`` copied into one CPU uint8 tensor, and their checksum.

    The copy is the only pass over the file (checksummed chunk by chunk as it is read), so the result never
    depends on the file afterwards. Raises EOFError when the file is shorter.
    """
    buf, view = _buffer(size)
    hasher = _Hasher(algorithm)
    try:
        done = 0
        while done < size:
            chunk = view[done:done + _READ_CHUNK]
            got = 0
            while got < chunk.nbytes:
                n = os.preadv(fd, [chunk[got:]], done + got)
                if n == 0:
                    raise EOFError(f"the file ended after {done + got} of {size} bytes (truncated while read?)")
                got += n
            hasher.add(chunk)
            done += got
    finally:
        hasher.close()
    return buf, hasher.hexdigest()


def read(path: Path, algorithm: str = XXH128) -> tuple[torch.Tensor, str]:
    """The bytes of a regular file as one CPU uint8 tensor (a copy), and their checksum."""
    with open(path, "rb") as f:
        return read_fd(f.fileno(), os.fstat(f.fileno()).st_size, algorithm)


def read_stream(f: BinaryIO, size: int, algorithm: str = SHA256) -> tuple[torch.Tensor, str]:
    """The first ``size`` bytes of the open binary file ``f`` (e.g. an fsspec file) copied into one CPU uint8
    tensor, and their checksum (sha256 by default, what remote manifests record; computed while read, as
    :func:`read_fd`). EOFError when the file is shorter."""
    buf, view = _buffer(size)
    hasher = _Hasher(algorithm)
    try:
        done = 0
        while done < size:
            n = f.readinto(view[done:done + _READ_CHUNK])
            if not n:
                raise EOFError(f"the file ended after {done} of {size} bytes (truncated while read?)")
            hasher.add(view[done:done + n])
            done += n
    finally:
        hasher.close()
    return buf, hasher.hexdigest()


MAX_HEADER = 100_000_000  # what safetensors itself accepts


def parse(buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors bytes ``buf``, as views of it.

    Raises ValueError when they are not valid safetensors (checked before any view is made).
    """
    size = buf.numel()
    view = memoryview(buf.numpy())
    if size < 8:
        raise ValueError("shorter than a safetensors header")
    (n_head,) = struct.unpack("<Q", view[:8])
    if 8 + n_head > size or n_head > MAX_HEADER:
        raise ValueError(f"header length {n_head} exceeds the file ({size} bytes) or {MAX_HEADER} bytes")
    try:
        header = json.loads(bytes(view[8:8 + n_head]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the header is not JSON ({e})") from None
    except RecursionError:
        raise ValueError("the header is JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    start, out, spans = 8 + n_head, {}, []
    for name, spec in header.items():
        code = spec.get("dtype") if isinstance(spec, dict) else None
        dtype = _FROM_CODE.get(code) if isinstance(code, str) else None
        shape, offsets = (spec.get("shape"), spec.get("data_offsets")) if dtype is not None else (None, None)
        if dtype is None or not isinstance(shape, list) or not all(isinstance(x, int) and x >= 0 for x in shape) \
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(x, int) for x in offsets):
            raise ValueError(f"malformed entry {name!r}: {str(spec)[:200]}")
        b, e = offsets
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for x in shape:
            numel *= x
        if e - b != numel * itemsize or b < 0 or start + e > size or (start + b) % itemsize:
            raise ValueError(f"entry {name!r} has inconsistent or misaligned offsets {offsets}")
        spans.append((b, e))
        out[name] = buf[start + b:start + e].view(dtype).reshape(shape)
    spans.sort()
    if any(e0 > b1 for (_, e0), (b1, _) in zip(spans, spans[1:], strict=False)):
        raise ValueError("tensors overlap")
    return out
