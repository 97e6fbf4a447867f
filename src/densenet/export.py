"""Export a DenseNet to ONNX or a ``torch.export`` program (dynamic batch), and verify it.

Both formats keep the batch dimension dynamic; the spatial size is fixed at the traced one for
ONNX (1x1-conv graphs with pooling are valid for other sizes too, but only the traced size is
verified). ``optimize=True`` exports :func:`densenet.inference.fuse_for_inference`'s graph (BN
folded, pool-first transitions) instead of the model's own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from densenet.inference import fuse_for_inference
from densenet.io import atomic_write
from densenet.runtimes import OnnxRuntimeModel, import_onnxruntime, onnx_bytes

FORMATS = ("onnx", "exported-program")
SUFFIXES = {"onnx": ".onnx", "exported-program": ".pt2"}


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
) -> Path:
    """Write ``model`` (eval mode) as ``fmt`` to ``path``, batch dimension dynamic.

    ``input_size`` is the traced ``(H, W)``. Returns the path.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    graph = _graph(model, optimize)
    example = torch.randn(2, model.in_chans, *input_size)
    with warnings.catch_warnings():
        # The shape checks in DenseNet.check_input are Python, not graph ops: harmless here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if fmt == "onnx":
            data = onnx_bytes(graph, example)
            return atomic_write(path, lambda f: f.write(data))
        batch = torch.export.Dim("batch", min=1, max=4096)
        with torch.no_grad():
            program = torch.export.export(graph, (example,), dynamic_shapes=({0: batch},))
        return atomic_write(path, lambda f: torch.export.save(program, f))


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
