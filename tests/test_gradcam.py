"""Grad-CAM: equal to a hand-computed map, safe with in-place ReLUs and memory-efficient blocks,
any input channels, single- and multi-label, and the model left exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from matplotlib import colormaps
from PIL import Image

from densenet.gradcam import cam_overlay, grad_cam, save_cam_overlay
from densenet.models import DenseNet


def tiny_densenet(in_chans: int = 3, num_classes: int = 5, **kwargs) -> DenseNet:
    torch.manual_seed(0)
    model = DenseNet(
        growth_rate=4,
        block_config=(2, 2),
        num_init_features=8,
        stem="cifar",
        in_chans=in_chans,
        num_classes=num_classes,
        **kwargs,
    )
    # Non-trivial BN statistics so that norm5's output has negative entries (before relu5).
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.bias.data.uniform_(-0.5, 0.5)
    torch.nn.init.normal_(model.classifier.weight)
    return model.eval()


def image(channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(1))


def hand_cam(weights: torch.Tensor, activation: torch.Tensor, size: int) -> torch.Tensor:
    """ReLU(sum_c weights_c * activation_c) ``(h, w)``, bilinear to ``size``, divided by its max."""
    cam = torch.relu((weights[:, None, None] * activation).sum(0))
    cam = F.interpolate(cam[None, None], size=(size, size), mode="bilinear", align_corners=False)
    return (cam / cam.max())[0, 0]


def test_cam_of_the_last_features_equals_the_hand_computed_map():
    model, x = tiny_densenet(), image()
    with torch.no_grad():
        activation = model.features(x)[0]  # (C, h, w) after norm5 and relu5
        logits = model(x)[0]
    top = int(logits.argmax())
    # Average pooling then a linear layer: d logit_k / d A_cij = W_kc / (h * w) at every position.
    h, w = activation.shape[1:]
    expected = hand_cam(model.classifier.weight[top] / (h * w), activation, 16)
    result = grad_cam(model, x)
    assert result.index == top
    assert result.probability == pytest.approx(float(logits.softmax(0)[top]))
    torch.testing.assert_close(result.cam, expected)
    assert result.cam.shape == (16, 16) and float(result.cam.max()) == 1.0
    assert float(result.cam.min()) >= 0
    other = grad_cam(model, x[0], index=(top + 1) % 5)
    assert other.index == (top + 1) % 5 and not torch.allclose(other.cam, result.cam)


def test_an_earlier_layer_equals_the_network_split_by_hand():
    model, x = tiny_densenet(), image()
    stages = list(model.features.named_children())
    cut = [name for name, _ in stages].index("denseblock1") + 1
    with torch.no_grad():
        early = torch.nn.Sequential(*[module for _, module in stages[:cut]])(x)
    leaf = early.clone().requires_grad_(True)
    late = torch.nn.Sequential(*[module for _, module in stages[cut:]])
    logit = model.forward_head(late(leaf))[0, 3]
    (gradient,) = torch.autograd.grad(logit, leaf)
    expected = hand_cam(gradient[0].mean((1, 2)), early[0], 16)
    torch.testing.assert_close(grad_cam(model, x, 3, layer="features.denseblock1").cam, expected)


def test_a_layer_followed_by_an_in_place_relu_sees_its_own_output():
    # norm5 is followed by relu5(inplace=True): the map must use norm5's output, negatives included.
    model, x = tiny_densenet(), image()
    with torch.no_grad():
        before_relu = model.features[:-1](x)[0]
    assert (before_relu < 0).any()
    h, w = before_relu.shape[1:]
    gradient = model.classifier.weight[2][:, None, None] / (h * w) * (before_relu > 0)
    expected = hand_cam(gradient.mean((1, 2)), before_relu, 16)
    torch.testing.assert_close(grad_cam(model, x, 2, layer="features.norm5").cam, expected)


def test_torchvision_densenet_whose_forward_applies_relu_in_place():
    # torchvision: features end at norm5; forward does F.relu(features, inplace=True)
    # (pytorch/vision#4164: backward module hooks fail on it).
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(4, (2, 2), 8, num_classes=4).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.bias.data.uniform_(-0.5, 0.5)
    x = image(size=32)
    with torch.no_grad():
        features = model.features(x)[0]
    assert (features < 0).any()
    h, w = features.shape[1:]
    weight = model.classifier.weight.detach()
    gradient = weight[0][:, None, None] / (h * w) * (features > 0)
    expected = hand_cam(gradient.mean((1, 2)), features, 32)
    torch.testing.assert_close(grad_cam(model, x, 0).cam, expected)
    # Class 1: no position votes for it (the weighted sum is negative everywhere): all zeros.
    gradient = weight[1][:, None, None] / (h * w) * (features > 0)
    assert float((gradient.mean((1, 2))[:, None, None] * features).sum(0).max()) < 0
    assert torch.equal(grad_cam(model, x, 1).cam, torch.zeros(32, 32))


def test_memory_efficient_blocks_give_the_same_map():
    x = image()
    plain = grad_cam(tiny_densenet(), x, 1, layer="features.denseblock2")
    efficient = grad_cam(tiny_densenet(memory_efficient=True), x, 1, layer="features.denseblock2")
    torch.testing.assert_close(efficient.cam, plain.cam)
    # A layer inside a memory-efficient block: the hook makes that block run the plain way.
    for layer in ("norm1", "conv1", "conv2"):
        name = f"features.denseblock1.denselayer1.{layer}"
        plain = grad_cam(tiny_densenet(), x, 1, layer=name)
        with pytest.warns(UserWarning, match="it runs the plain way"):
            efficient = grad_cam(tiny_densenet(memory_efficient=True), x, 1, layer=name)
        torch.testing.assert_close(efficient.cam, plain.cam)


def test_one_channel_input_and_a_multilabel_model():
    model = tiny_densenet(in_chans=1, num_classes=3)
    x = image(channels=1, size=20)
    with torch.no_grad():
        logits = model(x)[0]
    result = grad_cam(model, x, index=2, task="multilabel")
    assert result.cam.shape == (20, 20)
    assert result.probability == pytest.approx(float(torch.sigmoid(logits[2])))
    # The sigmoid only rescales the gradient: same map as explaining the raw logit.
    torch.testing.assert_close(result.cam, grad_cam(model, x, index=2).cam)


@pytest.mark.parametrize("training", [False, True])
def test_the_model_is_left_as_it_was(training):
    model = tiny_densenet()
    model.train(training)
    x = image()
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    frozen = model.features.conv0.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train(training)
    grad_cam(model, x)
    assert model.training is training
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert torch.equal(model.classifier.weight.grad, torch.ones_like(model.classifier.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")
    assert not frozen.requires_grad and model.classifier.weight.requires_grad
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_bad_arguments_say_what_to_do():
    model, x = tiny_densenet(), image()
    with pytest.raises(ValueError, match="no layer 'features.nope'.*features.denseblock1"):
        grad_cam(model, x, layer="features.nope")
    with pytest.raises(ValueError, match="index 5 is out of range: the model has 5 outputs"):
        grad_cam(model, x, index=5)
    with pytest.raises(ValueError, match=r"one image, \(C, H, W\) or \(1, C, H, W\); got \(2,"):
        grad_cam(model, torch.cat([x, x]))
    with pytest.raises(ValueError, match="task must be one of"):
        grad_cam(model, x, task="binary")
    with pytest.raises(ValueError, match="needs a \\(1, C, h, w\\) feature map"):
        grad_cam(model, x, layer="classifier")
    assert all(not m._forward_hooks for m in model.modules())


# --- overlays -----------------------------------------------------------------------------------
def test_overlay_blends_the_jet_heat_map_over_the_image(tmp_path):
    gray = Image.fromarray(np.full((12, 10), 200, dtype=np.uint8), mode="L")
    cam = torch.zeros(12, 10)
    cam[0, 0] = 1.0
    overlay = cam_overlay(gray, cam, alpha=0.4)
    assert overlay.mode == "RGB" and overlay.size == (10, 12)
    pixels = np.asarray(overlay, dtype=np.float64)
    for (row, col), value in (((0, 0), 1.0), ((5, 5), 0.0)):
        expected = 0.6 * 200 + 0.4 * 255 * np.asarray(colormaps["jet"](value)[:3])
        np.testing.assert_allclose(pixels[row, col], np.round(expected), atol=1)
    path = save_cam_overlay(gray, cam, tmp_path / "out" / "cam.png", alpha=0.4)
    assert path == tmp_path / "out" / "cam.png"
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(overlay))
    assert sorted(p.name for p in path.parent.iterdir()) == ["cam.png"]  # no temporary left


def test_overlay_of_a_tensor_image_resizes_a_low_resolution_map(tmp_path):
    picture = torch.rand(1, 16, 16)
    overlay = cam_overlay(picture, torch.rand(4, 4))
    assert overlay.size == (16, 16)
    with pytest.raises(ValueError, match="written as PNG"):
        save_cam_overlay(picture, torch.rand(16, 16), tmp_path / "cam.jpg")
    with pytest.raises(ValueError, match="alpha must be in"):
        cam_overlay(picture, torch.rand(16, 16), alpha=2)
