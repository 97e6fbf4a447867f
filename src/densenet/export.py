"""Export a DenseNet to ONNX or a ``torch.export`` program (dynamic batch), and verify it.

Both formats keep the batch dimension dynamic; the spatial size is fixed at the traced one for
ONNX (1x1-conv graphs with pooling are valid for other sizes too, but only the traced size is
verified). ``optimize=True`` exports :func:`densenet.inference.fuse_for_inference`'s graph (BN
folded, pool-first transitions) instead of the model's own.

Low precision: ``precision="bf16"`` writes that graph with bfloat16 weights and arithmetic as a
``.pt2`` program (float32 in and out); ONNX files stay float32, because ONNX runtimes pick their
arithmetic when they compile (OpenVINO computes an fp32 ONNX file in bf16 on CPUs that have it).
``precision="int8"`` writes the calibrated QDQ graph of :mod:`densenet.quantization` as ONNX.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densenet.inference import Bfloat16, fuse_for_inference
from densenet.io import atomic_write
from densenet.runtimes import OnnxRuntimeModel, import_onnxruntime, onnx_bytes

FORMATS = ("onnx", "exported-program")
SUFFIXES = {"onnx": ".onnx", "exported-program": ".pt2"}
# The format each precision is written in (fp32: both).
PRECISION_FORMATS = {
    "fp32": FORMATS,
    "bf16": ("exported-program",),
    "int8": ("onnx",),
}


# The extra file of a .pt2 that holds export_model's metadata.
PT2_METADATA = "densenet.json"


def _graph(model: nn.Module, optimize: bool) -> nn.Module:
    # Exporters and runtimes plan concat memory themselves: no in-place buffer writes in the graph.
    return fuse_for_inference(model, preallocate=False) if optimize else model.eval()


def export_model(
    model: nn.Module,
    path: str | Path,
    fmt: str = "onnx",
    *,
    input_size: Sequence[int] = (224, 224),
    optimize: bool = False,
    precision: str = "fp32",
    calibration: Iterable[torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (eval mode) as ``fmt`` to ``path``, batch dimension dynamic.

    ``input_size`` is the traced ``(H, W)``; ``precision`` 'fp32', 'bf16' (``.pt2``, the
    optimized graph) or 'int8' (ONNX, calibrated on ``calibration``'s batches of real,
    normalized images). ``metadata`` (e.g. class names, mean/std as JSON strings) goes into
    the file: ONNX ``metadata_props``, or the ``.pt2``'s extra file ``densenet.json``; read it
    back with :func:`read_export_metadata`. Returns the path.
    """
    metadata = metadata or {}
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    check_precision(precision, fmt)
    if precision == "int8":
        from densenet.quantization import quantize_onnx, save_quantized

        if calibration is None:
            raise ValueError("an int8 export calibrates on real images: give calibration batches")
        return save_quantized(
            _with_onnx_metadata(quantize_onnx(model, calibration), metadata), path
        )
    graph = _graph(model, optimize or precision == "bf16")
    if precision == "bf16":
        # Contiguous weights: torch.export.save warns about every channels_last one.
        graph = Bfloat16(graph, channels_last=False)
    example = torch.randn(2, model.in_chans, *input_size)
    with warnings.catch_warnings():
        # The shape checks in DenseNet.check_input are Python, not graph ops: harmless here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if fmt == "onnx":
            data = _with_onnx_metadata(onnx_bytes(graph, example), metadata)
            return atomic_write(path, lambda f: f.write(data))
        batch = torch.export.Dim("batch", min=1, max=4096)
        with torch.no_grad():
            program = torch.export.export(graph, (example,), dynamic_shapes=({0: batch},))
        extra = {PT2_METADATA: json.dumps(metadata)}
        return atomic_write(path, lambda f: torch.export.save(program, f, extra_files=extra))


def _with_onnx_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """The serialized ONNX model ``data`` with ``metadata`` added to its ``metadata_props``."""
    if not metadata:
        return data
    import onnx

    proto = onnx.load_from_string(data)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`export_model` wrote into an ``.onnx`` or ``.pt2`` file, decoded:
    ``{"class_names": [...], "mean": [...], "input_size": [3, 224, 224], ...}``. (In the file
    each value is a JSON string: ONNX ``metadata_props`` hold strings.)"""
    path = Path(path)
    if path.suffix == ".pt2":
        extra = {PT2_METADATA: ""}
        torch.export.load(path, extra_files=extra)
        stored = json.loads(extra[PT2_METADATA] or "{}")
    else:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        stored = {entry.key: entry.value for entry in proto.metadata_props}
    return {key: _decoded(value) for key, value in stored.items()}


def _decoded(value: str) -> Any:
    """A metadata value as written (JSON), or the string itself for entries others added."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def check_precision(precision: str, fmt: str) -> None:
    """A ``ValueError`` unless ``fmt`` can hold a ``precision`` export, naming the one that can."""
    if precision not in PRECISION_FORMATS:
        raise ValueError(f"precision must be one of {tuple(PRECISION_FORMATS)}, got {precision!r}")
    if fmt not in PRECISION_FORMATS[precision]:
        wanted = PRECISION_FORMATS[precision][0]
        why = {
            "bf16": "ONNX runtimes choose their own arithmetic: export fp32 ONNX and run it with "
            "OpenVINO, whose CPU default is bf16 where the CPU has it",
            "int8": "the int8 graph is ONNX (QDQ), run by OpenVINO or onnxruntime",
        }[precision]
        raise ValueError(
            f"precision {precision} exports as {wanted} ({SUFFIXES[wanted]}), not {fmt}: {why}"
        )


def load_exported(path: str | Path, threads: int | None = None) -> Callable:
    """A callable for an exported file: onnxruntime for ``.onnx``, the module of a ``.pt2``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such exported model")
    if path.suffix == ".onnx":
        import_onnxruntime()
        return OnnxRuntimeModel(path.read_bytes(), threads)
    if path.suffix == ".pt2":
        return torch.export.load(path).module()
    raise ValueError(f"{path}: unknown export format; expected a .onnx or .pt2 file")


@torch.no_grad()
def compare_outputs(
    reference: Callable, candidate: Callable, inputs: torch.Tensor
) -> dict[str, float]:
    """Max abs error and max error relative to the largest reference logit over ``inputs``."""
    expected = reference(inputs)
    actual = candidate(inputs)
    if actual.shape != expected.shape:
        raise ValueError(f"output shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    max_abs = (actual - expected).abs().max().item()
    scale = expected.abs().max().item() or 1.0
    return dict(max_abs_error=max_abs, max_rel_error=max_abs / scale, batch=int(inputs.shape[0]))


def verify_export(
    model: nn.Module,
    path: str | Path,
    inputs: dict[str, torch.Tensor],
) -> dict[str, dict[str, float]]:
    """Errors of the exported file against ``model`` for each named input batch."""
    from densenet.progress import progress

    exported = load_exported(path)
    model = model.eval()
    checks = progress(
        inputs.items(),
        total=sum(len(batch) for batch in inputs.values()),
        desc="verifying export",
        size=lambda item: len(item[1]),
    )
    return {name: compare_outputs(model, exported, batch) for name, batch in checks}
