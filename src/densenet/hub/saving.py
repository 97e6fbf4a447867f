"""Writing weights: our safetensors file with the metadata that rebuilds the model, and the
state dict torchvision's own ``DenseNet`` loads."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densenet.hub.loading import unwrap_model
from densenet.io import save_state

WEIGHTS_FORMAT = "densenet-weights"
# What torchvision's DenseNet has fixed: (our DenseNet argument, the only value it can hold).
TORCHVISION_FIXED = (
    ("stem", "imagenet"),
    ("blur", "none"),
    ("compression", 0.5),
    ("global_pool", "avg"),
)


def save_weights(model: nn.Module, path: str | Path, **metadata: Any) -> Path:
    """Write ``model``'s weights as our safetensors file, with JSON metadata.

    The metadata holds the model name, its full constructor arguments (``model_config``) and its
    ``pretrained_cfg``, so ``create_model(pretrained=path)`` rebuilds it; ``metadata`` adds any
    JSON-able fields (e.g. ``class_names``, ``dataset``).
    """
    net = unwrap_model(model)
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
    net = unwrap_model(model)
    config = net.config
    problems = [
        f"{key}={config[key]!r} (torchvision: {want!r})"
        for key, want in TORCHVISION_FIXED
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
