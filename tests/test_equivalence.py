"""Our models compute what torchvision's and timm's compute with the same weights.

Random weights come from their own constructors, with BatchNorm running statistics randomized too
(fresh ones are 0/1, which would hide a wrongly mapped buffer). Then a real third-party
checkpoint: its accuracy on the CIFAR-10 test images.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from inference_helpers import FLOAT32_REL_TOL
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import densenet
from densenet import DenseNet

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
JASONWEI = DATA / "checkpoints" / "jasonwei05_densenet_cifar10.pth"
CIFAR_ZIP = DATA / "cifar10-jpeg" / "cifar10_yoongikim_jpeg_q75.zip"
CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model.eval()


def assert_same_outputs(ours: nn.Module, theirs: nn.Module, size: int) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = theirs.eval()(x), ours.eval()(x)
    assert actual.shape == expected.shape
    relative = (actual - expected).abs().max() / expected.abs().max()
    assert relative <= FLOAT32_REL_TOL, f"relative difference {relative:.2e}"


@pytest.mark.parametrize(
    "name, size",
    [("densenet121", 224), ("densenet161", 64), ("densenet169", 64), ("densenet201", 64)],
)
def test_torchvision_weights_give_torchvision_outputs(name: str, size: int) -> None:
    torch.manual_seed(0)
    theirs = randomize_bn_stats(getattr(torchvision.models, name)())
    ours = densenet.create_model(name)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert_same_outputs(ours, theirs, size)


@pytest.mark.parametrize("name", ["densenet121", "densenetblur121d"])
def test_timm_state_dict_file_gives_timm_outputs(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    theirs = randomize_bn_stats(timm.create_model(name, pretrained=False))
    # timm publishes safetensors files; load through the same path as a download would.
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(path))
    ours = densenet.create_model(name, pretrained=path)
    assert_same_outputs(ours, theirs, 64)


def cifar10_test_subset(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` JPEG test images of each class: uint8 ``(N, 3, 32, 32)``, labels."""
    images, labels = [], []
    with zipfile.ZipFile(CIFAR_ZIP) as archive:
        names = sorted(
            n for n in archive.namelist() if n.startswith("test/") and n.endswith(".jpg")
        )
        for label, cls in enumerate(CIFAR_CLASSES):
            for name in [n for n in names if n.split("/")[1] == cls][:per_class]:
                image = Image.open(io.BytesIO(archive.read(name))).convert("RGB")
                images.append(np.asarray(image))
                labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels)


@pytest.mark.skipif(
    not (JASONWEI.is_file() and CIFAR_ZIP.is_file()),
    reason=f"real data not found beside the checkout ({DATA})",
)
def test_third_party_cifar10_checkpoint_accuracy() -> None:
    """JasonWei05/DenseNet's checkpoint (90.53% on lossless CIFAR-10, by its author) loads by key
    remap and scores what that implies on the JPEG q75 copy (about 10.5 points lower).

    Measured on all 10,000 JPEG test images: 79.73%. Here: 1,000 images (100 per class)."""
    model = DenseNet(
        growth_rate=12, block_config=(6, 12, 24), num_init_features=24, stem="cifar", num_classes=10
    )
    densenet.load_pretrained(model, JASONWEI)
    assert densenet.count_parameters(model) == 616_042
    images, labels = cifar10_test_subset(per_class=100)
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)  # the author's normalization
    std = torch.tensor((0.2023, 0.1994, 0.2010)).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(batch).argmax(1) for batch in x.split(250)])
    accuracy = (preds == labels).float().mean().item()
    assert accuracy > 0.76, f"accuracy {accuracy:.2%} on 1,000 JPEG test images"
