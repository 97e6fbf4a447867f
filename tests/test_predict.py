"""Model loading for inference and ``densenet predict`` on real sample images."""

from __future__ import annotations

import json

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

from densenet.catalog import imagenet_class_names
from densenet.cli import main
from densenet.data import eval_transform, load_image
from densenet.factory import create_model
from densenet.hub.saving import save_weights
from densenet.io import CheckpointError, save_state
from densenet.loader import load_model
from densenet.predict import list_images, predict
from densenet.zoo import get_model_spec


def test_imagenet_class_names_bundled():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[0].startswith("tench") and names[999].startswith("toilet tissue")
    assert names[281].startswith("tabby")


def test_load_model_restores_weights_and_metadata(tmp_path):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "ck.safetensors", model)
    loaded, info = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))  # eval mode, BN statistics loaded
    assert not loaded.training
    assert info.class_names == CIFAR10_CLASSES
    assert info.mean == (0.49, 0.48, 0.45) and info.input_size == (3, 32, 32)
    assert info.dataset == "cifar10" and info.crop_pct == 1.0


def test_predict_matches_a_manual_forward_on_real_samples(tmp_path):
    samples = shared_data("test-samples")
    model = tiny_model()
    loaded, info = load_model(save_checkpoint(tmp_path / "ck.safetensors", model))
    paths = list_images([samples])
    assert len(paths) == 100  # 20 each of CIFAR-10, CIFAR-100, MNIST, Fashion-MNIST, ImageNet
    chosen = [p for p in paths if p.name.startswith(("cifar10_0", "mnist_00", "imagenet_00"))]
    results = predict(loaded, info, chosen, topk=5, batch_size=4)
    assert [r["file"] for r in results] == [str(p) for p in chosen]
    transform = info.transform()
    for path, result in zip(chosen, results, strict=True):
        probs = model(transform(load_image(path))[None])[0].softmax(0)
        top = probs.topk(5)
        assert [e["index"] for e in result["top"]] == top.indices.tolist()
        assert [e["label"] for e in result["top"]] == [CIFAR10_CLASSES[i] for i in top.indices]
        assert [e["probability"] for e in result["top"]] == pytest.approx(
            top.values.tolist(), abs=1e-6
        )


def test_predict_imagenet_names_for_a_1000_class_model(tmp_path, capsys):
    images = shared_data("imagenet", "sample_images_256")
    files = sorted(images.glob("*.JPEG"))[:3]
    path = save_checkpoint(
        tmp_path / "in1k.safetensors", tiny_model(num_classes=1000), class_names=None,
        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], dataset="imagenet",
    )  # fmt: skip
    assert (
        main(["predict", *map(str, files), "--checkpoint", str(path), "--json", "--device", "cpu"])
        == 0
    )
    output = json.loads(capsys.readouterr().out)
    assert len(output["predictions"]) == 3
    names = set(imagenet_class_names())
    for prediction in output["predictions"]:
        top = prediction["top"]
        assert len(top) == 5 and all(e["label"] in names for e in top)
        assert imagenet_class_names()[top[0]["index"]] == top[0]["label"]
        probabilities = [e["probability"] for e in top]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1


def test_predict_cli_text_with_a_named_model(capsys):
    image = shared_data("test-samples", "cifar10_00_3.png")
    assert (
        main(["predict", str(image), "--model", "densenet40_k12", "--topk", "3", "--device", "cpu"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "model: densenet40_k12 (random weights)"
    assert (
        lines[1] == str(image)
        and len(lines) == 5
        and lines[2].strip().endswith(tuple("0123456789"))
    )


def test_named_model_with_a_weights_file(tmp_path, capsys):
    image = shared_data("test-samples", "cifar10_05_6.png")
    model = create_model("densenet40_k12").eval()
    path = save_weights(model, tmp_path / "w.safetensors", class_names=CIFAR10_CLASSES)
    args = ["predict", str(image), "--model", "densenet40_k12", "--pretrained", str(path)]
    assert main([*args, "--json", "--device", "cpu"]) == 0
    output = json.loads(capsys.readouterr().out)
    spec = get_model_spec("densenet40_k12")
    x = eval_transform(spec.input_size, spec.mean, spec.std, crop_pct=1.0)(load_image(image))
    with torch.no_grad():
        expected = model(x[None])[0].softmax(0).topk(5)
    top = output["predictions"][0]["top"]
    assert [e["label"] for e in top] == [CIFAR10_CLASSES[i] for i in expected.indices]
    assert output["source"] == f"densenet40_k12 (weights {path})"


def test_any_image_mode_converts_to_the_model_channels(tmp_path):
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    files = {
        "white.png": white,
        "transparent.png": Image.new("RGBA", (40, 40), (10, 200, 30, 0)),
        "gray.png": white.convert("L"),
        "cmyk.jpg": white.convert("CMYK"),
        "palette.gif": white.convert("P"),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    for in_chans in (3, 1):
        model = tiny_model(in_chans=in_chans)
        loaded, info = load_model(save_checkpoint(tmp_path / f"ck{in_chans}.safetensors", model))
        results = {r["file"]: r["top"] for r in predict(loaded, info, list_images([tmp_path]))}
        reference = results[str(tmp_path / "white.png")]
        for name in files:  # all of them are a white image once converted
            top = results[str(tmp_path / name)]
            assert [e["index"] for e in top] == [e["index"] for e in reference], name
            assert [e["probability"] for e in top] == pytest.approx(
                [e["probability"] for e in reference], abs=1e-3
            ), name


def test_clear_errors(tmp_path, capsys):
    model_path = save_checkpoint(tmp_path / "ck.safetensors", tiny_model())
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    assert main(["predict", str(not_image), "--checkpoint", str(model_path)]) == 2
    assert (
        f"{not_image} is not a readable image (unknown or unsupported format)"
        in capsys.readouterr().err
    )
    image = shared_data("test-samples", "cifar10_00_3.png")
    missing = tmp_path / "missing.safetensors"
    assert main(["predict", str(image), "--checkpoint", str(missing)]) == 2
    assert f"{missing}: no such checkpoint file" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nowhere"), "--checkpoint", str(model_path)]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--checkpoint", str(model_path)]) == 2
    assert "no image files" in capsys.readouterr().err
    assert main(["predict", str(image), "--checkpoint", str(model_path), "--pretrained", "x"]) == 2
    assert "--pretrained goes with --model" in capsys.readouterr().err


def test_checkpoint_problems_are_named(tmp_path):
    model = tiny_model()
    anonymous = save_state(tmp_path / "anon.safetensors", {"model": model.state_dict()})
    with pytest.raises(CheckpointError, match="does not say which architecture"):
        load_model(anonymous)
    wrong = save_checkpoint(
        tmp_path / "wrong.safetensors", model, model_config={**model.config, "growth_rate": 6}
    )
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(wrong)
    names = save_checkpoint(tmp_path / "names.safetensors", model, class_names=["a", "b"])
    with pytest.raises(CheckpointError, match="2 class names for a 10-class classifier"):
        load_model(names)
    no_stats = save_checkpoint(
        tmp_path / "nostats.safetensors", model, mean=None, std=None, dataset=None
    )
    _, info = load_model(no_stats)
    with pytest.raises(ValueError, match="no normalization"):
        info.transform()
    assert info.transform(mean=(0.5,) * 3, std=(0.5,) * 3) is not None


def test_trained_model_recognizes_real_cifar10_samples(tmp_path):
    samples = shared_data("test-samples")
    model, info = load_model(trained_cifar10_checkpoint(tmp_path / "trained.safetensors"))
    paths = sorted(samples.glob("cifar10_*.png"))  # cifar10_<position>_<label>.png
    results = predict(model, info, paths, topk=1)
    correct = sum(
        int(p.stem.split("_")[-1]) == r["top"][0]["index"]
        for p, r in zip(paths, results, strict=True)
    )
    assert len(paths) == 20 and correct >= 17  # 19 of 20 at the time of writing
