"""`densenet predict` on a multi-label checkpoint (every label's probability, the decisions at
the stored thresholds) and `--cam DIR` (Grad-CAM overlays of single- and multi-label models,
equal to densenet.gradcam's map, placed on the image the user gave)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from inference_helpers import save_checkpoint, tiny_model
from PIL import Image

from densenet.cli import main
from densenet.data import load_image
from densenet.gradcam import cam_overlay, grad_cam
from densenet.loader import ModelInfo, load_model
from densenet.predict import cam_on_image, file_safe

LABELS = ["Effusion", "Pleural Thickening", "T-shirt/top", "Hernia"]


def gray_images(folder, sizes=((32, 32), (32, 32))) -> list:
    """Random gray PNGs of the given (width, height)."""
    generator = np.random.default_rng(0)
    paths = []
    for number, (width, height) in enumerate(sizes):
        path = folder / f"scan{number}.png"
        Image.fromarray(generator.integers(0, 256, (height, width), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def probabilities_of(model, info: ModelInfo, paths) -> torch.Tensor:
    transform = info.transform()
    with torch.no_grad():
        return torch.stack([model(transform(load_image(p))[None])[0].sigmoid() for p in paths])


def multilabel_checkpoint(path, thresholds: dict | None):
    model = tiny_model(num_classes=len(LABELS), in_chans=1)
    stored = None
    if thresholds is not None:
        stored = {"method": "f1", "thresholds": thresholds, "scores": {}, "defaulted": {}}
    save_checkpoint(
        path, model, class_names=LABELS, task="multilabel", thresholds=stored,
        input_size=[1, 32, 32], dataset="csv",
    )  # fmt: skip
    return model, path


def run_predict(capsys, *args: str) -> dict:
    assert main(["predict", *args, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_reports_every_label_and_decides_at_the_stored_thresholds(tmp_path, capsys):
    paths = gray_images(tmp_path)
    model, _ = multilabel_checkpoint(tmp_path / "probe.safetensors", None)
    probabilities = probabilities_of(model, load_model(tmp_path / "probe.safetensors")[1], paths)
    # Label 0 always positive, 1 never, 2 between the two images, 3 at the default.
    between = float(probabilities[:, 2].mean())
    thresholds = dict(zip(LABELS, [0.0, 1.0, between, 0.5], strict=True))
    _, checkpoint = multilabel_checkpoint(tmp_path / "ck.safetensors", thresholds)
    output = run_predict(capsys, *map(str, paths), "--checkpoint", str(checkpoint))
    assert output["task"] == "multilabel" and output["thresholds"]["thresholds"] == thresholds
    for row, prediction in zip(probabilities, output["predictions"], strict=True):
        assert list(prediction["probabilities"]) == LABELS
        assert list(prediction["probabilities"].values()) == pytest.approx(row.tolist(), abs=1e-6)
        expected = [n for n, p in zip(LABELS, row.tolist(), strict=True) if p >= thresholds[n]]
        assert prediction["positive"] == sorted(expected, key=lambda n: -row[LABELS.index(n)])
        assert "Effusion" in prediction["positive"]
        assert "Pleural Thickening" not in prediction["positive"]
    assert ["T-shirt/top" in p["positive"] for p in output["predictions"]] == [
        bool(p >= between) for p in probabilities[:, 2].tolist()
    ]
    assert main(["predict", str(paths[0]), "--checkpoint", str(checkpoint)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[2].startswith("  + ") and "Effusion" in text[2] and "(threshold 0.000)" in text[2]


def test_a_checkpoint_without_thresholds_decides_at_one_half_and_says_so(tmp_path, capsys):
    paths = gray_images(tmp_path)
    model, checkpoint = multilabel_checkpoint(tmp_path / "ck.safetensors", None)
    assert main(["predict", str(paths[0]), "--checkpoint", str(checkpoint), "--json"]) == 0
    captured = capsys.readouterr()
    assert "stores no thresholds" in captured.err
    output = json.loads(captured.out)
    assert output["thresholds"]["method"] == "default"
    row = probabilities_of(model, load_model(checkpoint)[1], paths[:1])[0]
    expected = {n for n, p in zip(LABELS, row.tolist(), strict=True) if p >= 0.5}
    assert set(output["predictions"][0]["positive"]) == expected


def expected_overlay(model, info: ModelInfo, path, index: int) -> np.ndarray:
    image = load_image(path)
    cam = grad_cam(model, info.transform()(image), index, task=info.task).cam
    return np.asarray(cam_overlay(image, cam))


def test_cam_of_each_positive_label_equals_grad_cam(tmp_path, capsys):
    paths = gray_images(tmp_path, [(32, 32), (45, 32)])
    thresholds = dict(zip(LABELS, [0.0, 0.0, 1.0, 1.0], strict=True))  # two positive labels
    model, checkpoint = multilabel_checkpoint(tmp_path / "ck.safetensors", thresholds)
    out = tmp_path / "cams"
    output = run_predict(
        capsys, *map(str, paths), "--checkpoint", str(checkpoint), "--cam", str(out)
    )
    _, info = load_model(checkpoint)
    assert sorted(p.name for p in out.iterdir()) == [
        "scan0_Effusion.png", "scan0_Pleural_Thickening.png",
        "scan1_Effusion.png", "scan1_Pleural_Thickening.png",
    ]  # fmt: skip
    for path, prediction in zip(paths, output["predictions"], strict=True):
        assert set(prediction["cams"]) == set(prediction["positive"])
        with Image.open(path) as source:
            size = source.size
        for label, written in prediction["cams"].items():
            with Image.open(written) as overlay:
                assert overlay.format == "PNG" and overlay.size == size
                pixels = np.asarray(overlay.convert("RGB"))
            if size == (32, 32):  # the model's own input size: the map as grad_cam gives it
                expected = expected_overlay(model, info, path, LABELS.index(label))
                assert np.array_equal(pixels, expected)


def test_cam_of_the_top_label_when_none_is_positive(tmp_path, capsys):
    paths = gray_images(tmp_path, [(32, 32)])
    model, checkpoint = multilabel_checkpoint(
        tmp_path / "ck.safetensors", dict.fromkeys(LABELS, 1.0)
    )
    out = tmp_path / "cams"
    output = run_predict(capsys, str(paths[0]), "--checkpoint", str(checkpoint), "--cam", str(out))
    prediction = output["predictions"][0]
    top = prediction["top"][0]["label"]
    assert prediction["positive"] == [] and list(prediction["cams"]) == [top]
    with Image.open(out / f"scan0_{file_safe(top)}.png") as overlay:
        pixels = np.asarray(overlay.convert("RGB"))
    info = load_model(checkpoint)[1]
    assert np.array_equal(pixels, expected_overlay(model, info, paths[0], LABELS.index(top)))


def test_cam_of_a_single_label_model_explains_its_top_class(tmp_path, capsys):
    generator = np.random.default_rng(1)
    rgb = generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    folder = tmp_path / "in"
    for animal in ("cat", "dog"):  # the same file name in two folders: two overlays
        (folder / animal).mkdir(parents=True)
        Image.fromarray(rgb).save(folder / animal / "001.png")
    model = tiny_model()
    checkpoint = save_checkpoint(tmp_path / "ck.safetensors", model)
    out = tmp_path / "cams"
    output = run_predict(capsys, str(folder), "--checkpoint", str(checkpoint), "--cam", str(out))
    info = load_model(checkpoint)[1]
    top = output["predictions"][0]["top"][0]
    assert output["task"] == "multiclass" and "thresholds" not in output
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"cat_001_{top['label']}.png", f"dog_001_{top['label']}.png"]
    with Image.open(out / names[0]) as overlay:
        pixels = np.asarray(overlay.convert("RGB"))
    assert np.array_equal(
        pixels, expected_overlay(model, info, folder / "cat" / "001.png", top["index"])
    )


def test_cam_is_placed_on_the_centre_crop_the_model_saw():
    # A smooth pattern: the model's view of it, placed back by cam_on_image, lands on the
    # same pattern in the original; off by a few pixels it would not.
    height, width = 64, 96
    ys, xs = np.mgrid[0:height, 0:width]
    pattern = 0.6 + 0.4 * np.sin(xs / 5.0) * np.cos(ys / 7.0)
    image = Image.fromarray(np.round(255 * pattern).astype(np.uint8))
    info = ModelInfo(None, ["a"], (1, 32, 32), (0.0,), (1.0,), crop_pct=0.875)
    view = info.transform()(image)[0]  # (32, 32) in [0, 1]
    placed = cam_on_image(view, width, height, info).numpy()
    # The short side was resized to 36 (the long one to 54), then the centre 32 x 32 taken.
    scale = height / math.floor(32 / 0.875)
    top, left, side = round(2 * scale), round(11 * scale), round(32 * scale)
    box = (slice(top, top + side), slice(left, left + side))
    assert (placed[box] > 0).all()
    outside = np.ones_like(placed, dtype=bool)
    outside[box] = False
    assert (placed[outside] == 0).all()
    error = np.abs(placed[box] - pattern[box]).mean()
    shifted = np.abs(placed[box] - np.roll(pattern, 4, axis=1)[box]).mean()
    assert error < 0.05 and shifted > 2 * error


def test_file_safe_names():
    assert file_safe("T-shirt/top") == "T-shirt_top"
    assert file_safe("Pleural Thickening") == "Pleural_Thickening"
    assert file_safe("../..") == "label"


def test_grad_cam_works_under_no_grad():
    # Figures and inference loops run under torch.no_grad(); the map must not change there.
    model, x = tiny_model(num_classes=3), torch.randn(1, 3, 32, 32)
    expected = grad_cam(model, x).cam
    with torch.no_grad():
        assert torch.equal(grad_cam(model, x).cam, expected)
