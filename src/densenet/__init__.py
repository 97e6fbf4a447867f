"""densenet: the reference DenseNet library and toolkit for PyTorch.

The public names below are imported on first use (PEP 562), so ``import densenet`` and the
``densenet`` command's ``--help`` stay instant: torch is loaded by the first name that needs it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

# Public name -> the module that defines it.
_EXPORTS = {
    "optimize_for_inference": "densenet.inference",
    "DenseNet": "densenet.models",
    "FeatureExtractor": "densenet.models",
    "WEIGHTS": "densenet.hub.registry",
    "Weights": "densenet.hub.registry",
    "get_weights": "densenet.hub.registry",
    "list_weights": "densenet.hub.registry",
    "load_pretrained": "densenet.hub.loading",
    "load_state_dict_file": "densenet.hub.formats",
    "save_weights": "densenet.hub.saving",
    "to_torchvision_state_dict": "densenet.hub.saving",
    "cifar_densenet": "densenet.factory",
    "count_macs": "densenet.complexity",
    "count_parameters": "densenet.complexity",
    "create_model": "densenet.factory",
    "get_model_spec": "densenet.zoo",
    "list_models": "densenet.zoo",
    "model_complexity": "densenet.complexity",
}

__all__ = [
    "DenseNet",
    "FeatureExtractor",
    "WEIGHTS",
    "Weights",
    "cifar_densenet",
    "count_macs",
    "count_parameters",
    "create_model",
    "get_model_spec",
    "get_weights",
    "list_models",
    "list_weights",
    "load_pretrained",
    "load_state_dict_file",
    "model_complexity",
    "optimize_for_inference",
    "save_weights",
    "to_torchvision_state_dict",
]  # = sorted(_EXPORTS), spelled out for linters and IDEs
__version__ = "0.1.0"

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from densenet.complexity import count_macs, count_parameters, model_complexity
    from densenet.factory import cifar_densenet, create_model
    from densenet.hub.formats import load_state_dict_file
    from densenet.hub.loading import load_pretrained
    from densenet.hub.registry import WEIGHTS, Weights, get_weights, list_weights
    from densenet.hub.saving import save_weights, to_torchvision_state_dict
    from densenet.inference import optimize_for_inference
    from densenet.models import DenseNet, FeatureExtractor
    from densenet.zoo import get_model_spec, list_models


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        # densenet.zoo, densenet.hub, ...: loaded on first use like the names above.
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module 'densenet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
