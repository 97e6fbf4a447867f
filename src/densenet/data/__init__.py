"""Datasets, augmentation recipes and loaders, offline-first.

Small datasets (MNIST, Fashion-MNIST, CIFAR, SVHN) are read once into a ``uint8`` tensor
``(N, C, H, W)`` (:mod:`~densenet.data.datasets`); their loaders hand out whole uint8 batches and
:class:`BatchTransform` normalizes and augments a batch in a few tensor ops (on the GPU when
training there), so no per-image Python runs. File datasets (ImageNet, any class-per-folder tree,
also inside a .zip: :mod:`~densenet.data.folders`) decode images in worker processes with
per-image torchvision transforms from :func:`build_transforms` (:mod:`~densenet.data.transforms`).

Every image file is decoded by :func:`load_image` and converted by :func:`to_channels`'s one
documented rule (:mod:`~densenet.data.images`), in training, evaluation, prediction and
visualization alike. Labels-file datasets (``csv``: images listed in CSV files with ``|``-separated
labels, multi-label or not; :mod:`~densenet.data.labels`) split by group when asked. Folder datasets match class folders by name and hold out part of a folder
that has no split sub-folders (see :func:`build_dataset`). Loaders (:mod:`~densenet.data.loaders`)
draw an order that depends only on the seed and the epoch. What is known about a dataset without
reading it (classes, statistics) lives in :mod:`densenet.catalog`.
"""

from densenet.catalog import DATASETS, DatasetInfo
from densenet.data.build import build_dataset, dataset_info
from densenet.data.datasets import InMemoryImages, MixedSizesError
from densenet.data.folders import (
    FolderImages,
    folder_splits,
    holdout_description,
    holdout_digest,
    holds_out,
    is_data_name,
    split_folder,
)
from densenet.data.images import IMAGE_EXTENSIONS, SKIP_HINT, BadImageError, load_image, to_channels
from densenet.data.labels import LabelsFileImages
from densenet.data.loaders import EpochSampler, build_loader, set_epoch
from densenet.data.transforms import (
    BATCHED_RECIPES,
    INTERPOLATIONS,
    RECIPES,
    BatchTransform,
    build_transforms,
    eval_transform,
)

__all__ = [
    "BATCHED_RECIPES",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "RECIPES",
    "SKIP_HINT",
    "BadImageError",
    "BatchTransform",
    "DatasetInfo",
    "EpochSampler",
    "FolderImages",
    "InMemoryImages",
    "MixedSizesError",
    "LabelsFileImages",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "dataset_info",
    "eval_transform",
    "folder_splits",
    "is_data_name",
    "split_folder",
    "holdout_description",
    "holdout_digest",
    "holds_out",
    "load_image",
    "set_epoch",
    "to_channels",
]
