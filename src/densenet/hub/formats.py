"""Reading weights files of every form into a state dict in our key layout.

Reads, for :class:`~densenet.models.DenseNet`, the weights of

- torchvision (also the legacy ``norm.1`` / ``conv.2`` keys of its published files) and timm,
  whose module names are ours;
- third-party layouts listed in :data:`KEY_LAYOUTS` (rule tables of regex renames);
- our own files (``save_weights``, training checkpoints): safetensors plus JSON metadata naming
  the architecture.

A file's kind is recognized by its structure (:func:`densenet.io.file_kind`), never by its name
or first byte. ``torch.save`` files (zip or legacy) are read with ``torch.load(weights_only=True)``
only: a pickle that would run code is refused. The state dict is found however checkpoints wrap
it (nesting, EMA copies, ``module.``/``model.``/``_orig_mod.`` prefixes). Every problem with a
file is a :class:`~densenet.io.CheckpointError` that names it.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from densenet.io import (
    CheckpointError,
    exported_model_reason,
    file_kind,
    folder_reason,
    load_state,
    unknown_file_reason,
)
from densenet.messages import notice

# The first convolution's weight, ``(out, in_chans, kh, kw)`` in every stem: its input channels
# are those the weights were made for.
FIRST_CONV = "features.conv0.weight"


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
    if path.is_dir():
        raise CheckpointError(f"{path}: {folder_reason(path)}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    kind = file_kind(path)
    exported = exported_model_reason(path, kind)
    if exported:
        raise CheckpointError(f"{path}: {exported}")
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
