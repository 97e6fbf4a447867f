"""densenet: the reference DenseNet library and toolkit for PyTorch."""

from densenet.inference import optimize_for_inference
from densenet.models import DenseNet, FeatureExtractor
from densenet.weights import (
    WEIGHTS,
    Weights,
    get_weights,
    list_weights,
    load_pretrained,
    load_state_dict_file,
    save_weights,
    to_torchvision_state_dict,
)
from densenet.zoo import (
    cifar_densenet,
    count_macs,
    count_parameters,
    create_model,
    get_model_spec,
    list_models,
)

__all__ = [
    "WEIGHTS",
    "DenseNet",
    "FeatureExtractor",
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
    "optimize_for_inference",
    "save_weights",
    "to_torchvision_state_dict",
]
__version__ = "0.1.0"
