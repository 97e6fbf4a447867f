"""Fast inference: DenseNet-specific graph rewrites, then the best available backend and precision.

:func:`fuse_for_inference` rewrites a :class:`~densenet.models.DenseNet` in eval mode into an
:class:`InferenceDenseNet` with the same outputs (up to float rounding) and fewer operations:

* Every BatchNorm that *follows* a convolution is folded into it (stem convs; each dense layer's
  ``norm2`` into its ``conv1``, which gains a bias).
* Transitions pool before their 1x1 conv. Average (and blur) pooling is a per-channel linear map
  over space and the 1x1 conv a linear map over channels, so they commute exactly; pooling first
  costs 4x fewer MACs in the conv. AvgPool2d(2, 2) floors odd sizes by dropping the last row and
  column, which does not depend on the channel count, so the result is exact for odd maps too.
* Each dense block writes into one pre-allocated ``(N, C_out, H, W)`` buffer: layer ``l`` reads a
  ``narrow()`` view of the first ``C_in(l)`` channels and writes its ``k`` new channels into its
  slice, instead of re-concatenating the growing feature list (quadratic copying) every layer.

The ``norm1`` of each layer cannot be folded (a ReLU separates it from the previous conv) or shared
between layers (every layer has its own statistics for the same prefix channels), so it stays a
per-layer BN-ReLU; it is a cheap elementwise op beside the 1x1 conv it feeds, as long as the
features it reads are in cache.

That is the last rewrite: every layer of a dense block re-reads all the block's features so far,
and a runtime runs a whole batch through one layer before the next, so at batch 16 a 224x224
block's features (256 channels x 56 x 56 x 16 images = 51 MB) are re-read from main memory by every
layer. :class:`MicroBatched` runs a batch as chunks whose largest block buffer fits
:data:`CACHE_BUDGET_BYTES` (densenet121 at 224x224: 2 images), so the block stays in cache. The
images of a batch are independent in eval mode, so the outputs are the same. On OpenVINO the
chunks run on parallel streams, one thread each (:class:`~densenet.runtimes.OpenVinoModel`),
sharing the budget.

:func:`optimize_for_inference` then runs the rewritten model on a backend: ``"eager"`` PyTorch,
``"compile"`` (``torch.compile``, minutes of compile for densenet121 on a small CPU),
``"onnxruntime"`` or ``"openvino"`` (optional dependencies, run on the rewritten graph exported
to ONNX, :mod:`densenet.runtimes`). ``"auto"`` picks the fastest one installed as measured in
docs/benchmarks.md: openvino, then onnxruntime, then eager; it never starts a long compile.

It computes in the ``precision`` asked for, never another silently: ``"fp32"`` (default),
``"bf16"`` (OpenVINO's bf16 arithmetic, or :class:`Bfloat16` weights under PyTorch; on a device
without native bfloat16 it runs fp32 and says so) or ``"int8"`` (the calibrated graph of
:mod:`densenet.quantization` on OpenVINO or onnxruntime). The rewrites and micro-batches apply to
all three.
"""

from __future__ import annotations

import copy
import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from densenet import runtime
from densenet.messages import notice
from densenet.models import (
    BlurPool2d,
    DenseBlock,
    DenseLayer,
    DenseNet,
    Transition,
    check_batch,
    input_too_small,
)
from densenet.runtimes import RUNTIMES, OpenVinoModel, auto_backend, onnx_bytes

BACKENDS = ("auto", "eager", "compile", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
# The backends that compute each precision, the one 'auto' falls back to first (see auto_backend).
PRECISION_BACKENDS = {
    "fp32": ("eager", "compile", "onnxruntime", "openvino"),
    "bf16": ("eager", "compile", "openvino"),
    "int8": ("onnxruntime", "openvino"),
}
# Why a backend does not compute a precision (appended to the error).
PRECISION_LIMITS = {
    ("bf16", "onnxruntime"): " (its CPU provider has no bfloat16 convolution kernels)",
    ("int8", "eager"): " (int8 is a calibrated ONNX graph)",
    ("int8", "compile"): " (int8 is a calibrated ONNX graph)",
}
# OpenVINO's INFERENCE_PRECISION_HINT for each precision. An int8 graph keeps its quantized convs
# in int8 whatever the hint; the hint sets the arithmetic of the ops between them (BN-ReLU, pools,
# classifier): bf16 where the CPU has it (measured 1.09x f32 for densenet121 at batch 16, same
# accuracy), else f32.
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}
# Feature bytes of a micro-batch's largest dense-block buffer. Measured (docs/benchmarks.md): with
# 8 MiB densenet121 at 224x224 runs 2 images per chunk, densenet_bc100_k12 at 32x32 8 images, the
# best or within noise of the best chunk for OpenVINO; a quarter of the 32 MiB L3 of the machine.
CACHE_BUDGET_BYTES = 8 * 2**20


def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias computing ``bn(conv(x))`` with ``bn`` in eval mode (its running stats)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
    )
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def _bn_relu(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BN then ReLU; one fused BN kernel and an in-place ReLU on its fresh output."""
    y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return y.relu_()


def _fold_stem(stem: nn.Sequential) -> nn.Sequential:
    """Fold every conv-BN pair of the stem; keep ReLUs and pools."""
    children = list(stem.named_children())
    layers: list[tuple[str, nn.Module]] = []
    i = 0
    while i < len(children):
        name, module = children[i]
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if isinstance(module, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            layers.append((name, fold_bn_into_conv(module, nxt)))
            i += 2
            continue
        # A copy: the inference graph never shares a module (or its weights) with the source.
        module = nn.ReLU(inplace=True) if isinstance(module, nn.ReLU) else copy.deepcopy(module)
        layers.append((name, module))
        i += 1
    return nn.Sequential(OrderedDict(layers))


class InferenceDenseLayer(nn.Module):
    """A dense layer with ``norm2`` folded into ``conv1``: ``(N, C_in, H, W) -> (N, k, H, W)``."""

    def __init__(self, layer: DenseLayer) -> None:
        super().__init__()
        self.has_bottleneck = layer.has_bottleneck
        if self.has_bottleneck:
            self.norm1 = copy.deepcopy(layer.norm1)
            self.conv1 = fold_bn_into_conv(layer.conv1, layer.norm2)
        else:
            self.norm2 = copy.deepcopy(layer.norm2)
        self.conv2 = copy.deepcopy(layer.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_bottleneck:
            x = F.relu(self.conv1(_bn_relu(self.norm1, x)), inplace=True)
        else:
            x = _bn_relu(self.norm2, x)
        return self.conv2(x)


class InferenceDenseBlock(nn.Module):
    """Dense block over a pre-allocated feature buffer: ``(N, C, H, W) -> (N, C + L*k, H, W)``.

    With ``preallocate=False`` (used for ONNX/export, whose runtimes plan concat memory
    themselves and do not support in-place slice writes) it concatenates instead.
    """

    def __init__(self, block: DenseBlock, preallocate: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InferenceDenseLayer(layer) for layer in block.values())
        self.growth_rate = block.growth_rate
        self.out_channels = block.out_channels
        self.preallocate = preallocate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.preallocate:
            # One concat per layer of (features so far, new ones), not of every earlier piece:
            # OpenVINO then copies each piece fewer times (measured: densenet121 at batch 1 in
            # bf16, 33 ms instead of 37 ms).
            for layer in self.layers:
                x = torch.cat([x, layer(x)], 1)
            return x
        n, c, h, w = x.shape
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        buffer = torch.empty((n, self.out_channels, h, w), dtype=x.dtype, device=x.device)
        buffer = buffer.contiguous(memory_format=fmt)
        buffer[:, :c].copy_(x)
        for layer in self.layers:
            buffer[:, c : c + self.growth_rate].copy_(layer(buffer.narrow(1, 0, c)))
            c += self.growth_rate
        return buffer


class InferenceTransition(nn.Module):
    """BN-ReLU, then the pool, then the 1x1 conv (pool-first: exact, 4x fewer conv MACs)."""

    def __init__(self, transition: Transition) -> None:
        super().__init__()
        self.norm = copy.deepcopy(transition.norm)
        pool = transition.pool
        # The pool now runs on the conv's input channels; a blur pool's filter bank must match.
        self.pool = (
            BlurPool2d(transition.conv.in_channels, stride=pool.stride)
            if isinstance(pool, BlurPool2d)
            else copy.deepcopy(pool)
        )
        self.conv = copy.deepcopy(transition.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(_bn_relu(self.norm, x)))


class InputCheck:
    """The source model's input contract: float ``(N, in_chans, H, W)``, H and W >= ``min_size``."""

    def __init__(self, model: DenseNet) -> None:
        self.in_chans, self.min_size = model.in_chans, model.min_input_size()

    def __call__(self, x: torch.Tensor) -> None:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return  # Python checks are not graph ops; the eager call checked the shapes
        check_batch(x, self.in_chans)
        if min(x.shape[2], x.shape[3]) < self.min_size:
            raise input_too_small(int(x.shape[2]), int(x.shape[3]), self.min_size)


class InferenceDenseNet(nn.Module):
    """The inference graph of a :class:`DenseNet`: ``(N, in_chans, H, W) -> (N, num_classes)``.

    Build it with :func:`fuse_for_inference`. Same outputs as the source model in eval mode.
    """

    def __init__(self, model: DenseNet, preallocate: bool = True) -> None:
        super().__init__()
        stem, stages = [], []
        for name, module in model.features.named_children():
            if isinstance(module, DenseBlock):
                stages.append(InferenceDenseBlock(module, preallocate))
            elif isinstance(module, Transition):
                stages.append(InferenceTransition(module))
            elif name not in ("norm5", "relu5"):
                (stages if stages else stem).append((name, module))
        self.stem = _fold_stem(nn.Sequential(OrderedDict(stem)))
        self.stages = nn.Sequential(*stages)
        self.norm5 = copy.deepcopy(model.features.norm5)
        self.global_pool_type = model.global_pool_type
        self.classifier = copy.deepcopy(model.classifier)
        self.num_classes = model.num_classes
        self.in_chans = model.in_chans
        self.check_input = InputCheck(model)
        # An inference graph: no autograd, so its outputs hold no graph and torch.compile traces
        # no backward (which the in-place writes into the feature buffer would break) even when
        # called outside torch.no_grad().
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = _bn_relu(self.norm5, self.stages(self.stem(x)))
        x = x.amax((2, 3)) if self.global_pool_type == "max" else x.mean((2, 3))
        return self.classifier(x)


def feature_bytes_per_pixel(model: DenseNet) -> float:
    """Bytes of the largest dense-block output per input pixel of one image (float32)."""
    return 4 * max(info["num_chs"] / info["reduction"] ** 2 for info in model.feature_info)


def micro_batch_size(model: DenseNet, height: int, width: int) -> int:
    """Images per chunk for ``(H, W)`` inputs: the largest power of two whose largest dense-block
    buffer fits :data:`CACHE_BUDGET_BYTES` (at least 1)."""
    return _chunk_size(feature_bytes_per_pixel(model), height, width)


def _chunk_size(bytes_per_pixel: float, height: int, width: int) -> int:
    fits = CACHE_BUDGET_BYTES / (bytes_per_pixel * max(1, height * width))
    return 1 << math.floor(math.log2(fits)) if fits >= 1 else 1


class MicroBatched(nn.Module):
    """Runs ``module`` on chunks of the batch and concatenates the outputs (same outputs: eval-mode
    images are independent). Chunks are as even as possible, so a batch of 16 in chunks of at most
    2 is 8 calls of 2 (runtimes that compile per shape see at most two shapes per batch size).

    ``size``: images per chunk, or a function of the input's ``(H, W)`` that returns it. A module
    with ``streams`` > 1 and a ``map(chunks)`` method runs that many chunks at once; the batch is
    then split into at least ``min(N, streams)`` chunks so that every stream has one.
    """

    def __init__(self, module: nn.Module, size: int | Callable[[int, int], int]) -> None:
        super().__init__()
        self.module = module
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return self.module(x)  # the module's own input check names the problem
        size = self.size if isinstance(self.size, int) else self.size(x.shape[2], x.shape[3])
        n = x.shape[0]
        count = max(math.ceil(n / size), min(n, _streams(self.module)))
        if count == 1:
            return self.module(x)
        chunks = list(x.tensor_split(count))
        run_all = getattr(self.module, "map", None)
        return torch.cat(run_all(chunks) if run_all else [self.module(c) for c in chunks])


def _streams(module: nn.Module) -> int:
    return getattr(module, "streams", 1)


def micro_batched(module: nn.Module, model: DenseNet, micro_batch: int | None = None) -> nn.Module:
    """``module`` (any callable computing ``model``) run in :class:`MicroBatched` chunks of
    ``micro_batch`` images, or by default of :func:`micro_batch_size` for each input size (with
    ``module.streams`` > 1, chunks that fit the budget together); ``0`` returns ``module``."""
    if micro_batch == 0:
        return module
    per_pixel = feature_bytes_per_pixel(model) * _streams(module)
    return MicroBatched(module, micro_batch or functools.partial(_chunk_size, per_pixel))


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _as_densenet(model: nn.Module) -> DenseNet:
    if isinstance(model, DenseNet):
        return model
    raise ValueError(
        f"optimize_for_inference needs a densenet.DenseNet, got "
        f"{type(model).__module__}.{type(model).__qualname__}; build it "
        "with densenet.create_model(...) (torchvision/timm state dicts load into it unchanged)"
    )


@torch.no_grad()
def fuse_for_inference(model: nn.Module, preallocate: bool = True) -> InferenceDenseNet:
    """The rewritten eval-mode graph of ``model`` (unchanged itself); see the module docstring."""
    return InferenceDenseNet(_as_densenet(model), preallocate=preallocate)


class Bfloat16(nn.Module):
    """Runs ``module`` in bfloat16 on float inputs and returns float32.

    The weights and buffers of ``module`` are converted to bfloat16 in place (once, not per call),
    except BatchNorm's: each keeps its float32 statistics and reads bfloat16 activations, as it
    does under autocast. Activations are channels_last unless ``channels_last`` is False
    (oneDNN's bfloat16 convolutions are fastest on NHWC).
    """

    def __init__(self, module: nn.Module, channels_last: bool = True) -> None:
        super().__init__()
        for layer in module.modules():
            is_leaf = next(layer.children(), None) is None
            if is_leaf and not isinstance(layer, nn.BatchNorm2d):
                layer.to(torch.bfloat16)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.module = module.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16).contiguous(memory_format=self.memory_format)
        return self.module(x).float()


class ChannelsLast(nn.Module):
    """Runs ``module`` on a channels_last copy of the weights and input (same outputs)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last))


def _example_input(model: DenseNet, input_size: tuple[int, int] | None) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = input_size or tuple(cfg.get("input_size", (3, 224, 224)))[1:]
    return torch.randn(1, model.in_chans, *size)


def _check_count(name: str, value: int | None, least: int) -> None:
    """``value`` is None or an int (not a bool) of at least ``least``; else a ``ValueError``."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if value is not None and not (is_int and value >= least):
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a runtime-backed module without any)."""
    return next(model.parameters(), torch.empty(0)).device


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """The precision that will run: ``precision``, except 'bf16' on a device without native
    bfloat16 arithmetic, which runs fp32 instead (with a notice: emulated bf16 is slower than
    fp32 and no more exact)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and not runtime.native_bf16(device):
        notice(
            f"precision bf16: this {torch.device(device).type} has no native bfloat16 "
            "arithmetic (AVX512_BF16 or AMX on x86, bf16 on CUDA), so fp32 runs instead"
        )
        return "fp32"
    return precision


def backend_for(precision: str, backend: str, name: Callable[[str], str] = repr) -> str:
    """``backend`` ('auto' resolved) if it runs ``precision``; else a ``ValueError`` naming those
    that do, each as ``name`` writes it (a command's own names for the backends)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    able = PRECISION_BACKENDS[precision]
    if backend == "auto":
        return auto_backend(able[0])
    if backend not in able:
        why = PRECISION_LIMITS.get((precision, backend), "")
        raise ValueError(
            f"precision {precision} does not run on backend {name(backend)}{why}; "
            f"use backend {' or '.join(name(b) for b in able)}"
        )
    return backend


def _check_options(
    backend: str,
    precision: str,
    calibration: Iterable[torch.Tensor] | None,
    threads: int,
    micro_batch: int | None,
    streams: int | None,
) -> None:
    """A ``ValueError`` naming the first option of :func:`optimize_for_inference` that cannot
    work with the others."""
    _check_count("micro_batch", micro_batch, 0)
    _check_count("streams", streams, 1)
    if backend != "openvino" and streams not in (None, 1):
        raise ValueError(f"streams={streams} needs the openvino backend (this one is {backend!r})")
    if streams is not None and streams > threads:
        raise ValueError(f"streams={streams} needs at least one thread each; threads={threads}")
    if precision == "int8" and calibration is None:
        raise ValueError(
            "precision int8 needs calibration: batches of real images, normalized like the "
            "model's inputs (a few hundred images)"
        )


def optimize_for_inference(
    model: nn.Module,
    backend: str = "auto",
    *,
    precision: str = "fp32",
    calibration: Iterable[torch.Tensor] | None = None,
    channels_last: bool | None = None,
    input_size: tuple[int, int] | None = None,
    threads: int | None = None,
    micro_batch: int | None = None,
    streams: int | None = None,
    quantize_options: dict | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fast callable with the outputs of ``model`` in eval mode, computed in ``precision``.

    Args:
        model: a :class:`DenseNet` (left unchanged).
        backend: 'auto' (openvino if installed, else onnxruntime for fp32/int8, else eager; never
            a long compile), 'eager', 'compile' (``torch.compile``; densenet121 compiles for ~2 min
            on 2 cores), 'onnxruntime' or 'openvino' (the rewritten graph exported to ONNX and
            run there).
        precision: 'fp32' (default; relative error <= 2e-6, the tests' bound; measured
            <= 6e-7), 'bf16' (bfloat16 arithmetic: openvino, eager, compile; relative error
            ~1e-2; fp32 with a notice where the device has no native bfloat16) or 'int8' (a
            static int8 graph calibrated on ``calibration``: openvino or onnxruntime). Measured
            speed and accuracy: docs/benchmarks.md.
        calibration: int8 only: float ``(N, C, H, W)`` batches (or one) of real images, of one
            size (it is traced) and normalized like the model's inputs; a few hundred images.
        channels_last: NHWC activations for the eager/compile backends (default: on for bf16,
            whose oneDNN kernels want it; off for fp32, measured slower at batch 1 here).
        input_size: (H, W) traced for onnxruntime/openvino (default: the model's; batch dynamic).
        threads: runtime intra-op threads (default ``torch.get_num_threads()``).
        micro_batch: run larger batches as chunks of at most this many images; default: the
            largest power of two whose dense-block features fit :data:`CACHE_BUDGET_BYTES`, for
            the size of each input (:func:`micro_batch_size`), shared by the streams; ``0``:
            never split.
        streams: openvino only: how many chunks of a batch run at once, each on
            ``threads // streams`` threads (default: ``threads``, one thread per stream; a
            single image always runs on all threads). Measured on 2 cores only; on many cores,
            fewer streams may serve small batches better.
        quantize_options: int8 only: keyword arguments of
            :func:`densenet.quantization.quantize_onnx` (``per_channel``, ``reduce_range``,
            ``verbose``).

    Returns an ``nn.Module``: call it on float ``(N, in_chans, H, W)`` tensors; it returns
    float32 logits whatever the precision.
    """
    model = _as_densenet(model)
    on_torch = backend in ("eager", "compile")
    precision = resolve_precision(precision, model_device(model) if on_torch else "cpu")
    backend = backend_for(precision, backend)
    threads = threads or torch.get_num_threads()
    _check_options(backend, precision, calibration, threads, micro_batch, streams)
    if backend in RUNTIMES:
        example = _example_input(model, input_size)
        calibrated = (calibration, quantize_options or {})
        fused = _runtime_model(model, backend, precision, calibrated, example, threads, streams)
    else:
        fused = _torch_model(model, backend, precision, channels_last)
    return micro_batched(fused, model, micro_batch)


def _torch_model(
    model: DenseNet, backend: str, precision: str, channels_last: bool | None
) -> nn.Module:
    """The rewritten graph run by PyTorch (eager or compiled), in ``precision``."""
    fused: nn.Module = fuse_for_inference(model)
    if precision == "bf16":
        fused = Bfloat16(fused, channels_last is not False)
    elif channels_last:
        fused = ChannelsLast(fused)
    return torch.compile(fused) if backend == "compile" else fused


def _runtime_model(
    model: DenseNet,
    backend: str,
    precision: str,
    calibrated: tuple[Iterable[torch.Tensor] | None, dict],
    example: torch.Tensor,
    threads: int,
    streams: int | None,
) -> nn.Module:
    """The rewritten graph exported to ONNX (int8: quantized on ``calibrated``'s batches with its
    options) and run by onnxruntime or OpenVINO."""
    graph = fuse_for_inference(model, preallocate=False)
    if precision == "int8":
        # Imported here: quantization builds on this module's graph rewrites.
        from densenet.quantization import quantize_onnx

        batches, options = calibrated
        onnx = quantize_onnx(model, batches, **options)
    else:
        onnx = onnx_bytes(graph, example)
    if backend == "openvino":
        hint = OPENVINO_PRECISION[precision] if runtime.native_bf16("cpu") else "f32"
        return OpenVinoModel(onnx, threads, graph.check_input, streams or threads, hint)
    return RUNTIMES[backend](onnx, threads, graph.check_input)
