"""The Grad-CAM panel, the PNG figures and the visualize / models --plot commands."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import CIFAR10_CLASSES, save_checkpoint, shared_data, tiny_model
from PIL import Image

from densenet import visualize
from densenet.cli import main
from densenet.data import load_image
from densenet.loader import load_model
from densenet.visualize import (
    confusion_matrix_figure,
    feature_map_figure,
    parameter_efficiency_figure,
    parameter_efficiency_points,
)


def _check_png(path, min_size=(300, 200)):
    """The file is a real, non-trivial PNG."""
    assert path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        assert len(image.convert("L").getcolors(maxcolors=1_000_000)) > 10  # not blank


def test_the_figure_draws_densenet_gradcam_map(tmp_path, monkeypatch):
    # One Grad-CAM implementation: the figure's map is grad_cam's, for the task of the model.
    model = tiny_model(in_chans=1)
    loaded, info = load_model(
        save_checkpoint(tmp_path / "ck.safetensors", model, task="multilabel")
    )
    calls, drawn = [], []
    real_grad_cam, real_header = visualize.grad_cam, visualize._draw_header

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real_grad_cam(*args, **kwargs)

    def header(fig, shown, cam, probs, class_names, top_title):
        drawn.append((cam, probs, top_title))
        real_header(fig, shown, cam, probs, class_names, top_title)

    monkeypatch.setattr(visualize, "grad_cam", spy)
    monkeypatch.setattr(visualize, "_draw_header", header)
    image = load_image(shared_data("test-samples", "mnist_00_7.png"))
    x = info.transform()(image)[None]
    path = tmp_path / "fm.png"
    feature_map_figure(
        loaded,
        image,
        info.transform(),
        info.mean,
        info.std,
        info.class_names,
        path,
        4,
        "multilabel",
    )
    _check_png(path)
    assert len(calls) == 1 and calls[0][1] == {"task": "multilabel"}
    cam, probs, top_title = drawn[0]
    assert top_title == "top-5 labels (each its own sigmoid)"
    assert torch.equal(cam, real_grad_cam(loaded, x, task="multilabel").cam)
    with torch.no_grad():
        assert torch.allclose(probs, loaded(x)[0].sigmoid())  # labels, not a softmax


def test_the_figure_needs_a_classifier(tmp_path):
    model = tiny_model()
    model.reset_classifier(0)
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="needs the model's classifier"):
        feature_map_figure(
            model,
            image,
            lambda i: torch.zeros(3, 32, 32),
            (0.5,) * 3,
            (0.5,) * 3,
            [],
            tmp_path / "x.png",
        )


def test_feature_map_figure(tmp_path):
    model = tiny_model()
    loaded, info = load_model(save_checkpoint(tmp_path / "ck.safetensors", model))
    image = load_image(shared_data("test-samples", "cifar10_00_3.png"))
    path = feature_map_figure(
        loaded,
        image,
        info.transform(),
        info.mean,
        info.std,
        info.class_names,
        tmp_path / "fm.png",
        4,
    )
    _check_png(path)


def test_confusion_matrix_figures(tmp_path):
    torch.manual_seed(0)
    small = torch.randint(0, 20, (10, 10)) + 200 * torch.eye(10, dtype=torch.long)
    _check_png(confusion_matrix_figure(small, CIFAR10_CLASSES, tmp_path / "c10.png"))
    large = torch.randint(0, 3, (100, 100)) + 30 * torch.eye(100, dtype=torch.long)
    _check_png(confusion_matrix_figure(large, [], tmp_path / "c100.png"))
    with pytest.raises(ValueError, match="ending in .png"):
        confusion_matrix_figure(small, CIFAR10_CLASSES, tmp_path / "c10.jpg")


def test_parameter_efficiency_points_come_from_the_registry():
    points = {(p["name"], p["dataset"]): p for p in parameter_efficiency_points()}
    d121 = points[("densenet121", "imagenet")]
    assert d121["params"] == 7_978_856 and d121["error"] == 25.02 and d121["bc"]
    basic = points[("densenet40_k12", "cifar10+")]
    assert basic["error"] == 5.24 and not basic["bc"]
    assert 1.0e6 < basic["params"] < 1.1e6  # "1.0M" in the paper
    assert points[("densenet_bc100_k12", "cifar10+")]["bc"]
    assert {d for _, d in points} == {"imagenet", "cifar10+"}
    assert all(
        p["name"].startswith("densenet_bc") for p in parameter_efficiency_points("densenet_bc*")
    )


def test_models_plot_command(tmp_path, capsys):
    out = tmp_path / "efficiency.png"
    assert main(["models", "--plot", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    _check_png(out, (800, 400))
    assert main(["models", "zz*", "--plot", str(out)]) == 2
    assert "no models with published" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no models"):
        parameter_efficiency_figure([], tmp_path / "x.png")


def test_visualize_command(tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "ck.safetensors", tiny_model())
    image = shared_data("test-samples", "cifar10_03_0.png")
    out = tmp_path / "viz" / "maps.png"
    assert (
        main(
            [
                "visualize",
                str(image),
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    _check_png(out)
    assert (
        main(["visualize", str(checkpoint), "--checkpoint", str(checkpoint), "--out", str(out)])
        == 2
    )
    assert (
        "ck.safetensors is not a readable image (unknown or unsupported format)"
        in capsys.readouterr().err
    )


def test_curves_show_the_runs_score(tmp_path):
    """A multi-label run's middle panel is its validation mean AUROC (its top-1 columns are
    empty, NaN here); a single-label run's is top-1 accuracy."""
    import math

    from densenet.visualize import curve_panels, plot_curves

    nan = math.nan
    common = {"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "lr": 0.1}
    multilabel = [{**common, "train_top1": nan, "val_top1": nan, "val_mean_auroc": 0.71}]
    single = [{**common, "train_top1": 50.0, "val_top1": 40.0, "val_mean_auroc": nan}]
    assert curve_panels(multilabel)[1] == ("validation mean AUROC", (("val_mean_auroc", "val"),))
    assert curve_panels(single)[1][0] == "top-1 accuracy (%)"
    assert plot_curves(multilabel, tmp_path / "curves.png").stat().st_size > 0
