"""`densenet eval` and `densenet predict --cam` on a multi-label labels-file dataset built from
real images (tests/multilabel_fixtures.py: 2x2 mosaics of Fashion-MNIST items), checked
against scikit-learn and against the library functions they report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from inference_helpers import save_checkpoint, shared_data, tiny_model
from multilabel_fixtures import build_mosaic_dataset
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from densenet.cli import main
from densenet.data import build_dataset
from densenet.loader import load_model
from densenet.multilabel import fit_thresholds


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    shared_data("fashion-mnist")
    root = tmp_path_factory.mktemp("mosaics")
    return root, build_mosaic_dataset(root)


def checkpoint(path, names, thresholds=None):
    model = tiny_model(num_classes=len(names), in_chans=1)
    stored = None
    if thresholds is not None:
        stored = {"method": "f1", "thresholds": thresholds, "scores": {}, "defaulted": {}}
    save_checkpoint(
        path, model, class_names=names, task="multilabel", thresholds=stored,
        input_size=[1, 56, 56], mean=[0.29], std=[0.35], dataset="csv",
    )  # fmt: skip
    return path


def split_scores(path, root, names, split):
    """The model's sigmoid outputs and the targets of ``split``, computed here."""
    model, info = load_model(path)
    dataset = build_dataset("csv", root, split, info.transform(), classes=names, task="multilabel")
    with torch.no_grad():
        probabilities = torch.stack([model(x[None])[0].sigmoid() for x, _ in dataset])
    return probabilities, torch.stack([t for _, t in dataset])


def run_eval(capsys, *args: str) -> dict:
    assert main(["eval", *args, "--json", "--device", "cpu", "--workers", "0"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_json_matches_scikit_learn_at_the_stored_thresholds(mosaics, tmp_path, capsys):
    root, names = mosaics
    thresholds = {name: 0.3 + 0.04 * i for i, name in enumerate(names)}
    path = checkpoint(tmp_path / "run" / "ck.safetensors", names, thresholds)
    output = run_eval(capsys, "--checkpoint", str(path), "--data-dir", str(root))
    probabilities, targets = split_scores(path, root, names, "test")
    assert output["task"] == "multilabel" and output["images"] == len(targets)
    defined = []
    for column, name in enumerate(names):
        truth, scores = targets[:, column].numpy(), probabilities[:, column].numpy()
        if 0 < truth.sum() < len(truth):
            defined.append(roc_auc_score(truth, scores))
            assert output["auroc"][name] == pytest.approx(defined[-1], abs=1e-6)
        else:
            assert output["auroc"][name] is None and name in output["undefined"]
        if truth.sum():
            assert output["average_precision"][name] == pytest.approx(
                average_precision_score(truth, scores), abs=1e-6
            )
            called = scores >= thresholds[name]
            assert output["sensitivity"][name] == pytest.approx(called[truth == 1].mean())
    assert len(defined) >= 5
    assert output["mean_auroc"] == pytest.approx(sum(defined) / len(defined), abs=1e-6)
    assert output["thresholds"]["thresholds"] == thresholds
    assert output["thresholds"]["source"] == "the checkpoint"
    with Image.open(output["roc_png"]) as image:
        assert image.format == "PNG"
    assert output["roc_png"] == str(tmp_path / "run" / "eval_csv_test_roc.png")
    written = json.loads((tmp_path / "run" / "eval_csv_test.json").read_text())
    assert written["auroc"] == output["auroc"]


def test_eval_fits_thresholds_on_another_split(mosaics, tmp_path, capsys):
    root, names = mosaics
    path = checkpoint(tmp_path / "ck.safetensors", names)  # stores no thresholds
    args = ["--checkpoint", str(path), "--data-dir", str(root)]
    default = run_eval(capsys, *args)
    assert default["thresholds"]["method"] == "default"
    assert set(default["thresholds"]["thresholds"].values()) == {0.5}
    output = run_eval(capsys, *args, "--fit-thresholds-on", "val", "--threshold-method", "youden")
    fitted = fit_thresholds(*split_scores(path, root, names, "val"), "youden", names)
    assert output["thresholds"]["method"] == "youden"
    assert output["thresholds"]["source"] == "fitted on csv val"
    assert output["thresholds"]["thresholds"] == pytest.approx(fitted.to_dict(names)["thresholds"])
    assert output["auroc"] == default["auroc"]  # thresholds change decisions, not the ranking


def test_eval_refuses_mismatched_options_and_data(mosaics, tmp_path, capsys):
    root, names = mosaics
    path = checkpoint(tmp_path / "ck.safetensors", names)
    args = ["eval", "--checkpoint", str(path), "--data-dir", str(root)]
    assert main([*args, "--threshold-method", "youden"]) == 2
    assert "--threshold-method goes with --fit-thresholds-on" in capsys.readouterr().err
    assert main([*args, "--fit-thresholds-on", "val", "--threshold-method", "max"]) == 2
    assert "--threshold-method must be one of f1, youden, got 'max'" in capsys.readouterr().err
    single = save_checkpoint(tmp_path / "single.safetensors", tiny_model())
    assert main(["eval", "--checkpoint", str(single), "--fit-thresholds-on", "val"]) == 2
    assert "--fit-thresholds-on is for multi-label models" in capsys.readouterr().err


def test_predict_cam_on_the_mosaics(mosaics, tmp_path, capsys):
    root, names = mosaics
    path = checkpoint(tmp_path / "ck.safetensors", names, dict.fromkeys(names, 0.0))
    images = sorted((root / "images").glob("*.png"))[:2]
    out = tmp_path / "cams"
    argv = ["predict", *map(str, images), "--checkpoint", str(path), "--cam", str(out), "--json"]
    assert main(argv) == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    assert all(p["positive"] and set(p["cams"]) == set(names) for p in predictions)
    assert (out / f"{images[0].stem}_T-shirt_top.png").is_file()
    with Image.open(out / f"{images[0].stem}_Bag.png") as overlay:
        assert overlay.size == (56, 56) and overlay.mode == "RGB"


def one_labels_file(root: Path, folder: Path) -> Path:
    """``folder/labels.csv``: the rows of ``root``'s train, val and test files in one file."""
    folder.mkdir()
    (folder / "images").symlink_to(root / "images")
    rows = [(root / f"{split}.csv").read_text().splitlines() for split in ("train", "val", "test")]
    (folder / "labels.csv").write_text("\n".join([rows[0][0]] + [r for s in rows for r in s[1:]]))
    return folder


def test_eval_deals_one_labels_file_by_group_as_training_did(mosaics, tmp_path, capsys):
    root, names = mosaics
    single = one_labels_file(root, tmp_path / "one-file")
    path = checkpoint(tmp_path / "ck.safetensors", names)
    args = ["--checkpoint", str(path), "--data-dir", str(single), "--split-by", "group"]
    output = run_eval(capsys, *args, "--seed", "3")
    test = build_dataset(
        "csv", single, "test", split_by="group", seed=3, task="multilabel", classes=names
    )
    assert output["images"] == len(test)
    assert output["positives"] == dict(zip(names, test.targets.sum(0).int().tolist(), strict=True))
    assert main(["eval", *args[:4]]) == 2  # one labels file without --split-by
    assert "--split-by group" in capsys.readouterr().err


def test_the_readme_workflow_train_eval_predict(mosaics, tmp_path, capsys):
    root, names = mosaics
    run = tmp_path / "run"
    train = ["train", "--dataset", "csv", "--data-dir", str(root), "--epochs", "1"]
    assert main([*train, "--batch-size", "8", "--workers", "0", "--out", str(run)]) == 0
    capsys.readouterr()
    path = run / "checkpoints" / "best.safetensors"
    stored = load_model(path)[1].thresholds
    assert stored is not None and set(stored["thresholds"]) == set(names)
    output = run_eval(capsys, "--checkpoint", str(path), "--data-dir", str(root))
    assert output["thresholds"]["thresholds"] == stored["thresholds"]
    assert (
        output["mean_auroc"] is not None
        and (run / "checkpoints" / "eval_csv_test_roc.png").is_file()
    )
    image = sorted((root / "images").glob("*.png"))[0]
    argv = ["predict", str(image), "--checkpoint", str(path), "--cam", str(tmp_path / "out")]
    assert main([*argv, "--json"]) == 0
    prediction = json.loads(capsys.readouterr().out)["predictions"][0]
    probabilities, thresholds = prediction["probabilities"], stored["thresholds"]
    assert set(prediction["positive"]) == {n for n in names if probabilities[n] >= thresholds[n]}
    assert len(list((tmp_path / "out").glob(f"{image.stem}_*.png"))) == max(
        1, len(prediction["positive"])
    )


def test_eval_of_a_run_on_one_labels_file_deals_it_as_the_run_did(mosaics, tmp_path, capsys):
    root, names = mosaics
    single = one_labels_file(root, tmp_path / "one-file")
    run = tmp_path / "run"
    train = ["train", "--dataset", "csv", "--data-dir", str(single), "--epochs", "1", "--out", str(run),
             "--batch-size", "8", "--workers", "0", "--set", "split_by=group", "--set", "seed=3"]  # fmt: skip
    assert main(train) == 0
    capsys.readouterr()
    path = str(run / "checkpoints" / "best.safetensors")
    output = run_eval(capsys, "--checkpoint", path)  # no --data-dir, --split-by or --seed
    test = build_dataset("csv", single, "test", split_by="group", seed=3, task="multilabel")
    assert output["images"] == len(test)
    assert main(["eval", "--checkpoint", path, "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "training dealt" in err and "by group with seed 3" in err and "may hold images" in err
