"""The torchvision-file datasets (MNIST, Fashion-MNIST, CIFAR-10/100, SVHN), read into memory.

Each is read once from its published files into :class:`InMemoryImages`, one uint8 tensor
``(N, C, H, W)``; a missing file is a ``FileNotFoundError`` saying what to put where, and a
download (``--download``) that fails offline says so in one line.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as torchvision_datasets

from densenet.catalog import CIFAR10_CLASSES, KNOWN

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)  # Debian dataset-fashion-mnist
DOWNLOAD_DIR = Path.home() / ".cache" / "densenet" / "data"  # downloads without a --data-dir
# The MD5 of each .gz file Debian's package dataset-fashion-mnist (0.0~git20200523.55506a9-1, its
# DEBIAN/md5sums) ships: Debian re-compressed Zalando's files, so torchvision's MD5s miss them.
DEBIAN_FASHION_MNIST_MD5 = (
    "f78720b4224f21cce2f2ccf2d7a94c9a",  # t10k-images-idx3-ubyte.gz
    "0d30e22e447f3c33dab9ed536400ac01",  # t10k-labels-idx1-ubyte.gz
    "cf8536b0aa1a6ac5fa3f23001093305c",  # train-images-idx3-ubyte.gz
    "10bea18fdb374794d4bb42e356e600c9",  # train-labels-idx1-ubyte.gz
)
MNIST_LIKE_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


class MixedSizesError(ValueError):
    """Images of several sizes where one uint8 tensor needs one (:meth:`InMemoryImages.stack`)."""


class InMemoryImages(Dataset):
    """Images as one uint8 tensor ``(N, C, H, W)`` and int64 ``targets (N,)`` (class indices), or
    float ``targets (N, L)`` (multi-hot labels: ``task`` multilabel).

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
        self.targets = targets.float() if targets.dim() == 2 else targets.long()
        self.classes = list(classes)
        self.transform = transform

    @classmethod
    def stack(
        cls,
        arrays: Sequence[np.ndarray],
        targets: torch.Tensor,
        classes: Sequence[str],
        where: str,
    ) -> InMemoryImages:
        """Decoded images (``(H, W)`` gray or ``(H, W, C)``, uint8) as one tensor; a
        :class:`MixedSizesError` naming ``where`` when they differ in size."""
        sizes = {a.shape[:2] for a in arrays}
        if len(sizes) != 1:
            raise MixedSizesError(f"{where}: images differ in size ({sorted(sizes)[:3]}...)")
        stacked = torch.from_numpy(np.stack(arrays))
        stacked = stacked[:, None] if stacked.dim() == 3 else stacked.permute(0, 3, 1, 2)
        return cls(stacked.contiguous(), targets, classes)

    @property
    def task(self) -> str:
        return "multilabel" if self.targets.dim() == 2 else "multiclass"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = self.images[index]
        target = self.targets[index]
        return (self.transform(image) if self.transform else image), (
            target if self.task == "multilabel" else int(target)
        )

    def __getitems__(self, indices: list[int]) -> Any:
        if self.transform is not None:
            return [self[i] for i in indices]
        index = torch.as_tensor(indices)
        return GatheredBatch((self.images[index], self.targets[index]))

    def subset(self, indices: Sequence[int] | torch.Tensor) -> InMemoryImages:
        """The images at ``indices``, still in memory."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return InMemoryImages(self.images[index], self.targets[index], self.classes, self.transform)


class GatheredBatch(tuple):
    """``(images, targets)`` already gathered by ``__getitems__``; the loader's collate passes it
    through."""


def missing_files(
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
            f"{name}: not found locally, and downloading into {root} failed ({error}); without a "
            f"network, copy {name}'s files into a folder and give it as --data-dir"
        ) from None


@functools.cache
def _published_mnist_like_md5s() -> dict[str, str]:
    """Published MD5 of each MNIST-like .gz file -> the dataset it belongs to (``mnist`` ...)."""
    owners = {md5: "fashion_mnist" for md5 in DEBIAN_FASHION_MNIST_MD5}
    for name, tv_class in (("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")):
        owners.update({md5: name for _, md5 in getattr(torchvision_datasets, tv_class).resources})
    return owners


@functools.lru_cache(maxsize=32)
def _file_md5(path: Path, size: int, mtime_ns: int) -> str:
    """MD5 of ``path``; cached by (path, size, mtime) so a file is hashed once per process."""
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _refuse_other_mnist_like(name: str, files: Sequence[Path], data_dir: Path | None) -> None:
    """MNIST and Fashion-MNIST files share names and shapes: if ``files`` are the published files
    of the other dataset, a ValueError (reading them would silently score digits as clothes).
    Files matching no published MD5 (a re-compressed or decompressed copy) pass."""
    owners = _published_mnist_like_md5s()
    for path in files:
        stat = path.stat()
        owner = owners.get(_file_md5(path, stat.st_size, stat.st_mtime_ns))
        if owner is not None and owner != name:
            folder = f"--data-dir {path.parent}" if data_dir is not None else str(path.parent)
            theirs, asked = MNIST_LIKE_TITLES[owner], MNIST_LIKE_TITLES[name]
            raise ValueError(
                f"{folder} holds {theirs}'s files ({path.name} matches its published MD5), not "
                f"{asked}'s; use --dataset {owner} or the {asked} folder"
            )


def read_mnist_like(name: str, data_dir: Path | None, split: str, download: bool) -> InMemoryImages:
    """MNIST or Fashion-MNIST ``split`` from its IDX files (gzipped or not): ``(N, 1, 28, 28)``."""
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
        _download(
            name,
            root,
            lambda r: getattr(torchvision_datasets, tv_name)(r, train=train, download=True),
        )
        found = _find_idx(files, places)
    if found is None:
        system_copy = name == "fashion_mnist" and data_dir is None
        hint = " or install Debian's dataset-fashion-mnist" if system_copy else ""
        raise missing_files(name, [f + ".gz" for f in files], places, hint + ", or pass --download")
    _refuse_other_mnist_like(name, found, data_dir)
    images, labels = (_read_idx(path) for path in found)
    return InMemoryImages(images[:, None], labels, KNOWN[name].class_names)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow only what builds numpy arrays, never code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

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
        _download(
            name, data_dir, lambda r: getattr(torchvision_datasets, name.upper())(r, download=True)
        )
        found = _find(needed, places)
    if found is None:
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        raise missing_files(name, [f"{folder}/ (extracted from {archive})"], places)
    return found


def cifar100_classes(data_dir: str | Path) -> tuple[str, ...]:
    """CIFAR-100's 100 fine class names, read from its ``meta`` file."""
    meta = _unpickle(_cifar_dir("cifar100", Path(data_dir), False) / "meta")
    return tuple(meta["fine_label_names"])


def read_cifar(name: str, data_dir: Path | None, split: str, download: bool) -> InMemoryImages:
    """CIFAR-10 or CIFAR-100 ``split`` from its python batches: ``(N, 3, 32, 32)``."""
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


def read_svhn(data_dir: Path | None, split: str, download: bool) -> InMemoryImages:
    """SVHN ``split`` (also ``train+extra``) from its ``.mat`` files: ``(N, 3, 32, 32)``."""
    parts = ["train", "extra"] if split == "train+extra" else [split]
    places = [data_dir, data_dir / "svhn"] if data_dir is not None else []
    files = [f"{p}_32x32.mat" for p in parts]
    found = _find(files, places)
    if found is None and download and data_dir is not None:
        for part in parts:
            _download(
                "svhn",
                data_dir,
                lambda r, p=part: torchvision_datasets.SVHN(r, split=p, download=True),
            )
        found = _find(files, places)
    if found is None:
        raise missing_files("svhn", files, places)
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
        torch.cat(images).contiguous(), torch.cat(labels), KNOWN["svhn"].class_names
    )
