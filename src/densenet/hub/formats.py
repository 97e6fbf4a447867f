"""Pretrained weights: the registry, hash-checked downloads, and loading any DenseNet state dict.

Loads, into :class:`~densenet.models.DenseNet`, the weights of

- torchvision (also the legacy ``norm.1`` / ``conv.2`` keys of its published files) and timm,
  whose module names are ours;
- third-party layouts listed in :data:`KEY_LAYOUTS` (rule tables of regex renames);
- our own files (:func:`save_weights`, training checkpoints): safetensors plus JSON metadata naming
  the architecture, so ``create_model(pretrained=path)`` rebuilds it.

A file's kind is recognized by its structure (:func:`densenet.io.file_kind`), never by its name
or first byte. ``torch.save`` files (zip or legacy) are read with ``torch.load(weights_only=True)``
only: a pickle that would run code is refused. The state dict is found however checkpoints wrap
it (nesting, EMA copies, ``module.``/``model.``/``_orig_mod.`` prefixes); BatchNorm counters that
old files lack start at 0, as in torchvision. Every problem with a file is a
:class:`~densenet.io.CheckpointError` that names it.

Hashes: a registry entry stores the file's full SHA256 where it is published, else the prefix in
its file name (torchvision's convention, the only part ``torch.hub`` checks). A download must match
what is stored (the full digest, or the prefix); entries with no published hash (timm's Hugging
Face files) are only checked for being complete, readable weights files, and say so.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import os
import pickle
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn
from tqdm.auto import tqdm

from densenet.io import CheckpointError, file_kind, load_state, save_state, unknown_file_reason
from densenet.messages import did_you_mean
from densenet.models import DenseNet, FeatureExtractor
from densenet.zoo import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, get_model_spec, list_models

WEIGHTS_FORMAT = "densenet-weights"
CHUNK_BYTES = 1 << 20


def notice(message: str) -> None:
    """A one-line message to the user on stderr (never silent, never an exception)."""
    print(f"densenet: {message}", file=sys.stderr)


# --- registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    """One published set of weights, like a member of torchvision's ``Weights`` enums.

    ``sha256`` is the file's full hex digest, or the prefix published in its file name when the
    full digest is not (``None`` when nothing is published). ``top1``/``top5`` are accuracies in %
    on the ImageNet-1k validation set as reported by ``metrics_source``, with this entry's eval
    transform (``input_size``, ``crop_pct``, ``interpolation``).
    """

    tag: str
    url: str
    sha256: str | None
    license: str
    top1: float | None
    top5: float | None
    metrics_source: str
    file_name: str
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    file_size: int | None = None  # bytes, where published
    notes: str = field(default="", compare=False)

    @property
    def model_name(self) -> str:
        return self.tag.split(".", 1)[0]

    @property
    def hash_checked(self) -> str:
        if not self.sha256:
            return "none published (only completeness and format are checked)"
        return "full SHA256" if len(self.sha256) == 64 else f"SHA256 prefix {self.sha256!r}"

    def cfg(self) -> dict:
        """The eval-time config models built with these weights carry as ``pretrained_cfg``."""
        return dict(
            tag=self.tag, mean=self.mean, std=self.std, input_size=self.input_size,
            crop_pct=self.crop_pct, interpolation=self.interpolation,
            num_classes=self.num_classes,
        )  # fmt: skip


WEIGHTS: dict[str, Weights] = {}

TV_LICENSE = "BSD-3-Clause (torchvision; ported from the authors' LuaTorch models)"
TV_SOURCE = "torchvision {cls}.IMAGENET1K_V1 meta (resize 256 bilinear, center crop 224)"
TIMM_SOURCE = "timm results-imagenet.csv"


def _register(weights: Weights) -> None:
    if weights.tag in WEIGHTS:
        raise ValueError(f"weights {weights.tag!r} registered twice")
    WEIGHTS[weights.tag] = weights


def _torchvision(
    model: str, file_name: str, sha256: str, top1: float, top5: float, size: int | None
):
    url = f"https://download.pytorch.org/models/{file_name}"
    cls = f"DenseNet{model.removeprefix('densenet')}_Weights"
    _register(
        Weights(
            tag=f"{model}.tv_in1k", url=url, sha256=sha256, license=TV_LICENSE, top1=top1,
            top5=top5, metrics_source=TV_SOURCE.format(cls=cls), file_name=file_name,
            interpolation="bilinear", file_size=size,
        )
    )  # fmt: skip


def _timm(tag: str, top1: float, top5: float | None, notes: str):
    # timm serves these from the Hugging Face hub; the file names are all the same there.
    _register(
        Weights(
            tag=tag, url=f"https://huggingface.co/timm/{tag}/resolve/main/model.safetensors",
            sha256=None, license="Apache-2.0 (timm)", top1=top1, top5=top5,
            metrics_source=f"{TIMM_SOURCE} (@224, crop 0.875, bicubic)",
            file_name=f"{tag}.safetensors", notes=notes,
        )
    )  # fmt: skip


# Full SHA256 where published alongside the file; the 8-digit file-name prefix otherwise.
_torchvision("densenet121", "densenet121-a639ec97.pth",
             "a639ec97d7c33b07ae66f0b5fb7d0192f95a3b11b7576c66c0126c2a727c4395", 74.434, 91.972,
             32342954)  # fmt: skip
_torchvision("densenet161", "densenet161-8d451a50.pth",
             "8d451a50bad6b9a83f477126c443716882a17af26e94d338154b058fb2dfd359", 77.138, 93.560,
             None)  # fmt: skip
_torchvision("densenet169", "densenet169-b2777c0a.pth", "b2777c0a", 75.600, 92.806, None)
_torchvision("densenet201", "densenet201-c1103571.pth", "c1103571", 76.896, 93.370, None)
_timm("densenet121.ra_in1k", 75.574, None, "RandAugment recipe; 76.486 top-1 @288, crop 0.95")
_timm("densenetblur121d.ra_in1k", 76.574, 93.190, "77.320 top-1 @288, crop 0.95")


def list_weights(pattern: str = "*") -> list[str]:
    """Sorted registry tags matching a shell-style ``pattern`` (e.g. ``"densenet121.*"``)."""
    return sorted(tag for tag in WEIGHTS if fnmatch.fnmatch(tag, pattern))


def get_weights(tag: str) -> Weights:
    """The registry entry of ``tag``; a ``ValueError`` suggesting the nearest tags otherwise."""
    if tag in WEIGHTS:
        return WEIGHTS[tag]
    hint = did_you_mean(tag, WEIGHTS, cutoff=0.5)
    raise ValueError(f"unknown weights {tag!r}{hint} (densenet.list_weights() lists all)")


# --- downloads ----------------------------------------------------------------------------------


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
        raise CheckpointError(
            f"download of {url} failed ({error}); {partial} keeps what arrived and the next "
            "attempt resumes from it"
        ) from None
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
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
        disable=not progress, file=sys.stderr,
    )  # fmt: skip
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


# --- reading weights files ----------------------------------------------------------------------


# Plain-data classes that real checkpoints pickle besides tensors, safe to rebuild: timm's train
# script stores its command-line arguments (``"args"``) as an argparse.Namespace.
_SAFE_CLASSES = [argparse.Namespace]


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_SAFE_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        if "weights only" not in reason.lower():  # e.g. "pickle data was truncated"
            raise CheckpointError(f"{path}: corrupt or truncated PyTorch file ({reason})") from None
        raise CheckpointError(
            f"{path}: refused to load: it contains Python objects other than tensors and plain "
            f"containers, which could run code when unpickled ({reason}). Only load it with "
            "torch.load(weights_only=False) if you trust its source, then save its state_dict()."
        ) from None
    except Exception as error:  # damaged data fails anywhere in the unpickler: EOFError,
        # RuntimeError, IndexError (a truncated legacy file), ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch file ({reason})") from None


# Where checkpoints keep the weights, tried in this order: the trained model (ours and most
# scripts: "model"; timm's train script and Lightning: "state_dict"), then an EMA copy (ours:
# "ema"; timm's: "state_dict_ema" / "model_ema"), used only when the file holds nothing else.
_WEIGHTS_KEYS = ("model", "state_dict", "model_state_dict", "net", "network", "module")
_EMA_KEYS = ("ema", "state_dict_ema", "model_ema", "ema_state_dict", "model_ema_state_dict")
# Prefixes that wrappers add to every key: DataParallel/DDP, a model held as ``self.model``
# (Lightning modules, our FeatureExtractor), torch.compile.
_KEY_PREFIXES = ("module.", "model.", "_orig_mod.")
_NESTING = 3  # how deep state dicts are looked for, e.g. {"model": {"state_dict": ...}}


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _find_state_dict(obj: Any, depth: int = 0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(state dict, the keys leading to it)`` in a checkpoint; ``LookupError`` if none."""
    if _is_state_dict(obj):
        return obj, []
    if isinstance(obj, dict) and depth < _NESTING:
        for key in (*_WEIGHTS_KEYS, *_EMA_KEYS):
            if isinstance(obj.get(key), dict):
                with contextlib.suppress(LookupError):
                    found, where = _find_state_dict(obj[key], depth + 1)
                    return found, [key, *where]
    raise LookupError


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the wrapper prefixes (:data:`_KEY_PREFIXES`) that all its keys share."""
    while prefix := next((p for p in _KEY_PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _unwrap(state: Any, path: Path, announce: bool = True) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint ``state``, wrapper prefixes removed.

    ``announce``: say on stderr which entry was used when the file also holds EMA weights.
    """
    try:
        found, where = _find_state_dict(state)
    except LookupError:
        found_keys = list(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path}: no state dict found (expected a dict of tensors, or one under "
            f"{'/'.join(_WEIGHTS_KEYS + _EMA_KEYS)}; found {found_keys})"
        ) from None
    if announce and where and where[0] in _WEIGHTS_KEYS:
        ema = [k for k in _EMA_KEYS if isinstance(state.get(k), dict)]
        if ema:
            notice(
                f"{path}: using the weights under {where[0]!r}; the EMA weights under "
                f"{ema[0]!r} are not used"
            )
    return _strip_prefixes(dict(found))


def load_state_dict_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, metadata)`` of a weights or checkpoint file, in our key layout.

    The file's kind is recognized by its structure (:func:`densenet.io.file_kind`), never by its
    name: our safetensors files (weights or training checkpoints) and plain ``.safetensors``;
    ``torch.save`` files, zip or legacy, via ``torch.load(weights_only=True)``. The state dict is
    found inside training checkpoints (``model``/``state_dict``/... entries, an EMA copy when
    there is nothing else), stripped of ``module.``/``model.``/``_orig_mod.`` prefixes, and
    torchvision's legacy keys and the layouts of :data:`KEY_LAYOUTS` are renamed. Tensors keep
    their dtype (fp16 files load into float32 models by ``load_state_dict``'s copy). ``metadata``
    is our files' JSON metadata (model name and arguments), else empty. Raises
    :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    kind = file_kind(path)
    if kind == "safetensors":
        state, metadata = load_state(path)
    elif kind in ("zip", "pickle"):
        state, metadata = _torch_load(path), {}
    else:
        raise CheckpointError(f"{path}: {unknown_file_reason(path)}")
    return remap_state_dict(_unwrap(state, path, announce=not metadata)), metadata


# --- key layouts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyLayout:
    """A foreign key naming: applies when any key matches ``detect``; then each key is renamed by
    the first matching ``(pattern, template)`` rule. Templates use the pattern's named groups, and
    ``{n}`` for a group ``n0`` holding a 0-based index (so it becomes ``int(n0) + 1``)."""

    name: str
    detect: str
    rules: tuple[tuple[str, str], ...]


KEY_LAYOUTS = (
    # torchvision's published files predate the removal of '.' from module names (vision PR #474).
    KeyLayout(
        "torchvision legacy (norm.1/conv.2)",
        r"denselayer\d+\.(norm|conv)\.[12]\.",
        ((r"^(?P<head>.*denselayer\d+\.(?:norm|relu|conv))\.(?P<tail>[12]\..*)$", "{head}{tail}"),),
    ),
    # github.com/JasonWei05/DenseNet (CIFAR): block.i.{bn1,conv1,bn2,conv2}, bn, fc.
    KeyLayout(
        "JasonWei05/DenseNet",
        r"^features\.denseblock\d+\.block\.\d+\.bn1\.",
        (
            (r"^conv0\.(?P<t>.*)$", "features.conv0.{t}"),
            (
                r"^features\.denseblock(?P<b>\d+)\.block\.(?P<i0>\d+)\.bn(?P<j>[12])\.(?P<t>.*)$",
                "features.denseblock{b}.denselayer{i}.norm{j}.{t}",
            ),
            (
                r"^features\.denseblock(?P<b>\d+)\.block\.(?P<i0>\d+)\.conv(?P<j>[12])\.(?P<t>.*)$",
                "features.denseblock{b}.denselayer{i}.conv{j}.{t}",
            ),
            (r"^features\.transition(?P<b>\d+)\.bn\.(?P<t>.*)$", "features.transition{b}.norm.{t}"),
            (r"^bn\.(?P<t>.*)$", "features.norm5.{t}"),
            (r"^fc\.(?P<t>.*)$", "classifier.{t}"),
        ),
    ),
)


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, template in rules:
        match = re.match(pattern, key)
        if match:
            groups = match.groupdict()
            groups.update({k[:-1]: int(v) + 1 for k, v in groups.items() if k.endswith("0")})
            return template.format(**groups)
    return key


def remap_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of every known foreign layout (:data:`KEY_LAYOUTS`) to ours."""
    for layout in KEY_LAYOUTS:
        if any(re.search(layout.detect, key) for key in state_dict):
            state_dict = {_rename(k, layout.rules): v for k, v in state_dict.items()}
    return state_dict


# --- sources: what ``create_model(pretrained=...)`` points at ---------------------------------


@dataclass
class Source:
    """Resolved ``pretrained=`` argument: the loaded state dict and where it came from."""

    description: str  # the tag, file or URL, for messages
    state_dict: dict[str, torch.Tensor]
    metadata: dict
    weights: Weights | None = None


def _is_url(text: str) -> bool:
    return urllib.parse.urlparse(text).scheme in ("http", "https", "file")


def _tag_for(name: str | None) -> str:
    if name is None:
        raise ValueError("pretrained=True needs a model name (or pass a weights tag or file)")
    if "." in name:
        return name
    default = get_model_spec(name).default_weights
    if default is None:
        available = ", ".join(list_weights()) or "none"
        raise ValueError(
            f"{name} has no published weights; pass pretrained= a file or URL, or use one of: "
            f"{available}"
        )
    return default


def resolve_source(
    name: str | None, pretrained: bool | str | Path | None, progress: bool = True
) -> Source | None:
    """Fetch and read the weights ``pretrained`` names (None when it is None/False).

    ``pretrained``: True (``name``'s tag, or the model's default weights), a registry tag, a
    registry URL (hash-checked), any http(s)/file URL (downloaded into the cache), or a local file.
    """
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        pretrained = _tag_for(name)
    text = str(pretrained)
    by_url = {w.url: w for w in WEIGHTS.values()}
    weights = WEIGHTS.get(text) or by_url.get(text)
    if weights is not None:
        if name is not None and get_model_spec(name).name != weights.model_name:
            raise ValueError(
                f"weights {weights.tag} are for {weights.model_name}, not {name}; use "
                f"create_model({weights.tag!r}, pretrained=True)"
            )
        path = download_weights(weights.tag, progress)
        description = f"{weights.tag} ({path})"
    elif _is_url(text):
        file_name = Path(urllib.parse.urlparse(text).path).name or "weights"
        path = download(text, cache_dir() / file_name, progress=progress)
        description = text
    else:
        path = Path(text).expanduser()
        if not path.exists():
            hint = did_you_mean(text, WEIGHTS)
            raise ValueError(
                f"pretrained={text!r} is no weights tag, URL or existing file{hint} "
                "(densenet.list_weights() lists the tags)"
            )
        description = str(path)
    state_dict, metadata = load_state_dict_file(path)
    return Source(description, state_dict, metadata, weights)


def architecture_of(source: Source) -> tuple[ModelSpec, dict]:
    """``(model spec, DenseNet kwargs)`` saved in our file's metadata.

    An architecture that is no registered name (e.g. ``cifar_densenet(52, 12)``) gets a spec of
    its own, built from the saved arguments.
    """
    name = source.metadata.get("model")
    config = _saved_config(source)
    if config is None:
        guess = suggest_architecture(source.state_dict)
        raise CheckpointError(
            f"{source.description}: the file does not say which architecture it holds (no "
            f"'model_config' metadata); pass the model name, e.g. create_model(NAME, "
            f"pretrained=...){'; the weights look like ' + guess if guess else ''}"
        )
    config = {k: v for k, v in config.items() if k not in ("in_chans", "num_classes")}
    if name and name.split(".", 1)[0] in list_models():
        return get_model_spec(name), config
    family = "cifar" if str(config.get("stem", "")).startswith("cifar") else "imagenet"
    return ModelSpec(name=name or "densenet", kwargs={}, family=family), config


def _saved_config(source: Source) -> dict | None:
    """The DenseNet arguments our file's metadata records (``model_config``), else None."""
    config = source.metadata.get("model_config") or source.metadata.get("config")
    return config if isinstance(config, dict) else None


def saved_kwargs(spec: ModelSpec, source: Source) -> dict:
    """DenseNet arguments of our file (``in_chans`` and ``num_classes`` left out) when its
    metadata names ``spec``'s model; empty otherwise (other files, other or unnamed models).

    With them, ``create_model(NAME, pretrained=run_checkpoint)`` rebuilds what was trained
    (``model_args`` such as depth or drop rate included) rather than the registry's default.
    """
    config = _saved_config(source)
    saved_name = source.metadata.get("model")
    if config is None or not saved_name or str(saved_name).split(".", 1)[0] != spec.name:
        return {}
    return {k: v for k, v in config.items() if k not in ("in_chans", "num_classes")}


def in_chans_of(source: Source) -> int | None:
    """Input channels the weights were made for: our metadata's ``model_config``, else the first
    conv's input channels; None if neither says."""
    config = _saved_config(source) or {}
    if isinstance(config.get("in_chans"), int) and config["in_chans"] > 0:
        return config["in_chans"]
    weight = source.state_dict.get(FIRST_CONV)
    return int(weight.shape[1]) if weight is not None and weight.ndim == 4 else None


def num_classes_of(source: Source) -> int:
    """Classifier outputs of the weights; 0 if they have no classifier."""
    weight = source.state_dict.get("classifier.weight")
    return int(weight.shape[0]) if weight is not None else 0


def _channels(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Per-channel normalization for ``in_chans`` inputs, matching :func:`adapt_input_conv`."""
    if in_chans == len(values):
        return tuple(values)
    if in_chans == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(in_chans))


_CFG_KEYS = ("mean", "std", "input_size", "crop_pct", "interpolation")


def pretrained_cfg(spec: ModelSpec, source: Source | None, in_chans: int = 3) -> dict:
    """What evaluation transforms read: mean, std, input_size, crop_pct, interpolation,
    num_classes, class_names (when known) and the weights tag."""
    cfg: dict = dict(
        tag=None, mean=spec.mean, std=spec.std, input_size=spec.input_size,
        crop_pct=spec.crop_pct, interpolation=spec.interpolation, num_classes=spec.num_classes,
    )  # fmt: skip
    if source is not None:
        if source.weights is not None:
            cfg.update(source.weights.cfg())
        else:
            cfg.update(source.metadata.get("pretrained_cfg") or {})
            # training checkpoints record the run's normalization and input at the top level
            cfg.update({k: source.metadata[k] for k in _CFG_KEYS if source.metadata.get(k)})
            cfg["tag"] = cfg.get("tag") or source.description
            cfg["num_classes"] = num_classes_of(source)
        if source.metadata.get("class_names"):
            cfg["class_names"] = list(source.metadata["class_names"])
    if "class_names" not in cfg and cfg["num_classes"] == 1000 and spec.family == "imagenet":
        from densenet.catalog import imagenet_class_names

        cfg["class_names"] = list(imagenet_class_names())
    cfg["mean"] = _channels(tuple(cfg["mean"]), in_chans)
    cfg["std"] = _channels(tuple(cfg["std"]), in_chans)
    cfg["input_size"] = (in_chans, *tuple(cfg["input_size"])[-2:])
    return cfg


# --- loading into a model -----------------------------------------------------------------------

FIRST_CONV = "features.conv0.weight"


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """First-conv weight ``(out, c, kh, kw)`` adapted to ``in_chans`` input channels.

    1 channel: the sum over the input channels (a gray image gives what its RGB copy gave). More:
    the filters repeated cyclically and scaled by ``c / in_chans``, so an input whose channels
    repeat the original ones cyclically gives the same activation scale (as timm).
    """
    chans = weight.shape[1]
    if in_chans == chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // chans)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (chans / in_chans)


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> dict | None:
    """DenseNet kwargs read off a state dict in our layout (None if it is not one)."""
    layers: dict[int, set[int]] = {}
    for key in state_dict:
        match = re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", key)
        if match:
            layers.setdefault(int(match[1]), set()).add(int(match[2]))
    conv2 = state_dict.get("features.denseblock1.denselayer1.conv2.weight")
    if not layers or conv2 is None:
        return None
    deep = "features.conv2.weight" in state_dict
    stem_out = state_dict.get("features.conv2.weight" if deep else FIRST_CONV)
    kernel = state_dict[FIRST_CONV].shape[-1] if FIRST_CONV in state_dict else None
    if deep:
        stem = "deep"
    elif kernel == 7:
        stem = "imagenet"
    else:
        stem = "cifar_bn" if "features.norm0.weight" in state_dict else "cifar"
    return dict(
        growth_rate=int(conv2.shape[0]),
        block_config=tuple(len(layers[b]) for b in sorted(layers)),
        num_init_features=int(stem_out.shape[0]) if stem_out is not None else None,
        bn_size=int(conv2.shape[1]) // int(conv2.shape[0])
        if "features.denseblock1.denselayer1.conv1.weight" in state_dict
        else 0,
        stem=stem,
    )


def _fits(kwargs: dict, arch: dict) -> bool:
    return (
        kwargs.get("growth_rate") == arch["growth_rate"]
        and tuple(kwargs.get("block_config", ())) == arch["block_config"]
        and kwargs.get("num_init_features") == arch["num_init_features"]
        and kwargs.get("stem", "imagenet") == arch["stem"]
    )


def suggest_architecture(state_dict: dict[str, torch.Tensor]) -> str | None:
    """A registered model name, or the DenseNet(...) call, that fits ``state_dict``."""
    arch = infer_architecture(state_dict)
    if arch is None:
        return None
    for name in list_models():
        if _fits(get_model_spec(name).kwargs, arch):
            return name
    return f"DenseNet({', '.join(f'{k}={v!r}' for k, v in arch.items())})"


# BatchNorm's batch counter: absent from files saved before PyTorch 0.4.1 (torchvision's published
# DenseNets among them); BatchNorm's own loader then starts it at 0, and so does ours.
BN_COUNTER = "num_batches_tracked"


def mismatch_report(model: nn.Module, state_dict: dict[str, torch.Tensor], limit: int = 5) -> str:
    """Missing and unexpected keys and differing shapes of ``state_dict`` for ``model`` ('' if
    it fits), ``limit`` of each named. A missing BatchNorm ``num_batches_tracked`` fits: it is
    only a counter, which loading starts at 0 (see :func:`with_bn_counters`)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("." + BN_COUNTER)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: weights {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def with_bn_counters(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict:
    """``state_dict`` with each BatchNorm ``num_batches_tracked`` of ``model`` it lacks set to 0,
    as torchvision's loader ends for its published files (which predate the counter)."""
    counters = {
        k: torch.zeros((), dtype=v.dtype)
        for k, v in model.state_dict().items()
        if k.endswith("." + BN_COUNTER) and k not in state_dict
    }
    return {**state_dict, **counters}


def load_pretrained(model: nn.Module, source: Source | str | Path) -> nn.Module:
    """Copy ``source``'s weights into ``model`` (a :class:`DenseNet`, possibly compiled or
    wrapped); return ``model``.

    ``source``: a :class:`Source`, or anything ``create_model(pretrained=...)`` takes. The first
    conv is adapted to ``model.in_chans``; a classifier of another size is left as it is, with a
    notice. Any other mismatch raises :class:`CheckpointError` listing missing and unexpected keys
    and differing shapes, and suggesting the architecture the weights fit; the model is then
    untouched (checked before anything is copied).
    """
    if not isinstance(source, Source):
        source = resolve_source(None, source)
    net = _unwrap_model(model)
    state_dict = dict(source.state_dict)
    if FIRST_CONV in state_dict:
        state_dict[FIRST_CONV] = adapt_input_conv(state_dict[FIRST_CONV], net.in_chans)
    weight_classes, model_classes = num_classes_of(source), net.num_classes
    # A file without "classifier.weight" but with other classifier keys is partial, not headless.
    headless = not any(k.startswith("classifier.") for k in state_dict)
    if weight_classes != model_classes and (weight_classes or headless):
        notice(
            f"{source.description}: weights have {weight_classes} classes, the model "
            f"{model_classes}; keeping the model's new classifier (train it before use)"
        )
        own = net.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
        state_dict.update({k: v for k, v in own.items() if k.startswith("classifier.")})
    report = mismatch_report(net, state_dict)
    if report:
        guess = suggest_architecture(state_dict)
        hint = f" The weights look like {guess}." if guess else ""
        raise CheckpointError(
            f"{source.description}: the weights do not fit the architecture ({report}).{hint}"
        )
    net.load_state_dict(with_bn_counters(net, state_dict))
    return model


# --- writing ------------------------------------------------------------------------------------


def _unwrap_model(model: nn.Module) -> DenseNet:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DataParallel / DDP
    if isinstance(model, FeatureExtractor):
        model = model.model
    if not isinstance(model, DenseNet):
        raise ValueError(f"expected a densenet.DenseNet, got {type(model).__name__}")
    return model


def save_weights(model: nn.Module, path: str | Path, **metadata: Any) -> Path:
    """Write ``model``'s weights as our safetensors file, with JSON metadata.

    The metadata holds the model name, its full constructor arguments (``model_config``) and its
    ``pretrained_cfg``, so ``create_model(pretrained=path)`` rebuilds it; ``metadata`` adds any
    JSON-able fields (e.g. ``class_names``, ``dataset``).
    """
    net = _unwrap_model(model)
    meta = {
        "format": WEIGHTS_FORMAT,
        "model": getattr(net, "model_name", None),
        "model_config": net.config,
        "pretrained_cfg": getattr(net, "pretrained_cfg", None),
        **metadata,
    }
    state = OrderedDict((k, v.detach().cpu()) for k, v in net.state_dict().items())
    return save_state(path, state, meta)


def to_torchvision_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """``model``'s state dict as torchvision's ``DenseNet`` of the same shape loads it (strict).

    Only what torchvision can build qualifies: 7x7 ImageNet stem, bottleneck layers, compression
    0.5, no blur pooling, average pool and a classifier.
    """
    net = _unwrap_model(model)
    config = net.config
    problems = [
        f"{key}={config[key]!r} (torchvision: {want!r})"
        for key, want in (
            ("stem", "imagenet"),
            ("blur", "none"),
            ("compression", 0.5),
            ("global_pool", "avg"),
        )  # fmt: skip
        if config[key] != want
    ]
    if not config["bn_size"]:
        problems.append("no bottleneck (bn_size=0)")
    if not config["num_classes"]:
        problems.append("no classifier (num_classes=0)")
    if problems:
        raise ValueError(
            f"torchvision's DenseNet cannot hold this model: {', '.join(problems)}; "
            "use save_weights() for our format instead"
        )
    return OrderedDict((k, v.detach().clone()) for k, v in net.state_dict().items())
