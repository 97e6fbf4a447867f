"""Downloads: hash-checked, cached in torch.hub's checkpoint folder, resumable.

A download must match the SHA256 its registry entry stores (the full digest, or the prefix
published in the file name); entries with no published hash (timm's Hugging Face files) are only
checked later for being complete, readable weights files, and say so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm.auto import tqdm

from densenet.hub.registry import get_weights
from densenet.io import CheckpointError
from densenet.messages import notice

CHUNK_BYTES = 1 << 20


def cache_dir() -> Path:
    """Where downloads are kept: torch.hub's checkpoint cache (shared with torchvision)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_ok(path: Path, sha256: str | None) -> bool:
    return sha256 is None or _sha256(path).startswith(sha256.lower())


@contextlib.contextmanager
def _open_url(url: str, offset: int) -> Iterator[tuple[BinaryIO, int | None, bool]]:
    """``(stream, total size or None, resumed)``: the stream starts at ``offset`` if resumed."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        size = path.stat().st_size
        resumed = 0 < offset <= size
        with open(path, "rb") as f:
            f.seek(offset if resumed else 0)
            yield f, size, resumed
        return
    headers = {"User-Agent": "densenet"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
        resumed = offset > 0 and r.status == 206
        length = r.headers.get("Content-Length")
        total = int(length) + (offset if resumed else 0) if length else None
        yield r, total, resumed


def download(url: str, dest: str | Path, sha256: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` unless a good copy is there; return ``dest``.

    Bytes go to ``dest + ".partial"`` first; an interrupted download resumes from it (HTTP Range
    when the server supports it; ``file://`` always). The complete file must match ``sha256`` (a
    full hex digest or a prefix); a mismatch deletes it and raises :class:`CheckpointError`. Only
    then is it renamed to ``dest``. A cached ``dest`` that fails the check is deleted and fetched
    again.
    """
    dest = Path(dest)
    if dest.is_file():
        if _hash_ok(dest, sha256):
            return dest
        notice(f"{dest}: cached file fails its hash check; deleting it and downloading again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    offset = partial.stat().st_size if partial.is_file() else 0
    try:
        with _open_url(url, offset) as (stream, total, resumed):
            if not resumed:
                offset = 0  # the server ignores Range: start again
            _copy_with_progress(stream, partial, offset, total, dest.name, progress)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not offset:  # 416: the partial file is longer than the file
            raise CheckpointError(f"download of {url} failed ({error})") from None
        partial.unlink()
        return download(url, dest, sha256, progress)
    except OSError as error:  # urllib's URLError, connection resets, a full disk
        arrived = partial.stat().st_size if partial.is_file() else 0
        kept = (
            f"{partial} keeps the {arrived:,} bytes that arrived and the next attempt resumes "
            "from it"
            if arrived
            else "nothing arrived"
        )
        raise CheckpointError(f"download of {url} failed ({error}); {kept}") from None
    size = partial.stat().st_size
    if total is not None and size < total:
        raise CheckpointError(
            f"download of {url} is incomplete ({size} of {total} bytes); try again to resume"
        )
    if (total is not None and size > total) or not _hash_ok(partial, sha256):
        actual = _sha256(partial)
        partial.unlink()
        raise CheckpointError(
            f"download of {url} does not match its SHA256 (expected {sha256}..., got {actual}, "
            f"{size} bytes); the file was deleted. The server copy may have changed or been "
            "tampered with."
        )
    os.replace(partial, dest)
    return dest


def _copy_with_progress(
    stream: BinaryIO, partial: Path, offset: int, total: int | None, name: str, progress: bool
) -> None:
    bar = tqdm(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        disable=not progress,
        file=sys.stderr,
    )
    with bar, open(partial, "ab" if offset else "wb") as f:
        while chunk := stream.read(CHUNK_BYTES):
            f.write(chunk)
            bar.update(len(chunk))


def download_weights(tag: str, progress: bool = True) -> Path:
    """The local file of registry weights ``tag``, downloaded into :func:`cache_dir` if needed."""
    weights = get_weights(tag)
    if not weights.sha256:
        notice(f"{tag}: hash check: {weights.hash_checked}")
    return download(weights.url, cache_dir() / weights.file_name, weights.sha256, progress)
