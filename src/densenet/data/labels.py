"""Labels-file datasets (``--dataset csv``): images listed in CSV files, as ChestX-ray14 ships.

A folder ``DIR`` holds ``train.csv``, ``val.csv`` and ``test.csv`` (or one ``labels.csv`` that
``split_by="group"`` splits) with the columns ``image`` (a path relative to ``DIR``), ``labels``
(``|``-separated names; empty or ``No Finding`` means none, as ``Data_Entry_2017.csv`` writes
them) and optionally ``group`` (a patient id, say: a split never divides a group).

The label names are the sorted union of the names in the training rows. A CSV whose training rows
each carry exactly one label is an ordinary classification set (``task`` ``multiclass``: targets
are class indices); any training row with no label or two or more makes it ``multilabel``
(targets are multi-hot float vectors ``(L,)``). Images decode through :func:`load_image`.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from densenet.data.datasets import InMemoryImages
from densenet.data.images import BadImageError, load_image
from densenet.messages import count, did_you_mean, notice_once
from densenet.multilabel import TASKS
from densenet.progress import progress

CSV_SPLITS = ("train", "val", "test")
NO_LABEL = "No Finding"  # ChestX-ray14's name for an image without findings
LABEL_SEPARATOR = "|"
SPLIT_BY = ("group",)
# --split-by group: the share of groups (not rows) each split gets from one labels file.
GROUP_SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}
STATISTICS_IMAGES = 256  # training images read to estimate the dataset's mean and std


@dataclass(frozen=True)
class LabelRow:
    """One CSV row: the image path relative to the folder, its label names, its group."""

    image: str
    labels: tuple[str, ...]
    group: str


def parse_labels(text: str) -> tuple[str, ...]:
    """``"Effusion|Infiltration"`` -> ``("Effusion", "Infiltration")``; empty or ``No Finding``
    -> ``()``."""
    names = [name.strip() for name in (text or "").split(LABEL_SEPARATOR)]
    return tuple(dict.fromkeys(n for n in names if n and n != NO_LABEL))


# What to do about an image a labels file lists that cannot be read (or does not exist).
ROW_HINT = "fix its path or remove its row from the labels file, or pass --skip-bad-images"
# ChestX-ray14's Data_Entry_2017.csv names the columns so.
COLUMN_ALIASES = {"Image Index": "image", "Finding Labels": "labels", "Patient ID": "group"}


def read_rows(path: Path) -> list[LabelRow]:
    """The rows of labels file ``path``; a ``ValueError`` naming a missing column."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames and not {"image", "labels"} & {c.strip() for c in reader.fieldnames}:
            reader.fieldnames = [COLUMN_ALIASES.get(c.strip(), c) for c in reader.fieldnames]
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("image", "labels") if c not in columns]
        if missing:
            raise ValueError(
                f"{path}: no {' or '.join(repr(c) for c in missing)} column (it has "
                f"{', '.join(columns) or 'none'}); a labels file needs the columns image,labels"
                "[,group]"
            )
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return [
        LabelRow(row["image"], parse_labels(row["labels"]), row.get("group", "")) for row in rows
    ]


def label_files(root: Path) -> list[Path]:
    """The CSV files directly in ``root``."""
    return sorted(p for p in root.iterdir() if p.suffix.lower() == ".csv")


def _single_file(root: Path) -> Path:
    """The one labels file that ``split_by`` splits: ``labels.csv``, or the only CSV."""
    if (root / "labels.csv").is_file():
        return root / "labels.csv"
    files = label_files(root)
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise FileNotFoundError(
            f"--split-by group splits one labels file: put it at {root}/labels.csv (found {found})"
        )
    return files[0]


def _group_split(rows: list[LabelRow], seed: int, source: Path) -> dict[str, list[LabelRow]]:
    """Rows of one file dealt to train/val/test by whole groups, in an order fixed by ``seed``."""
    if any(not row.group for row in rows):
        raise ValueError(
            f"{source}: --split-by group needs a 'group' column with a value in every row "
            "(a patient id, say)"
        )
    groups = sorted({row.group for row in rows})
    if len(groups) < len(CSV_SPLITS):
        raise ValueError(f"{source}: {len(groups)} groups cannot make train, val and test")

    def rank(group: str) -> bytes:
        return hashlib.sha256(f"{seed}/{group}".encode()).digest()

    ordered = sorted(groups, key=rank)
    held = max(1, round(len(groups) * GROUP_SHARES["val"]))
    side = {g: "val" for g in ordered[:held]}
    side.update({g: "test" for g in ordered[held : 2 * held]})
    splits: dict[str, list[LabelRow]] = {split: [] for split in CSV_SPLITS}
    for row in rows:
        splits[side.get(row.group, "train")].append(row)
    return splits


def _note_leaks(root: Path, splits: dict[str, list[LabelRow]]) -> None:
    """Say where the splits share an image or a group (a score on the later split is then
    partly on training data) and where one image is listed with two sets of labels."""
    where: dict[str, dict[str, set[str]]] = {"image": {}, "group": {}}
    labels: dict[str, set[tuple[str, ...]]] = {}
    for split, rows in splits.items():
        for row in rows:
            where["image"].setdefault(row.image, set()).add(split)
            if row.group:
                where["group"].setdefault(row.group, set()).add(split)
            labels.setdefault(row.image, set()).add(tuple(sorted(row.labels)))
    for kind, found in where.items():
        shared = sorted(k for k, in_splits in found.items() if len(in_splits) > 1)
        if shared:
            notice_once(
                f"{root}: {count(len(shared), kind)} in more than one split (e.g. {shared[0]} in "
                f"{', '.join(sorted(found[shared[0]]))}): scores on val/test are then partly on "
                "training data; put each in one split"
            )
    conflicting = sorted(image for image, sets in labels.items() if len(sets) > 1)
    if conflicting:
        notice_once(
            f"{root}: {count(len(conflicting), 'image')} listed with different labels in "
            f"different rows (e.g. {conflicting[0]}); each row trains as written"
        )


@dataclass(frozen=True)
class LabelsTable:
    """A labels-file dataset's rows by split, its label names and its task."""

    root: Path
    splits: dict[str, list[LabelRow]]
    label_names: tuple[str, ...]
    task: str


def read_table(root: str | Path, split_by: str | None = None, seed: int = 0) -> LabelsTable:
    """Read ``root``'s labels files (see the module docstring); errors name the file."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root}: no such folder (dataset csv)")
    if split_by is not None:
        if split_by not in SPLIT_BY:
            raise ValueError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")
        source = _single_file(root)
        splits = _group_split(read_rows(source), seed, source)
        sizes = ", ".join(f"{len(splits[s])} {s}" for s in CSV_SPLITS)
        notice_once(f"{source}: split by group (seed {seed}) into {sizes} images; no group divided")
    else:
        missing = [s for s in CSV_SPLITS if not (root / f"{s}.csv").is_file()]
        if "train" in missing:
            found = ", ".join(p.name for p in label_files(root)) or "none"
            raise FileNotFoundError(
                f"{root}: no train.csv (found {found}); give train.csv, val.csv and test.csv, or "
                "one labels.csv with a group column and --split-by group"
            )
        splits = {s: read_rows(root / f"{s}.csv") for s in CSV_SPLITS if s not in missing}
    train = splits["train"]
    if not train:
        raise ValueError(f"{root}: the training split has no rows")
    _note_leaks(root, splits)
    names = tuple(sorted({name for row in train for name in row.labels}))
    by_folded: dict[str, list[str]] = {}
    for name in names:
        by_folded.setdefault(name.casefold(), []).append(name)
    for spellings in (s for s in by_folded.values() if len(s) > 1):
        notice_once(f"{root}: labels {' and '.join(spellings)} differ only in case: two labels")
    single = all(len(row.labels) == 1 for row in train)
    return LabelsTable(root, splits, names, "multiclass" if single else "multilabel")


def resolve_task(table_task: str, task: str) -> str:
    """The task a run uses: ``task`` itself, or the table's for ``auto``."""
    if task not in ("auto", *TASKS):
        raise ValueError(f"task must be auto, multiclass or multilabel, got {task!r}")
    if task == "multiclass" and table_task == "multilabel":
        raise ValueError(
            "task multiclass needs exactly one label per training row, and this labels file has "
            "rows with none or several; use task: multilabel (or auto)"
        )
    return table_task if task == "auto" else task


class LabelsFileImages(Dataset):
    """Split ``split`` of a labels-file dataset: items ``(transform(image), target)``.

    ``target`` is the class index (``task`` multiclass) or a float multi-hot ``(L,)`` tensor
    (multilabel) over ``class_names``. ``classes`` given (a model's labels): targets follow
    their order, and a label outside them is a ``ValueError``. Images are decoded to
    ``channels`` (1 or 3; None: as stored).
    """

    def __init__(
        self,
        table: LabelsTable,
        split: str,
        task: str = "auto",
        classes: Sequence[str] | None = None,
        transform: Callable | None = None,
        channels: int | None = None,
    ) -> None:
        stand_in = {"val": "test", "test": "val"}.get(split)
        if split not in table.splits and stand_in in table.splits:  # as folders' val/ and test/
            notice_once(f"{table.root} has no {split}.csv: using {stand_in}.csv for split {split}")
            split = stand_in
        if split not in table.splits:
            raise FileNotFoundError(f"{table.root}: no {split}.csv (dataset csv, split {split})")
        self.root = table.root
        self.task = resolve_task(table.task, task)
        self.classes = list(classes if classes is not None else table.label_names)
        self.class_names = self.classes
        self.rows = table.splits[split]
        self.targets = _targets(self.rows, self.classes, self.task, f"{table.root}/{split}")
        self.transform = transform
        self.channels = channels
        self.skipped = 0
        self.bad_images: list[str] = []

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int, channels: int | None = None) -> Any:
        """Image ``index`` decoded by :func:`load_image`; ``BadImageError`` naming the file."""
        path = self.root / self.rows[index].image
        return load_image(path, str(path), ROW_HINT, channels or self.channels)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = self.load(index)
        target = self.targets[index]
        return (self.transform(image) if self.transform else image), (
            target if self.task == "multilabel" else int(target)
        )

    def subset(self, indices: Sequence[int] | torch.Tensor) -> LabelsFileImages:
        """The rows at ``indices`` (same labels), without reading them."""
        part = object.__new__(LabelsFileImages)
        part.__dict__.update(self.__dict__)
        index = torch.as_tensor(indices, dtype=torch.long)
        part.rows = [self.rows[int(i)] for i in index]
        part.targets = self.targets[index]
        return part

    def drop_unreadable(self) -> None:
        """Decode every image once and drop those :func:`load_image` refuses."""
        good = []
        for index in progress(range(len(self.rows)), desc=f"checking images in {self.root}"):
            try:
                self.load(index)
            except BadImageError as error:
                self.bad_images.append(str(error).removesuffix(f"; {ROW_HINT}"))
            else:
                good.append(index)
        self.skipped += len(self.rows) - len(good)
        kept = self.subset(good)
        self.rows, self.targets = kept.rows, kept.targets

    def image_side(self) -> int:
        """The longer side of the first image (pixels)."""
        return max(self.load(0).size)

    def to_memory(self, channels: int) -> InMemoryImages:
        """Decode everything once into a uint8 tensor (all images must share one size)."""
        indices = progress(range(len(self.rows)), desc=f"decoding {self.root}")
        arrays = [np.asarray(self.load(i, channels)) for i in indices]
        return InMemoryImages.stack(arrays, self.targets, self.classes, str(self.root))


def _targets(rows: list[LabelRow], classes: list[str], task: str, where: str) -> torch.Tensor:
    """Class indices ``(N,)`` (multiclass) or multi-hot float ``(N, L)`` (multilabel)."""
    index = {name: i for i, name in enumerate(classes)}
    for row in rows:
        unknown = [name for name in row.labels if name not in index]
        if unknown:
            raise ValueError(
                f"{where}: {row.image} has label {unknown[0]!r}, which is not one of the "
                f"{len(classes)} labels of the training split{did_you_mean(unknown[0], classes)}"
            )
        if task == "multiclass" and len(row.labels) != 1:
            raise ValueError(
                f"{where}: {row.image} has {len(row.labels)} labels; a multiclass dataset needs "
                "exactly one per row"
            )
    if task == "multiclass":
        return torch.tensor([index[row.labels[0]] for row in rows], dtype=torch.long)
    hot = torch.zeros(len(rows), len(classes))
    for i, row in enumerate(rows):
        hot[i, [index[name] for name in row.labels]] = 1.0
    return hot


def channel_statistics(images: LabelsFileImages) -> tuple[int, tuple, tuple]:
    """``(channels, mean, std)`` of up to :data:`STATISTICS_IMAGES` images spread over the split:
    gray images give 1 channel, any color image 3; pixel values in [0, 1]."""
    step = max(1, len(images) // STATISTICS_IMAGES)
    picked = list(range(0, len(images), step))[:STATISTICS_IMAGES]
    channels = 1 if all(images.load(i).mode == "L" for i in picked[:16]) else 3
    sums = np.zeros(channels)
    squares = np.zeros(channels)
    pixels = 0
    for i in picked:
        array = np.asarray(images.load(i, channels), dtype=np.float64) / 255
        array = array.reshape(-1, channels)
        sums += array.sum(0)
        squares += (array**2).sum(0)
        pixels += len(array)
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 1e-12))
    return channels, tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)
