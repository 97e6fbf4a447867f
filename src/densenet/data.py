"""Datasets, augmentation recipes and loaders, offline-first.

Small datasets (MNIST, Fashion-MNIST, CIFAR, SVHN) are read once into a ``uint8`` tensor
``(N, C, H, W)``; their loaders hand out whole uint8 batches and :class:`BatchTransform`
normalizes and augments a batch in a few tensor ops (on the GPU when training there), so no
per-image Python runs. File datasets (ImageNet, any class-per-folder tree, also inside a .zip)
decode images in worker processes with per-image torchvision transforms from
:func:`build_transforms`.

Every image file is decoded by :func:`load_image` and converted by :func:`to_channels`'s one
documented rule (EXIF orientation, transparency on white, 16-bit and float scaling), in training,
evaluation, prediction and visualization alike. Folder datasets match class folders by name and
hold out part of a folder that has no split sub-folders (see :func:`build_dataset`).

Public API: ``DATASETS``, :func:`dataset_info`, :func:`build_dataset`, :func:`build_transforms`,
:class:`BatchTransform`, :func:`build_loader`, :func:`set_epoch`, :func:`load_image`,
:func:`to_channels`, :func:`folder_splits`.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import datasets
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)  # Debian dataset-fashion-mnist
DOWNLOAD_DIR = Path.home() / ".cache" / "densenet" / "data"  # downloads without a --data-dir
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
RECIPES = ("none", "standard", "imagenet", "randaugment")
INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


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

    @property
    def in_chans(self) -> int:
        return self.input_size[0]


def _imagenet_classes() -> tuple[str, ...]:
    text = (Path(__file__).parent / "resources" / "imagenet_classes.txt").read_text()
    return tuple(line.split(",")[0].strip() for line in text.splitlines() if line.strip())


def _info(name, classes, mean, std, size, splits, in_memory=True) -> DatasetInfo:
    return DatasetInfo(name, len(classes), tuple(classes), mean, std, size, splits, in_memory)


_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_INFOS = {
    info.name: info
    for info in (
        _info(
            "mnist",
            [str(i) for i in range(10)],
            (0.1307,),
            (0.3081,),
            (1, 28, 28),
            ("train", "test"),
        ),
        _info(
            "fashion_mnist", FASHION_CLASSES, (0.2860,), (0.3530,), (1, 28, 28), ("train", "test")
        ),
        _info("cifar10", CIFAR10_CLASSES, _CIFAR_MEAN, _CIFAR_STD, (3, 32, 32), ("train", "test")),
        _info(
            "svhn",
            [str(i) for i in range(10)],
            (0.4377, 0.4438, 0.4728),
            (0.1980, 0.2010, 0.1970),
            (3, 32, 32),
            ("train", "train+extra", "extra", "test"),
        ),  # fmt: skip
    )
}
DATASETS = ("cifar10", "cifar100", "svhn", "mnist", "fashion_mnist", "imagenet", "folder")


def dataset_info(name: str, data_dir: str | Path | None = None) -> DatasetInfo:
    """Classes, normalization and input size of dataset ``name``.

    ``folder`` needs ``data_dir`` (its classes: the class folders of its ``train`` split, else of
    its first split, else its top-level folders); without it the class list is empty and the other
    fields are ImageNet's defaults.
    """
    name = _check_name(name)
    if name in _INFOS:
        return _INFOS[name]
    if name == "cifar100":
        _check_data_dir(name, Path(data_dir) if data_dir else None, False)
        classes = _cifar100_classes(data_dir) if data_dir else tuple(str(i) for i in range(100))
        return _info("cifar100", classes, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                     (3, 32, 32), ("train", "test"))  # fmt: skip
    if name == "imagenet":
        classes = _imagenet_classes()
        return _info(
            name, classes, IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224), ("train", "val"), False
        )
    root = Path(data_dir).expanduser() if data_dir else None
    _check_data_dir(name, root, False)
    classes = tuple(_folder_classes(root)) if root else ()
    return _info(
        name, classes, IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224), ("train", "val", "test"), False
    )


def _check_name(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist"}.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


# --- in-memory datasets -------------------------------------------------------------------------
class InMemoryImages(Dataset):
    """Images as one uint8 tensor ``(N, C, H, W)`` and int64 ``targets (N,)``.

    With ``transform`` None, :func:`build_loader` serves whole uint8 batches (see
    :class:`BatchTransform`); otherwise ``transform`` gets one uint8 ``(C, H, W)`` tensor
    (torchvision v2 transforms accept it like a PIL image).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: Sequence[str],
        transform: Callable | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(targets):
            raise ValueError(
                f"expected uint8 images (N, C, H, W) and N targets, got {images.shape}"
            )
        self.images = images
        self.targets = targets.long()
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.targets[index])

    def __getitems__(self, indices: list[int]) -> Any:
        if self.transform is not None:
            return [self[i] for i in indices]
        index = torch.as_tensor(indices)
        return _Batch((self.images[index], self.targets[index]))

    def subset(self, indices: Sequence[int] | torch.Tensor) -> InMemoryImages:
        """The images at ``indices``, still in memory."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return InMemoryImages(self.images[index], self.targets[index], self.classes, self.transform)


class _Batch(tuple):
    """A batch already gathered by ``__getitems__``; :func:`_collate` passes it through."""


def _collate(samples: Any) -> Any:
    return tuple(samples) if isinstance(samples, _Batch) else default_collate(samples)


def _missing(
    name: str, files: Sequence[str], places: Sequence[Path], hint: str = ""
) -> FileNotFoundError:
    where = ", ".join(str(p) for p in places) or "(no --data-dir given)"
    return FileNotFoundError(
        f"{name} not found: put {', '.join(files)} in --data-dir (looked in {where}){hint}"
    )


def _find(files: Sequence[str], places: Sequence[Path]) -> Path | None:
    for place in places:
        if all((place / f).is_file() for f in files):
            return place
    return None


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (MNIST's format, optionally gzipped) as a uint8 tensor."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise ValueError(f"{path}: truncated IDX file ({data.size} of {math.prod(shape)} bytes)")
    return torch.from_numpy(data.reshape(shape).copy())


def _find_idx(files: Sequence[str], places: Sequence[Path]) -> list[Path] | None:
    """The IDX ``files`` (gzipped or not) in the first of ``places`` holding them all."""
    for suffix in (".gz", ""):
        place = _find([f + suffix for f in files], places)
        if place is not None:
            return [place / (f + suffix) for f in files]
    return None


def _download(name: str, root: Path, fetch: Callable[[str], Any]) -> None:
    """Run torchvision's downloader ``fetch(root)``; offline, a clear error, not a traceback."""
    try:
        fetch(str(root))
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise FileNotFoundError(
            f"{name}: downloading into {root} failed ({error}); without a network, copy the "
            "files there by hand (run without --download to see which)"
        ) from None


def _mnist_like(name: str, data_dir: Path | None, split: str, download: bool) -> InMemoryImages:
    prefix = "train" if split == "train" else "t10k"
    files = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    tv_name = "FashionMNIST" if name == "fashion_mnist" else "MNIST"
    # The built-in default (Fashion-MNIST, no --data-dir) falls back to downloading it.
    fetch = download or (name == "fashion_mnist" and data_dir is None)
    root = data_dir or DOWNLOAD_DIR
    local = [root, root / name, root / name.replace("_", "-"), root / tv_name / "raw"]
    system = list(FASHION_MNIST_DIRS) if name == "fashion_mnist" else []
    # A given --data-dir is the only place looked in; without one, the system-wide copy, then an
    # earlier download.
    places = local if data_dir is not None else system + local[-1:]
    found = _find_idx(files, places)
    if found is None and fetch:
        train = split == "train"
        _download(name, root, lambda r: getattr(datasets, tv_name)(r, train=train, download=True))
        found = _find_idx(files, places)
    if found is None:
        system_copy = name == "fashion_mnist" and data_dir is None
        hint = " or install Debian's dataset-fashion-mnist" if system_copy else ""
        raise _missing(name, [f + ".gz" for f in files], places, hint + ", or pass --download")
    images, labels = (_read_idx(path) for path in found)
    return InMemoryImages(images[:, None], labels, _INFOS[name].class_names)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow only what builds numpy arrays, never code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: not a CIFAR python batch file ({error})") from None


def _cifar_dir(name: str, data_dir: Path | None, download: bool) -> Path:
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    needed = ["test_batch"] if name == "cifar10" else ["test", "meta"]
    places = [data_dir / folder, data_dir] if data_dir is not None else []
    found = _find(needed, places)
    if found is None and download and data_dir is not None:
        _download(name, data_dir, lambda r: getattr(datasets, name.upper())(r, download=True))
        found = _find(needed, places)
    if found is None:
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        raise _missing(name, [f"{folder}/ (extracted from {archive})"], places)
    return found


def _cifar100_classes(data_dir: str | Path) -> tuple[str, ...]:
    meta = _unpickle(_cifar_dir("cifar100", Path(data_dir), False) / "meta")
    return tuple(meta["fine_label_names"])


def _cifar(name: str, data_dir: Path | None, split: str, download: bool) -> InMemoryImages:
    root = _cifar_dir(name, data_dir, download)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, classes = "labels", CIFAR10_CLASSES
    else:
        files, label_key = [split], "fine_labels"
        classes = tuple(_unpickle(root / "meta")["fine_label_names"])
    batches = [_unpickle(root / f) for f in files]
    data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[label_key] for b in batches])
    return InMemoryImages(torch.from_numpy(data), torch.from_numpy(labels), classes)


def _svhn(data_dir: Path | None, split: str, download: bool) -> InMemoryImages:
    parts = ["train", "extra"] if split == "train+extra" else [split]
    places = [data_dir, data_dir / "svhn"] if data_dir is not None else []
    files = [f"{p}_32x32.mat" for p in parts]
    found = _find(files, places)
    if found is None and download and data_dir is not None:
        for part in parts:
            _download("svhn", data_dir, lambda r, p=part: datasets.SVHN(r, split=p, download=True))
        found = _find(files, places)
    if found is None:
        raise _missing("svhn", files, places)
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(
            "reading SVHN's .mat files needs scipy: pip install 'densenet[svhn]'"
        ) from None
    images, labels = [], []
    for f in files:
        mat = loadmat(found / f)
        images.append(torch.from_numpy(mat["X"]).permute(3, 2, 0, 1))  # (H, W, C, N) -> NCHW
        labels.append(torch.from_numpy(mat["y"].astype(np.int64).reshape(-1) % 10))  # '10' is 0
    return InMemoryImages(
        torch.cat(images).contiguous(), torch.cat(labels), _INFOS["svhn"].class_names
    )


# --- image files --------------------------------------------------------------------------------
# Transparent pixels are composited onto white: the background browsers, viewers and documents show
# them on, so a cut-out photo or a logo reaches the model as it looks to the person who made it. The
# color stored under alpha 0 is arbitrary (encoders keep anything there), so it is never used.
ALPHA_BACKGROUND = (255, 255, 255)
# Float images hold [0, 1] (torchvision's range for float images); half an 8-bit step of rounding
# slack outside it is clipped, anything further is an error.
FLOAT_SLACK = 0.5 / 255
SKIP_HINT = "remove it or pass --skip-bad-images"
ORIENTATION_TAG = 0x0112  # EXIF "Orientation"; 1 is upright


class BadImageError(ValueError):
    """An unreadable image file; its message is one line, also when a loader worker raised it."""

    def __init__(self, message: str) -> None:
        # DataLoader re-raises a worker's error as ``type(error)(text with the worker's
        # traceback)``; the last line of that text is "...BadImageError: <our message>".
        if "Original Traceback" in message:
            message = message.strip().splitlines()[-1].split("BadImageError: ", 1)[-1]
        super().__init__(message)


def to_channels(image: Image.Image, channels: int | None = None) -> Image.Image:
    """``image`` converted by the one rule every path uses: 8-bit ``'L'`` or ``'RGB'``.

    The rule, for every PIL mode:

    - EXIF orientation is applied (``ImageOps.exif_transpose``): pixels stand as a viewer shows them.
    - Transparency (an alpha band: ``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``; or a PNG ``tRNS``
      color or palette alpha: ``P``, ``L``, ``RGB`` with ``info["transparency"]``) is composited
      onto white, :data:`ALPHA_BACKGROUND`.
    - Integer gray (``I;16``, ``I;16B``, ``I``) is read as 16-bit: ``[0, 65535]`` maps to
      ``[0, 255]`` as ``round(v / 257)``; a value outside ``[0, 65535]`` is an error.
    - Float gray (``F``) must hold ``[0, 1]``: it maps to ``round(255 v)``; NaN, infinity or a value
      further than :data:`FLOAT_SLACK` outside ``[0, 1]`` is an error.
    - ``1`` becomes 0/255 gray; ``P``, ``CMYK``, ``YCbCr``, ``RGBX`` become RGB by PIL's conversion.
    - ``channels`` 1 takes PIL's luma of RGB (ITU-R 601-2), 3 repeats gray; None keeps gray
      sources ``'L'`` and color sources ``'RGB'``.

    Raises ``ValueError`` for an out-of-range image or a mode PIL cannot convert to RGB.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"images can be converted to 1 or 3 channels, not {channels}")
    if image.getexif().get(ORIENTATION_TAG, 1) != 1:  # exif_transpose copies even when upright
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I"):  # 'I' and the 16-bit 'I;16', 'I;16B', 'I;16L', 'I;16N'
        pixels = np.asarray(image).astype(np.int64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(
                f"integer image (mode {mode}) with values from {pixels.min()} to {pixels.max()}; "
                "integer images are read as 16-bit, 0 to 65535 (save it as 8- or 16-bit)"
            )
        image = Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8))
    elif mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        if not np.isfinite(pixels).all():
            raise ValueError("floating-point image holds NaN or infinite values")
        low, high = float(pixels.min()), float(pixels.max())
        if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
            raise ValueError(
                f"floating-point image with values from {low:g} to {high:g}; float images must "
                "hold 0 to 1 (scale it, or save it as 8- or 16-bit)"
            )
        image = Image.fromarray(np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    elif "A" in mode or "a" in mode or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        flat = Image.alpha_composite(background, image.convert("RGBA"))
        image = flat.convert("L" if mode in ("L", "LA", "La") else "RGB")
    elif mode not in ("L", "RGB"):
        image = image.convert("L" if mode == "1" else "RGB")
    wanted = {1: "L", 3: "RGB"}.get(channels, image.mode)
    return image if image.mode == wanted else image.convert(wanted)


def load_image(
    source: str | Path | bytes, name: str | None = None, hint: str = "", channels: int | None = None
) -> Image.Image:
    """Decode one image file as training, evaluation, prediction and visualization all do.

    ``source`` is a path or the file's bytes. Returns an 8-bit ``'L'`` or ``'RGB'`` image made by
    :func:`to_channels`'s rule (``channels`` 1 or 3, default: gray stays gray). A file that does not decode, is larger than PIL's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``; PIL itself only warns up to twice
    it) or breaks the rule raises :class:`BadImageError`, one line naming the file (``name``,
    default the path) and ending with ``hint``.
    """
    label = name or str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                image.load()
                return to_channels(image, channels)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
        limit = f"{Image.MAX_IMAGE_PIXELS:,}" if Image.MAX_IMAGE_PIXELS else "set"
        message = (
            f"{label}: {size}, over PIL's decompression-bomb limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS); shrink the image, or raise that limit if you trust it"
        )
    except UnidentifiedImageError:
        message = f"{label} is not a readable image (unknown or unsupported format)"
    except (OSError, SyntaxError, EOFError) as error:  # truncated or damaged
        message = f"{label} is not a readable image ({error})"
    except ValueError as error:  # the conversion rule's range checks, or an unconvertible mode
        message = f"{label}: {error}"
    raise BadImageError(message + (f"; {hint}" if hint else ""))


class ToChannels:
    """Transform form of :func:`to_channels` (a class, so DataLoader workers can pickle it).

    Non-PIL inputs (uint8 tensors of the in-memory datasets, already converted) pass through.
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, image: Any) -> Any:
        return to_channels(image, self.channels) if isinstance(image, Image.Image) else image


# --- file datasets ------------------------------------------------------------------------------
SPLIT_FOLDERS = ("train", "val", "test")
# A folder without split sub-folders holds out this share of each class for validation, chosen by
# a hash of "<class>/<file name>" (not by --seed): the same files whatever the run's seed, and a
# file keeps its side when others are added or removed.
HOLDOUT_PERCENT = 10
HOLDOUT_SALT = "densenet-holdout-0"


class FolderImages(Dataset):
    """A class-per-folder image tree ``root/<class>/<image>``, a directory or inside a .zip.

    Images in a zip are read straight from the archive (each worker opens its own handle) and
    decoded by :func:`load_image`. ``classes`` given: each class folder is matched BY NAME to its
    index in ``classes`` (a subset is fine; an unknown folder name is a ``ValueError`` naming it,
    described as not one of ``classes_from``); otherwise the classes are the folder names,
    sorted. A file that does not decode raises ``ValueError`` naming it; with ``skip_bad_images``
    the bad files are found up front (one decode each), dropped, counted in ``skipped`` and
    listed (with the reason) in ``bad_images``.
    """

    def __init__(
        self,
        root: str | Path,
        subdir: str | None = None,
        transform: Callable | None = None,
        skip_bad_images: bool = False,
        classes: Sequence[str] | None = None,
        classes_from: str = "the given classes",
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        found, self.samples = self.scan(self.root, subdir)
        self.classes = found
        if classes is not None:
            where = f"{self.root}/{subdir}" if subdir else str(self.root)
            self.classes = list(classes)
            self.samples = _match_classes(found, self.samples, self.classes, where, classes_from)
        self.targets = [t for _, t in self.samples]
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = 0
        self.skipped = 0
        self.bad_images: list[str] = []
        if skip_bad_images:
            self.drop_unreadable()

    @staticmethod
    def scan(root: str | Path, subdir: str | None) -> tuple[list[str], list[tuple[str, int]]]:
        """``(class names, [(member path, class index)])`` of ``root[/subdir]``, sorted."""
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such image folder or .zip (give --data-dir)")
        if zipfile.is_zipfile(root):
            with zipfile.ZipFile(root) as archive:
                names = [n for n in archive.namelist() if not n.endswith("/")]
            for n in names:
                parts = PurePosixPath(n).parts
                if n.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                    raise ValueError(f"{root}: unsafe path {n!r} in the zip (escapes the archive)")
            paths = [PurePosixPath(n) for n in names]
            if subdir:
                paths = [p.relative_to(subdir) for p in paths if p.parts[0] == subdir]
                prefix = PurePosixPath(subdir)
            else:
                prefix = PurePosixPath()
            members = [(p.parts[0], str(prefix / p)) for p in paths if len(p.parts) == 2]
        else:
            base = root / subdir if subdir else root
            if not base.is_dir():
                raise FileNotFoundError(
                    f"{base}: no such folder (expected {root}/<split>/<class>/)"
                )
            members = [
                (d.name, str(f))
                for d in base.iterdir() if d.is_dir()
                for f in d.iterdir() if f.is_file()
            ]  # fmt: skip
        members = [(c, m) for c, m in members if m.lower().endswith(IMAGE_EXTENSIONS)]
        classes = sorted({c for c, _ in members})
        if not classes:
            where = f"{root}/{subdir}" if subdir else str(root)
            raise FileNotFoundError(
                f"{where}: no images in class sub-folders (<class>/<image>.jpg)"
            )
        index = {c: i for i, c in enumerate(classes)}
        return classes, sorted((m, index[c]) for c, m in members)

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> FolderImages:
        """The images at ``indices`` (same classes), without reading them."""
        part = copy.copy(self)
        part.samples = [self.samples[int(i)] for i in indices]
        part.targets = [t for _, t in part.samples]
        part._zip = None
        return part

    def drop_unreadable(self) -> None:
        """Decode every image once and drop those :func:`load_image` refuses (``bad_images``)."""
        from densenet.progress import progress

        good = []
        for member, target in progress(self.samples, desc=f"checking images in {self.root}"):
            try:
                self.load(member)
            except BadImageError as error:
                self.bad_images.append(str(error).removesuffix(f"; {SKIP_HINT}"))
            else:
                good.append((member, target))
        self.skipped += len(self.samples) - len(good)
        self.samples, self.targets = good, [t for _, t in good]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None}  # zip handles do not cross process boundaries

    def _read(self, member: str) -> bytes:
        if self.root.is_dir():
            return Path(member).read_bytes()
        # A forked worker inherits the parent's handle and file offset: open one per process.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.root), os.getpid()
        return self._zip.read(member)

    def load(self, member: str, channels: int | None = None) -> Image.Image:
        """Decode one image with :func:`load_image` (to ``channels``, default its own: gray or
        RGB); ``BadImageError`` naming the file."""
        label = member if self.root.is_dir() else f"{self.root}: {member}"
        try:
            raw = self._read(member)
        except (OSError, zipfile.BadZipFile) as error:
            raise BadImageError(f"{label}: cannot be read ({error}); {SKIP_HINT}") from None
        return load_image(raw, label, SKIP_HINT, channels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        member, target = self.samples[index]
        image = self.load(member)
        return (self.transform(image) if self.transform else image), target

    def to_memory(self, channels: int = 3) -> InMemoryImages:
        """Decode everything once into a uint8 tensor (all images must share one size)."""
        from densenet.progress import progress

        samples = progress(self.samples, desc=f"decoding {self.root}")
        arrays = [np.asarray(self.load(m, channels)) for m, _ in samples]
        sizes = {a.shape[:2] for a in arrays}
        if len(sizes) != 1:
            raise ValueError(f"{self.root}: images differ in size ({sorted(sizes)[:3]}...)")
        stacked = torch.from_numpy(np.stack(arrays))
        stacked = stacked[:, None] if channels == 1 else stacked.permute(0, 3, 1, 2)
        return InMemoryImages(stacked.contiguous(), torch.tensor(self.targets), self.classes)


def _match_classes(
    found: list[str],
    samples: list[tuple[str, int]],
    classes: list[str],
    where: str,
    classes_from: str,
) -> list[tuple[str, int]]:
    """``samples`` (indices into ``found``) relabelled to the index of the same name in
    ``classes``; a ``ValueError`` naming the folders that are not among ``classes``."""
    from densenet.messages import did_you_mean

    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in found if name not in index]
    if unknown:
        shown = ", ".join(classes[:12]) + (
            f", ... ({len(classes)} in all)" if len(classes) > 12 else ""
        )
        others = (
            f" (and {len(unknown) - 1} more: {', '.join(unknown[1:4])})" if len(unknown) > 1 else ""
        )
        raise ValueError(
            f"{where}: class folder {unknown[0]!r}{others} is not one of {classes_from} "
            f"({shown}){did_you_mean(unknown[0], classes)}"
        )
    return [(member, index[found[target]]) for member, target in samples]


def folder_splits(root: str | Path) -> list[str]:
    """The split sub-folders (``train``, ``val``, ``test``) of an image folder or .zip.

    Empty for a flat ``<class>/<image>`` tree; ``FileNotFoundError`` if ``root`` does not exist.
    """
    root = Path(root)
    if zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as archive:
            tops = {PurePosixPath(n).parts[0] for n in archive.namelist() if "/" in n}
    elif root.is_dir():
        tops = {d.name for d in root.iterdir() if d.is_dir()}
    else:
        raise FileNotFoundError(f"--data-dir {root}: no such image folder or .zip")
    return [s for s in SPLIT_FOLDERS if s in tops]


def _folder_classes(root: Path) -> list[str]:
    """The class names of a folder dataset: its train split's (else its first split's), or the
    top-level class folders of a flat tree."""
    splits = folder_splits(root)
    return FolderImages.scan(root, splits[0] if splits else None)[0]


def _holdout(dataset: FolderImages) -> list[bool]:
    """For each sample: is it held out for validation? Per class, the ``HOLDOUT_PERCENT``%
    (rounded, at least one of a class of two or more) whose "<class>/<file>" hashes lowest."""
    by_class: dict[int, list[tuple[bytes, int]]] = {}
    for i, (member, target) in enumerate(dataset.samples):
        key = f"{HOLDOUT_SALT}/{Path(member).parent.name}/{Path(member).name}".encode()
        by_class.setdefault(target, []).append((hashlib.sha256(key).digest(), i))
    held = [False] * len(dataset.samples)
    for members in by_class.values():
        count = max(1, round(len(members) * HOLDOUT_PERCENT / 100)) if len(members) > 1 else 0
        for _, i in sorted(members)[:count]:
            held[i] = True
    return held


def _notice(message: str) -> None:
    from densenet.weights import notice

    notice(message)


def _folder_dataset(
    root: Path,
    split: str,
    transform: Callable | None,
    classes: Sequence[str] | None,
    classes_from: str,
) -> FolderImages:
    """Split ``split`` of a folder dataset (see :func:`build_dataset`), not yet checked for bad
    images."""
    splits = folder_splits(root)
    if not splits:
        dataset = FolderImages(root, None, transform, classes=classes, classes_from=classes_from)
        if split == "all":
            return dataset
        held = _holdout(dataset)
        chosen = [i for i, h in enumerate(held) if h == (split != "train")]
        total, validation = len(held), sum(held)
        _notice(
            f"{root} has no train/, val/ or test/ sub-folders: {HOLDOUT_PERCENT}% of each class "
            f"({validation} of its {total} images, chosen by file name) is held out for validation"
            f"; this is the {'training' if split == 'train' else 'held-out'} part "
            f"({len(chosen)} images). Make train/ and val/ sub-folders to choose them yourself"
        )
        return dataset.subset(chosen)
    if split == "all":
        raise ValueError(
            f"{root} has split sub-folders ({', '.join(splits)}); choose one with --split"
        )
    candidates = {"train": ["train"], "val": ["val", "test"], "test": ["test", "val"]}[split]
    subdir = next((c for c in candidates if c in splits), None)
    if subdir is None:
        raise FileNotFoundError(
            f"{root} has no {' or '.join(c + '/' for c in candidates)} sub-folder (it has "
            f"{', '.join(s + '/' for s in splits)}); add one, or give a folder without split "
            "sub-folders to hold out part of it"
        )
    if classes is None and subdir != splits[0]:
        # Every split is labelled by the training classes, matched by name.
        classes = FolderImages.scan(root, splits[0])[0]
        classes_from = f"the {len(classes)} classes of {root}/{splits[0]}"
    return FolderImages(root, subdir, transform, classes=classes, classes_from=classes_from)


def _check_data_dir(name: str, data_dir: Path | None, download: bool) -> None:
    """A --data-dir that does not exist is an error (a download creates it)."""
    if data_dir is not None and not data_dir.exists() and not (download and name != "folder"):
        raise FileNotFoundError(
            f"--data-dir {data_dir} does not exist (dataset {name}); give the folder that holds "
            "the data" + ("" if name in ("folder", "imagenet") else ", or add --download")
        )


def build_dataset(
    name: str,
    data_dir: str | Path | None,
    split: str = "train",
    transform: Callable | None = None,
    download: bool = False,
    skip_bad_images: bool = False,
    classes: Sequence[str] | None = None,
    classes_from: str = "the given classes",
) -> Dataset:
    """Dataset ``name``'s ``split`` ('train', 'test'/'val'; SVHN also 'train+extra', 'extra').

    Items are ``(transform(image), target)``; see :class:`InMemoryImages` and
    :class:`FolderImages` for what ``transform`` receives. A ``data_dir`` that does not exist or
    lacks the files raises ``FileNotFoundError`` saying which files to put where.

    ``folder`` datasets: with ``train``/``val``/``test`` sub-folders, every split is labelled by
    the class names of the first of them (``classes`` given: by those), matched by name. Without
    split sub-folders, ``HOLDOUT_PERCENT``% of each class (chosen by a hash of the file name, so
    the same files every run) is held out: ``train`` is the rest, ``val``/``test`` the held-out
    part, ``all`` the whole tree; a notice on stderr says so.
    """
    name = _check_name(name)
    data_dir = Path(data_dir).expanduser() if data_dir else None
    _check_data_dir(name, data_dir, download)
    splits = dataset_info(name).splits
    if split == "val" and "val" not in splits:
        split = "test"
    if split == "test" and "test" not in splits:
        split = "val"
    if split not in splits and not (name == "folder" and split == "all"):
        raise ValueError(
            f"dataset {name} has no split {split!r}; choose one of {', '.join(splits)}"
        )
    if name in ("mnist", "fashion_mnist"):
        dataset: Dataset = _mnist_like(name, data_dir, split, download)
    elif name in ("cifar10", "cifar100"):
        dataset = _cifar(name, data_dir, split, download)
    elif name == "svhn":
        dataset = _svhn(data_dir, split, download)
    elif data_dir is None:
        raise ValueError(
            f"dataset {name} needs --data-dir (a folder or .zip of <split>/<class>/ images)"
        )
    else:
        if name == "imagenet":
            if not (data_dir / split).is_dir():
                raise _missing("imagenet", [f"{split}/<wnid>/*.JPEG"], [data_dir])
            dataset = FolderImages(data_dir, split, transform)
            if len(dataset.classes) != 1000:
                raise ValueError(
                    f"{data_dir / split}: expected 1000 class folders, found {len(dataset.classes)}"
                )
        else:
            dataset = _folder_dataset(data_dir, split, transform, classes, classes_from)
        if skip_bad_images:
            dataset.drop_unreadable()
        return dataset
    dataset.transform = transform
    return dataset


# --- transforms ---------------------------------------------------------------------------------
class Lighting:
    """AlexNet-style PCA lighting noise (fb.resnet.torch), on a float ``(3, H, W)`` tensor in [0, 1]."""

    EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
    EIGVEC = torch.tensor(
        [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
    )

    def __init__(self, alphastd: float = 0.1) -> None:
        self.alphastd = alphastd

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0 or image.shape[0] != 3:
            return image
        alpha = torch.randn(3) * self.alphastd
        rgb = self.EIGVEC @ (alpha * self.EIGVAL)
        return image + rgb.view(3, 1, 1).to(image)


def build_transforms(
    recipe: str,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    input_size: int | Sequence[int],
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
) -> v2.Compose:
    """Per-image transform: PIL image or uint8 ``(C, H, W)`` -> normalized float ``(C, S, S)``.

    Recipes (training): ``none`` (paper C10/C100/SVHN), ``standard`` (4-px zero-pad random crop
    and flip, the paper's "+"), ``imagenet`` (random-resized crop, flip, color jitter 0.4, PCA
    lighting 0.1 as fb.resnet.torch), ``randaugment`` (random-resized crop, flip, RandAugment
    2 ops magnitude 9 as timm's ``ra``). Eval (``train=False``): resize the short side to
    ``S / crop_pct``, then center crop ``S``.
    """
    if recipe not in RECIPES:
        raise ValueError(
            f"unknown augmentation recipe {recipe!r}; choose one of {', '.join(RECIPES)}"
        )
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}"
        )
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    size = int(input_size[-1]) if isinstance(input_size, Sequence) else int(input_size)
    mode = INTERPOLATIONS[interpolation]
    steps: list = [ToChannels(len(mean)), v2.ToImage()]
    if train and recipe in ("imagenet", "randaugment"):
        steps += [
            v2.RandomResizedCrop(size, interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if recipe == "randaugment":
            steps.append(v2.RandAugment(num_ops=2, magnitude=9, interpolation=mode))
        else:
            steps.append(v2.ColorJitter(0.4, 0.4, 0.4))
    else:
        steps += [
            v2.Resize(math.floor(size / crop_pct), interpolation=mode, antialias=True),
            v2.CenterCrop(size),
        ]
        if train and recipe == "standard":
            steps += [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train and recipe == "imagenet":
        steps.append(Lighting(0.1))
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


class BatchTransform:
    """Batched preprocessing of uint8 ``(N, C, H, W)`` -> normalized float, on the batch's device.

    ``recipe`` 'standard' adds a random crop of the 4-px zero-padded image and a horizontal flip
    per image, drawn from the global torch RNG of that device (saved with checkpoints, so resumed
    runs draw the same). Padding is zero in pixel space, like torchvision's RandomCrop.
    """

    def __init__(
        self, recipe: str, train: bool, mean: Sequence[float], std: Sequence[float], pad: int = 4
    ) -> None:
        if recipe not in ("none", "standard"):
            raise ValueError(f"batched augmentation supports 'none' and 'standard', not {recipe!r}")
        self.augment = train and recipe == "standard"
        self.pad = pad
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images  # already preprocessed per image
        x = images.float().mul_(1 / 255)  # as v2.ToDtype(scale=True): the per-image path's values
        if self.augment:
            x = self._crop_flip(x)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return x.sub_(mean).div_(std)

    def _crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), device=x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), device=x.device)
        flip = torch.rand(n, device=x.device) < 0.5
        rows = (dy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = torch.arange(w, device=x.device).expand(n, w)
        cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
        rows = rows.expand(n, x.shape[1], h, w + 2 * p)
        out = padded.gather(2, rows)
        return out.gather(3, cols.view(n, 1, 1, w).expand(n, x.shape[1], h, w))


# --- loaders ------------------------------------------------------------------------------------
class EpochSampler(Sampler[int]):
    """A permutation drawn from ``seed + epoch`` (or the identity): the same order on resume.

    ``num_replicas``/``rank`` give each DDP process its strided share: rank ``r`` of ``W`` takes
    ``order[r::W]``, so a per-rank batch of ``B/W`` is the strided share of the global batch of
    ``B`` that one process would draw, whatever ``W`` is. Shuffled (training) shares are cut to
    equal length, as every rank must take the same number of steps; ordered (evaluation) shares
    are uneven and cover each sample exactly once.
    """

    def __init__(
        self, size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.start = 0  # samples of this epoch already consumed (a run resumed mid-epoch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _total(self) -> int:
        if self.shuffle:
            return self.size // self.num_replicas * self.num_replicas
        return self.size

    def __len__(self) -> int:
        return len(range(self.rank, self._total(), self.num_replicas)) - self.start

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        return iter(order[self.rank : self._total() : self.num_replicas][self.start :])


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    drop_last: bool | None = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` and the epoch (:func:`set_epoch`).

    In-memory datasets without a per-image transform are served as whole uint8 batches in the
    main process (indexing a tensor is faster than any worker); file datasets decode in
    ``workers`` processes. Memory is pinned when training on CUDA.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = EpochSampler(len(dataset), train, seed, num_replicas, rank)
    batched = isinstance(dataset, InMemoryImages) and dataset.transform is None
    workers = 0 if batched else workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=torch.device(device).type == "cuda",
        drop_last=train if drop_last is None else drop_last,
        # Fresh workers each epoch take their seeds from the generator reseeded by set_epoch,
        # so a resumed run augments exactly like an uninterrupted one.
        persistent_workers=False,
        worker_init_fn=_seed_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def _seed_worker(worker_id: int) -> None:
    # Per-image augmentation in workers draws from torch's per-worker seed; numpy and random too.
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Make ``loader``'s next pass use epoch ``epoch``'s order, from batch ``start_batch`` on."""
    sampler = loader.sampler
    if isinstance(sampler, EpochSampler):
        sampler.set_epoch(epoch, start_batch * (loader.batch_size or 1))
    if loader.generator is not None:
        # Worker seeds come from this generator: reseed so a resumed epoch draws the same.
        loader.generator.manual_seed(getattr(sampler, "seed", 0) * 1_000_003 + epoch)
