"""Every file the project writes, read back by every reader (issue 12's round-trip matrix).

Artifacts: the ``last``/``best`` checkpoints after each epoch of a tiny real ``densenet train`` run
(epoch 2 by ``--resume``), ``save_weights`` files, both also re-written with metadata padded so
that their safetensors header length starts with byte 0x80 (pickle's PROTO opcode, which the old
first-byte sniffer took them for), then the ONNX files ``densenet export`` writes and the int8
ONNX of :mod:`densenet.quantization`. Readers: ``create_model(pretrained=)``, ``densenet eval``,
``predict``, ``visualize``, ``export``, ``bench``, ``train --pretrained``, ``train --resume``,
and for ONNX files ``load_exported`` (onnxruntime).

Data: real Fashion-MNIST (128 training, 64 test images) from ../shared/data when present, else a
generated image folder; the model has a few hundred parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from inference_helpers import FLOAT32_REL_TOL
from PIL import Image
from test_data import SHARED, make_image_folder

import densenet
from densenet import DenseNet
from densenet.cli import main
from densenet.export import load_exported
from densenet.io import atomic_write, file_kind, load_state, save_state
from densenet.quantization import quantize_onnx, save_quantized

TINY_MODEL = "{growth_rate: 2, block_config: [1, 1], num_init_features: 4}"
CHECKPOINTS = ["epoch1-last", "epoch1-best", "epoch2-last", "epoch2-best"]
PADDED = {"epoch2-last-0x80": "epoch2-last", "weights-0x80": "weights"}
ARTIFACTS = [*CHECKPOINTS, "weights", *PADDED]


def data_args(tmp: Path) -> list[str]:
    if (SHARED / "fashion-mnist").exists():
        return [
            "--dataset", "fashion_mnist", "--data-dir", str(SHARED / "fashion-mnist"),
            "--set", "train_subset=128", "--set", "val_subset=64",
        ]  # fmt: skip
    return ["--dataset", "folder", "--data-dir", str(make_image_folder(tmp / "images", 16, 32, 4))]


def common(tmp: Path) -> list[str]:
    """Train options of every run here: a constant lr, so that a resumed run may add epochs."""
    return [
        *data_args(tmp), "--batch-size", "32", "--workers", "0", "--device", "cpu",
        "--deterministic", "--no-progress", "--set", "threads=1", "--set", "schedule=constant",
        "--set", f"model_args={TINY_MODEL}",
    ]  # fmt: skip


def header_first_byte(path: Path) -> int:
    return path.read_bytes()[0]


def rewrite_with_first_byte(source: Path, dest: Path, first_byte: int = 0x80) -> Path:
    """``source`` (our state file) written again by ``save_state`` with a ``padding`` metadata
    entry sized so that the header length's first byte is ``first_byte``."""
    state, metadata = load_state(source)
    for size in range(0, 264, 8):  # headers are 8-byte aligned
        save_state(dest, state, {**metadata, "padding": "x" * size})
        if header_first_byte(dest) == first_byte:
            return dest
    raise AssertionError(f"no padding gives {source} a header starting with {first_byte:#x}")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("roundtrip")
    run = tmp / "run"
    args = common(tmp)
    paths: dict[str, Path] = {}

    def keep(epoch: int) -> None:
        for which in ("last", "best"):
            paths[f"epoch{epoch}-{which}"] = Path(
                shutil.copy(run / "checkpoints" / f"{which}.safetensors", tmp / f"e{epoch}-{which}.safetensors")
            )  # fmt: skip

    assert main(["train", "--out", str(run), "--epochs", "1", *args]) == 0
    keep(1)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    keep(2)
    model = densenet.create_model(pretrained=paths["epoch2-best"])
    metadata = load_state(paths["epoch2-best"])[1]
    keys = ("class_names", "mean", "std", "input_size", "dataset")
    paths["weights"] = densenet.save_weights(
        model, tmp / "weights.safetensors", **{k: metadata[k] for k in keys}
    )
    for padded, source in PADDED.items():
        paths[padded] = rewrite_with_first_byte(paths[source], tmp / f"{padded}.safetensors")
    image = tmp / "image.png"
    size, chans = metadata["input_size"][-1], metadata["input_size"][0]
    pixels = np.random.default_rng(0).integers(
        0, 256, (size, size, chans)[: 3 if chans == 3 else 2]
    )
    Image.fromarray(pixels.astype(np.uint8)).save(image)
    return {"paths": paths, "run": run, "args": args, "image": image, "tmp": tmp}


def reference_model(path: Path) -> DenseNet:
    """The model a file holds, rebuilt without our readers: its model_config, strict load."""
    state, metadata = load_state(path)
    model = DenseNet(**metadata["model_config"])
    model.load_state_dict(state.get("model", state), strict=True)
    model.input_size = tuple(metadata["input_size"])  # (C, H, W) it was trained at
    return model.eval()


def example_input(model: DenseNet) -> torch.Tensor:
    """A batch of 3 at the input size the file records (the export's fixed spatial size)."""
    return torch.randn(3, *model.input_size, generator=torch.Generator().manual_seed(0))


def test_artifacts_are_what_they_claim(artifacts) -> None:
    paths = artifacts["paths"]
    assert all(file_kind(p) == "safetensors" for p in paths.values())
    assert all(header_first_byte(paths[name]) == 0x80 for name in PADDED)
    epochs = {name: load_state(paths[name])[0]["epoch"] for name in CHECKPOINTS}
    assert epochs["epoch1-last"] == 1 and epochs["epoch2-last"] == 2


@pytest.mark.parametrize("name", ARTIFACTS)
def test_create_model_pretrained(artifacts, name: str) -> None:
    path = artifacts["paths"][name]
    model, reference = densenet.create_model(pretrained=path), reference_model(path)
    x = example_input(reference)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference(x))


def run_cli(*args: str, capsys) -> str:
    """Run ``densenet ARGS`` in this process; its stdout (the exit status must be 0)."""
    capsys.readouterr()
    status = main(list(args))
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out


@pytest.mark.parametrize("name", ARTIFACTS)
def test_cli_readers(artifacts, name: str, capsys, tmp_path: Path) -> None:
    """eval, predict, visualize, bench, export (and its ONNX file read back), train --pretrained."""
    path, image = str(artifacts["paths"][name]), str(artifacts["image"])
    data = artifacts["args"][:4]  # --dataset X --data-dir Y
    result = json.loads(run_cli(
        "eval", "--checkpoint", path, *data[2:], "--limit", "32", "--workers", "0",
        "--device", "cpu", "--out", str(tmp_path), "--json", "--no-progress", capsys=capsys,
    ))  # fmt: skip
    assert 0 <= result["top1"] <= 100
    predicted = json.loads(run_cli("predict", "--checkpoint", path, image, "--json", capsys=capsys))
    assert predicted
    png = tmp_path / "vis.png"
    run_cli("visualize", "--checkpoint", path, image, "--out", str(png), capsys=capsys)
    assert png.stat().st_size > 0
    run_cli(
        "bench", "--checkpoint", path, "--backends", "eager", "--batch", "1", "--iters", "1",
        "--warmup", "0", "--json", "--no-progress", capsys=capsys,
    )  # fmt: skip
    onnx = tmp_path / "model.onnx"
    run_cli("export", "--checkpoint", path, "--out", str(onnx), "--json", capsys=capsys)
    reference = reference_model(Path(path))
    x = example_input(reference)
    with torch.no_grad():
        expected = reference(x)
    relative = (load_exported(onnx)(x) - expected).abs().max() / expected.abs().max()
    assert relative <= FLOAT32_REL_TOL
    run_cli(
        "train", "--pretrained", path, "--out", str(tmp_path / "fine-tune"), "--epochs", "1",
        *artifacts["args"], capsys=capsys,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["epoch1-last", "epoch2-last-0x80"])
def test_train_resume(artifacts, name: str, tmp_path: Path) -> None:
    """A run directory whose last checkpoint is the artifact resumes one more epoch."""
    run = tmp_path / "run"
    shutil.copytree(artifacts["run"], run)
    shutil.copy(artifacts["paths"][name], run / "checkpoints" / "last.safetensors")
    epoch = load_state(run / "checkpoints" / "last.safetensors")[0]["epoch"]
    assert main(["train", "--resume", str(run), "--epochs", str(epoch + 1), "--no-progress"]) == 0
    assert load_state(run / "checkpoints" / "last.safetensors")[0]["epoch"] == epoch + 1


def test_int8_onnx_reads_back(artifacts, tmp_path: Path) -> None:
    """The int8 ONNX of a trained checkpoint, written and read back by onnxruntime, ranks the
    classes like the float model on the calibration images (within int8's error)."""
    model = reference_model(artifacts["paths"]["epoch2-best"])
    images = example_input(model)
    path = save_quantized(quantize_onnx(model, [images]), tmp_path / "int8.onnx")
    with torch.no_grad():
        expected = model(images)
    actual = load_exported(path)(images)
    assert actual.shape == expected.shape
    relative = (actual - expected).abs().max() / expected.abs().max()
    assert relative < 0.1, f"int8 relative error {relative:.3f}"


# --- writing: durability --------------------------------------------------------------------


def test_atomic_write_fsyncs_the_complete_file_before_the_rename(tmp_path, monkeypatch) -> None:
    """The order a power cut needs: the temporary file's bytes all written and fsynced, then
    renamed over the target, then the directory fsynced (so the rename itself is durable)."""
    events: list[tuple] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd: int) -> None:
        info = os.fstat(fd)
        kind = "directory" if stat.S_ISDIR(info.st_mode) else "file"
        events.append(("fsync", kind, info.st_ino, info.st_size))
        fsync(fd)

    def record_replace(source, target) -> None:
        events.append(("replace", os.stat(source).st_ino, Path(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    target = tmp_path / "checkpoint.safetensors"
    data = b"x" * 100_000
    atomic_write(target, lambda f: f.write(data))
    assert [e[0] if e[0] == "replace" else e[:2] for e in events] == [
        ("fsync", "file"),
        "replace",
        ("fsync", "directory"),
    ]
    (_, _, synced_inode, synced_size), (_, renamed_inode, renamed_to) = events[:2]
    assert synced_size == len(data) and synced_inode == renamed_inode == target.stat().st_ino
    assert renamed_to == target and target.read_bytes() == data
