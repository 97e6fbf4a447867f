"""Class-per-folder image trees (a directory or a .zip): :class:`FolderImages`.

Class folders are matched to a model's or the training split's classes BY NAME; a folder without
``train``/``val``/``test`` sub-folders holds out part of each class (:func:`folder_dataset`).
Images are decoded by :func:`densenet.data.images.load_image`.
"""

from __future__ import annotations

import copy
import hashlib
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from densenet.data.datasets import InMemoryImages
from densenet.data.images import IMAGE_EXTENSIONS, SKIP_HINT, BadImageError, load_image
from densenet.messages import did_you_mean, notice
from densenet.progress import progress

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
                for d in base.iterdir()
                if d.is_dir()
                for f in d.iterdir()
                if f.is_file()
            ]
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
    ``classes``; a ``ValueError`` naming the folders that are not among ``classes``.

    A folder matches its class exactly, or else by :func:`folder_key` (case, spaces and
    punctuation ignored), since a class such as Fashion-MNIST's ``T-shirt/top`` cannot be a
    folder name as it is: ``T-shirt_top`` and ``t-shirt top`` find it.
    """
    keys = [folder_key(name) for name in classes]
    index = {key: i for i, key in enumerate(keys) if keys.count(key) == 1}
    index.update({name: i for i, name in enumerate(classes)})
    for name in found:
        if name not in index and folder_key(name) in index:
            index[name] = index[folder_key(name)]
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


def folder_key(name: str) -> str:
    """``name`` without case, spaces or punctuation: ``T-shirt/top`` and ``t_shirt top`` -> ``tshirttop``."""
    return "".join(ch for ch in name.casefold() if ch.isalnum())


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


def folder_classes(root: Path) -> list[str]:
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


def folder_dataset(
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
        notice(
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
