"""Low precision inference: optimize_for_inference(precision=...) and bench --precision."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch
from inference_helpers import (
    FLOAT32_REL_TOL,
    cifar_checkpoint_and_samples,
    save_checkpoint,
    tiny_model,
)

from densenet import runtime
from densenet.cli import main
from densenet.inference import PRECISION_BACKENDS, PRECISIONS, optimize_for_inference

# Relative error (max |difference| / max |fp32 logit|) allowed for bfloat16 arithmetic: its 8-bit
# mantissa rounds each value by up to 2^-9 ~ 2e-3, and a DenseNet sums hundreds of such terms per
# output. The bound; measured ~5e-3 on these models.
BF16_REL_TOL = 2e-2
NATIVE_BF16 = runtime.native_bf16("cpu")
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bfloat16")


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_native_bf16_follows_the_cpu_flags() -> None:
    """On x86 Linux the answer is the kernel's own list of CPU features."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.exists():
        pytest.skip("x86 Linux only")
    flags = set(cpuinfo.read_text().split())
    assert bool({"avx512_bf16", "amx_bf16"} & flags) == NATIVE_BF16
    assert runtime.native_bf16("meta") is False


def test_bench_precisions_match_the_library() -> None:
    from densenet.cli import bench

    assert bench.PRECISIONS == PRECISIONS  # the CLI keeps its own copy to stay torch-free


@needs_bf16
@pytest.mark.parametrize("backend", ["eager", "openvino"])
@torch.no_grad()
def test_bf16_is_close_to_fp32_but_really_bf16(backend: str) -> None:
    model = tiny_model()
    x = torch.randn(6, 3, 16, 16)
    expected = model(x)
    fast = optimize_for_inference(model, backend, precision="bf16", input_size=(16, 16))
    actual = fast(x)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert rel_error(actual, expected) <= BF16_REL_TOL
    # Not float32 arithmetic under another name: bf16 rounding shows.
    assert rel_error(actual, expected) > 10 * FLOAT32_REL_TOL
    # The source model is left as it was (the bf16 graph is a copy).
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert rel_error(model(x), expected) == 0


@needs_bf16
@torch.no_grad()
def test_bf16_and_int8_keep_the_classes_of_real_cifar_images() -> None:
    """The third-party CIFAR-10 checkpoint on the 20 real sample images: same classes."""
    model, x = cifar_checkpoint_and_samples()
    expected = model.eval()(x).argmax(1)
    for precision, backend in [("bf16", "eager"), ("bf16", "openvino"), ("int8", "openvino")]:
        fast = optimize_for_inference(
            model, backend, precision=precision, calibration=[x[:10]], input_size=(32, 32)
        )
        agree = (fast(x).argmax(1) == expected).float().mean().item()
        assert agree >= 0.9, (precision, backend, agree)


def test_bf16_without_native_support_runs_fp32_with_a_notice(monkeypatch, capsys) -> None:
    monkeypatch.setattr(runtime, "native_bf16", lambda device="cpu": False)
    model = tiny_model()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        fast = optimize_for_inference(model, "eager", precision="bf16")
        assert rel_error(fast(x), model(x)) <= FLOAT32_REL_TOL
    error = capsys.readouterr().err
    assert "no native bfloat16" in error and "fp32 runs instead" in error


@pytest.mark.parametrize(
    "precision, backend, message",
    [
        ("fp16", "eager", "precision must be one of"),
        ("int8", "eager", "does not run on backend 'eager'"),
        ("int8", "openvino", "int8 needs calibration"),
    ],
)
def test_impossible_precisions_are_named(precision: str, backend: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        optimize_for_inference(tiny_model(), backend, precision=precision)


@needs_bf16
def test_bf16_on_onnxruntime_names_the_backends_that_can() -> None:
    with pytest.raises(ValueError, match="no bfloat16 convolution kernels.*'openvino'"):
        optimize_for_inference(tiny_model(), "onnxruntime", precision="bf16")
    assert "onnxruntime" not in PRECISION_BACKENDS["bf16"]


@torch.no_grad()
def test_int8_runs_micro_batched_like_the_float_graphs() -> None:
    model = tiny_model()
    calibration = [torch.randn(16, 3, 16, 16)]
    x = torch.randn(8, 3, 16, 16)
    for backend in ("onnxruntime", "openvino"):
        whole = optimize_for_inference(
            model, backend, precision="int8", calibration=calibration, micro_batch=0
        )
        chunked = optimize_for_inference(
            model, backend, precision="int8", calibration=calibration, micro_batch=3
        )
        assert torch.allclose(whole(x), chunked(x), rtol=1e-4, atol=1e-4)
        assert rel_error(whole(x), model(x)) < 0.1


@needs_bf16
def test_bench_rows_per_precision(tmp_path: Path, capsys) -> None:
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    argv = ["bench", "--checkpoint", str(checkpoint), "--batch", "2", "--threads", "1"]
    argv += ["--precision", "fp32,bf16", "--iters", "1", "--warmup", "1", "--json"]
    argv += ["--backends", "torchvision,optimized-eager,optimized-onnxruntime,openvino-default"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["results"]["2"]
    assert list(rows) == [
        "torchvision",
        "optimized-eager",
        "optimized-eager:bf16",
        "optimized-onnxruntime",
        "openvino-default",
    ]
    precision = {name: row["precision"] for name, row in rows.items()}
    assert precision["optimized-eager:bf16"] == "bf16" and precision["torchvision"] == "fp32"
    assert precision["openvino-default"].startswith("default (")
    assert "vs_openvino-default" in rows["optimized-eager:bf16"]
    assert "bfloat16" in report["skipped"]["optimized-onnxruntime:bf16"]


def test_bench_precision_errors(tmp_path: Path, capsys) -> None:
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    base = ["bench", "--checkpoint", str(checkpoint), "--iters", "1", "--batch", "1"]
    assert main([*base, "--precision", "bf61"]) == 2
    assert "unknown precision(s) bf61; choose from fp32, bf16, int8; did you mean bf16?" in (
        capsys.readouterr().err
    )
    assert main([*base, "--precision", "int8", "--backends", "optimized-openvino"]) == 2
    assert "calibrat" in capsys.readouterr().err
