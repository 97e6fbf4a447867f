"""What is known about each dataset before reading it: names, classes, statistics, input size.

The one home of the normalization statistics (ImageNet's, CIFAR-10's, ...) and class names
(ImageNet's from the bundled file) that the data pipeline, the model zoo, the weights registry
and inference all use. Imports no torch, so the model listing and the CLI stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
DIGITS = tuple(str(i) for i in range(10))

DATASETS = ("cifar10", "cifar100", "svhn", "mnist", "fashion_mnist", "imagenet", "folder", "csv")
_ALIASES = {"fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist"}


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset. ``input_size`` is ``(C, H, W)``."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    splits: tuple[str, ...]
    in_memory: bool  # read into one uint8 tensor; batched augmentation applies
    # "multiclass" (one class per image) or "multilabel" (any number of labels per image)
    task: str = "multiclass"

    @property
    def in_chans(self) -> int:
        return self.input_size[0]


def dataset_entry(
    name: str,
    classes: tuple[str, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    size: tuple[int, int, int],
    splits: tuple[str, ...],
    in_memory: bool = True,
) -> DatasetInfo:
    """A :class:`DatasetInfo` whose ``num_classes`` is ``len(classes)``."""
    return DatasetInfo(name, len(classes), tuple(classes), mean, std, size, splits, in_memory)


TRAIN_TEST = ("train", "test")
# Datasets whose classes are known without their files (cifar100 and folder read theirs).
KNOWN = {
    info.name: info
    for info in (
        dataset_entry("mnist", DIGITS, (0.1307,), (0.3081,), (1, 28, 28), TRAIN_TEST),
        dataset_entry(
            "fashion_mnist", FASHION_CLASSES, (0.2860,), (0.3530,), (1, 28, 28), TRAIN_TEST
        ),
        dataset_entry(
            "cifar10", CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, (3, 32, 32), TRAIN_TEST
        ),
        dataset_entry(
            "svhn",
            DIGITS,
            (0.4377, 0.4438, 0.4728),
            (0.1980, 0.2010, 0.1970),
            (3, 32, 32),
            ("train", "train+extra", "extra", "test"),
        ),
    )
}


def check_dataset_name(name: str) -> str:
    """The canonical name of dataset ``name`` (``Fashion-MNIST`` -> ``fashion_mnist``), or a
    ``ValueError`` listing :data:`DATASETS`."""
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order.

    Each name is the whole line of ``resources/imagenet_classes.txt``: every WordNet lemma of the
    class's synset, comma-separated (``"great white shark, white shark, man-eater, ..."``). Not
    only the first lemma, as torchvision's ``categories`` list: the whole line says which sense is
    meant and tells apart classes whose first lemma is the same (``maillot``: 638 and 639).
    """
    text = resources.files("densenet").joinpath("resources/imagenet_classes.txt")
    return tuple(text.read_text("utf-8").splitlines())


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet's names for a 1000-class model, else the class indices as strings."""
    if num_classes == 1000:
        return list(imagenet_class_names())
    return [str(i) for i in range(num_classes)]
