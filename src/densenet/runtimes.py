"""ONNX runtimes behind a module interface: onnxruntime and OpenVINO (optional dependencies).

:class:`OnnxRuntimeModel` and :class:`OpenVinoModel` take a serialized ONNX model and are called
like a module: float32 ``(N, C, H, W)`` tensor in, logits out. ``precision`` picks the arithmetic
OpenVINO computes in (``"f32"``, ``"bf16"``); onnxruntime's CPU kernels are float32 only (int8
comes as a quantized graph, see :mod:`densenet.quantization`). :func:`onnx_bytes` exports a module
with a dynamic batch.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import io
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from densenet.inference import InputCheck

# What 'auto' picks, fastest first as measured in docs/benchmarks.md (eager when neither is there).
AUTO_ORDER = ("openvino", "onnxruntime")


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

    ``precision``: OpenVINO's ``INFERENCE_PRECISION_HINT``, 'f32' (default) or 'bf16'; None
    leaves it to OpenVINO (bf16 on CPUs with AVX512_BF16 or AMX: the reference "out of the box").

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
        precision: str | None = "f32",
    ) -> None:
        super().__init__()
        self.check_input = check_input
        self.precision = precision
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
            # OpenVINO's default on CPUs with bfloat16 is bf16 (rel. error ~1e-2): the precision
            # is always set, never left to the CPU.
            config = {"INFERENCE_NUM_THREADS": self.threads}
            if self.precision is not None:
                config["INFERENCE_PRECISION_HINT"] = self.precision
            if streams == 1:
                config["PERFORMANCE_HINT"] = "LATENCY"
            else:
                config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=streams)
            self.compiled[key] = self.core.compile_model(model, "CPU", config)
        return self.compiled[key]

    def default_precision(self) -> str:
        """The precision OpenVINO picks on this CPU when none is set ('bf16', 'f32', ...)."""
        return self.core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()

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


def auto_backend(fallback: str) -> str:
    """The runtime 'auto' stands for: the first installed of :data:`AUTO_ORDER`, else
    ``fallback`` ('eager' for float models; 'onnxruntime' for int8, whose missing package then
    gets its install hint)."""
    return next((b for b in AUTO_ORDER if importlib.util.find_spec(b)), fallback)
