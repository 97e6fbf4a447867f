"""``create_model(pretrained=our_checkpoint)`` rebuilds the architecture the file's metadata
records: input channels and the other ``model_config`` fields, with or without a model name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from inference_helpers import shared_data
from PIL import Image

import densenet
from densenet.io import CheckpointError, save_state

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
]  # fmt: skip
# densenet_bc100_k12 with model_args, as `densenet train` builds it for a Fashion-MNIST run
MODEL_ARGS = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, drop_rate=0.1)


def gray_model() -> densenet.DenseNet:
    torch.manual_seed(0)
    model = densenet.create_model("densenet_bc100_k12", in_chans=1, **MODEL_ARGS)
    for m in model.modules():  # non-trivial BN statistics, so dropped buffers would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def training_checkpoint(path: Path, model: densenet.DenseNet) -> Path:
    """The layout of densenet.train.state's ``save_checkpoint``: the state tree and its ``metadata``."""
    metadata = {
        "model": "densenet_bc100_k12", "model_config": model.config, "dataset": "fashion_mnist",
        "num_classes": 10, "class_names": FASHION_CLASSES, "mean": [0.286], "std": [0.353],
        "input_size": [1, 28, 28], "densenet_version": densenet.__version__,
    }  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": {"name": "cosine", "step": 4, "lr": 0.1}, "scaler": {}, "rng": {},
        "epoch": 1, "step": 4, "epoch_step": 0, "train_sums": [1.0, 3, 8], "best_top1": 12.5,
    }  # fmt: skip
    return save_state(path, state, {**metadata, "epoch": 1})


def fashion_images() -> torch.Tensor:
    """The first Fashion-MNIST test images (real, 28x28 gray), normalized: ``(N, 1, 28, 28)``."""
    folder = shared_data("test-samples")
    files = sorted(folder.glob("fashionMNIST_*.png"))[:4]
    arrays = [torch.frombuffer(bytearray(Image.open(f).convert("L").tobytes()), dtype=torch.uint8)
              for f in files]  # fmt: skip
    x = torch.stack(arrays).reshape(-1, 1, 28, 28).float() / 255
    return (x - 0.286) / 0.353


@pytest.mark.parametrize("name", [None, "densenet_bc100_k12"])
def test_gray_training_checkpoint_rebuilds_one_channel_model(tmp_path: Path, name) -> None:
    original = gray_model()
    path = training_checkpoint(tmp_path / "best.safetensors", original)
    model = densenet.create_model(name, pretrained=path).eval()
    assert model.in_chans == 1 and model.features.conv0.weight.shape[1] == 1
    assert model.config == original.config  # model_args (block_config, drop_rate) included
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 28, 28) and cfg["mean"] == (0.286,) and cfg["std"] == (0.353,)
    assert cfg["class_names"] == FASHION_CLASSES and cfg["num_classes"] == 10
    x = fashion_images()
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_explicit_arguments_still_win(tmp_path: Path) -> None:
    original = gray_model()
    path = training_checkpoint(tmp_path / "best.safetensors", original)
    rgb = densenet.create_model(pretrained=path, in_chans=3, drop_rate=0.0).eval()
    assert rgb.in_chans == 3 and rgb.config["drop_rate"] == 0.0
    assert rgb.pretrained_cfg["input_size"] == (3, 28, 28)
    x = fashion_images()
    with torch.no_grad():  # the gray filter spread over 3 copies (x 1/3): the same outputs
        assert torch.allclose(rgb(x.expand(-1, 3, -1, -1)), original(x), atol=1e-5)
    # a file of another model: the named model's registry arguments, and the usual mismatch error
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        densenet.create_model("densenet40_k12", pretrained=path)


def test_state_dict_without_metadata_gives_its_first_conv_channels(tmp_path: Path) -> None:
    original = gray_model()
    plain = tmp_path / "plain.pth"
    torch.save(original.state_dict(), plain)
    model = densenet.create_model("densenet_bc100_k12", pretrained=plain, **MODEL_ARGS)
    assert model.in_chans == 1 and model.pretrained_cfg["input_size"][0] == 1
    assert densenet.create_model("densenet_bc100_k12").in_chans == 3  # no weights: RGB


def test_fashion_mnist_run_checkpoint_end_to_end(tmp_path: Path) -> None:
    """A real (tiny, 64-image) `densenet train` run on Fashion-MNIST, loaded by path alone."""
    from densenet.config import load_config
    from densenet.train import train

    data_dir = shared_data("fashion-mnist")
    cfg = load_config(None, {
        "dataset": "fashion_mnist", "data_dir": str(data_dir), "model": "densenet_bc100_k12",
        "model_args": {"growth_rate": 2, "block_config": [1, 1], "num_init_features": 4},
        "batch_size": 32, "epochs": 1, "train_subset": 64, "val_subset": 64, "workers": 0,
        "device": "cpu", "out": str(tmp_path / "run"), "seed": 1, "threads": 1,
    })  # fmt: skip
    train(cfg, progress=False, log=lambda _: None)
    model = densenet.create_model(pretrained=tmp_path / "run" / "checkpoints" / "best.safetensors")
    assert model.in_chans == 1 and model.pretrained_cfg["input_size"] == (1, 28, 28)
    assert model.pretrained_cfg["class_names"][9] == "Ankle boot"
    with torch.no_grad():
        assert model.eval()(fashion_images()).shape == (4, 10)
