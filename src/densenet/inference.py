"""Fast float32 inference: DenseNet-specific graph rewrites, then the best available backend.

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
chunks run on parallel streams, one thread each (:class:`OpenVinoModel`), sharing the budget.

:func:`optimize_for_inference` then runs the rewritten model on a backend: ``"eager"`` PyTorch,
``"compile"`` (``torch.compile``, minutes of compile for densenet121 on a small CPU),
``"onnxruntime"`` or ``"openvino"`` (optional dependencies, run on the rewritten graph exported
to ONNX). ``"auto"`` picks the fastest one installed as measured in docs/benchmarks.md: openvino,
then onnxruntime, then eager; it never starts a long compile.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import io
import math
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from densenet.models import (
    BlurPool2d,
    DenseBlock,
    DenseLayer,
    DenseNet,
    Transition,
    check_batch,
    input_too_small,
)

BACKENDS = ("auto", "eager", "compile", "onnxruntime", "openvino")
# Feature bytes of a micro-batch's largest dense-block buffer. Measured (docs/benchmarks.md): with
# 8 MiB densenet121 at 224x224 runs 2 images per chunk, densenet_bc100_k12 at 32x32 8 images, the
# best or within noise of the best chunk for OpenVINO; a quarter of the 32 MiB L3 of the machine.
CACHE_BUDGET_BYTES = 8 * 2**20
# What 'auto' picks, fastest first as measured in docs/benchmarks.md (eager when neither is there).
AUTO_ORDER = ("openvino", "onnxruntime")


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
        if isinstance(module, nn.ReLU):
            module = nn.ReLU(inplace=True)
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
            features = [x]
            for layer in self.layers:
                features.append(layer(torch.cat(features, 1)))
            return torch.cat(features, 1)
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
        f"optimize_for_inference needs a densenet.DenseNet, got {type(model).__name__}; build it "
        "with densenet.create_model(...) (torchvision/timm state dicts load into it unchanged)"
    )


@torch.no_grad()
def fuse_for_inference(model: nn.Module, preallocate: bool = True) -> InferenceDenseNet:
    """The rewritten eval-mode graph of ``model`` (unchanged itself); see the module docstring."""
    return InferenceDenseNet(_as_densenet(model), preallocate=preallocate)


class ChannelsLast(nn.Module):
    """Runs ``module`` on a channels_last copy of the weights and input (same outputs)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last))


class OnnxRuntimeModel(nn.Module):
    """An onnxruntime session behind a module interface: float32 tensor in, tensor out.

    ``model_bytes`` is a serialized ONNX model with one input and one output; ``threads`` sets
    onnxruntime's intra-op threads (default: ``torch.get_num_threads()``).
    """

    def __init__(
        self, model_bytes: bytes, threads: int | None = None, check_input: InputCheck | None = None
    ) -> None:
        super().__init__()
        self.check_input = check_input
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            model_bytes, options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check_input is not None:
            self.check_input(x)
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(out)


def import_optional(module: str, extra: str):
    """An optional dependency, or a ``ValueError`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ValueError(f"this backend needs {module}: pip install 'densenet[{extra}]'") from error


def import_onnxruntime():
    return import_optional("onnxruntime", "onnx")


@functools.cache
def openvino_core():
    """The process's one ``openvino.Core``. Each Core's CPU plugin installs an alternate signal
    stack on the thread that creates it and, when freed, frees it and restores the one it found;
    Cores freed in creation order thus left a freed stack installed, and Python's SIGINT/SIGTERM
    handlers (which run on it) crashed the process. One shared Core, as OpenVINO recommends,
    keeps the stack valid."""
    return import_optional("openvino", "bench").Core()


class OpenVinoModel(nn.Module):
    """An ONNX model compiled by OpenVINO for CPU, one static shape per input shape (compiled on
    first use, about a second), behind a module-like call.

    ``streams`` > 1: :meth:`map` runs that many inputs at once, each on its own OpenVINO stream
    of ``threads // streams`` threads. Streams share no work, so they never wait for each other;
    one input on all threads synchronizes them after every operation (hundreds per densenet121
    image), so on a machine whose cores are shared with others each step waits for the slowest
    core. Measured in docs/benchmarks.md: on this project's 2-core VM, two streams kept their
    gain when load came and went, one stream on two threads did not.
    """

    def __init__(
        self,
        model_bytes: bytes,
        threads: int | None = None,
        check_input: InputCheck | None = None,
        streams: int = 1,
    ) -> None:
        super().__init__()
        self.check_input = check_input
        self.core = openvino_core()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "model.onnx")
            path.write_bytes(model_bytes)
            self.model = self.core.read_model(str(path))
        self.threads = threads or torch.get_num_threads()
        self.streams = streams
        # Compiled models by (input shape, streams), and each multi-stream model's request queue.
        self.compiled: dict[tuple, object] = {}
        self.queues: dict[tuple, object] = {}

    def _compiled(self, shape: tuple[int, ...], streams: int):
        key = (shape, streams)
        if key not in self.compiled:
            model = self.model.clone()
            model.reshape(list(shape))
            # OpenVINO silently computes in bfloat16 on CPUs that have it (rel. error ~1e-2):
            # pin float32 so it is the same arithmetic as the other backends.
            config = {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32"}
            if streams == 1:
                config["PERFORMANCE_HINT"] = "LATENCY"
            else:
                config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=streams)
            self.compiled[key] = self.core.compile_model(model, "CPU", config)
        return self.compiled[key]

    def _queue(self, shape: tuple[int, ...]):
        if shape not in self.queues:
            ov = import_optional("openvino", "bench")
            self.queues[shape] = ov.AsyncInferQueue(
                self._compiled(shape, self.streams), self.streams
            )
        return self.queues[shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.map([x])[0]

    def map(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The output for each input; inputs of one shape run ``streams`` at a time."""
        arrays = []
        for x in inputs:
            if self.check_input is not None:
                self.check_input(x)
            arrays.append(x.detach().to("cpu", torch.float32).contiguous().numpy())
        outputs: list[torch.Tensor | None] = [None] * len(arrays)
        by_shape: dict[tuple, list[int]] = {}
        for i, array in enumerate(arrays):
            by_shape.setdefault(array.shape, []).append(i)
        for shape, indices in by_shape.items():
            if self.streams == 1 or len(indices) == 1:
                compiled = self._compiled(shape, 1)
                for i in indices:
                    outputs[i] = _first_output(compiled([arrays[i]]).values())
                continue
            queue = self._queue(shape)
            queue.set_callback(functools.partial(_store_output, outputs))
            for i in indices:
                queue.start_async([arrays[i]], userdata=i)
            queue.wait_all()
        if any(out is None for out in outputs):
            raise RuntimeError("OpenVINO returned no output for some inputs")  # a lost callback
        return outputs


def _first_output(values) -> torch.Tensor:
    return torch.from_numpy(next(iter(values)).copy())


def _store_output(outputs: list, request, index: int) -> None:
    outputs[index] = _first_output([request.get_output_tensor(0).data])


# The runtimes that run an ONNX graph, by backend name.
RUNTIMES: dict[str, type[nn.Module]] = {"onnxruntime": OnnxRuntimeModel, "openvino": OpenVinoModel}


def onnx_bytes(module: nn.Module, example: torch.Tensor, opset: int = 18) -> bytes:
    """Serialized ONNX of ``module`` with a dynamic batch dimension (TorchScript exporter)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # DenseNet.check_input's shape checks are Python, not graph ops: nothing is lost.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter is deprecated but exports densenet121 in seconds, not minutes.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return buffer.getvalue()


def _example_input(model: DenseNet, input_size: tuple[int, int] | None) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = input_size or tuple(cfg.get("input_size", (3, 224, 224)))[1:]
    return torch.randn(1, model.in_chans, *size)


def auto_backend(fallback: str) -> str:
    """The runtime 'auto' stands for: the first installed of :data:`AUTO_ORDER`, else
    ``fallback`` ('eager' for float models; 'onnxruntime' for int8, whose missing package then
    gets its install hint)."""
    return next((b for b in AUTO_ORDER if importlib.util.find_spec(b)), fallback)


def _check_count(name: str, value: int | None, least: int) -> None:
    """``value`` is None or an int (not a bool) of at least ``least``; else a ``ValueError``."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if value is not None and not (is_int and value >= least):
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def optimize_for_inference(
    model: nn.Module,
    backend: str = "auto",
    *,
    channels_last: bool | None = None,
    input_size: tuple[int, int] | None = None,
    threads: int | None = None,
    micro_batch: int | None = None,
    streams: int | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fast float32 callable with the outputs of ``model`` in eval mode (rel. error <= 1e-4).

    Args:
        model: a :class:`DenseNet` (left unchanged).
        backend: 'auto' (openvino if installed, else onnxruntime, else eager; never a long
            compile), 'eager', 'compile' (``torch.compile``; densenet121 compiles for ~2 min on
            2 cores),
            'onnxruntime' or 'openvino' (the rewritten graph exported to ONNX and run there).
        channels_last: NHWC activations for the eager/compile backends (default: off, measured
            slower here at batch 1 and about even at batch 16).
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

    Returns an ``nn.Module``: call it on ``(N, in_chans, H, W)`` float tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_count("micro_batch", micro_batch, 0)
    _check_count("streams", streams, 1)
    model = _as_densenet(model)
    if backend == "auto":
        backend = auto_backend("eager")
    threads = threads or torch.get_num_threads()
    if backend != "openvino" and streams not in (None, 1):
        raise ValueError(f"streams={streams} needs the openvino backend (this one is {backend!r})")
    if streams is not None and streams > threads:
        raise ValueError(f"streams={streams} needs at least one thread each; threads={threads}")
    fused: nn.Module
    if backend in RUNTIMES:
        graph = fuse_for_inference(model, preallocate=False)
        onnx = onnx_bytes(graph, _example_input(model, input_size))
        if backend == "openvino":
            fused = OpenVinoModel(onnx, threads, graph.check_input, streams or threads)
        else:
            fused = RUNTIMES[backend](onnx, threads, graph.check_input)
    else:
        fused = fuse_for_inference(model)
        if channels_last:
            fused = ChannelsLast(fused)
        if backend == "compile":
            fused = torch.compile(fused)
    return micro_batched(fused, model, micro_batch)
