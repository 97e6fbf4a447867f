"""Safe files: atomic writes and safetensors-plus-JSON state files that never unpickle anything.

A state file is one ``.safetensors`` file. Its tensors are the leaves of a nested structure (dicts,
lists, tuples); everything else (numbers, strings, None, the structure itself) is JSON in the
safetensors header's metadata, next to free-form JSON ``metadata`` (model name, arguments, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

TREE_KEY = "densenet.tree"
META_KEY = "densenet.metadata"
FORMAT_KEY = "densenet.format"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint or weights file; the message names it."""


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write ``path`` so that it is either the complete new file or the old one, never partial.

    ``write(f)`` fills a temporary file in the same directory, which is flushed, fsynced and
    renamed over ``path``; on any error (including a full disk) the temporary file is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def _split(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replace each tensor leaf of ``obj`` by a reference into ``tensors``; return the JSON tree."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)):
                raise TypeError(f"state keys must be str or int, got {type(k).__name__} at {prefix!r}")
        return {
            "__dict__": [[k, _split(v, tensors, f"{prefix}.{k}" if prefix else str(k))] for k, v in obj.items()]
        }
    if isinstance(obj, (list, tuple)):
        items = [_split(v, tensors, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"cannot store {type(obj).__name__} at {prefix!r} in a safetensors state file; "
        "convert it to tensors, numbers or strings"
    )


def _join(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__tuple__" in tree:
            return tuple(_join(v, tensors) for v in tree["__tuple__"])
        return {k: _join(v, tensors) for k, v in tree["__dict__"]}
    if isinstance(tree, list):
        return [_join(v, tensors) for v in tree]
    return tree


def save_state(path: str | Path, state: Any, metadata: dict | None = None) -> Path:
    """Atomically write a nested ``state`` (tensors, dicts, lists, numbers, strings) to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, tensors, "")
    header = {
        FORMAT_KEY: FORMAT_VERSION,
        TREE_KEY: json.dumps(tree),
        META_KEY: json.dumps(metadata or {}),
    }
    # Tied or shared tensors must be separate buffers for safetensors.
    data = safetensors_save({k: v.clone() for k, v in tensors.items()}, metadata=header)
    return atomic_write(path, lambda f: f.write(data))


def read_header(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of ``path`` (raises :class:`CheckpointError` if not one)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) < 8:
                raise CheckpointError(f"{path}: file is empty or truncated ({len(size_bytes)} bytes)")
            size = int.from_bytes(size_bytes, "little")
            if size > os.path.getsize(path) - 8 or size > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (bad header length {size})")
            header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header.get("__metadata__") or {}


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Any, dict]:
    """Read a file written by :func:`save_state`: ``(state, metadata)``.

    Raises :class:`CheckpointError` naming the file for a missing, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    header = read_header(path)
    try:
        tensors = safetensors_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({error})") from None
    metadata = json.loads(header.get(META_KEY, "{}"))
    if TREE_KEY not in header:  # a plain safetensors weights file (e.g. from the hub)
        state: Any = tensors
    else:
        try:
            state = _join(json.loads(header[TREE_KEY]), tensors)
        except (KeyError, json.JSONDecodeError, TypeError) as error:
            raise CheckpointError(f"{path}: damaged state structure ({error})") from None
    if str(map_location) != "cpu":
        state = _join(_split(state, tensors := {}, ""), {k: v.to(map_location) for k, v in tensors.items()})
    return state, metadata
