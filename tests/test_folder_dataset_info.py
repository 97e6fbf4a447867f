"""``dataset_info("folder", ...)`` reports the classes ``build_dataset`` trains on: those of the
``train`` split when the folder or zip has splits, the top-level folders otherwise."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
from inference_helpers import CIFAR10_CLASSES, shared_data

from densenet import data

# real CIFAR-10 test images: <dataset>_<position>_<label>.png
SPLITS = {"train": ("cat", "dog", "ship"), "test": ("airplane", "cat")}


def real_images() -> list[Path]:
    return sorted(shared_data("test-samples").glob("cifar10_*.png"))


def make_tree(root: Path) -> Path:
    """``root/{train,test}/<class>/<n>.png`` with different classes per split."""
    images = iter(real_images())
    for split, classes in SPLITS.items():
        for cls in classes:
            for n in range(2):
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(next(images), folder / f"{n}.png")
    return root


def make_zip(tree: Path, path: Path, directory_entries: bool) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for item in sorted(tree.rglob("*")):
            if item.is_file() or directory_entries:
                archive.write(item, item.relative_to(tree).as_posix())
    return path


@pytest.mark.parametrize("kind", ["zip", "zip with directory entries", "directory"])
def test_folder_info_reports_the_train_split_classes(tmp_path: Path, kind: str) -> None:
    tree = make_tree(tmp_path / "tree")
    root = tree if kind == "directory" else make_zip(tree, tmp_path / "d.zip", "entries" in kind)
    info = data.dataset_info("folder", root)
    assert info.class_names == SPLITS["train"] and info.num_classes == 3
    train = data.build_dataset("folder", root, "train")
    assert tuple(train.classes) == info.class_names and len(train) == 6
    test = data.build_dataset("folder", root, "test")
    assert tuple(test.classes) == SPLITS["test"] and len(test) == 4
    assert test[0][0].size == (32, 32)  # real images, read from the archive or folder


def test_folder_without_splits_uses_the_top_level_classes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree") / "train"  # <class>/<image> only
    for root in (tree, make_zip(tree, tmp_path / "flat.zip", directory_entries=False)):
        info = data.dataset_info("folder", root)
        assert info.class_names == SPLITS["train"]
        assert tuple(data.build_dataset("folder", root, "train").classes) == info.class_names


def test_real_cifar10_jpeg_zip_classes() -> None:
    path = shared_data("cifar10-jpeg", "cifar10_yoongikim_jpeg_q75.zip")
    assert list(data.dataset_info("folder", path).class_names) == CIFAR10_CLASSES
