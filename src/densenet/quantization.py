"""Static int8 post-training quantization with onnxruntime, calibrated on real images.

The model is first rewritten by :func:`densenet.inference.fuse_for_inference` (BN folded into the
convs that precede it, pool-first transitions), exported to ONNX and quantized with
``onnxruntime.quantization.quantize_static``: int8 per-channel weights, uint8 activations whose
ranges come from the calibration batches, in QDQ format, which both onnxruntime and OpenVINO turn
into integer convolutions.
Each layer's ``norm1`` stays in float32 between the quantized convs. Run it with
``optimize_for_inference(model, precision="int8", calibration=batches)`` (OpenVINO or
onnxruntime, micro-batched like the float graphs), or save it with :func:`save_quantized`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from densenet.inference import InputCheck, fuse_for_inference
from densenet.io import atomic_write
from densenet.runtimes import import_onnxruntime, onnx_bytes


def quantize_onnx(
    model: nn.Module,
    calibration: Iterable[torch.Tensor] | torch.Tensor,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    verbose: bool = False,
) -> bytes:
    """Serialized int8 ONNX of ``model``, activation ranges from ``calibration`` batches.

    ``calibration`` yields float ``(N, C, H, W)`` batches of one image size, normalized like the
    model's inputs (a few hundred real images are enough), or is one such batch (checked:
    :func:`checked_calibration`). ``reduce_range`` uses 7-bit weights, which avoids int16
    overflow on CPUs without VNNI at some accuracy cost. onnxruntime's own warnings
    (root-logger advice, per-node notes) are shown only when ``verbose``.
    """
    from densenet.progress import progress

    import_onnxruntime()
    from onnxruntime import quantization as q

    graph = fuse_for_inference(model, preallocate=False)
    batches = checked_calibration(calibration, graph.check_input)

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(
                progress(
                    batches, total=sum(len(b) for b in batches), desc="int8 calibration", size=len
                )
            )

        def get_next(self) -> dict | None:
            batch = next(self.items, None)
            return None if batch is None else {"input": batch.numpy()}

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        fp32.write_bytes(onnx_bytes(graph, batches[0][:1]))
        quiet = contextlib.nullcontext() if verbose else _onnxruntime_quiet()
        with quiet:
            q.quantize_static(
                str(fp32),
                str(int8),
                Reader(),
                quant_format=q.QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=q.QuantType.QUInt8,
                weight_type=q.QuantType.QInt8,
                calibrate_method=q.CalibrationMethod.MinMax,
                op_types_to_quantize=["Conv", "Gemm"],
            )
        return int8.read_bytes()


def checked_calibration(
    calibration: Iterable[torch.Tensor] | torch.Tensor, check_input: InputCheck
) -> list[torch.Tensor]:
    """The calibration batches as float32 CPU tensors, each checked against the model's input
    contract (``check_input``) and of one image size (the graph is traced at it); a tensor
    is one batch. Raises ``ValueError`` naming the first bad batch."""
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    batches: list[torch.Tensor] = []
    for i, batch in enumerate(calibration):
        try:
            check_input(batch)
        except ValueError as e:
            raise ValueError(f"int8 calibration batch {i}: {e}") from None
        if batches and batch.shape[2:] != batches[0].shape[2:]:
            size = "x".join(map(str, batches[0].shape[2:]))
            raise ValueError(
                f"int8 calibration batch {i} is {'x'.join(map(str, batch.shape[2:]))}, batch 0 "
                f"{size}: give every calibration image the size the model will run at"
            )
        batches.append(batch.detach().float().cpu().contiguous())
    if not batches:
        raise ValueError("int8 calibration needs at least one batch of real, normalized images")
    return batches


@contextlib.contextmanager
def _onnxruntime_quiet():
    """Hide onnxruntime's warnings for the duration: quantize_static logs its advice through the
    root logger and its sessions log per-node warnings through onnxruntime's own logger."""
    import onnxruntime

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    onnxruntime.set_default_logger_severity(3)  # errors only
    try:
        yield
    finally:
        root.setLevel(level)
        onnxruntime.set_default_logger_severity(2)  # onnxruntime's default: warnings


def save_quantized(model_bytes: bytes, path: str | Path) -> Path:
    """Write quantized ONNX bytes atomically (load with :func:`densenet.export.load_exported`)."""
    return atomic_write(path, lambda f: f.write(model_bytes))
