"""Export to ONNX / torch.export with dynamic batch, verification, and the export/bench commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from inference_helpers import FLOAT32_REL_TOL, save_checkpoint, shared_data, tiny_model

from densenet.cli import main
from densenet.export import export_model, load_exported, verify_export


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("exported-program", ".pt2")])
@pytest.mark.parametrize("optimize", [False, True])
def test_export_round_trip_dynamic_batch(tmp_path: Path, fmt: str, suffix: str, optimize: bool):
    model = tiny_model()
    path = export_model(model, tmp_path / f"m{suffix}", fmt, input_size=(16, 16), optimize=optimize)
    exported = load_exported(path)
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 3, 16, 16)
            expected = model(x)
            actual = exported(x)
            assert actual.shape == (batch, 10)
            assert (
                (actual - expected).abs().max() / expected.abs().max()
            ).item() <= FLOAT32_REL_TOL


def test_verify_export_detects_a_different_model(tmp_path: Path) -> None:
    path = export_model(tiny_model(seed=0), tmp_path / "m.onnx", input_size=(16, 16))
    inputs = {"random": torch.randn(2, 3, 16, 16)}
    assert (
        verify_export(tiny_model(seed=0), path, inputs)["random"]["max_rel_error"]
        <= FLOAT32_REL_TOL
    )
    assert verify_export(tiny_model(seed=1), path, inputs)["random"]["max_rel_error"] > 1e-2


def test_bad_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(tiny_model(), tmp_path / "m.tflite", "tflite")
    with pytest.raises(FileNotFoundError):
        load_exported(tmp_path / "absent.onnx")
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a .onnx or .pt2"):
        load_exported(tmp_path / "m.bin")


def test_export_command_json_on_real_images(tmp_path: Path, capsys) -> None:
    images = sorted(shared_data("test-samples").glob("cifar10_*.png"))[:4]
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    out = tmp_path / "tiny.onnx"
    argv = ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--optimize", "--json"]
    assert main(argv + ["--images", *map(str, images)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and out.is_file() and report["input_size"] == [3, 32, 32]
    assert set(report["errors"]) == {"random batch 1", "random batch 3", "4 real images"}
    assert report["max_rel_error"] <= FLOAT32_REL_TOL


def test_export_at_another_size_verifies_real_images_at_that_size(tmp_path: Path, capsys) -> None:
    images = sorted(shared_data("test-samples").glob("cifar10_*.png"))[:2]
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())  # 32 px model
    out = tmp_path / "tiny48.onnx"
    argv = ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--size", "48", "--json"]
    assert main(argv + ["--images", *map(str, images)]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["input_size"] == [3, 48, 48]
    assert "2 real images" in report["errors"]


def test_int8_export_at_another_size_calibrates_and_checks_at_that_size(tmp_path, capsys) -> None:
    images = sorted(shared_data("test-samples").glob("cifar10_*.png"))[:8]
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())  # 32 px model
    argv = ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "q.onnx"), "--json",
            "--precision", "int8", "--size", "48", "--calibration", *map(str, images)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["input_size"] == [3, 48, 48] and report["judged"] == ["8 calibration images"]


def test_export_command_rejects_wrong_suffix(tmp_path: Path, capsys) -> None:
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    argv = ["export", "--checkpoint", str(checkpoint), "--format", "exported-program"]
    assert main(argv + ["--out", str(tmp_path / "m.onnx")]) == 2
    assert "writes a .pt2 file" in capsys.readouterr().err


def _interrupted_check(model, path, inputs):
    assert Path(path).is_file()  # the file is written, its check under way
    raise KeyboardInterrupt


def _failed_check(model, path, inputs):
    return {name: dict(max_abs_error=1.0, max_rel_error=0.5, batch=len(x)) for name, x in inputs.items()}  # fmt: skip


@pytest.mark.parametrize(
    "check,status,message",
    [
        (_interrupted_check, 130, "interrupted; {out} not written (its check against PyTorch"),
        (_failed_check, 2, "max rel error 0.5 > 0.0001 (fp32); {out} not written"),
    ],
)
def test_export_leaves_no_unchecked_file_at_out(
    tmp_path, capsys, monkeypatch, check, status, message
):
    """Interrupted or failing during the check against PyTorch: --out keeps what it held (here an
    older export) and no unchecked file is left beside it."""
    import densenet.export

    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    out = tmp_path / "exports" / "tiny.onnx"
    out.parent.mkdir()
    out.write_bytes(b"an older export")
    monkeypatch.setattr(densenet.export, "verify_export", check)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == status
    error = capsys.readouterr().err
    assert error.startswith("densenet export: ") and message.format(out=out) in error
    assert [p.name for p in out.parent.iterdir()] == ["tiny.onnx"]
    assert out.read_bytes() == b"an older export"


def test_bench_command_json(tmp_path: Path, capsys) -> None:
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    backends = (
        "torchvision,channels_last,optimized,optimized-eager,onnxruntime,onnxruntime-microbatch"
    )
    argv = ["bench", "--checkpoint", str(checkpoint), "--batch", "1,2", "--backends", backends]
    assert main(argv + ["--iters", "3", "--warmup", "1", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"1", "2"}
    for rows in report["results"].values():
        assert list(rows) == backends.split(",")
        assert rows["onnxruntime"]["vs_onnxruntime"] == pytest.approx(1.0)
        assert rows["onnxruntime"]["vs_onnxruntime_round_median"] == pytest.approx(1.0)
        for row in rows.values():
            assert row["img_per_s"] > 0 and row["p90_ms"] >= row["p50_ms"] > 0
            assert {"vs_torchvision", "extra_memory_mb"} <= set(row)


def test_bench_openvino_streams(tmp_path: Path, capsys) -> None:
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    argv = ["bench", "--checkpoint", str(checkpoint), "--batch", "3", "--threads", "2"]
    argv += ["--backends", "optimized-openvino,openvino,openvino-microbatch", "--streams", "2"]
    assert main(argv + ["--iters", "2", "--warmup", "1", "--min-time", "0.05", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]["3"]
    # --min-time: rounds go on until every backend has run 0.05 s in timed calls.
    assert len({row["rounds"] for row in rows.values()}) == 1
    for row in rows.values():
        assert 3 * row["rounds"] / row["img_per_s"] >= 0.05  # timed seconds of 3-image calls
    assert list(rows) == ["optimized-openvino", "openvino", "openvino-microbatch"]
    assert all(row["img_per_s"] > 0 for row in rows.values())
    assert rows["openvino"]["vs_openvino_round_median"] == pytest.approx(1.0)
    assert "vs_openvino" in rows["optimized-openvino"]


def test_bench_command_errors(tmp_path: Path, capsys) -> None:
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    base = ["bench", "--checkpoint", str(checkpoint), "--iters", "1"]
    assert main(base + ["--backends", "tensorrt"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert main(base + ["--micro-batch", "-1"]) == 2
    assert "--micro-batch must be >= 0" in capsys.readouterr().err
    assert main(base + ["--threads", "2", "--streams", "3"]) == 2
    assert "--streams must be between 1 and --threads" in capsys.readouterr().err
    assert main(base + ["--min-time", "-1"]) == 2
    assert "--min-time >= 0" in capsys.readouterr().err
    assert main(base + ["--backends", "int8", "--batch", "1"]) == 2
    assert "--calibration" in capsys.readouterr().err
