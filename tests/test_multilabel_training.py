"""Labels-file (``--dataset csv``) datasets and multi-label training, through ``densenet train``.

The CSVs are written as ChestX-ray14's ``Data_Entry_2017.csv`` writes its findings (``A|B``,
``No Finding``), with a patient-like ``group``; the floor test trains on real pictures
(2x2 Fashion-MNIST mosaics, :mod:`multilabel_fixtures`).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from multilabel_fixtures import FASHION_MNIST_DIR, build_mosaic_dataset
from PIL import Image
from test_checkpoint_forms import torchvision_published_file

from densenet.cli import main
from densenet.config import load_config
from densenet.data import build_dataset, dataset_info
from densenet.io import load_state
from densenet.train import train
from densenet.train.inputs import label_pos_weight
from densenet.train.optim import build_criterion

FINDINGS = ("Effusion", "Infiltration", "Mass")


def write_csv(path: Path, rows: list[tuple[str, ...]], columns=("image", "labels", "group")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def chest_like(root: Path, rows_per_split=(12, 6, 6), size: int = 32, rgb: bool = False) -> Path:
    """A ChestX-ray14-shaped folder: gray PNGs (RGB with ``rgb``), labels from FINDINGS where
    each finding brightens its own third of the image, some rows ``No Finding``."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    index = 0
    for split, count in zip(("train", "val", "test"), rows_per_split, strict=True):
        rows = []
        for _ in range(count):
            present = [name for name in FINDINGS if rng.random() < 0.4]
            pixels = rng.integers(0, 60, (size, size), dtype=np.uint8)
            for k, name in enumerate(FINDINGS):
                if name in present:
                    pixels[:, k * size // 3 : (k + 1) * size // 3] += 150
            image = f"images/{index:08d}_000.png"
            Image.fromarray(pixels).convert("RGB" if rgb else "L").save(root / image)
            rows.append((image, "|".join(present) or "No Finding", f"p{index // 2:04d}"))
            index += 1
        write_csv(root / f"{split}.csv", rows)
    return root


def train_cli(data_dir: Path, out: Path, *extra: str) -> int:
    argv = ["train", "--dataset", "csv", "--data-dir", str(data_dir), "--out", str(out)]
    return main([*argv, "--workers", "0", "--no-progress", *extra])


# --- the dataset --------------------------------------------------------------------------------


def test_labels_file_rows_become_multi_hot_targets(tmp_path: Path) -> None:
    root = tmp_path / "chest"
    (root / "images").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
    write_csv(
        root / "train.csv",
        [
            ("images/0.png", "Effusion|Infiltration", "1"),
            ("images/1.png", "No Finding", "2"),
            ("images/2.png", "", "3"),
            ("images/3.png", "Mass", "4"),
        ],
    )
    write_csv(root / "val.csv", [("images/3.png", "Mass|Effusion", "4")])
    info = dataset_info("csv", root)
    assert info.task == "multilabel" and info.class_names == FINDINGS
    assert info.in_chans == 1 and info.mean[0] == pytest.approx(60 / 255, abs=1e-3)
    train = build_dataset("csv", root, "train")
    assert train.task == "multilabel" and train.class_names == list(FINDINGS)
    image, target = train[0]
    assert image.mode == "L" and target.dtype == torch.float32
    assert target.tolist() == [1.0, 1.0, 0.0]
    assert train[1][1].tolist() == train[2][1].tolist() == [0.0, 0.0, 0.0]  # No Finding, empty
    assert build_dataset("csv", root, "val")[0][1].tolist() == [1.0, 0.0, 1.0]
    memory = train.to_memory(1)
    assert memory.task == "multilabel" and memory.targets.shape == (4, 3)


def test_single_label_csv_is_ordinary_classification(tmp_path: Path) -> None:
    root = relabel_single(chest_like(tmp_path / "c", (6, 2, 2)))
    info = dataset_info("csv", root)
    assert info.task == "multiclass" and info.class_names == ("cat", "dog")
    dataset = build_dataset("csv", root, "train")
    assert [dataset[i][1] for i in range(3)] == [0, 1, 0]


def relabel_single(root: Path) -> Path:
    """Every row of ``root``'s CSVs given exactly one label, cat or dog."""
    for split in ("train", "val", "test"):
        with open(root / f"{split}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        labelled = [(r["image"], ["cat", "dog"][i % 2], r["group"]) for i, r in enumerate(rows)]
        write_csv(root / f"{split}.csv", labelled)
    return root


def test_single_label_csv_trains_as_classification(tmp_path: Path, capsys) -> None:
    data = relabel_single(chest_like(tmp_path / "c", (8, 4, 4)))
    out = tmp_path / "run"
    assert train_cli(data, out, "--epochs", "1", "--batch-size", "4") == 0
    assert "top-1" in capsys.readouterr().out
    _, meta = load_state(out / "checkpoints" / "last.safetensors")
    assert meta["task"] == "multiclass" and meta["class_names"] == ["cat", "dog"]
    assert "thresholds" not in meta
    with open(out / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert row["val_mean_auroc"] == "" and 0 <= float(row["val_top1"]) <= 100


def test_multilabel_settings_that_cannot_apply_are_errors(tmp_path: Path, capsys) -> None:
    single = relabel_single(chest_like(tmp_path / "c", (8, 4, 4)))
    assert train_cli(single, tmp_path / "r", "--set", "pos_weight=auto") == 2
    assert "pos_weight auto weighs the labels of a multilabel task" in capsys.readouterr().err
    multi = chest_like(tmp_path / "m", (8, 4, 4))
    assert train_cli(multi, tmp_path / "r", "--set", "label_smoothing=0.1") == 2
    assert "label_smoothing applies to multiclass cross-entropy" in capsys.readouterr().err
    assert main(["train", "--task", "multilabel", "--out", str(tmp_path / "r")]) == 2
    assert "task multilabel needs a labels-file dataset" in capsys.readouterr().err
    assert train_cli(single, tmp_path / "r", "--set", "threshold_method=roc") == 2
    assert "threshold_method must be one of f1, youden, got 'roc'" in capsys.readouterr().err


def test_labels_file_errors_name_the_problem(tmp_path: Path) -> None:
    root = chest_like(tmp_path / "c", (6, 2, 2))
    write_csv(root / "val.csv", [("images/00000000_000.png", "Pneumonia", "p")])
    with pytest.raises(ValueError, match=r"label 'Pneumonia', which is not one of the 3 labels"):
        build_dataset("csv", root, "val")
    write_csv(
        root / "train.csv", [("images/00000000_000.png", "Mass")], columns=("path", "finding")
    )
    with pytest.raises(ValueError, match=r"train.csv: no 'image' or 'labels' column"):
        dataset_info("csv", root)
    with pytest.raises(ValueError, match="task multiclass needs exactly one label"):
        build_dataset("csv", chest_like(tmp_path / "d"), "train", task="multiclass")


def test_split_by_group_never_divides_a_group(tmp_path: Path, capsys) -> None:
    root = tmp_path / "one"
    chest_like(root, (40, 0, 0))
    (root / "train.csv").rename(root / "labels.csv")
    for name in ("val.csv", "test.csv"):
        (root / name).unlink()
    splits = {
        s: build_dataset("csv", root, s, split_by="group", seed=3) for s in ("train", "val", "test")
    }
    assert "split by group (seed 3) into" in capsys.readouterr().err
    groups = {s: {row.group for row in d.rows} for s, d in splits.items()}
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"])
    assert not groups["val"] & groups["test"]
    assert sum(len(d) for d in splits.values()) == 40 and all(len(d) for d in splits.values())
    again = build_dataset("csv", root, "val", split_by="group", seed=3)
    other = build_dataset("csv", root, "val", split_by="group", seed=4)
    assert [r.image for r in again.rows] == [r.image for r in splits["val"].rows]
    assert [r.image for r in other.rows] != [r.image for r in splits["val"].rows]


# --- training -----------------------------------------------------------------------------------


def test_pos_weight_is_negatives_over_positives() -> None:
    targets = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert label_pos_weight(targets).tolist() == pytest.approx([1 / 3, 3.0, 1.0])  # none: 1
    assert label_pos_weight(torch.tensor([0, 1])) is None
    from densenet.config import TrainConfig

    criterion = build_criterion(TrainConfig(), "multilabel", label_pos_weight(targets))
    logits = torch.zeros(4, 3)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=torch.tensor([1 / 3, 3.0, 1.0])
    )
    assert float(criterion(logits, targets)) == pytest.approx(float(expected))


def test_multilabel_run_scores_auroc_and_stores_thresholds(tmp_path: Path, capsys) -> None:
    data = chest_like(tmp_path / "chest", (24, 12, 6))
    out = tmp_path / "run"
    code = train_cli(data, out, "--epochs", "2", "--batch-size", "8", "--set", "pos_weight=auto")
    assert code == 0, capsys.readouterr().err
    assert "mean AUROC" in capsys.readouterr().out
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["val_top1"] == r["val_top5"] == r["train_top1"] == "" for r in rows)
    aurocs = [float(r["val_mean_auroc"]) for r in rows]
    assert all(0 <= a <= 1 for a in aurocs)
    _, meta = load_state(out / "checkpoints" / "best.safetensors")
    assert meta["task"] == "multilabel" and meta["class_names"] == list(FINDINGS)
    fit = meta["thresholds"]
    assert fit["method"] == "f1" and set(fit["thresholds"]) == set(FINDINGS)
    assert all(0 <= t <= 1 for t in fit["thresholds"].values())
    assert meta["epoch"] == 1 + aurocs.index(max(aurocs))  # best = highest mean AUROC (first)
    config = (out / "config.yaml").read_text()
    assert "val_split: val" in config and "task: auto" in config


def test_multilabel_run_resumes_with_its_best_score_and_thresholds(tmp_path: Path, capsys) -> None:
    data = chest_like(tmp_path / "chest", (16, 8, 4))
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert train_cli(data, straight, "--epochs", "2", "--batch-size", "8") == 0

    def crash_after_epoch_one(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise KeyboardInterrupt  # as if killed right after epoch 1's checkpoint

    overrides = {"dataset": "csv", "data_dir": str(data), "epochs": 2, "batch_size": 8}
    cfg = load_config(None, {**overrides, "workers": 0, "out": str(parts)})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, log=crash_after_epoch_one)
    assert main(["train", "--resume", str(parts), "--no-progress"]) == 0
    capsys.readouterr()
    for name in ("best", "last"):
        a_state, a_meta = load_state(straight / "checkpoints" / f"{name}.safetensors")
        b_state, b_meta = load_state(parts / "checkpoints" / f"{name}.safetensors")
        assert a_meta["thresholds"] == b_meta["thresholds"] and a_meta["epoch"] == b_meta["epoch"]
        assert a_state["best_mean_auroc"] == b_state["best_mean_auroc"] > 0
    with open(parts / "metrics.csv") as f:
        assert [r["val_mean_auroc"] != "" for r in csv.DictReader(f)] == [True, True]


def test_grayscale_data_from_torchvision_imagenet_weights(tmp_path: Path, capsys) -> None:
    """densenet121 from a torchvision-form ImageNet file trains on 1-channel images: its first
    conv takes one channel and the run normalizes with the dataset's own mean/std."""
    weights = torchvision_published_file(tmp_path / "densenet121-a639ec97.pth")
    data = chest_like(tmp_path / "chest", (4, 2, 2))
    out = tmp_path / "run"
    extra = ["--model", "densenet121", "--pretrained", str(weights), "--epochs", "1"]
    # a frozen backbone keeps the first conv as the file gave it, to compare with
    assert train_cli(data, out, *extra, "--batch-size", "2", "--freeze-backbone") == 0, (
        capsys.readouterr().err
    )
    state, meta = load_state(out / "checkpoints" / "last.safetensors")
    rgb = torch.load(weights, weights_only=True)["features.conv0.weight"]
    conv = state["model"]["features.conv0.weight"]
    assert conv.shape == (64, 1, 7, 7)  # a gray image gives what its RGB copy gave
    torch.testing.assert_close(conv, rgb.sum(1, keepdim=True), atol=1e-6, rtol=0)
    assert meta["mean"] == list(dataset_info("csv", data).mean) and len(meta["std"]) == 1
    assert meta["mean"] != [0.485]


# --- the floor on real pictures -----------------------------------------------------------------

FLOOR_GROUPS = (100, 20, 20)  # 300 training, 60 validation mosaics
FLOOR_ARGS = ("--epochs", "8", "--batch-size", "16", "--set", "augment=standard")
# Measured: 0.7243 (epoch 8; chance is 0.5) with this command, docs/results.md; the floor leaves
# room for other CPUs' and torch versions' rounding.
MEAN_AUROC_FLOOR = 0.65


@pytest.mark.slow  # minutes on a shared 2-core machine
def test_mosaic_run_reaches_mean_auroc_floor(tmp_path: Path, capsys) -> None:
    if not FASHION_MNIST_DIR.exists():
        pytest.skip(
            f"real data not found at {FASHION_MNIST_DIR} (../shared/data beside the checkout)"
        )
    data = tmp_path / "mosaics"
    build_mosaic_dataset(data, FLOOR_GROUPS, source_split="test")
    assert train_cli(data, tmp_path / "run", *FLOOR_ARGS) == 0, capsys.readouterr().err
    with open(tmp_path / "run" / "metrics.csv") as f:
        final = list(csv.DictReader(f))[-1]
    assert math.isfinite(float(final["val_mean_auroc"]))
    assert float(final["val_mean_auroc"]) >= MEAN_AUROC_FLOOR
