"""Class-per-folder image trees (a directory or a .zip): :class:`FolderImages`.

Class folders are matched to a model's or the training split's classes BY NAME; a folder without
``train``/``val``/``test`` sub-folders, or with ``train`` alone, holds out part of each class
(:func:`folder_dataset`).
Images are decoded by :func:`densenet.data.images.load_image`.
"""

from __future__ import annotations

import copy
import functools
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
from densenet.messages import count, did_you_mean, notice_once
from densenet.progress import progress

SPLIT_FOLDERS = ("train", "val", "test")
# A folder without split sub-folders (or with train/ alone) holds out this share of each class
# for validation, the files whose hash of "<class>/<file name>" is lowest (not chosen by --seed):
# the same files whatever the run's seed. Adding or removing files can move others across;
# checkpoints record a fingerprint of the part (holdout_digest) so that is noticed.
HOLDOUT_PERCENT = 10
HOLDOUT_SALT = "densenet-holdout-0"
# Folders that tools add beside the data (macOS zips, hidden folders): never a class or a wrapper.
MACOS_ZIP_FOLDER = "__MACOSX"


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
        """``(class names, [(member path, class index)])`` of ``root[/subdir]``, sorted.

        A class folder holding no image directly inside is a ``ValueError`` naming it and what it
        holds (an empty folder, nested sub-folders, other files): never silently fewer classes.
        """
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such image folder or .zip (give --data-dir)")
        inside = PurePosixPath(_inner_folder(root) or "", subdir or "")
        where = "/".join((str(root), *inside.parts))
        folders = _class_folders(root, inside)
        members = [
            (name, member)
            for name, (files, _) in folders.items()
            for member in files
            # Hidden files (macOS's ._name.jpg AppleDouble companions) and folders are not data.
            if member.lower().endswith(IMAGE_EXTENSIONS)
            and is_data_name(name)
            and is_data_name(PurePosixPath(member).name)
        ]
        classes = sorted({c for c, _ in members})
        if not classes:
            raise FileNotFoundError(
                f"{where}: no images in class sub-folders (<class>/<image>.jpg)"
            )
        imageless = sorted(n for n in folders if n not in classes and is_data_name(n))
        if imageless:
            raise ValueError(_imageless_message(where, imageless, folders))
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
        return InMemoryImages.stack(
            arrays, torch.tensor(self.targets), self.classes, str(self.root)
        )


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
    if not root.exists():
        raise FileNotFoundError(f"--data-dir {root}: no such image folder or .zip")
    if root.is_file() and not zipfile.is_zipfile(root):
        raise ValueError(
            f"--data-dir {root} is a file but not a readable .zip (damaged, or another format); "
            "give a folder of <split>/<class>/ images or a .zip of one"
        )
    inner = _inner_folder(root)
    tops = _listing(root, PurePosixPath(inner or ""))[0]
    return [s for s in SPLIT_FOLDERS if s in tops]


def holds_out(splits: Sequence[str]) -> bool:
    """Does a folder with these split sub-folders validate on a part held out of its training
    images? Yes without splits (a flat ``<class>/`` tree) and with train/ only."""
    return list(splits) in ([], ["train"])


def holdout_description(root: str | Path, splits: Sequence[str]) -> str:
    """Why a folder (:func:`holds_out`) has no validation images of its own, for messages."""
    if splits:
        return f"{root} has a train/ sub-folder but no val/ or test/"
    return f"{root} has no train/, val/ or test/ sub-folders"


def split_folder(root: str | Path, split: str) -> str | None:
    """The sub-folder of ``root`` that ``split`` reads: itself, else 'val' and 'test' stand for
    each other; None where ``split`` is a held-out part (a folder without split sub-folders, or
    with train/ only: :func:`holds_out`). ``FileNotFoundError`` when the folder has splits
    but none for ``split``."""
    if split not in (*SPLIT_FOLDERS, "all"):
        raise ValueError(
            f"a folder dataset has no split {split!r}; choose one of train, val, test, all"
            f"{did_you_mean(split, (*SPLIT_FOLDERS, 'all'), most=1)}"
        )
    splits = folder_splits(root)
    if holds_out(splits) or split == "all":
        return None
    candidates = {"train": ["train"], "val": ["val", "test"], "test": ["test", "val"]}[split]
    subdir = next((c for c in candidates if c in splits), None)
    if subdir is None:
        raise FileNotFoundError(
            f"{root} has no {' or '.join(c + '/' for c in candidates)} sub-folder (it has "
            f"{', '.join(s + '/' for s in splits)}); add one, or give a folder without split "
            "sub-folders (or with train/ alone) to hold out part of it"
        )
    return subdir


def is_data_name(name: str) -> bool:
    """Is this folder or file name part of the data (not hidden, not a macOS zip's extra)?"""
    return not name.startswith(".") and name != MACOS_ZIP_FOLDER


def _zip_names(root: Path) -> list[str]:
    """The entries of the zip ``root`` (folders end with ``/``); ``ValueError`` for a path that
    escapes the archive. Read once per version of the file (a large zip's index takes seconds)."""
    stat = root.stat()
    return _read_zip_names(str(root), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_zip_names(path: str, mtime_ns: int, size: int) -> list[str]:
    """:func:`_zip_names` of the zip at ``path`` as it is at ``mtime_ns`` with ``size`` bytes."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    for n in names:
        parts = PurePosixPath(n).parts
        if n.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
            raise ValueError(f"{path}: unsafe path {n!r} in the zip (escapes the archive)")
    return names


def _listing(root: Path, inside: PurePosixPath) -> tuple[set[str], list[str]]:
    """``(folder names, file names)`` directly inside ``inside`` of the folder or zip ``root``."""
    if not zipfile.is_zipfile(root):
        base = root.joinpath(*inside.parts)
        entries = list(base.iterdir()) if base.is_dir() else []
        return {e.name for e in entries if e.is_dir()}, [e.name for e in entries if e.is_file()]
    depth, folders, files = len(inside.parts), set(), []
    for name in _zip_names(root):
        parts = PurePosixPath(name).parts
        if parts[:depth] != inside.parts or len(parts) <= depth:
            continue
        if len(parts) > depth + 1 or name.endswith("/"):
            folders.add(parts[depth])
        else:
            files.append(parts[depth])
    return folders, files


def _inner_folder(root: Path) -> str | None:
    """The one top folder to read inside, if ``root`` holds nothing else that counts and that
    folder holds no image directly (it wraps the tree: ``zip -r small.zip small`` puts everything
    under ``small/``); else None. Says so in one notice."""
    folders, files = _listing(root, PurePosixPath())
    folders = {f for f in folders if is_data_name(f)}
    if len(folders) != 1 or any(is_data_name(f) for f in files):
        return None
    (top,) = folders
    if top in SPLIT_FOLDERS:
        return None  # a tree with one split
    if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in _listing(root, PurePosixPath(top))[1]):
        return None  # a one-class flat tree: the folder is the class
    notice_once(f"{root} holds only the folder {top}/: reading the images inside it")
    return top


def _class_folders(root: Path, prefix: PurePosixPath) -> dict[str, tuple[list[str], list[str]]]:
    """Each folder in ``prefix`` of the folder or zip ``root``: its name -> (member paths of the
    files directly inside it, names of its sub-folders)."""
    folders: dict[str, tuple[list[str], list[str]]] = {}
    if zipfile.is_zipfile(root):
        depth = len(prefix.parts)
        for name in _zip_names(root):
            parts = PurePosixPath(name).parts
            if parts[:depth] != prefix.parts or len(parts) <= depth:
                continue
            if len(parts) == depth + 1 and not name.endswith("/"):
                continue  # a file beside the class folders
            files, subfolders = folders.setdefault(parts[depth], ([], []))
            if len(parts) == depth + 2 and not name.endswith("/"):
                files.append(name)
            elif len(parts) > depth + 1 and parts[depth + 1] not in subfolders:
                subfolders.append(parts[depth + 1])
        return folders
    base = root.joinpath(*prefix.parts)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no such folder (expected {root}/<split>/<class>/)")
    for folder in os.scandir(base):
        if folder.is_dir():
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
            folders[folder.name] = (
                [e.path for e in entries if e.is_file()],
                [e.name for e in entries if e.is_dir()],
            )
    return folders


def _imageless_message(
    where: str, names: list[str], folders: dict[str, tuple[list[str], list[str]]]
) -> str:
    """One line naming the first class folder without images and what it holds instead."""
    files, subfolders = folders[names[0]]
    held = []
    if subfolders:
        shown = ", ".join(f + "/" for f in subfolders[:3]) + (
            ", ..." if len(subfolders) > 3 else ""
        )
        held.append(f"{count(len(subfolders), 'sub-folder')}: {shown}")
    if files:
        shown = ", ".join(PurePosixPath(f).name for f in files[:3])
        held.append(
            f"{count(len(files), 'other file')}: {shown}" + (", ..." if len(files) > 3 else "")
        )
    contents = f"it has {' and '.join(held)}" if held else "it is empty"
    nested = "; images in nested folders are not read" if subfolders else ""
    others = f" (and {len(names) - 1} more: {', '.join(names[1:4])})" if len(names) > 1 else ""
    kinds = ", ".join(IMAGE_EXTENSIONS[:3])
    return (
        f"class folder {where}/{names[0]}{others} has no images ({kinds}, ...) directly inside "
        f"({contents}{nested}); put its images directly in it, or remove the folder"
    )


def folder_classes(root: Path) -> list[str]:
    """The class names of a folder dataset: its train split's (else its first split's), or the
    top-level class folders of a flat tree."""
    return FolderImages.scan(root, _first_split(folder_splits(root)))[0]


def _first_split(splits: Sequence[str]) -> str | None:
    """The sub-folder that names the classes (and that a held-out part is taken from)."""
    return splits[0] if splits else None


def _holdout_name(member: str) -> str:
    """``"<class>/<file>"``: what chooses a file's side, whatever the folder's path or zip."""
    return f"{Path(member).parent.name}/{Path(member).name}"


def _holdout(dataset: FolderImages) -> list[bool]:
    """For each sample: is it held out for validation? Per class, the ``HOLDOUT_PERCENT``%
    (rounded, at least one of a class of two or more) whose "<class>/<file>" hashes lowest."""
    by_class: dict[int, list[tuple[bytes, int]]] = {}
    for i, (member, target) in enumerate(dataset.samples):
        key = f"{HOLDOUT_SALT}/{_holdout_name(member)}".encode()
        by_class.setdefault(target, []).append((hashlib.sha256(key).digest(), i))
    held = [False] * len(dataset.samples)
    for members in by_class.values():
        count = max(1, round(len(members) * HOLDOUT_PERCENT / 100)) if len(members) > 1 else 0
        for _, i in sorted(members)[:count]:
            held[i] = True
    return held


def holdout_digest(root: str | Path) -> str | None:
    """A fingerprint of the files a folder holds out for validation (None for a folder with its
    own validation folder). Training records it; resume and eval compare it, so that a folder
    changed since (files added or removed move others into or out of the held-out part) is
    never validated or scored as if it were the same."""
    splits = folder_splits(root)
    if not holds_out(splits):
        return None
    dataset = FolderImages(root, _first_split(splits))
    held = _holdout(dataset)
    names = sorted(
        _holdout_name(member)
        for (member, _), is_held in zip(dataset.samples, held, strict=True)
        if is_held
    )
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


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
    if holds_out(splits):
        dataset = FolderImages(
            root, _first_split(splits), transform, classes=classes, classes_from=classes_from
        )
        if split == "all":
            return dataset
        held = _holdout(dataset)
        total, held_out = len(held), sum(held)
        notice_once(  # training reads both parts: said once
            f"{holdout_description(root, splits)}: {HOLDOUT_PERCENT}% of each class, chosen by "
            f"file name, is held out for validation ({held_out} of {total} files; "
            f"{total - held_out} for training). Make train/ and val/ sub-folders to choose them "
            "yourself"
        )
        return dataset.subset([i for i, h in enumerate(held) if h == (split != "train")])
    if split == "all":
        raise ValueError(
            f"{root} has split sub-folders ({', '.join(splits)}); choose one with --split"
        )
    subdir = split_folder(root, split)
    if classes is None and subdir != splits[0]:
        # Every split is labelled by the training classes, matched by name.
        classes = FolderImages.scan(root, splits[0])[0]
        classes_from = f"the {len(classes)} classes of {root}/{splits[0]}"
    return FolderImages(root, subdir, transform, classes=classes, classes_from=classes_from)
