"""What ``create_model(pretrained=...)`` points at, and what the weights say about the model.

:func:`resolve_source` turns a registry tag, URL or file into a :class:`Source` (downloaded,
read, in our key layout); the functions below read off it the architecture, input channels,
class count and eval-time config (``pretrained_cfg``) the model is built with.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch

from densenet.catalog import imagenet_class_names
from densenet.hub.download import cache_dir, download, download_weights
from densenet.hub.formats import FIRST_CONV, load_state_dict_file
from densenet.hub.registry import WEIGHTS, Weights, list_weights
from densenet.io import CheckpointError
from densenet.messages import did_you_mean
from densenet.zoo import ModelSpec, get_model_spec, list_models


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
            + _model_args_hint(source.state_dict, guess)
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
        tag=None,
        mean=spec.mean,
        std=spec.std,
        input_size=spec.input_size,
        crop_pct=spec.crop_pct,
        interpolation=spec.interpolation,
        num_classes=spec.num_classes,
    )
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
        cfg["class_names"] = list(imagenet_class_names())
    cfg["mean"] = _channels(tuple(cfg["mean"]), in_chans)
    cfg["std"] = _channels(tuple(cfg["std"]), in_chans)
    cfg["input_size"] = (in_chans, *tuple(cfg["input_size"])[-2:])
    return cfg


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


def _model_args_hint(state_dict: dict[str, torch.Tensor], guess: str | None) -> str:
    """For weights of no registered layout: the same arguments as the command line's
    ``--model-args`` (a YAML mapping)."""
    arch = infer_architecture(state_dict)
    if arch is None or guess is None or not guess.startswith("DenseNet("):
        return ""
    values = ", ".join(f"{k}: {list(v) if isinstance(v, tuple) else v}" for k, v in arch.items())
    return f" (command line: --model NAME --model-args '{{{values}}}' --pretrained FILE)"


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
