"""A dataset by name: :func:`dataset_info` (what is known about it) and :func:`build_dataset`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from torch.utils.data import Dataset

from densenet.catalog import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KNOWN,
    TRAIN_TEST,
    DatasetInfo,
    check_dataset_name,
    dataset_entry,
    imagenet_class_names,
)
from densenet.data.datasets import (
    cifar100_classes,
    missing_files,
    read_cifar,
    read_mnist_like,
    read_svhn,
)
from densenet.data.folders import SPLIT_FOLDERS, FolderImages, folder_classes, folder_dataset
from densenet.data.labels import CSV_SPLITS, LabelsFileImages, channel_statistics, read_table


def dataset_info(
    name: str,
    data_dir: str | Path | None = None,
    split_by: str | None = None,
    seed: int = 0,
    task: str = "auto",
) -> DatasetInfo:
    """Classes, normalization and input size of dataset ``name``.

    ``folder`` needs ``data_dir`` (its classes: the class folders of its ``train`` split, else of
    its first split, else its top-level folders); without it the class list is empty and the other
    fields are ImageNet's defaults. ``cifar100`` reads its class names from ``data_dir``.
    ``csv`` reads its labels files (``split_by``, ``seed``: see :func:`build_dataset`): the label
    names and ``task`` of the training rows (``task`` given: that one), the channels (1 when the
    images are gray), mean and std of a sample of training images, input size 224.
    """
    name = check_dataset_name(name)
    if name in KNOWN:
        return KNOWN[name]
    root = Path(data_dir).expanduser() if data_dir else None
    if name == "csv":
        return _labels_file_info(root, split_by, seed, task)
    if name == "cifar100":
        check_data_dir(name, root, False)
        classes = cifar100_classes(root) if root else tuple(str(i) for i in range(100))
        return dataset_entry(name, classes, CIFAR100_MEAN, CIFAR100_STD, (3, 32, 32), TRAIN_TEST)
    if name == "imagenet":
        classes = imagenet_class_names()
        splits: tuple[str, ...] = ("train", "val")
    else:
        check_data_dir(name, root, False)
        classes = tuple(folder_classes(root)) if root else ()
        splits = SPLIT_FOLDERS
    return dataset_entry(name, classes, IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224), splits, False)


def _labels_file_info(root: Path | None, split_by: str | None, seed: int, task: str) -> DatasetInfo:
    if root is None:
        return dataset_entry("csv", (), IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224), CSV_SPLITS)
    check_data_dir("csv", root, False)
    train = LabelsFileImages(read_table(root, split_by, seed), "train", task)
    channels, mean, std = channel_statistics(train)
    info = dataset_entry("csv", tuple(train.classes), mean, std, (channels, 224, 224), CSV_SPLITS)
    return dataclasses.replace(info, in_memory=False, task=train.task)


def check_data_dir(name: str, data_dir: Path | None, download: bool) -> None:
    """A --data-dir that does not exist is an error (a download creates it)."""
    if data_dir is not None and not data_dir.exists() and not (download and name != "folder"):
        raise FileNotFoundError(
            f"--data-dir {data_dir} does not exist (dataset {name}); give the folder that holds "
            "the data" + ("" if name in ("folder", "imagenet") else ", or add --download")
        )


def _split_of(name: str, split: str) -> str:
    """``split`` as dataset ``name`` calls it ('val' and 'test' stand for each other)."""
    splits = dataset_info(name).splits
    if split == "val" and "val" not in splits:
        split = "test"
    if split == "test" and "test" not in splits:
        split = "val"
    if split not in splits and not (name == "folder" and split == "all"):
        raise ValueError(
            f"dataset {name} has no split {split!r}; choose one of {', '.join(splits)}"
        )
    return split


def build_dataset(
    name: str,
    data_dir: str | Path | None,
    split: str = "train",
    transform: Callable | None = None,
    download: bool = False,
    skip_bad_images: bool = False,
    classes: Sequence[str] | None = None,
    classes_from: str = "the given classes",
    split_by: str | None = None,
    seed: int = 0,
    task: str = "auto",
) -> Dataset:
    """Dataset ``name``'s ``split`` ('train', 'test'/'val'; SVHN also 'train+extra', 'extra').

    Items are ``(transform(image), target)``; see :class:`InMemoryImages` and
    :class:`FolderImages` for what ``transform`` receives. A ``data_dir`` that does not exist or
    lacks the files raises ``FileNotFoundError`` saying which files to put where.

    ``folder`` datasets: with ``train``/``val``/``test`` sub-folders, every split is labelled by
    the class names of the first of them (``classes`` given: by those), matched by name. Without
    split sub-folders, or with ``train`` alone, ``HOLDOUT_PERCENT``% of each class (chosen by a
    hash of the file name, so the same files every run) is held out: ``train`` is the rest,
    ``val``/``test`` the held-out part, ``all`` the whole tree; a notice on stderr says so.
    """
    name = check_dataset_name(name)
    data_dir = Path(data_dir).expanduser() if data_dir else None
    check_data_dir(name, data_dir, download)
    split = _split_of(name, split)
    if name == "csv":
        if data_dir is None:
            raise ValueError("dataset csv needs --data-dir (a folder with train.csv, val.csv, ...)")
        table = read_table(data_dir, split_by, seed)
        images = LabelsFileImages(table, split, task, classes, transform)
        if skip_bad_images:
            images.drop_unreadable()
        return images
    if name in ("imagenet", "folder"):
        images = _image_folder(name, data_dir, split, transform, classes, classes_from)
        if skip_bad_images:
            images.drop_unreadable()
        return images
    if name in ("mnist", "fashion_mnist"):
        dataset = read_mnist_like(name, data_dir, split, download)
    elif name in ("cifar10", "cifar100"):
        dataset = read_cifar(name, data_dir, split, download)
    else:
        dataset = read_svhn(data_dir, split, download)
    dataset.transform = transform
    return dataset


def _image_folder(
    name: str,
    data_dir: Path | None,
    split: str,
    transform: Callable | None,
    classes: Sequence[str] | None,
    classes_from: str,
) -> FolderImages:
    """ImageNet's ``split`` (1000 class folders) or a folder dataset's, not yet checked for bad
    images."""
    if data_dir is None:
        raise ValueError(
            f"dataset {name} needs --data-dir (a folder or .zip of <split>/<class>/ images)"
        )
    if name == "folder":
        return folder_dataset(data_dir, split, transform, classes, classes_from)
    if not (data_dir / split).is_dir():
        raise missing_files("imagenet", [f"{split}/<wnid>/*.JPEG"], [data_dir])
    images = FolderImages(data_dir, split, transform)
    if len(images.classes) != 1000:
        raise ValueError(
            f"{data_dir / split}: expected 1000 class folders, found {len(images.classes)}"
        )
    return images
