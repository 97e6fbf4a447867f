"""The full inference benchmark (issues 5 and 14), one command (results go in docs/benchmarks.md):

    .venv/bin/python benchmarks/inference.py [--iters N] [--min-time S] [--test-images N]
        [--checkpoint RUN/checkpoints/best.safetensors --data-dir DATA] [--json OUT.json]

1. Speed: ``densenet bench --precision fp32,bf16,int8`` on densenet121 at 224x224, batch 1 and
   16, and densenet_bc100_k12 at 32x32, batch 64: our default at each precision beside the
   references at their own precision (torchvision eager fp32 and under bf16 autocast with
   channels_last, onnxruntime fp32, OpenVINO pinned to f32 and OpenVINO's default, which is bf16
   on this CPU), interleaved in one run. Random weights: speed does not depend on them; int8
   calibrates on the 100 real sample images of ../shared/data/test-samples.
2. Accuracy: the third-party CIFAR-10 DenseNet-BC checkpoint in ../shared/data at each precision
   and backend, top-1 on the real CIFAR-10 JPEG test images (all 10,000 by default), its change
   against fp32 and the share of images whose class is the fp32 one; int8 calibrated on 500 real
   CIFAR-10 *train* JPEGs.
3. With ``--checkpoint``: ``densenet eval --precision P`` of a model trained by ``densenet train``
   on its own dataset's test split, for each precision.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densenet import DenseNet
from densenet.cli import main
from densenet.hub.loading import load_pretrained
from densenet.inference import optimize_for_inference

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_ZIP = DATA / "cifar10-jpeg" / "cifar10_yoongikim_jpeg_q75.zip"
CHECKPOINT = DATA / "checkpoints" / "jasonwei05_densenet_cifar10.pth"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The checkpoint author's normalization.
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# Ours (optimized, at each precision) and the references, each at its own precision.
BACKENDS = "torchvision,torchvision-bf16,optimized,onnxruntime,openvino,openvino-default"


def cifar_images(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` JPEGs of each class, normalized: (N, 3, 32, 32), labels (N,)."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    images, labels = [], []
    with zipfile.ZipFile(CIFAR_ZIP) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
        for label, cls in enumerate(CLASSES):
            for name in [n for n in names if n.startswith(f"{split}/{cls}/")][:per_class]:
                rgb = np.array(Image.open(io.BytesIO(archive.read(name))).convert("RGB"))
                images.append((torch.from_numpy(rgb).permute(2, 0, 1) / 255 - mean) / std)
                labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def accuracy_benchmark(test_per_class: int, threads: int) -> dict:
    """Top-1 of the third-party checkpoint at each precision and backend, against fp32."""
    model = DenseNet(
        growth_rate=12, block_config=(6, 12, 24), num_init_features=24, stem="cifar",
        num_classes=10,
    )  # fmt: skip
    load_pretrained(model, CHECKPOINT)
    model.eval()
    test_x, test_y = cifar_images("test", test_per_class)
    calibration = cifar_images("train", 50)[0].split(50)
    runs = {
        "fp32 torch eager": lambda: model,
        "fp32 ours (openvino)": lambda: optimize(model, "openvino", "fp32", threads),
        "bf16 ours (eager)": lambda: optimize(model, "eager", "bf16", threads),
        "bf16 ours (openvino)": lambda: optimize(model, "openvino", "bf16", threads),
        "int8 ours (openvino)": lambda: optimize(model, "openvino", "int8", threads, calibration),
        "int8 ours (onnxruntime)": lambda: optimize(
            model, "onnxruntime", "int8", threads, calibration
        ),
    }
    with torch.no_grad():
        predictions = {name: classes(make(), test_x) for name, make in runs.items()}
    reference = predictions["fp32 torch eager"]
    rows = {}
    for name, predicted in predictions.items():
        top1 = 100 * (predicted == test_y).float().mean().item()
        rows[name] = dict(
            top1=top1,
            change_vs_fp32=top1 - 100 * (reference == test_y).float().mean().item(),
            agreement_with_fp32=100 * (predicted == reference).float().mean().item(),
        )
    return dict(test_images=len(test_y), calibration_images=500, rows=rows)


def optimize(model, backend: str, precision: str, threads: int, calibration=None):
    return optimize_for_inference(
        model, backend, precision=precision, calibration=calibration, threads=threads
    )


def classes(fn, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(b).argmax(1) for b in images.split(250)])


def trained_model_accuracy(checkpoint: Path, data_dir: str | None) -> dict:
    """``densenet eval --precision P --json`` of ``checkpoint`` (on ``data_dir`` when given) for
    each precision."""
    results = {}
    for precision in ("fp32", "bf16", "int8"):
        buffer = io.StringIO()
        argv = ["eval", "--checkpoint", str(checkpoint), "--precision", precision, "--json"]
        argv += ["--data-dir", data_dir] if data_dir else []
        with contextlib.redirect_stdout(buffer):
            main(argv + ["--no-progress", "--out", str(checkpoint.parent)])
        report = json.loads(buffer.getvalue())
        results[precision] = {k: report[k] for k in ("precision", "images", "top1", "top5")}
    for row in results.values():
        row["change_vs_fp32"] = row["top1"] - results["fp32"]["top1"]
    return results


def bench(
    model: str, batch: str, iters: int, min_time: float, calibration: Path, out: Path
) -> dict:
    buffer = io.StringIO()
    argv = ["bench", "--model", model, "--batch", batch, "--iters", str(iters), "--json"]
    argv += ["--min-time", str(min_time), "--precision", "fp32,bf16,int8"]
    argv += ["--calibration", str(calibration)]
    with contextlib.redirect_stdout(buffer):
        main(argv + ["--backends", BACKENDS, "--threads", "2", "--no-progress"])
    report = json.loads(buffer.getvalue())
    out.write_text(json.dumps(report, indent=1))
    return report


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--min-time", type=float, default=10.0,
        help="seconds of timed calls per backend at least, adding rounds (default 10): batch 1 "
        "then gets as many seconds of samples as batch 16, not 1 s that one load spike decides",
    )  # fmt: skip
    parser.add_argument("--test-images", type=int, default=1000, help="per class, up to 1000")
    parser.add_argument("--checkpoint", type=Path, help="a densenet train checkpoint to eval too")
    parser.add_argument(
        "--data-dir", help="its dataset's folder or .zip (densenet eval --data-dir)"
    )
    parser.add_argument("--json", default="inference_benchmark.json")
    parser.add_argument("--skip", default="", help="comma list of: densenet121,bc100,accuracy")
    args = parser.parse_args()
    torch.set_num_threads(2)
    skip = set(args.skip.split(","))
    results: dict = {"load_start": os.getloadavg()}
    tmp = Path(args.json).with_suffix(".part.json")
    speed = {
        "densenet121": ("1,16", DATA / "test-samples"),
        "bc100": ("64", DATA / "test-samples"),
    }
    for key, (batch, calibration) in speed.items():
        if key not in skip:
            name = "densenet_bc100_k12" if key == "bc100" else key
            results[name] = bench(name, batch, args.iters, args.min_time, calibration, tmp)
            print(json.dumps(results[name]["results"], indent=1), flush=True)
    if "accuracy" not in skip:
        results["accuracy"] = accuracy_benchmark(args.test_images, 2)
        print(json.dumps(results["accuracy"], indent=1), flush=True)
    if args.checkpoint:
        results["trained"] = trained_model_accuracy(args.checkpoint, args.data_dir)
        print(json.dumps(results["trained"], indent=1), flush=True)
    results["load_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main_()
