"""Safe files: atomic writes and safetensors-plus-JSON state files that never unpickle anything.

A state file is one ``.safetensors`` file. Its tensors are the leaves of a nested structure (dicts,
lists, tuples); everything else (numbers, strings, None, the structure itself) is JSON in the
safetensors header's metadata, next to free-form JSON ``metadata`` (model name, arguments, ...) and
a SHA-256 checksum of all of it, so a file damaged after it was written is refused, not loaded.

Writes are atomic: a file is either the complete new version or the previous one, whatever happens
(a kill -9, a full disk, a power cut after the fsync). A write that fails raises
:class:`WriteError` naming the file and saying that the previous version is intact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import stat
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

TREE_KEY = "densenet.tree"
META_KEY = "densenet.metadata"
FORMAT_KEY = "densenet.format"
CHECKSUM_KEY = "densenet.sha256"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint or weights file; the message names it."""


class WriteError(OSError, ValueError):
    """A file could not be written (full disk, no permission, ...); the previous one is intact.

    An ``OSError`` with the original ``errno`` and the path as ``filename``; also a ``ValueError``,
    so command-line tools report it as one line, like other user-facing errors.
    """

    def __str__(self) -> str:
        return str(self.strerror)


# --- atomic writes ------------------------------------------------------------------------------
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
# Temporary files: ".<name>.<host>-<pid>-<random>.tmp" beside the target, so that one left behind
# by a killed process can be recognized (same host, dead pid) and removed by a later write.
_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write ``path`` so that it is either the complete new file or the old one, never partial.

    ``write(f)`` fills a temporary file in the same directory, which is flushed, fsynced and
    renamed over ``path``. On any error the temporary file is removed and ``path`` is untouched;
    an ``OSError`` (a full disk, no permission, a read-only file system) becomes a
    :class:`WriteError` naming ``path`` and saying so. A replaced file keeps its permissions; a
    new one gets the usual ``0o666 & ~umask``. Temporary files left in the directory by writers
    on this machine that were killed (kill -9, power loss) are removed after a successful write.
    """
    path = Path(path)
    existed = path.exists()
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.{_HOST}-{os.getpid()}-", suffix=".tmp", dir=path.parent
        )
        with os.fdopen(fd, mode) as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _mode_for(path))
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise _write_error(path, error, existed) from error
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    remove_stale_temporary_files(path.parent)
    return path


def _write_error(path: Path, error: OSError, existed: bool) -> WriteError:
    reason = error.strerror or str(error)
    if error.errno in _DISK_FULL:
        reason = f"the disk is full ({reason}); free some space or write elsewhere"
    kept = f"the previous {path.name} is intact" if existed else "no partial file was left behind"
    return WriteError(error.errno, f"could not write {path}: {reason}; {kept}", str(path))


def _mode_for(path: Path) -> int:
    """The permissions of the file being replaced, or what ``open()`` would give a new file."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    return 0o666 & ~_umask()


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it (briefly) and back
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process
    return True


def remove_stale_temporary_files(directory: str | Path) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` in ``directory`` whose writer is dead.

    Only files written from this machine (by host name) by a process that no longer exists are
    removed; the temporary files of live writers are left alone. Returns the removed paths.
    """
    if os.name != "posix":  # os.kill(pid, 0) is not a liveness check elsewhere
        return []
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = _TEMP.match(entry.name)
            if match is None or match["host"] != _HOST:
                continue
            pid = int(match["pid"])
            if pid == os.getpid() or _alive(pid):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


# --- state files --------------------------------------------------------------------------------
def _split(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replace each tensor leaf of ``obj`` by a reference into ``tensors``; return the JSON tree."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)):
                raise TypeError(
                    f"state keys must be str or int, got {type(k).__name__} at {prefix!r}"
                )
        return {
            "__dict__": [
                [k, _split(v, tensors, f"{prefix}.{k}" if prefix else str(k))]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, (list, tuple)):
        items = [
            _split(v, tensors, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(obj)
        ]
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


def _checksum(header: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the structure, the metadata and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for key in (FORMAT_KEY, TREE_KEY, META_KEY):
        digest.update(json.dumps([key, header.get(key)]).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def save_state(path: str | Path, state: Any, metadata: dict | None = None) -> Path:
    """Atomically write a nested ``state`` (tensors, dicts, lists, numbers, strings) to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, tensors, "")
    header = {
        FORMAT_KEY: FORMAT_VERSION,
        TREE_KEY: json.dumps(tree),
        META_KEY: json.dumps(metadata or {}),
    }
    header[CHECKSUM_KEY] = _checksum(header, tensors)
    # Tied or shared tensors must be separate buffers for safetensors.
    data = safetensors_save({k: v.clone() for k, v in tensors.items()}, metadata=header)
    return atomic_write(path, lambda f: f.write(data))


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
ZIP_MAGIC = b"PK\x03\x04"  # a zip's first local file header: torch.save's format since 1.6
PICKLE_PROTOCOLS = range(2, 6)  # PROTO opcode 0x80 then the protocol; torch.save's legacy format


class _Header(NamedTuple):
    header: dict | None  # the parsed header of a whole safetensors file, else None
    problem: str = ""  # why it is not one
    damaged: bool = False  # a safetensors header that parses, over missing or extra data


def _safetensors_header(f: BinaryIO, file_size: int) -> _Header:
    """What ``f`` holds as a safetensors file, decided by its structure, not a byte: an 8-byte
    little-endian header length, that many bytes of a JSON object, and tensors whose
    ``data_offsets`` tile the rest of the file exactly."""
    f.seek(0)
    size_bytes = f.read(8)
    if len(size_bytes) < 8:
        return _Header(None, f"file is empty or truncated ({file_size} bytes)")
    size = int.from_bytes(size_bytes, "little")
    if size > MAX_HEADER_BYTES:
        return _Header(None, f"not a safetensors file (bad header length {size})")
    if size > file_size - 8:
        if f.read(1) == b"{":  # a JSON header that starts but does not fit: cut short
            return _Header(
                None, f"its header claims {size} bytes, the whole file has {file_size}", True
            )
        return _Header(None, f"not a safetensors file (bad header length {size})")
    try:
        header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return _Header(None, f"not a safetensors file ({error})")
    if not isinstance(header, dict):
        return _Header(None, "not a safetensors file (header is not a JSON object)")
    if not isinstance(header.get("__metadata__") or {}, dict):
        return _Header(None, "not a safetensors file (__metadata__ is not an object)")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            return _Header(
                None, f"not a safetensors file (tensor {name!r} has no valid data_offsets)"
            )
        spans.append(tuple(offsets))
    data_bytes, end = file_size - 8 - size, 0
    for start, stop in sorted(spans):
        if start != end:
            return _Header(None, f"tensor data has a gap or overlap at byte {start}", damaged=True)
        end = stop
    if end != data_bytes:
        return _Header(
            None, f"its tensors need {end} data bytes, it has {data_bytes}", damaged=True
        )
    return _Header(header)


def file_kind(path: str | Path) -> str:
    """What ``path`` holds, recognized by its structure: ``'safetensors'`` (a header that parses
    and covers the file), ``'zip'`` (torch.save since 1.6: local header and central directory),
    ``'pickle'`` (torch.save's legacy format: a PROTO opcode) or ``'unknown'``.

    The checks run in that order because the first byte alone is ambiguous: a safetensors header
    length may start with 0x80, pickle's PROTO opcode.
    """
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        if _safetensors_header(f, file_size).header is not None:
            return "safetensors"
        f.seek(0)
        head = f.read(4)
        if head == ZIP_MAGIC and zipfile.is_zipfile(f):
            return "zip"
    if len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        return "pickle"
    return "unknown"


AGAIN = "copy or download it again"


def folder_reason(path: str | Path) -> str:
    """Why the folder ``path`` is not a weights file, saying which file to give instead."""
    best = Path(path, "checkpoints", "best.safetensors")
    if best.is_file():
        return f"a run directory, not a checkpoint file: give {best} (or last.safetensors)"
    return "a folder, not a checkpoint file: give the .safetensors or .pth file itself"


def exported_model_reason(path: str | Path, kind: str) -> str | None:
    """Why ``path``, of :func:`file_kind` ``kind``, is not a weights file when it is an exported
    model (what ``densenet export`` writes: a ``torch.export`` .pt2 zip or an ONNX graph),
    recognized by its structure; else None. The end of a one-line error that starts with the
    file name."""
    if kind == "zip":
        with zipfile.ZipFile(path) as archive:
            if any(n.endswith("archive_format") for n in archive.namelist()):
                return (
                    "an exported torch.export program (.pt2), not a weights file: run it with "
                    "torch.export.load(path).module(), or give the .safetensors checkpoint it "
                    "was exported from"
                )
        return None
    if kind != "unknown":
        return None  # safetensors or a pickle: weights
    with open(path, "rb") as f:
        head = f.read(3)
    # An ONNX ModelProto starts with ir_version (field 1, varint) then a field of tag 0x12..0x3a.
    if len(head) == 3 and head[0] == 0x08 and head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x3A):
        return (
            "an ONNX graph (e.g. from densenet export), not a weights file: run it with "
            "onnxruntime or OpenVINO, or give the .safetensors checkpoint it was exported from"
        )
    return None


def unknown_file_reason(path: str | Path) -> str:
    """Why ``path`` is none of the kinds of :func:`file_kind`: the end of a one-line error that
    starts with the file name, saying what to do."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size < 8:  # shorter than any weights file: an interrupted copy or download
            return f"empty or truncated file ({file_size} bytes); {AGAIN}"
        if f.read(4) == ZIP_MAGIC:
            return f"damaged or truncated torch.save (zip) file: no central directory; {AGAIN}"
        sniffed = _safetensors_header(f, file_size)
    if sniffed.damaged:
        return f"damaged or truncated safetensors file ({sniffed.problem}); {AGAIN}"
    return (
        f"not a weights file: neither safetensors nor a torch.save file ({sniffed.problem}); "
        "pass a .safetensors or .pth weights file"
    )


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata our safetensors files carry (model, class names, mean/std, ...); {}
    for any other file, a missing one included."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(read_header(path).get(META_KEY, "{}"))
    except (CheckpointError, OSError, ValueError):
        return {}


def read_header(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of ``path`` (raises :class:`CheckpointError` if not one)."""
    path = Path(path)
    with open(path, "rb") as f:
        sniffed = _safetensors_header(f, os.fstat(f.fileno()).st_size)
    if sniffed.header is None:
        kind = file_kind(path)
        if kind != "unknown":
            raise CheckpointError(
                f"{path}: not a safetensors file (it is a torch.save {kind} file); state files "
                "and checkpoints are safetensors, weights from .pth files load with "
                "create_model(pretrained=...)"
            )
        raise CheckpointError(f"{path}: {unknown_file_reason(path)}")
    return sniffed.header.get("__metadata__") or {}


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Any, dict]:
    """Read a file written by :func:`save_state`: ``(state, metadata)``.

    Raises :class:`CheckpointError` naming the file for a missing, truncated or corrupt file,
    including one whose contents no longer match the checksum written with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    header = read_header(path)
    try:
        tensors = safetensors_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({error})") from None
    if CHECKSUM_KEY in header and _checksum(header, tensors) != header[CHECKSUM_KEY]:
        raise CheckpointError(
            f"{path}: corrupt file: its contents do not match the SHA-256 checksum written with "
            "it (damaged after it was saved: a failing disk, an incomplete copy or an edit); use "
            "another copy or an earlier checkpoint"
        )
    try:
        metadata = json.loads(header.get(META_KEY, "{}"))
    except (json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{path}: damaged metadata ({error})") from None
    if TREE_KEY not in header:  # a plain safetensors weights file (e.g. from the hub)
        state: Any = tensors
    else:
        try:
            state = _join(json.loads(header[TREE_KEY]), tensors)
        except (KeyError, json.JSONDecodeError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: damaged state structure ({error})") from None
    if str(map_location) != "cpu":
        state = _join(
            _split(state, tensors := {}, ""), {k: v.to(map_location) for k, v in tensors.items()}
        )
    return state, metadata
