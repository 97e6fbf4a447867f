"""optimize_for_inference: the rewritten graph gives the model's outputs on every architecture."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import FLOAT32_REL_TOL, cifar_checkpoint_and_samples

import densenet.inference
from densenet import DenseNet, create_model
from densenet.inference import (
    CACHE_BUDGET_BYTES,
    InferenceTransition,
    MicroBatched,
    feature_bytes_per_pixel,
    fuse_for_inference,
    micro_batch_size,
    optimize_for_inference,
)
from densenet.runtimes import OnnxRuntimeModel, OpenVinoModel


def randomize_bn(model: DenseNet, seed: int = 0) -> DenseNet:
    """Non-trivial BN statistics and affine params, so every fold is actually exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def tiny(**kwargs) -> DenseNet:
    torch.manual_seed(0)
    args = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, num_classes=7)
    return randomize_bn(DenseNet(**{**args, **kwargs}))


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@torch.no_grad()
def assert_same(model, fast, x: torch.Tensor) -> None:
    expected = model(x)
    actual = fast(x)
    assert actual.shape == expected.shape
    assert rel_error(actual, expected) <= FLOAT32_REL_TOL


ARCHS = {
    "bc-cifar": dict(stem="cifar"),
    "basic-cifar": dict(stem="cifar", bn_size=0, compression=1.0),
    "cifar-bn-stem": dict(stem="cifar_bn"),
    "imagenet-stem": dict(stem="imagenet"),
    "deep-blur-stem": dict(stem="deep", stem_width=6, blur="stem"),
    "blur-all": dict(stem="imagenet", blur="all"),
    "max-pool-head": dict(stem="cifar", global_pool="max"),
    "three-blocks-odd-compression": dict(stem="cifar", block_config=(1, 2, 1), compression=0.7),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [16, 19])
def test_fused_graph_matches_model(arch: str, size: int) -> None:
    # 19 is odd at every stage: pool-first must floor exactly like conv-then-pool.
    model = tiny(**ARCHS[arch])
    x = torch.randn(2, 3, size, size)
    assert_same(model, fuse_for_inference(model), x)
    assert_same(model, fuse_for_inference(model, preallocate=False), x)


def test_odd_map_reaches_transition() -> None:
    model = tiny(stem="cifar")
    seen = []
    fast = fuse_for_inference(model)
    for m in fast.modules():
        if isinstance(m, InferenceTransition):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[-1]))
    assert_same(model, fast, torch.randn(1, 3, 15, 15))
    assert seen == [15]


def test_pool_runs_before_conv_and_norm2_is_folded() -> None:
    model = tiny(stem="cifar")
    fast = fuse_for_inference(model)
    transition = next(m for m in fast.modules() if isinstance(m, InferenceTransition))
    shapes = []
    transition.conv.register_forward_pre_hook(lambda mod, args: shapes.append(args[0].shape))
    fast(torch.randn(1, 3, 16, 16))
    assert shapes[0][-1] == 8  # the 1x1 conv sees the pooled map
    layer = fast.stages[0].layers[0]
    assert layer.conv1.bias is not None and not hasattr(layer, "norm2")


@pytest.mark.parametrize("backend", ["auto", "eager", "onnxruntime", "openvino"])
def test_backends_match(backend: str) -> None:
    model = tiny(stem="cifar")
    fast = optimize_for_inference(model, backend, input_size=(16, 16))
    for batch in (1, 3):
        assert_same(model, fast, torch.randn(batch, 3, 16, 16))
    # Batches split into micro-batches (5 = 2 + 2 + 1) give the same outputs.
    split = optimize_for_inference(model, backend, input_size=(16, 16), micro_batch=2)
    assert_same(model, split, torch.randn(5, 3, 16, 16))
    if isinstance(split.module, OpenVinoModel):
        # One compile per chunk shape: the two chunks of 2 on the streams, the last one alone.
        compiled = {(shape[0], streams) for shape, streams in split.module.compiled}
        assert compiled == {(2, split.module.streams), (1, 1)}


def test_openvino_streams_run_chunks_at_once() -> None:
    model = tiny(stem="cifar")
    fast = optimize_for_inference(
        model, "openvino", input_size=(16, 16), threads=2, streams=2, micro_batch=1
    )
    assert fast.module.streams == 2
    assert_same(model, fast, torch.randn(7, 3, 16, 16))  # 7 chunks of 1, in order
    assert set(fast.module.queues) == {(1, 3, 16, 16)}
    assert set(fast.module.compiled) == {((1, 3, 16, 16), 2)}
    assert_same(model, fast, torch.randn(1, 3, 16, 16))  # one image: all threads, no streams
    assert ((1, 3, 16, 16), 1) in fast.module.compiled
    # By default a batch is spread over the streams even when it fits one chunk.
    spread = optimize_for_inference(model, "openvino", input_size=(16, 16), threads=2)
    assert spread.module.streams == 2
    assert_same(model, spread, torch.randn(4, 3, 16, 16))
    assert set(spread.module.compiled) == {((2, 3, 16, 16), 2)}


class Recorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return x.flatten(1).sum(1, keepdim=True)


def test_micro_batched_splits_evenly_and_keeps_order() -> None:
    recorder = Recorder()
    x = torch.randn(17, 3, 4, 4)
    out = MicroBatched(recorder, 4)(x)
    assert recorder.batches == [4, 4, 3, 3, 3]  # ceil(17 / 4) = 5 chunks, as even as possible
    torch.testing.assert_close(out, x.flatten(1).sum(1, keepdim=True))
    recorder.batches.clear()
    MicroBatched(recorder, lambda h, w: 8 if (h, w) == (4, 4) else 1)(torch.randn(16, 3, 4, 4))
    assert recorder.batches == [8, 8]
    recorder.batches.clear()
    MicroBatched(recorder, 4)(torch.randn(3, 3, 4, 4))
    assert recorder.batches == [3]


class StreamsRecorder(Recorder):
    """A module that runs ``streams`` chunks at once through ``map``."""

    streams = 3

    def map(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        self.batches.append([len(c) for c in chunks])
        return [c.flatten(1).sum(1, keepdim=True) for c in chunks]


def test_micro_batched_spreads_a_batch_over_the_streams() -> None:
    recorder = StreamsRecorder()
    x = torch.randn(8, 3, 4, 4)
    out = MicroBatched(recorder, 16)(x)  # fits one chunk, but three streams want work
    assert recorder.batches == [[3, 3, 2]]
    torch.testing.assert_close(out, x.flatten(1).sum(1, keepdim=True))
    recorder.batches.clear()
    MicroBatched(recorder, 2)(x)
    assert recorder.batches == [[2, 2, 2, 2]]
    recorder.batches.clear()
    MicroBatched(recorder, 16)(x[:1])  # one image: one plain call
    assert recorder.batches == [1]


def test_micro_batch_size_fits_the_cache_budget() -> None:
    model = create_model("densenet121")
    # Largest block buffer: block 1, 256 channels at stride 4.
    assert feature_bytes_per_pixel(model) == 4 * 256 / 16
    per_image = 4 * 256 * 56 * 56
    size = micro_batch_size(model, 224, 224)
    assert size * per_image <= CACHE_BUDGET_BYTES < 2 * size * per_image
    assert size & (size - 1) == 0  # a power of two
    assert micro_batch_size(model, 2048, 2048) == 1  # one image over the budget still runs
    bc = create_model("densenet_bc100_k12")
    assert micro_batch_size(bc, 32, 32) > size  # smaller maps, more images per chunk


def test_micro_batch_option() -> None:
    model = tiny(stem="cifar")
    assert isinstance(optimize_for_inference(model, "eager"), MicroBatched)
    unsplit = optimize_for_inference(model, "eager", micro_batch=0)
    assert not isinstance(unsplit, MicroBatched)
    assert_same(model, unsplit, torch.randn(3, 3, 16, 16))
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="micro_batch must be an int >= 0"):
            optimize_for_inference(model, "eager", micro_batch=bad)
    for bad in (0, False):
        with pytest.raises(ValueError, match="streams must be an int >= 1"):
            optimize_for_inference(model, "eager", streams=bad)
    with pytest.raises(ValueError, match="streams=2 needs the openvino backend"):
        optimize_for_inference(model, "onnxruntime", streams=2)
    with pytest.raises(ValueError, match="streams=3 needs at least one thread each"):
        optimize_for_inference(model, "openvino", threads=2, streams=3)


def test_channels_last_input_and_option() -> None:
    model = tiny(stem="imagenet")
    x = torch.randn(2, 3, 33, 33).contiguous(memory_format=torch.channels_last)
    assert_same(model, optimize_for_inference(model, "eager", channels_last=True), x)
    assert_same(model, fuse_for_inference(model), x)


def test_compile_backend_matches_outside_no_grad() -> None:
    """As the README calls it: no ``torch.no_grad()`` around it. Failed before with
    'one of the variables needed for gradient computation has been modified by an inplace
    operation' (inductor traced a backward through the in-place feature buffer)."""
    model = tiny(stem="cifar", block_config=(1, 1))
    x = torch.randn(2, 3, 8, 8)
    fast = optimize_for_inference(model, "compile")
    actual = fast(x)
    assert not actual.requires_grad
    assert_same(model, fast, x)
    with torch.no_grad():
        assert rel_error(actual, model(x)) <= FLOAT32_REL_TOL


def test_eager_graph_outside_no_grad_keeps_no_autograd_graph() -> None:
    model = tiny(stem="cifar")
    assert not optimize_for_inference(model, "eager")(torch.randn(1, 3, 16, 16)).requires_grad


FOLDING_ARCHS = ["bc-cifar", "cifar-bn-stem", "imagenet-stem", "deep-blur-stem"]


@pytest.mark.parametrize("arch", FOLDING_ARCHS)
def test_tolerance_catches_a_fold_without_eps(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLOAT32_REL_TOL is tight enough to fail a BatchNorm fold that forgets eps (1e-4 was not)."""
    fold = densenet.inference.fold_bn_into_conv

    def fold_without_eps(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> torch.nn.Conv2d:
        eps, bn.eps = bn.eps, 0.0
        try:
            return fold(conv, bn)
        finally:
            bn.eps = eps

    model = tiny(**ARCHS[arch])
    x = torch.randn(2, 3, 16, 16)
    monkeypatch.setattr(densenet.inference, "fold_bn_into_conv", fold_without_eps)
    with torch.no_grad():
        error = rel_error(fuse_for_inference(model)(x), model(x))
    assert FLOAT32_REL_TOL < error < 1e-4


def test_model_left_unchanged_and_bad_arguments() -> None:
    model = tiny(stem="cifar")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimize_for_inference(model, "eager")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="backend must be one of"):
        optimize_for_inference(model, "tensorrt")
    with pytest.raises(ValueError, match="needs a densenet.DenseNet"):
        optimize_for_inference(torch.nn.Linear(2, 2))


def test_densenet121_matches_at_small_size() -> None:
    model = randomize_bn(create_model("densenet121"))
    assert_same(model, fuse_for_inference(model), torch.randn(1, 3, 64, 64))


@torch.no_grad()
def test_int8_on_real_cifar_images() -> None:
    """Quantized model: finite outputs and mostly the float model's classes on real images."""
    from densenet.quantization import quantize_onnx

    model, x = cifar_checkpoint_and_samples()
    assert len(x) == 20
    int8 = quantize_onnx(model, [x[:10]])
    for runtime in (OnnxRuntimeModel, OpenVinoModel):
        logits = runtime(int8)(x)
        assert torch.isfinite(logits).all()
        agree = (logits.argmax(1) == model(x).argmax(1)).float().mean().item()
        assert agree >= 0.8
        # The quantized graph really differs from float32 (it is not the fp32 model re-run).
        assert not torch.allclose(logits, model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        optimize_for_inference(model, "tensorrt", precision="int8", calibration=[x[:2]])


SIGNAL_AFTER_OPENVINO = """
import gc, os, signal, torch
from densenet import DenseNet
from densenet.inference import optimize_for_inference
model = DenseNet(growth_rate=4, block_config=(2,), num_init_features=8, stem="cifar").eval()
first = optimize_for_inference(model, "openvino", input_size=(8, 8), micro_batch=0)
second = optimize_for_inference(model, "openvino", input_size=(8, 8), micro_batch=0)
with torch.no_grad():
    first(torch.randn(1, 3, 8, 8)), second(torch.randn(2, 3, 8, 8))
del first  # freed in creation order, not in reverse
gc.collect()
del second
gc.collect()
received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
os.kill(os.getpid(), signal.SIGTERM)
assert received == [signal.SIGTERM]
print("handled")
"""


def test_signal_handled_after_an_openvino_model_is_freed() -> None:
    """Two OpenVINO models freed in creation order, then a signal with a Python handler (Ctrl-C,
    SIGTERM): with a Core per model, the second Core's CPU plugin restored the first one's freed
    alternate signal stack on its way out, and the handler crashed the process (SIGSEGV)."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", SIGNAL_AFTER_OPENVINO], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "handled" in run.stdout, (run.returncode, run.stderr[-2000:])
