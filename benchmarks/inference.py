"""The full inference benchmark of issue 5, one command (results go in docs/benchmarks.md):

    .venv/bin/python benchmarks/inference.py [--iters N] [--min-time S] [--test-images N] [--json OUT.json]

1. ``densenet bench`` on densenet121 at 224x224, batch 1 and 16, and densenet_bc100_k12 at batch
   64: torchvision eager, our default (``optimized``), our graph on each backend, onnxruntime and
   OpenVINO on the plain export, and both runtimes on the plain export scheduled like ours (our
   default micro-batches; OpenVINO also on our streams): how much of the gain the scheduling
   alone gives. Interleaved in one run. Random weights: speed does not depend on them.
2. int8: the third-party CIFAR-10 DenseNet-BC checkpoint in ../shared/data quantized with
   :mod:`densenet.quantization` (calibrated on real CIFAR-10 *train* JPEGs), top-1 on the real
   CIFAR-10 JPEG test images against float32, and its speed against onnxruntime float32 on the
   plain export, in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densenet import DenseNet
from densenet.benchmark import measure
from densenet.cli import main
from densenet.hub.loading import load_pretrained
from densenet.inference import optimize_for_inference
from densenet.quantization import quantize_model
from densenet.runtimes import OnnxRuntimeModel, onnx_bytes

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_ZIP = DATA / "cifar10-jpeg" / "cifar10_yoongikim_jpeg_q75.zip"
CHECKPOINT = DATA / "checkpoints" / "jasonwei05_densenet_cifar10.pth"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The checkpoint author's normalization.
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


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
def top1(fn, images: torch.Tensor, labels: torch.Tensor) -> float:
    preds = torch.cat([fn(b).argmax(1) for b in images.split(250)])
    return 100 * (preds == labels).float().mean().item()


def int8_benchmark(iters: int, min_time: float, test_per_class: int, threads: int) -> dict:
    model = DenseNet(
        growth_rate=12, block_config=(6, 12, 24), num_init_features=24, stem="cifar",
        num_classes=10,
    )  # fmt: skip
    load_pretrained(model, CHECKPOINT)
    model.eval()
    test_x, test_y = cifar_images("test", test_per_class)
    calib_x, _ = cifar_images("train", 50)
    backends = {
        "torch-eager-fp32": model,
        "onnxruntime-fp32": OnnxRuntimeModel(onnx_bytes(model, test_x[:1]), threads),
        "optimized-fp32": optimize_for_inference(model, input_size=(32, 32), threads=threads),
        "int8-onnxruntime": quantize_model(model, calib_x.split(50), "onnxruntime", threads),
        "int8-openvino": quantize_model(model, calib_x.split(50), "openvino", threads),
    }
    # torch eager computes the same float32 function as onnxruntime-fp32 (checked in the tests);
    # its accuracy pass would only cost time.
    accuracy = {
        n: top1(fn, test_x, test_y) for n, fn in backends.items() if n != "torch-eager-fp32"
    }
    speed = measure(backends, torch.randn(64, 3, 32, 32), iters, 2, min_time)
    speed = {k: {**v, "vs_onnxruntime": v["img_per_s"] / speed["onnxruntime-fp32"]["img_per_s"]}
             for k, v in speed.items()}  # fmt: skip
    return dict(
        test_images=len(test_y), calibration_images=len(calib_x), top1=accuracy,
        top1_change_int8={
            k: accuracy[k] - accuracy["onnxruntime-fp32"] for k in accuracy if k.startswith("int8")
        }, batch64=speed,
    )  # fmt: skip


def bench(model: str, batch: str, iters: int, min_time: float, backends: str, out: Path) -> dict:
    import contextlib

    buffer = io.StringIO()
    argv = ["bench", "--model", model, "--batch", batch, "--iters", str(iters), "--json"]
    argv += ["--min-time", str(min_time)]
    with contextlib.redirect_stdout(buffer):
        main(argv + ["--backends", backends, "--threads", "2"])
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
    parser.add_argument("--json", default="inference_benchmark.json")
    parser.add_argument("--skip", default="", help="comma list of: densenet121,bc100,int8")
    args = parser.parse_args()
    torch.set_num_threads(2)
    skip = set(args.skip.split(","))
    results: dict = {"load_start": os.getloadavg()}
    backends = (
        "torchvision,optimized,optimized-eager,optimized-openvino,onnxruntime,openvino,"
        "onnxruntime-microbatch,openvino-microbatch"
    )
    tmp = Path(args.json).with_suffix(".part.json")
    if "densenet121" not in skip:
        results["densenet121"] = bench(
            "densenet121", "1,16", args.iters, args.min_time, backends, tmp
        )
        print(json.dumps(results["densenet121"]["results"], indent=1), flush=True)
    if "bc100" not in skip:
        results["densenet_bc100_k12"] = bench(
            "densenet_bc100_k12", "64", args.iters, args.min_time, backends, tmp
        )
        print(json.dumps(results["densenet_bc100_k12"]["results"], indent=1), flush=True)
    if "int8" not in skip:
        results["int8"] = int8_benchmark(args.iters, args.min_time, args.test_images, 2)
        print(json.dumps(results["int8"], indent=1), flush=True)
    results["load_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main_()
