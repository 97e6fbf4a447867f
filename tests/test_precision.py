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
    shared_data,
    tiny_model,
    trained_cifar10_checkpoint,
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


def test_cli_precisions_match_the_library() -> None:
    from densenet.cli import _common

    assert _common.PRECISIONS == PRECISIONS  # the CLI keeps its own copy to stay torch-free


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
def test_bf16_compiles() -> None:
    """torch.compile of the bf16 graph (its conversions traced once), outside no_grad."""
    model = tiny_model()
    x = torch.randn(2, 3, 8, 8)
    actual = optimize_for_inference(model, "compile", precision="bf16")(x)
    assert actual.dtype == torch.float32 and not actual.requires_grad
    with torch.no_grad():
        assert FLOAT32_REL_TOL < rel_error(actual, model(x)) <= BF16_REL_TOL


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


def test_bench_bf16_rows_need_native_bf16(tmp_path: Path, capsys, monkeypatch) -> None:
    """Without native bfloat16 neither our bf16 row nor torchvision's bf16 reference runs
    (emulated bf16 measures the emulation); both are named."""
    monkeypatch.setattr(runtime, "native_bf16", lambda device="cpu": False)
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    argv = ["bench", "--checkpoint", str(checkpoint), "--batch", "1", "--iters", "1", "--json"]
    argv += ["--precision", "fp32,bf16", "--backends", "optimized-eager,torchvision-bf16"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["results"]["1"]) == ["optimized-eager"]
    for row in ("optimized-eager:bf16", "torchvision-bf16"):
        assert "no native bfloat16" in report["skipped"][row]


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


@pytest.mark.parametrize(
    "batches, message",
    [
        # uint8 pixels quantized without a word gave logits unrelated to fp32's (a user report)
        ([torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)], "batch 0: .*floating-point"),
        ([torch.randn(4, 1, 16, 16)], "batch 0: expected 3 input channels"),
        ([torch.randn(4, 3, 16, 16), torch.randn(3, 16, 16)], "batch 1: expected a 4-D batch"),
        ([torch.randn(4, 3, 16, 16), torch.randn(2, 3, 20, 20)], "batch 1 is 20x20, batch 0 16x16"),
        ([torch.randn(2, 3, 1, 1)], "batch 0: input 1x1 is too small"),
        ([], "needs at least one batch"),
    ],
)
def test_int8_calibration_batches_are_checked(batches: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        optimize_for_inference(tiny_model(), "onnxruntime", precision="int8", calibration=batches)


@torch.no_grad()
def test_int8_calibration_may_be_one_batch_tensor() -> None:
    """A single (N, C, H, W) tensor is one batch (iterating it would yield 3-D images)."""
    model = tiny_model()
    x = torch.randn(8, 3, 16, 16)
    fast = optimize_for_inference(model, "onnxruntime", precision="int8", calibration=x)
    assert rel_error(fast(x), model(x)) < 0.1


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
    assert precision["openvino-default"] == "default (bf16)"  # OpenVINO's choice on such CPUs
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


def test_bench_says_where_a_precision_did_not_run(tmp_path: Path, capsys) -> None:
    """--precision applies to the optimized* backends: asked for with none of them, it is named
    as run nowhere; an int8 row on a backend without int8 names bench's own backends."""
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    base = ["bench", "--checkpoint", str(checkpoint), "--iters", "1", "--batch", "1", "--json"]
    assert main([*base, "--precision", "int8", "--backends", "eager"]) == 0
    skipped = json.loads(capsys.readouterr().out)["skipped"]
    assert "add --backends optimized" in skipped["--precision int8"]
    images = sorted(shared_data("test-samples").glob("cifar10_*.png"))[:4]
    argv = [*base, "--precision", "int8", "--backends", "optimized-eager,optimized-onnxruntime"]
    assert main([*argv, "--calibration", *map(str, images)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert list(report["results"]["1"]) == ["optimized-onnxruntime:int8"]
    why = report["skipped"]["optimized-eager:int8"]
    assert "use backend optimized-onnxruntime or optimized-openvino" in why
    assert "'eager'" not in why
    assert "--precision int8" not in report["skipped"]
    assert "int8 calibrates on 4 images of --calibration" in captured.err


def test_unreadable_calibration_is_an_error_before_any_work(tmp_path: Path, capsys) -> None:
    """An empty folder or a non-image as --calibration stops bench, export and predict at once
    (bench used to skip its int8 rows and succeed); the message names the file and the fix."""
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    empty, text = tmp_path / "empty", tmp_path / "notes.jpg"
    empty.mkdir()
    text.write_text("not an image")
    image = str(sorted(shared_data("test-samples").glob("cifar10_*.png"))[0])
    commands = {
        "bench": ["bench", "--checkpoint", str(checkpoint), "--precision", "int8", "--iters", "1"],
        "export": ["export", "--checkpoint", str(checkpoint), "--precision", "int8", "--out",
                   str(tmp_path / "q.onnx")],
        "predict": ["predict", "--checkpoint", str(checkpoint), image, "--precision", "int8"],
    }  # fmt: skip
    for command, argv in commands.items():
        assert main([*argv, "--calibration", str(empty)]) == 2, command
        assert "no image files" in capsys.readouterr().err, command
        assert main([*argv, "--calibration", str(text)]) == 2, command
        err = capsys.readouterr().err
        assert "notes.jpg" in err and "not a readable image" in err, (command, err)
        fix = "--skip-bad-images" if command == "predict" else "remove it from --calibration"
        assert fix in err, (command, err)
    assert not (tmp_path / "q.onnx").exists()


# --- the commands ----------------------------------------------------------------------------
def test_eval_precisions_on_real_cifar10_jpegs(tmp_path: Path, capsys) -> None:
    """``eval --precision``: the same images scored at each precision, int8 calibrated on the
    train split (not the test images), each one's report under its own name."""
    data = shared_data("cifar10-jpeg", "cifar10_yoongikim_jpeg_q75.zip")
    checkpoint = trained_cifar10_checkpoint(tmp_path / "trained.safetensors")
    args = ["eval", "--checkpoint", str(checkpoint), "--dataset", "folder", "--data-dir", str(data)]
    args += ["--limit", "200", "--workers", "0", "--device", "cpu", "--json"]
    top1 = {}
    for precision in PRECISIONS:
        assert main([*args, "--precision", precision]) == 0
        captured = capsys.readouterr()
        result = json.loads(captured.out)
        expected = precision if precision != "bf16" or NATIVE_BF16 else "fp32"
        assert result["precision"] == expected and result["images"] == 200
        top1[precision] = result["top1"]
        if precision == "int8":
            assert "int8 calibrates on 256 images of folder train" in captured.err
            assert result["calibration"] == {"images": 256, "source": "folder train"}
        else:
            assert "calibration" not in result
        suffix = "" if expected == "fp32" else f"_{expected}"
        assert (tmp_path / f"eval_folder_test{suffix}.json").is_file()
    # 78% in fp32 on these 200; low precision moves a few images at most.
    assert top1["fp32"] >= 65
    assert abs(top1["bf16"] - top1["fp32"]) <= 2 and abs(top1["int8"] - top1["fp32"]) <= 3


def test_predict_precision(tmp_path: Path, capsys) -> None:
    images = sorted(shared_data("test-samples").glob("cifar10_*.png"))
    checkpoint = trained_cifar10_checkpoint(tmp_path / "trained.safetensors")
    argv = ["predict", *map(str, images), "--checkpoint", str(checkpoint), "--json", "--topk", "1"]
    labels = {}
    for precision in ("fp32", "int8"):
        assert main([*argv, "--precision", precision]) == 0
        captured = capsys.readouterr()
        report = json.loads(captured.out)
        assert report["precision"] == precision
        labels[precision] = [p["top"][0]["label"] for p in report["predictions"]]
    assert (
        "int8 calibrates on 20 images of the images predicted; --calibration IMAGES" in captured.err
    )
    agree = sum(a == b for a, b in zip(labels["fp32"], labels["int8"], strict=True))
    assert agree >= 18


def test_export_low_precision_files_read_back(tmp_path: Path, capsys) -> None:
    from densenet.export import load_exported

    images = sorted(shared_data("test-samples").glob("cifar10_*.png"))
    checkpoint = trained_cifar10_checkpoint(tmp_path / "trained.safetensors")
    model, x = cifar_checkpoint_and_samples()
    base = ["export", "--checkpoint", str(checkpoint), "--images", *map(str, images), "--json"]
    cases = [("int8", "m.onnx", 0.1)] + ([("bf16", "m.pt2", BF16_REL_TOL)] if NATIVE_BF16 else [])
    with torch.no_grad():
        expected = model(x)
        for precision, name, tolerance in cases:
            out = tmp_path / name
            assert main([*base, "--out", str(out), "--precision", precision]) == 0
            report = json.loads(capsys.readouterr().out)
            assert report["precision"] == precision and report["max_rel_error"] <= tolerance
            # int8 passes or fails on real images; random noise lies outside its calibration.
            real = [f"16 real images (the first of {len(images)})"]  # 20 samples
            assert report["judged"] == (real if precision == "int8" else list(report["errors"]))
            actual = load_exported(out)(x)
            assert actual.dtype == torch.float32
            assert FLOAT32_REL_TOL < rel_error(actual, expected) <= tolerance
            assert (actual.argmax(1) == expected.argmax(1)).float().mean() >= 0.9
    # Without --images, int8 is judged on (the first 16 of) the images it calibrated on.
    calibrated = ["export", "--checkpoint", str(checkpoint), "--json", "--precision", "int8"]
    assert main([*calibrated, "--calibration", *map(str, images), "--out", str(tmp_path / "c.onnx")]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["judged"] == ["16 calibration images"]
    # bf16 is a .pt2 program, int8 an ONNX graph: the other suffix names the problem.
    assert main([*base, "--out", str(tmp_path / "b.onnx"), "--precision", "bf16"]) == 2
    assert "precision bf16 exports as exported-program (.pt2)" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "i.pt2"), "--precision", "int8"]) == 2
    assert "precision int8 exports as onnx (.onnx)" in capsys.readouterr().err
    assert not (tmp_path / "b.onnx").exists() and not (tmp_path / "i.pt2").exists()


@pytest.mark.parametrize("command", ["predict", "eval", "export", "bench"])
def test_calibration_without_int8_is_named_not_silently_ignored(
    command: str, tmp_path: Path, capsys
) -> None:
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    image = str(sorted(shared_data("test-samples").glob("cifar10_*.png"))[0])
    data = str(shared_data("cifar10-jpeg", "cifar10_yoongikim_jpeg_q75.zip"))
    argv = {
        "predict": ["predict", image, "--json"],
        "eval": ["eval", "--dataset", "folder", "--data-dir", data, "--limit", "8", "--json"],
        "export": ["export", "--out", str(tmp_path / "m.onnx")],
        "bench": ["bench", "--batch", "1", "--iters", "1", "--backends", "eager", "--json"],
    }[command]
    missing = str(tmp_path / "no-such-folder")
    assert main([*argv, "--checkpoint", str(checkpoint), "--calibration", missing]) == 0
    assert "--calibration calibrates int8 only; ignored here" in capsys.readouterr().err


def test_bench_notes_only_a_precision_asked_for(tmp_path: Path, capsys) -> None:
    """The default fp32 is no request: reference-only runs get no note; int8 asked for with
    only references gets the one note that says why, not also "--calibration ignored"."""
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    images = [str(p) for p in sorted(shared_data("test-samples").glob("cifar10_*.png"))[:4]]
    base = ["bench", "--checkpoint", str(checkpoint), "--batch", "1", "--iters", "1", "--json"]
    for backends in ("int8", "torchvision", "eager,onnxruntime"):
        assert main([*base, "--backends", backends, "--calibration", *images]) == 0
        captured = capsys.readouterr()
        assert not any(k.startswith("--precision") for k in json.loads(captured.out)["skipped"])
    argv = [*base, "--backends", "torchvision,eager", "--precision", "int8"]
    assert main([*argv, "--calibration", *images]) == 0
    captured = capsys.readouterr()
    assert "add --backends optimized" in json.loads(captured.out)["skipped"]["--precision int8"]
    assert "ignored here" not in captured.err and "calibrates on" not in captured.err
    # optimized-eager never runs int8: no calibration is asked for or read for it.
    argv = [*base, "--backends", "optimized-eager", "--precision", "fp32,int8"]
    assert main(argv) == 0
    skipped = json.loads(capsys.readouterr().out)["skipped"]
    assert "does not run on backend optimized-eager" in skipped["optimized-eager:int8"]


def test_export_names_the_format_before_asking_for_calibration(tmp_path: Path, capsys) -> None:
    """int8 to a .pt2: the format is the first problem, not the missing images; an extension
    that names no format gets advice that works (the old advice, --format, was refused next)."""
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    base = ["export", "--checkpoint", str(checkpoint)]
    assert main([*base, "--precision", "int8", "--out", str(tmp_path / "q.pt2")]) == 2
    err = capsys.readouterr().err
    assert "precision int8 exports as onnx (.onnx)" in err and "calibration" not in err
    assert main([*base, "--out", str(tmp_path / "z.bin")]) == 2
    err = capsys.readouterr().err
    assert "its extension chooses the format: .onnx onnx, .pt2 exported-program" in err
    assert "give --format" not in err


def test_eval_int8_says_how_classes_are_matched_once(tmp_path: Path, capsys) -> None:
    """A model without class names on a class folder: the matching is said once, although int8
    also reads the train split to calibrate (it was said twice)."""
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model(), class_names=None)
    data = shared_data("cifar10-jpeg", "cifar10_yoongikim_jpeg_q75.zip")
    argv = ["eval", "--checkpoint", str(checkpoint), "--dataset", "folder", "--data-dir", str(data)]
    argv += ["--limit", "20", "--workers", "0", "--precision", "int8", "--json"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("the model has no class names of its own") == 1, err
    assert "int8 calibrates on 256 images of folder train" in err
    assert main([*argv, "--split", "train"]) == 0  # scoring the split it calibrates on: said
    assert "int8 calibrates on 256 images of folder train, the split evaluated" in (
        capsys.readouterr().err
    )
    images = sorted(shared_data("test-samples").glob("cifar10_*.png"))[:5]
    assert main([*argv, "--calibration", *map(str, images)]) == 0
    captured = capsys.readouterr()
    assert "int8 calibrates on 5 images of --calibration" in captured.err
    assert json.loads(captured.out)["calibration"] == {
        "images": 5, "source": "--calibration", "paths": [str(image) for image in images]
    }  # fmt: skip


def test_predict_int8_says_what_it_calibrated_on(tmp_path: Path, capsys) -> None:
    """Calibrating on the images predicted, with --skip-bad-images: the line comes after reading
    them and counts the readable ones (it announced all of them before reading any)."""
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    images = sorted(shared_data("test-samples").glob("cifar10_*.png"))[:3]
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    argv = ["predict", "--checkpoint", str(checkpoint), *map(str, images), str(text)]
    assert main([*argv, "--precision", "int8", "--skip-bad-images", "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["predictions"]) == 3
    assert "int8 calibrates on 3 images of the images predicted (1 unreadable image left out)" in (
        captured.err
    )
    assert captured.err.count(str(text)) == 1  # named once, by predict's own skip line


def test_bench_int8_calibrates_at_the_size_it_measures(tmp_path: Path, capsys) -> None:
    """--size other than the model's: the calibration images are resized to it (the int8 graph
    is traced there; onnxruntime refused the 32x32 batches of a 48x48 graph)."""
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    images = [str(p) for p in sorted(shared_data("test-samples").glob("cifar10_*.png"))[:4]]
    argv = ["bench", "--checkpoint", str(checkpoint), "--batch", "1", "--iters", "1", "--json"]
    argv += ["--size", "48", "--precision", "int8", "--backends", "optimized-onnxruntime"]
    assert main([*argv, "--calibration", *images]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == 48 and list(report["results"]["1"]) == ["optimized-onnxruntime:int8"]
