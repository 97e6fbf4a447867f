"""Metrics against hand-computed values, the evaluation loop, ten-crop and the eval transform."""

from __future__ import annotations

import json
import math

import pytest
import torch
from inference_helpers import (
    CIFAR10_CLASSES,
    save_checkpoint,
    shared_data,
    tiny_model,
    trained_cifar10_checkpoint,
)
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from densenet.cli import main
from densenet.data import eval_transform, to_channels
from densenet.evaluation import (
    confusion_matrix,
    evaluate,
    per_class_accuracy,
    topk_correct,
)
from densenet.runtime import resolve_device


class FixedLogits(nn.Module):
    """Returns the row of ``table`` selected by the first pixel of each input (a sample id)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.anchor = nn.Parameter(torch.zeros(1))  # so the model has a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]


class ConstantLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


# 4 samples, 6 classes; targets 0, 1, 2, 2.
LOGITS = torch.tensor(
    [
        [9.0, 1, 2, 3, 4, 5],  # target 0: rank 1
        [9.0, 1, 2, 3, 4, 5],  # target 1: rank 6 (the worst)
        [1.0, 2, 6, 9, 0, 0],  # target 2: rank 2
        [0.0, 0, 1, 2, 3, 4],  # target 2: rank 4
    ]
)
TARGETS = torch.tensor([0, 1, 2, 2])


def test_topk_correct_by_hand():
    assert topk_correct(LOGITS, TARGETS, (1, 2, 4, 5, 6)) == [1, 2, 3, 3, 4]
    # k above the class count counts every sample.
    # Among classes 0-2 only sample 1 (target 1, logit 1 of 9, 1, 2) misses top-1.
    assert topk_correct(LOGITS[:, :3], TARGETS, (1, 5)) == [3, 4]


def test_confusion_matrix_and_per_class_by_hand():
    preds = LOGITS.argmax(1)  # 0, 0, 3, 5
    cm = confusion_matrix(preds, TARGETS, 6)
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[0, 0] = 1
    expected[1, 0] = 1
    expected[2, 3] = 1
    expected[2, 5] = 1
    assert torch.equal(cm, expected)
    assert per_class_accuracy(cm) == [100.0, 0.0, 0.0, None, None, None]


def test_evaluate_metrics_loss_and_restores_train_mode():
    model = FixedLogits(LOGITS).train()
    ids = torch.arange(4.0)[:, None, None, None].expand(4, 1, 2, 2).clone()
    loader = DataLoader(TensorDataset(ids, TARGETS), batch_size=3)  # two uneven batches
    result = evaluate(model, loader, class_names=list("abcdef"))
    assert result.images == 4 and result.crops == 1
    assert result.top1 == pytest.approx(25.0)
    assert result.top5 == pytest.approx(75.0)
    expected_loss = float(nn.functional.cross_entropy(LOGITS, TARGETS))
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)
    assert result.per_class == [100.0, 0.0, 0.0, None, None, None]
    summary = result.to_dict()
    assert summary["per_class"] == {"a": 100.0, "b": 0.0, "c": 0.0, "d": None, "e": None, "f": None}
    assert summary["confusion"][2] == [0, 0, 0, 1, 0, 1]
    assert model.training


def test_ten_crop_averages_softmax_over_crops():
    torch.manual_seed(0)
    n, crops, classes = 3, 10, 4
    inputs = torch.randn(n, crops, 2, 3, 3)
    targets = torch.tensor([0, 3, 1])
    model = nn.Sequential(nn.Flatten(), nn.Linear(18, classes))
    result = evaluate(model, [(inputs, targets)])
    with torch.no_grad():
        probs = model(inputs.flatten(0, 1)).softmax(1).view(n, crops, classes).mean(1)
    assert result.images == n and result.crops == crops
    assert result.loss == pytest.approx(
        float(-probs[torch.arange(n), targets].log().mean()), rel=1e-5
    )
    expected_top1 = 100 * float((probs.argmax(1) == targets).float().mean())
    assert result.top1 == pytest.approx(expected_top1)


def test_evaluate_rejects_labels_beyond_the_classifier_and_empty_data():
    model = FixedLogits(LOGITS)
    ids = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="label 7 but the model predicts 6 classes"):
        evaluate(model, [(ids, torch.tensor([0, 7]))])
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [])


def _gradient_image(width: int = 48, height: int = 40) -> Image.Image:
    x = torch.linspace(0, 255, width).expand(height, width)
    rgb = torch.stack([x, x.flip(1), torch.full_like(x, 30)], dim=-1).to(torch.uint8)
    return Image.fromarray(rgb.numpy(), "RGB")


def test_eval_transform_center_crop_and_ten_crop_shapes():
    image = _gradient_image()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    single = eval_transform(32, mean, std, crop_pct=0.8)(image)
    assert single.shape == (3, 32, 32) and single.dtype == torch.float32
    ten = eval_transform((3, 32, 32), mean, std, crop_pct=0.8, ten_crop=True)(image)
    assert ten.shape == (10, 3, 32, 32)
    # Crop 4 is the center crop; crop 9 is the center of the flipped image.
    assert torch.allclose(ten[4], single)
    assert torch.allclose(ten[9], single.flip(-1))
    # Corners differ from the center on a gradient image.
    assert not torch.allclose(ten[0], ten[1])


def test_eval_transform_converts_channels():
    gray = eval_transform(16, (0.5,), (0.5,), crop_pct=1.0)(_gradient_image())
    assert gray.shape == (1, 16, 16)
    cmyk = _gradient_image().convert("CMYK")
    assert eval_transform(16, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0)(cmyk).shape == (3, 16, 16)
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert to_channels(transparent, 3).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_channels(transparent, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(crop_pct=0), "crop_pct"),
        (dict(interpolation="lanczos9"), "interpolation"),
    ],
)
def test_eval_transform_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        eval_transform(32, (0.5,) * 3, (0.5,) * 3, **kwargs)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_loss_is_finite_for_confident_wrong_predictions():
    # Averaging in log space stays finite where log(mean(softmax)) would underflow to log(0).
    model = ConstantLogits(torch.tensor([1000.0, -1000.0]))
    result = evaluate(model, [(torch.zeros(1, 2, 1, 1, 1), torch.tensor([1]))])
    assert result.crops == 2
    assert math.isfinite(result.loss) and result.loss == pytest.approx(2000.0)


# --- the eval command on real images ------------------------------------------------------------
CIFAR_ZIP = ("cifar10-jpeg", "cifar10_yoongikim_jpeg_q75.zip")
BIAS = torch.tensor([0.0, 0, 0, 5, 4, 3, 2, 1, 0, 0])


def _constant_model():
    """A model whose logits are ``BIAS`` for every image (zero classifier weights)."""
    model = tiny_model()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(BIAS)
    return model


def _constant_checkpoint(path):
    return save_checkpoint(path, _constant_model(), dataset="folder")


@pytest.mark.parametrize("ten_crop", [False, True])
def test_eval_command_json_on_real_cifar10_jpegs(tmp_path, capsys, ten_crop):
    data = shared_data(*CIFAR_ZIP)
    checkpoint = _constant_checkpoint(tmp_path / "run" / "ck.safetensors")
    args = ["eval", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--limit", "200"]
    args += ["--workers", "0", "--device", "cpu", "--json"] + (["--ten-crop"] if ten_crop else [])
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    # 200 evenly spaced images of the class-sorted 10,000: 20 per class. Always predicting class 3
    # (then 4, 5, 6, 7) gives 10% top-1 and 50% top-5; the loss is the mean -log softmax(BIAS).
    assert result["images"] == 200 and result["crops"] == (10 if ten_crop else 1)
    assert result["top1"] == pytest.approx(10.0) and result["top5"] == pytest.approx(50.0)
    assert result["loss"] == pytest.approx(float(-BIAS.log_softmax(0).mean()), rel=1e-5)
    assert result["per_class"] == {n: (100.0 if n == "cat" else 0.0) for n in CIFAR10_CLASSES}
    assert [sum(row) for row in result["confusion"]] == [20] * 10
    assert all(row[3] == 20 for row in result["confusion"])
    stem = "eval_folder_test" + ("_10crop" if ten_crop else "")
    assert result["confusion_png"] == str(checkpoint.parent / f"{stem}.png")
    assert (checkpoint.parent / f"{stem}.png").stat().st_size > 5_000
    assert json.loads((checkpoint.parent / f"{stem}.json").read_text())["top1"] == result["top1"]


def test_eval_command_report_and_errors(tmp_path, capsys):
    data = shared_data(*CIFAR_ZIP)
    checkpoint = _constant_checkpoint(tmp_path / "ck.safetensors")
    out = tmp_path / "report"
    args = ["eval", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--limit", "20"]
    assert main([*args, "--workers", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "top-1   10.00%" in text and "100.00%  cat" in text
    assert (out / "eval_folder_test.png").exists()
    missing = tmp_path / "missing.safetensors"
    assert main(["eval", "--checkpoint", str(missing), "--dataset", "cifar10"]) == 2
    assert f"{missing}: no such checkpoint file" in capsys.readouterr().err
    anonymous = save_checkpoint(tmp_path / "anon.safetensors", tiny_model(), dataset=None)
    assert main(["eval", "--checkpoint", str(anonymous)]) == 2
    assert "give --dataset" in capsys.readouterr().err
    assert main([*args, "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


def test_eval_command_with_a_trained_model_on_real_cifar10_jpegs(tmp_path, capsys):
    data = shared_data(*CIFAR_ZIP)
    checkpoint = trained_cifar10_checkpoint(tmp_path / "trained.safetensors")
    args = ["eval", "--checkpoint", str(checkpoint), "--dataset", "folder", "--data-dir", str(data)]
    assert main([*args, "--limit", "100", "--workers", "0", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # 79.7% on all 10,000 JPEGs (its author: 90.5% on the lossless originals); chance is 10%.
    assert result["images"] == 100
    assert result["top1"] >= 65 and result["top5"] >= 90 and result["loss"] < 1.2


# --- folders with some of the classes -----------------------------------------------------------
def _class_folders(root, per_class: int, **renamed) -> dict:
    """``root/<class>/`` with the first ``per_class`` real CIFAR-10 test JPEGs of each class named
    in ``renamed`` (class -> folder name); returns {folder name: class}."""
    import zipfile

    with zipfile.ZipFile(shared_data(*CIFAR_ZIP)) as archive:
        names = sorted(archive.namelist())
        for cls, folder in renamed.items():
            (root / folder).mkdir(parents=True)
            members = [n for n in names if n.startswith(f"test/{cls}/") and n.endswith(".jpg")]
            for member in members[:per_class]:
                (root / folder / member.rsplit("/", 1)[-1]).write_bytes(archive.read(member))
    return {folder: cls for cls, folder in renamed.items()}


def _eval_json(capsys, checkpoint, folder, *extra) -> dict:
    args = ["eval", "--checkpoint", str(checkpoint), "--dataset", "folder", "--data-dir"]
    args += [str(folder), "--workers", "0", "--device", "cpu", "--json", *extra]
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_eval_on_a_folder_with_some_classes_matches_them_by_name(tmp_path, capsys):
    folder = tmp_path / "pets"
    _class_folders(folder, 3, cat="cat", dog="dog")
    checkpoint = _constant_checkpoint(tmp_path / "ck.safetensors")  # always predicts 'cat'
    result = _eval_json(capsys, checkpoint, folder)
    # Matched by name: the cats are class 3 (right), the dogs class 5 (wrong); by position they
    # would be 'airplane' and 'automobile' and all wrong.
    assert result["top1"] == pytest.approx(50.0) and result["images"] == 6
    assert result["per_class"] == {n: {"cat": 100.0, "dog": 0.0}.get(n) for n in CIFAR10_CLASSES}
    assert [sum(row) for row in result["confusion"]] == [0, 0, 0, 3, 0, 3, 0, 0, 0, 0]
    assert result["split"] == "all"  # a folder without splits is evaluated whole, and says so


def test_eval_of_a_trained_cifar10_model_on_only_cats_and_dogs(tmp_path, capsys):
    folder = tmp_path / "pets"
    _class_folders(folder, 20, cat="cat", dog="dog")
    checkpoint = trained_cifar10_checkpoint(tmp_path / "trained.safetensors")
    result = _eval_json(capsys, checkpoint, folder)
    assert result["images"] == 40
    # 77.5% measured (79.7% over all ten classes of the JPEG test set); by position: 0%.
    assert result["top1"] >= 65
    assert result["per_class"]["cat"] is not None and result["per_class"]["dog"] is not None
    assert result["per_class"]["airplane"] is None and result["per_class"]["automobile"] is None


def test_eval_class_folder_unknown_to_the_model_is_an_error_naming_it(tmp_path, capsys):
    folder = tmp_path / "pets"
    _class_folders(folder, 1, cat="kat", dog="dog")
    checkpoint = _constant_checkpoint(tmp_path / "ck.safetensors")
    args = ["eval", "--checkpoint", str(checkpoint), "--dataset", "folder", "--data-dir"]
    assert main([*args, str(folder), "--workers", "0", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{folder}: class folder 'kat' is not one of the model's 10 classes" in err
    assert "(airplane, automobile, bird, cat," in err and err.endswith("did you mean cat?")


def test_eval_model_without_class_names(tmp_path, capsys):
    anonymous = save_checkpoint(
        tmp_path / "anon.safetensors", _constant_model(), class_names=None, dataset="folder"
    )
    digits = tmp_path / "digits"
    _class_folders(digits, 2, cat="3", dog="5")  # folders named by class index: matched by name
    assert _eval_json(capsys, anonymous, digits)["top1"] == pytest.approx(50.0)
    pets = tmp_path / "pets"
    _class_folders(pets, 1, cat="cat", dog="dog")
    args = ["eval", "--checkpoint", str(anonymous), "--dataset", "folder", "--data-dir", str(pets)]
    assert main([*args, "--workers", "0"]) == 2
    assert "has no class names to match them by" in capsys.readouterr().err


def test_class_folders_match_names_a_file_system_cannot_hold(tmp_path, capsys):
    """Fashion-MNIST's ``T-shirt/top`` cannot be a folder: ``T-shirt_top`` (or ``t-shirt top``)
    finds it; case, spaces and punctuation are ignored when no folder matches exactly."""
    from densenet.catalog import FASHION_CLASSES
    from densenet.data.folders import _match_classes

    found = ["T-shirt_top", "ankle boot", "Bag"]
    samples = [("a.png", 0), ("b.png", 1), ("c.png", 2)]
    relabelled = _match_classes(found, samples, list(FASHION_CLASSES), "DIR", "the model's classes")
    assert [FASHION_CLASSES[i] for _, i in relabelled] == ["T-shirt/top", "Ankle boot", "Bag"]
    # Through the command: 'CAT' and 'Dog' are the model's cat and dog.
    folder = tmp_path / "pets"
    _class_folders(folder, 3, cat="CAT", dog="Dog")
    result = _eval_json(capsys, _constant_checkpoint(tmp_path / "ck.safetensors"), folder)
    assert result["top1"] == pytest.approx(50.0)
    assert result["per_class"]["cat"] == 100.0 and result["per_class"]["dog"] == 0.0
