"""Shared by the evaluate/predict/visualize tests: tiny checkpoints and the real sample images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from densenet import DenseNet
from densenet.io import save_state

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Largest relative error (max |difference| / max |reference|) allowed between two float32
# computations of the same DenseNet (fused graph, ONNX, torchvision/timm, ...). Measured: at most
# 6e-7 (every test architecture, densenet121 at 64x64, onnxruntime, OpenVINO). A BatchNorm fold
# without eps is off by 4e-6 to 3e-5 on the same models, which 1e-4 let pass.
FLOAT32_REL_TOL = 2e-6
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
]  # fmt: skip


def shared_data(*parts: str) -> Path:
    """A path under ``../shared/data``; skips the test when that copy of the data is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the shared data folder beside the checkout)")
    return path


def tiny_model(num_classes: int = 10, in_chans: int = 3, seed: int = 0) -> DenseNet:
    """A 2-block CIFAR-style DenseNet-BC with k=4: a few thousand parameters."""
    torch.manual_seed(seed)
    model = DenseNet(
        growth_rate=4, block_config=(2, 2), num_init_features=8, stem="cifar",
        in_chans=in_chans, num_classes=num_classes,
    )  # fmt: skip
    # Non-trivial BN statistics, so eval-mode outputs depend on them being loaded.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def save_checkpoint(path: Path, model: DenseNet, **metadata) -> Path:
    """A training-style checkpoint: weights under 'model', architecture and data in metadata.

    ``metadata`` adds or overrides keys; a None value drops the key.
    """
    meta = dict(
        model_config=model.config, class_names=CIFAR10_CLASSES[: model.num_classes],
        mean=[0.49, 0.48, 0.45][: model.in_chans], std=[0.25, 0.24, 0.26][: model.in_chans],
        input_size=[model.in_chans, 32, 32], dataset="cifar10",
    )  # fmt: skip
    meta.update(metadata)
    meta = {k: v for k, v in meta.items() if v is not None}
    return save_state(path, {"model": model.state_dict(), "epoch": 3}, meta)


def trained_cifar10_checkpoint(path: Path) -> Path:
    """The third-party DenseNet trained on CIFAR-10 (../shared/data/checkpoints), as our file.

    90.53% on the lossless test set by its author; about 10 points less on the JPEG q75 copy.
    """
    from densenet.hub.loading import load_pretrained
    from densenet.hub.saving import save_weights

    source = shared_data("checkpoints", "jasonwei05_densenet_cifar10.pth")
    model = DenseNet(
        growth_rate=12, block_config=(6, 12, 24), num_init_features=24, stem="cifar", num_classes=10
    )
    load_pretrained(model, source)
    # Its author's normalization (DATA.md), not the usual CIFAR-10 std.
    return save_weights(
        model, path, class_names=CIFAR10_CLASSES, mean=[0.4914, 0.4822, 0.4465],
        std=[0.2023, 0.1994, 0.2010], input_size=[3, 32, 32], dataset="cifar10",
    )  # fmt: skip


def cifar_checkpoint_and_samples() -> tuple[DenseNet, torch.Tensor]:
    """The third-party CIFAR-10 DenseNet-BC checkpoint in ../shared (eval mode) and the 20 real
    CIFAR-10 sample images, normalized as its author did: (20, 3, 32, 32)."""
    import numpy as np
    from PIL import Image

    from densenet.hub.loading import load_pretrained

    folder = shared_data("test-samples")
    checkpoint = shared_data("checkpoints", "jasonwei05_densenet_cifar10.pth")
    model = DenseNet(
        growth_rate=12, block_config=(6, 12, 24), num_init_features=24, stem="cifar",
        num_classes=10,
    )  # fmt: skip
    load_pretrained(model, checkpoint)
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
    std = torch.tensor((0.2023, 0.1994, 0.2010)).view(3, 1, 1)
    images = []
    for path in sorted(folder.glob("cifar10_*.png")):
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)  # (32, 32, 3)
        images.append((torch.from_numpy(array).permute(2, 0, 1) / 255 - mean) / std)
    return model.eval(), torch.stack(images)
