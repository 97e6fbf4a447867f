"""The multi-label mosaic dataset builder: its CSVs follow the labels-file rules, from the files."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from multilabel_fixtures import (
    COLUMNS,
    FASHION_MNIST_DIR,
    SPLITS,
    build_mosaic_dataset,
    picture_key,
    tiles,
)
from PIL import Image

from densenet.data import build_dataset


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory) -> tuple[Path, list[str]]:
    if not FASHION_MNIST_DIR.exists():
        pytest.skip(
            f"real data not found at {FASHION_MNIST_DIR} (../shared/data beside the checkout)"
        )
    root = tmp_path_factory.mktemp("mosaics")
    return root, build_mosaic_dataset(root, groups=(10, 4, 4), mosaics_per_group=3)


def read_rows(root: Path, split: str) -> list[dict[str, str]]:
    with open(root / f"{split}.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def test_every_row_names_the_classes_of_the_items_in_its_image(mosaics):
    root, names = mosaics
    source = build_dataset("fashion_mnist", FASHION_MNIST_DIR, "test")
    class_of = {
        picture_key(p): names[int(t)]
        for p, t in zip(source.images[:, 0].numpy(), source.targets, strict=True)
    }
    counts = {split: len(read_rows(root, split)) for split in SPLITS}
    assert counts == {"train": 30, "val": 12, "test": 12}
    label_sets = []
    for split in SPLITS:
        for row in read_rows(root, split):
            image = Image.open(root / row["image"])
            assert image.format == "PNG" and image.mode == "L" and image.size == (56, 56)
            present = sorted({class_of[picture_key(tile)] for tile in tiles(np.asarray(image))})
            assert row["labels"] == "|".join(present)  # ChestX-ray14's form, alphabetical
            assert row["labels"] and "No Finding" not in row["labels"]
            label_sets.append(present)
    assert any(len(labels) >= 2 for labels in label_sets)  # multi-label for real
    assert {name for labels in label_sets for name in labels} == set(names)
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(
        Path(row["image"]).name for split in SPLITS for row in read_rows(root, split)
    )


def test_no_picture_is_in_two_groups_and_no_group_in_two_splits(mosaics):
    root, _ = mosaics
    groups_of_picture = defaultdict(set)
    splits_of_group = defaultdict(set)
    for split in SPLITS:
        for row in read_rows(root, split):
            splits_of_group[row["group"]].add(split)
            for tile in tiles(np.asarray(Image.open(root / row["image"]))):
                groups_of_picture[picture_key(tile)].add(row["group"])
    assert len(splits_of_group) == 18
    assert all(len(splits) == 1 for splits in splits_of_group.values())
    assert all(len(groups) == 1 for groups in groups_of_picture.values())
    # The image name starts with its group, as ChestX-ray14's <patient>_<visit>.png.
    for split in SPLITS:
        for row in read_rows(root, split):
            assert Path(row["image"]).name.startswith(row["group"] + "_")


def test_same_seed_same_dataset_and_too_large_a_request_is_refused(mosaics, tmp_path):
    root, _ = mosaics
    build_mosaic_dataset(tmp_path / "again", groups=(10, 4, 4), mosaics_per_group=3)
    for split in SPLITS:
        assert (tmp_path / "again" / f"{split}.csv").read_bytes() == (
            root / f"{split}.csv"
        ).read_bytes()
    with pytest.raises(ValueError, match="source pictures needed"):
        build_mosaic_dataset(tmp_path / "big", groups=(5000, 0, 0), pictures_per_group=6)


def test_labels_files_that_share_images_or_groups_across_splits_are_named(tmp_path, capsys):
    from densenet.data.labels import read_table

    (tmp_path / "train.csv").write_text(
        "image,labels,group\na.png,x,p1\nb.png,y,p2\nb.png,x|y,p2\ne.png,X,p5\n"
    )
    (tmp_path / "val.csv").write_text("image,labels,group\nc.png,x,p3\n")
    (tmp_path / "test.csv").write_text("image,labels,group\na.png,x,p1\nd.png,y,p4\n")
    read_table(tmp_path)
    err = capsys.readouterr().err
    assert "1 image in more than one split (e.g. a.png in test, train)" in err
    assert "1 group in more than one split (e.g. p1 in test, train)" in err
    assert "1 image listed with different labels in different rows (e.g. b.png)" in err
    assert "labels X and x differ only in case: two labels" in err
    clean = tmp_path / "clean"
    clean.mkdir()
    for split, row in (("train", "a.png,x,p1\nb.png,y,p2"), ("val", "c.png,x,p3"), ("test", "d.png,y,p4")):  # fmt: skip
        (clean / f"{split}.csv").write_text(f"image,labels,group\n{row}\n")
    read_table(clean)
    assert "more than one split" not in capsys.readouterr().err


def test_chestxray14_column_names_are_read(tmp_path):
    from densenet.data.labels import read_rows

    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age\n"
        "00000001_000.png,Cardiomegaly|Emphysema,0,1,58\n00000002_000.png,No Finding,0,2,81\n"
    )
    rows = read_rows(path)
    assert [(r.image, r.labels, r.group) for r in rows] == [
        ("00000001_000.png", ("Cardiomegaly", "Emphysema"), "1"),
        ("00000002_000.png", (), "2"),
    ]


def test_a_listed_image_that_is_missing_names_the_labels_file_row(tmp_path):
    from densenet.data.images import BadImageError
    from densenet.data.labels import LabelsFileImages, read_table

    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.csv").write_text("image,labels\nimages/gone.png,x\n")
    images = LabelsFileImages(read_table(tmp_path), "train")
    with pytest.raises(BadImageError, match="gone.png .*remove its row from the labels file"):
        images.load(0)
    images.drop_unreadable()
    assert len(images.bad_images) == 1 and "labels file" not in images.bad_images[0]


def test_a_labels_file_dataset_without_val_csv_validates_on_test_csv(tmp_path, capsys):
    from densenet.data.labels import LabelsFileImages, read_table

    (tmp_path / "train.csv").write_text("image,labels\na.png,x\nb.png,y\n")
    (tmp_path / "test.csv").write_text("image,labels\nc.png,x\n")
    table = read_table(tmp_path)
    val = LabelsFileImages(table, "val")
    assert [r.image for r in val.rows] == ["c.png"]
    assert f"{tmp_path} has no val.csv: using test.csv for split val" in capsys.readouterr().err
    (tmp_path / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no val.csv"):
        LabelsFileImages(read_table(tmp_path), "val")
