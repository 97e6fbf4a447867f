"""densenet: the reference DenseNet library and toolkit for PyTorch."""

from densenet.models import DenseNet, FeatureExtractor
from densenet.zoo import (
    cifar_densenet,
    count_macs,
    count_parameters,
    create_model,
    get_model_spec,
    list_models,
)

__all__ = [
    "DenseNet",
    "FeatureExtractor",
    "cifar_densenet",
    "count_macs",
    "count_parameters",
    "create_model",
    "get_model_spec",
    "list_models",
]
__version__ = "0.1.0"
