"""``dataset_info("folder", ...)`` reports the classes ``build_dataset`` trains on: those of the
``train`` split when the folder or zip has splits, the top-level folders otherwise."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import pytest
from inference_helpers import CIFAR10_CLASSES, shared_data

from densenet import data

# real CIFAR-10 test images: <dataset>_<position>_<label>.png
SPLITS = {"train": ("cat", "dog", "ship"), "test": ("cat", "ship")}


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
    # The test split holds 2 of the 3 classes: labelled by name with the training classes.
    assert tuple(test.classes) == SPLITS["train"] and len(test) == 4
    assert [SPLITS["train"][t] for t in test.targets] == ["cat", "cat", "ship", "ship"]
    assert test[0][0].size == (32, 32)  # real images, read from the archive or folder


def test_a_test_class_unknown_to_training_is_an_error_naming_it(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "test" / "shipp").mkdir()
    shutil.copy(real_images()[0], tree / "test" / "shipp" / "0.png")
    with pytest.raises(
        ValueError,
        match=r"test: class folder 'shipp' is not one of the 3 "
        r"classes of .*train \(cat, dog, ship\); did you mean ship\?",
    ):
        data.build_dataset("folder", tree, "test")


def test_split_folder_without_the_requested_split_is_an_error(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    shutil.rmtree(tree / "train")  # test/ only: there is nothing to train on
    with pytest.raises(FileNotFoundError, match=r"has no train/ sub-folder \(it has test/\)"):
        data.build_dataset("folder", tree, "train")


def flat_tree(root: Path, per_class: int = 10) -> Path:
    """``root/<class>/<n>.png``: 3 classes of ``per_class`` real CIFAR-10 images, no splits."""
    images = real_images()
    for c, cls in enumerate(SPLITS["train"]):
        (root / cls).mkdir(parents=True)
        for n in range(per_class):
            shutil.copy(images[(c * per_class + n) % len(images)], root / cls / f"img{n:02d}.png")
    return root


def test_folder_without_splits_holds_out_an_announced_validation_part(tmp_path, capsys) -> None:
    flat = flat_tree(tmp_path / "flat")
    train = data.build_dataset("folder", flat, "train")
    notice = capsys.readouterr().err
    assert "has no train/, val/ or test/ sub-folders: 10% of each class" in notice
    assert "(3 of 30 files; 27 for training)" in notice
    val = data.build_dataset("folder", flat, "test")
    assert "held out" not in capsys.readouterr().err  # said once, not per part
    train_files = {m for m, _ in train.samples}
    val_files = {m for m, _ in val.samples}
    assert not train_files & val_files  # never validate on the training images
    assert len(train_files | val_files) == 30 and len(val_files) == 3
    assert sorted(val.targets) == [0, 1, 2]  # one of each class
    assert val.classes == train.classes == list(SPLITS["train"])
    # The same files every time, and in the zip of the same tree.
    assert {m for m, _ in data.build_dataset("folder", flat, "val").samples} == val_files
    packed = make_zip(flat, tmp_path / "flat.zip", directory_entries=False)
    zipped = {m for m, _ in data.build_dataset("folder", packed, "val").samples}
    assert zipped == {str(Path(m).relative_to(flat).as_posix()) for m in val_files}
    everything = data.build_dataset("folder", flat, "all")
    assert len(everything) == 30


def test_folder_without_splits_uses_the_top_level_classes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree") / "train"  # <class>/<image> only
    for root in (tree, make_zip(tree, tmp_path / "flat.zip", directory_entries=False)):
        info = data.dataset_info("folder", root)
        assert info.class_names == SPLITS["train"]
        assert tuple(data.build_dataset("folder", root, "train").classes) == info.class_names


def test_real_cifar10_jpeg_zip_classes() -> None:
    path = shared_data("cifar10-jpeg", "cifar10_yoongikim_jpeg_q75.zip")
    assert list(data.dataset_info("folder", path).class_names) == CIFAR10_CLASSES


def zip_r(folder: Path, path: Path, extra: dict[str, bytes] | None = None) -> Path:
    """What ``cd parent && zip -qr path folder`` writes: every entry under ``folder.name/``,
    folders as ``name/`` entries; ``extra`` adds members (a macOS zip's ``__MACOSX/`` copies)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(folder, folder.name + "/")
        for item in sorted(folder.rglob("*")):
            archive.write(item, item.relative_to(folder.parent).as_posix())
        for name, content in (extra or {}).items():
            archive.writestr(name, content)
    return path


MACOS_EXTRAS = {"__MACOSX/small/train/cat/._0.png": b"\0\5\26\7", "small/.DS_Store": b"\0"}


@pytest.mark.parametrize("kind", ["zip -r", "zip -r on macOS", "directory"])
def test_one_wrapping_top_folder_is_read_inside_with_a_notice(tmp_path, capsys, kind) -> None:
    tree = make_tree(tmp_path / "small")
    if kind == "directory":
        root = tmp_path
        (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden: does not count
    else:
        root = zip_r(tree, tmp_path / "small.zip", MACOS_EXTRAS if "macOS" in kind else None)
    info = data.dataset_info("folder", root)
    assert info.class_names == SPLITS["train"]
    train = data.build_dataset("folder", root, "train")
    test = data.build_dataset("folder", root, "test")
    assert (tuple(train.classes), len(train), len(test)) == (SPLITS["train"], 6, 4)
    assert train[0][0].size == (32, 32)
    assert data.folder_splits(root) == ["train", "test"]
    notices = capsys.readouterr().err.splitlines()
    assert notices == [
        f"densenet: {root} holds only the folder small/: reading the images inside it"
    ]


def test_a_one_class_flat_tree_is_not_unwrapped(tmp_path) -> None:
    flat = flat_tree(tmp_path / "flat")
    for cls in SPLITS["train"][1:]:
        shutil.rmtree(flat / cls)
    assert data.build_dataset("folder", flat, "all").classes == ["cat"]


def nested_images(horse: Path) -> None:
    (horse / "batch1").mkdir(parents=True)
    shutil.copy(real_images()[0], horse / "batch1" / "0.jpg")


def heic_photos(horse: Path) -> None:
    horse.mkdir()
    for name in ("a.heic", "b.heic"):
        (horse / name).write_bytes(b"\0\0\0\x18ftypheic")


@pytest.mark.parametrize("kind", ["zip -r", "directory"])
@pytest.mark.parametrize(
    ("make", "holds"),
    [
        (Path.mkdir, "it is empty"),
        (nested_images, "it has 1 sub-folder: batch1/; images in nested folders are not read"),
        (heic_photos, "it has 2 other files: a.heic, b.heic"),
    ],
    ids=["empty", "nested", "heic"],
)
def test_a_class_folder_without_images_directly_inside_is_an_error_naming_it(
    tmp_path, kind, make, holds
) -> None:
    tree = make_tree(tmp_path / "small")
    make(tree / "train" / "horse")
    root = tree if kind == "directory" else zip_r(tree, tmp_path / "small.zip")
    where = f"{root}/small/train" if kind != "directory" else f"{root}/train"
    message = (
        f"class folder {where}/horse has no images (.jpg, .jpeg, .png, ...) directly inside "
        f"({holds}); put its images directly in it, or remove the folder"
    )
    for split in ("train", "test"):  # test: the training classes are read first
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            data.build_dataset("folder", root, split)


def test_folder_with_only_train_holds_out_part_of_it(tmp_path, capsys) -> None:
    # The common download: train/<class>/ and nothing to validate on (a test/ without labels
    # is usually left out). It validates on a part of train/, as a flat tree does.
    tree = tmp_path / "tree"
    flat_tree(tree / "train")
    assert data.split_folder(tree, "val") is None
    train = data.build_dataset("folder", tree, "train")
    val = data.build_dataset("folder", tree, "val")
    notice = capsys.readouterr().err
    assert notice.count("held out") == 1
    assert "has a train/ sub-folder but no val/ or test/: 10% of each class" in notice
    train_files = {m for m, _ in train.samples}
    val_files = {m for m, _ in val.samples}
    assert not train_files & val_files and len(val_files) == 3 and len(train_files) == 27
    assert all(m.startswith(str(tree / "train")) for m in train_files | val_files)
    assert val.classes == train.classes == list(SPLITS["train"])
    assert len(data.build_dataset("folder", tree, "all")) == 30
