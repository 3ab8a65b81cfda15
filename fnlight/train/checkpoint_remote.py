"""Checkpoints in remote directories (``s3://``, ``gs://``, ``memory://``...): crash safety without renames.

Object stores have no rename, so the local layout's atomic install (a temp directory renamed into place) is
replaced by a commit marker. A remote checkpoint is the local layout's files (``checkpoint.json``, the tensor
files) plus ``manifest.json``, written last, which lists every file of the checkpoint directory with its size
and sha256 (and its own sha256). Since one object is written whole or not at all:

- a checkpoint whose manifest is absent does not exist for readers: :func:`list_checkpoints` (and so the
  Trainer's resume) does not see it; a writer killed mid-checkpoint leaves such a directory, which the
  Trainer removes after its next checkpoint (:func:`remove_incomplete`);
- loading reads the manifest, then every file it lists, and checks each one's size and sha256 against it
  (and against ``checkpoint.json``'s own checksums, as locally): damage is a CorruptCheckpointError naming the
  file; a file that the manifest does not list is refused, as locally;
- overwriting a checkpoint first deletes its manifest (from then on readers see no checkpoint there, never a
  mix of two), then its files, and writes the new ones; removal also deletes the manifest first.

Every file of the directory goes into the manifest, whoever wrote it (:func:`commit` hashes those it was not
told about), so files that other processes wrote into the checkpoint before the commit are covered. Several
writers of one checkpoint (e.g. one per rank) compose the steps of :func:`write`: one :func:`clear` first, then
each writes its files, then, once all are done (a barrier), one :func:`commit` (given the sizes and sha256s the
others report, or hashing their files itself).

Example:
    ```python
    write(RemotePath("s3://bucket/run/step_100"), {"w": torch.zeros(3)}, {"structure": ..., "meta": {}})
    doc, tensors = read(RemotePath("s3://bucket/run/step_100"))
    ```
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import torch

from .._remote import RemotePath
from . import _safetensors
from .checkpoint_files import (
    MAX_META_BYTES,
    META,
    TENSOR_FILE,
    each,
    finish,
    join_shards,
    parse_doc,
    parse_tensor_file,
    recorded_files,
    shards,
)
from .checkpoint_tree import CheckpointError, CorruptCheckpointError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fnlight-checkpoint-manifest"
_ATTEMPTS = 5  # reads started again because the checkpoint was replaced meanwhile


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, separators=(",", ":"), sort_keys=True).encode()).hexdigest()


# -- listing, removing ------------------------------------------------------------------------------------------


def _steps(ckpt_dir: RemotePath) -> tuple[dict[int, RemotePath], dict[int, RemotePath]]:
    """The ``step_<n>`` directories of ``ckpt_dir`` (one recursive listing): (committed, incomplete) by step."""
    committed, incomplete = {}, {}
    for rel in ckpt_dir.files():
        top, _, rest = rel.partition("/")
        if not (top.startswith("step_") and top[5:].isdigit() and rest):
            continue
        n = int(top[5:])
        if rest == MANIFEST:
            committed[n] = ckpt_dir / top
        incomplete.setdefault(n, ckpt_dir / top)
    return committed, {n: p for n, p in incomplete.items() if n not in committed}


def list_checkpoints(ckpt_dir: RemotePath) -> list[RemotePath]:
    """The committed ``step_<n>`` checkpoints (those with a manifest) of ``ckpt_dir``, oldest first."""
    committed, _ = _steps(ckpt_dir)
    return [committed[n] for n in sorted(committed)]


def remove(path: RemotePath) -> None:
    """Delete the checkpoint ``path``: its manifest first (it stops existing at once), then its files."""
    (path / MANIFEST).unlink()
    path.rmtree()


def remove_incomplete(ckpt_dir: RemotePath, below: int) -> list[RemotePath]:
    """Delete the ``step_<n>`` directories without a manifest for n < ``below`` (what writers killed
    mid-checkpoint left; a checkpoint of a smaller step is never being written when a newer one has been
    committed by the same, single writer); returns them."""
    _, incomplete = _steps(ckpt_dir)
    gone = [p for n, p in sorted(incomplete.items()) if n < below]
    for p in gone:
        p.rmtree()
    return gone


def exists(path: RemotePath) -> bool:
    """Whether ``path`` holds a committed checkpoint (its manifest is there)."""
    return (path / MANIFEST).exists()


# -- writing ----------------------------------------------------------------------------------------------------


def _ours(name: str, listed: set[str]) -> bool:
    return name in (META, MANIFEST) or bool(TENSOR_FILE.fullmatch(name)) or name in listed


def clear(path: RemotePath) -> None:
    """Make ``path`` ready for a new checkpoint: delete the checkpoint there (manifest first), or what a killed
    writer left. Anything else there is a CheckpointError, and nothing is deleted (as locally)."""
    present = path.files()
    if not present:
        return
    listed: set[str] = set()
    if MANIFEST in present:
        # (a damaged manifest: its checkpoint is replaced like any other)
        with contextlib.suppress(ValueError, AttributeError, FileNotFoundError):
            listed = set(json.loads((path / MANIFEST).read_bytes()).get("files", {}))
    foreign = sorted(n for n in present if not _ours(n, listed))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CheckpointError(f"cannot save a checkpoint to {path}: it holds files a fnlight checkpoint never has "
                              f"({shown}); nothing was written or removed. Choose another path (e.g. a step_<n> "
                              "directory inside it), or remove them yourself")
    remove(path)


def _put(target: RemotePath, tensors: dict[str, torch.Tensor]) -> tuple[str, int]:
    with target.fs.open(target.path, "wb") as f:  # a multipart upload: the object appears whole at close
        return _safetensors.write_stream(f, tensors)


def write_files(path: RemotePath, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Write contiguous host ``tensors`` (in shards, in parallel) and ``doc`` (completed with the format and
    checksums, as locally) into ``path``: name -> {size, sha256} of each file written (for :func:`commit`)."""
    files = shards(tensors)
    written = each(lambda name: _put(path / name, files[name]), list(files))
    # sha256 here, what the manifest records too (so the document is of format version 1 or 2)
    doc = finish(doc, {n: h for n, (h, _) in zip(files, written, strict=True)})
    raw = json.dumps(doc, indent=1).encode()
    (path / META).write_bytes(raw)
    out = {n: {"size": size, "sha256": h} for n, (h, size) in zip(files, written, strict=True)}
    out[META] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    return out


def commit(path: RemotePath, known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the manifest of ``path``: every file there (``known``: the size and sha256 of those already
    hashed by their writer; the others are read and hashed now), then the manifest itself. Returns it."""
    known = known or {}
    present = {n: s for n, s in path.files().items() if n != MANIFEST}
    if missing := sorted(known.keys() - present.keys()):
        raise CheckpointError(f"cannot commit the checkpoint {path}: {missing} were written but are not there")
    entries = {}
    for name, size in sorted(present.items()):
        entry = known.get(name)
        if entry is None:
            data = (path / name).read_bytes()
            entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if entry["size"] != size:
            raise CheckpointError(f"cannot commit the checkpoint {path}: {name} is {size} bytes there, "
                                  f"{entry['size']} were written")
        entries[name] = {"size": int(entry["size"]), "sha256": entry["sha256"]}
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": 1, "files": entries}
    manifest["manifest_sha256"] = _manifest_checksum(manifest)
    (path / MANIFEST).write_bytes(json.dumps(manifest, indent=1).encode())  # the commit
    return manifest


def write(path: RemotePath, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> RemotePath:
    """Write the checkpoint ``path``: clear it, write its files, commit its manifest. A failure raises an
    OSError (or the store's error) naming ``path``, and leaves no committed checkpoint there."""
    try:
        clear(path)
        commit(path, write_files(path, tensors, doc))
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e} while writing the checkpoint {path} (it is not committed: "
                               "readers do not see it)") from e
    return path


# -- reading ----------------------------------------------------------------------------------------------------


class _Changed(Exception):
    """The manifest changed (or vanished) while the checkpoint was read: a writer replaced it."""


def _read_manifest(path: RemotePath) -> dict[str, dict[str, Any]]:
    where = path / MANIFEST
    try:
        raw = where.read_bytes()
    except FileNotFoundError:
        if path.files():
            raise CorruptCheckpointError(f"{path} is incomplete: it has no {MANIFEST} (its writer stopped before "
                                         "committing it, or is still writing): it is not a checkpoint yet") from None
        raise CheckpointError(f"{path} is not a checkpoint directory (nothing is there)") from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise CorruptCheckpointError(f"{where} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CorruptCheckpointError(f"{where} is not a fnlight checkpoint manifest")
    if manifest.get("manifest_sha256") != _manifest_checksum(manifest):
        raise CorruptCheckpointError(f"{where} is corrupted: its sha256 does not match the one it records")
    files = manifest.get("files")
    if not isinstance(files, dict) or META not in files or not all(
            isinstance(v, dict) and type(v.get("size")) is int and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CorruptCheckpointError(f"{where} is malformed: it needs the size and sha256 of each file, "
                                     f"{META} among them")
    return files


def _fetch(path: RemotePath, name: str, entry: dict[str, Any]) -> torch.Tensor:
    target = path / name
    try:
        with target.fs.open(target.path, "rb") as f:
            raw, actual = _safetensors.read_stream(f, entry["size"])
    except FileNotFoundError:
        raise _Changed(f"{target} missing") from None
    except EOFError as e:
        raise _Changed(f"{target}: {e}") from None
    if actual != entry["sha256"]:
        raise _Changed(f"{target} is corrupted: its sha256 is {actual}, the manifest records {entry['sha256']}")
    return raw


def _read_once(path: RemotePath) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    files = _read_manifest(path)
    present = path.files()
    present.pop(MANIFEST, None)
    if missing := sorted(files.keys() - present.keys()):
        raise _Changed(f"{path} is incomplete: {', '.join(missing)} missing")
    if extra := sorted(present.keys() - files.keys()):
        raise CorruptCheckpointError(f"refusing to load {path}: {extra[:10]} are not among the files its {MANIFEST} "
                                     "records; nothing here was read")
    if wrong := sorted(n for n in files if present[n] != files[n]["size"]):
        raise _Changed(f"{path / wrong[0]} is {present[wrong[0]]} bytes, the manifest records "
                       f"{files[wrong[0]]['size']}")
    if files[META]["size"] > MAX_META_BYTES:
        raise CorruptCheckpointError(f"{path / META} is {files[META]['size']} bytes, more than any metadata")
    doc = parse_doc(_fetch(path, META, files[META]).numpy().tobytes(), path)
    recorded = recorded_files(path, doc, set(files))
    parts = each(lambda name: parse_tensor_file(_fetch(path, name, files[name]), files[name]["sha256"],
                                                recorded[name], path, name), list(recorded))
    return doc, join_shards(path, parts, list(recorded))


def read(path: RemotePath) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The verified document and tensors of the committed checkpoint ``path``. A file that does not match the
    manifest is damage (CorruptCheckpointError naming it) unless the manifest changed meanwhile (a writer
    replaced the checkpoint): then the read starts again."""
    for _ in range(_ATTEMPTS):
        try:
            before = (path / MANIFEST).read_bytes()
        except FileNotFoundError:
            before = None
        try:
            return _read_once(path)
        except _Changed as e:
            try:
                after = (path / MANIFEST).read_bytes()
            except FileNotFoundError:
                after = None
            if after is not None and after == before:
                raise CorruptCheckpointError(str(e)) from None
            if after is None:
                raise CheckpointError(f"{path} was deleted while it was read") from None
        except OSError as e:
            raise CheckpointError(f"cannot read the checkpoint {path}: {e}") from None
    raise CorruptCheckpointError(f"{path} kept being replaced while it was read ({_ATTEMPTS} attempts)")

