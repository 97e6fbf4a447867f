"""memory_efficient=True: the plain model's math, linear memory, and composition with AMP,
channels_last, torch.compile and DDP. Tiny models; float64 where exactness is checked."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import densenet
from densenet import efficient
from densenet.models import DenseNet, Transition

TINY = dict(growth_rate=4, block_config=(3, 2), num_init_features=8, stem="cifar", num_classes=5)
VARIANTS = {
    "bc": {},
    "basic": dict(bn_size=0),
    "dropout": dict(drop_rate=0.3),
    "basic_dropout": dict(bn_size=0, drop_rate=0.3),
    "deep_blur": dict(stem="deep", blur="all", block_config=(2, 3, 1)),
    "imagenet_stem": dict(stem="imagenet", block_config=(1, 2, 2, 1)),
}
IMAGE = {"deep_blur": 32, "imagenet_stem": 32}


def pair(dtype=torch.float64, **kwargs) -> tuple[DenseNet, DenseNet]:
    """A plain model and a memory-efficient copy with the same weights."""
    torch.manual_seed(0)
    plain = DenseNet(**{**TINY, **kwargs}).to(dtype)
    for m in plain.modules():  # non-trivial BN affine parameters and statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    efficient_model = copy.deepcopy(plain)
    efficient_model.set_grad_checkpointing(True)
    return plain, efficient_model


def step(model, x, seed=1, amp=False):
    """Output, input gradient and parameter gradients of one forward/backward."""
    torch.manual_seed(seed)  # the same dropout draws for both models
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        out = model(x)
    (out.float().square().sum() + out.float().sum()).backward()
    named = getattr(model, "_orig_mod", model).named_parameters()  # torch.compile's wrapper
    grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_same_step(reference, result, tol):
    (out_a, gx_a, grads_a), (out_b, gx_b, grads_b) = reference, result
    assert rel(out_b, out_a) <= tol
    assert rel(gx_b, gx_a) <= tol
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert rel(grads_b[name], grad) <= tol, name


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_outputs_and_all_gradients_equal_plain_float64(variant, mode):
    plain, eff = pair(**VARIANTS[variant])
    plain.train(mode == "train")
    eff.train(mode == "train")
    size = IMAGE.get(variant, 8)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    assert_same_step(step(plain, x), step(eff, x), 1e-10)


def test_outputs_and_gradients_equal_plain_float32():
    plain, eff = pair(torch.float32, drop_rate=0.2)
    x = torch.randn(4, 3, 16, 16)
    assert_same_step(step(plain, x), step(eff, x), 1e-4)


def test_really_uses_the_shared_buffer_function():
    _, eff = pair()
    block = eff.dense_blocks()[0]
    out = block(torch.randn(2, 8, 8, 8, dtype=torch.float64, requires_grad=True))
    assert type(out.grad_fn).__name__ == "_DenseBlockFunctionBackward"
    assert out.shape == (2, 8 + 3 * 4, 8, 8)


@pytest.mark.parametrize("variant", ["bc", "dropout", "basic", "cumulative_momentum"])
def test_bn_running_stats_and_weights_after_sgd_steps_equal_plain(variant):
    plain, eff = pair(**VARIANTS.get(variant, {}))
    if variant == "cumulative_momentum":  # momentum=None: running averages over all batches
        for m in (*plain.modules(), *eff.modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for model in (plain, eff):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for i in range(3):
            torch.manual_seed(i)
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    state_a, state_b = plain.state_dict(), eff.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, value in state_a.items():
        if value.is_floating_point():
            assert rel(state_b[name], value) <= 1e-10, name
        else:  # num_batches_tracked: BN counted each step exactly once
            assert torch.equal(state_b[name], value), name


def test_dropout_is_active_and_follows_the_rng():
    _, eff = pair(drop_rate=0.5)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out_1, _, grads_1 = step(eff, x, seed=1)
    out_2, _, _ = step(eff, x, seed=2)
    out_1_again, _, grads_1_again = step(eff, x, seed=1)
    assert not torch.allclose(out_1, out_2)  # different masks
    assert torch.equal(out_1, out_1_again)  # same seed, same masks
    assert all(torch.equal(grads_1[n], grads_1_again[n]) for n in grads_1)


def test_frozen_parameters_and_input_gradient_only():
    plain, eff = pair()
    for model in (plain, eff):
        for p in model.features.parameters():
            p.requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    (out_a, gx_a, grads_a), (out_b, gx_b, grads_b) = step(plain, x), step(eff, x)
    assert rel(out_b, out_a) <= 1e-10 and rel(gx_b, gx_a) <= 1e-10
    assert grads_a.keys() == grads_b.keys() == {"classifier.weight", "classifier.bias"}


def test_no_grad_and_eval_inference_is_the_plain_path(monkeypatch):
    plain, eff = pair()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    def fail(*args):
        raise AssertionError("inference must not take the memory-efficient path")

    monkeypatch.setattr(efficient._DenseBlockFunction, "apply", fail)
    for mode in (True, False):
        plain.train(mode)
        eff.train(mode)
        with torch.no_grad():
            assert torch.equal(eff(x), plain(x))
        with torch.inference_mode():
            assert torch.equal(eff(x), plain(x))


def test_second_backward_raises_a_clear_error():
    _, eff = pair()
    loss = eff(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="memory_efficient=False"):
        loss.backward()


def _layout(models, x, channels_last):
    if not channels_last:
        return models, x
    models = [m.to(memory_format=torch.channels_last) for m in models]
    return models, x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("variant", ["bc", "dropout", "basic"])
def test_amp_bfloat16_matches_plain(variant, channels_last):
    (plain, eff), x = _layout(pair(torch.float32, **VARIANTS[variant]), torch.randn(4, 3, 16, 16),
                              channels_last)  # fmt: skip
    full = step(plain, x)
    plain_amp, ours_amp = step(plain, x, amp=True), step(eff, x, amp=True)
    assert ours_amp[0].dtype == plain_amp[0].dtype == torch.bfloat16
    # The same forward ops in the same precision (BN statistics of each channel computed once in
    # float32 from the same bfloat16 features): equal bit for bit at 2 threads; with 1 thread
    # oneDNN picks other conv kernels for the two layouts (basic, channels_last) and a few
    # outputs differ by one bf16 ulp (2**-8 relative), so that is the bound.
    assert rel(ours_amp[0].float(), plain_amp[0].float()) <= 2**-8
    # bf16 gradients are summed in a different order (one shared bf16 gradient buffer instead of
    # autograd's per-feature bf16 sums; at 1 thread oneDNN also picks other kernels for the
    # channels_last bottleneck stage, so a few forward values differ by an ulp). On these tiny,
    # freshly initialized nets bf16 gradients are ill-conditioned: the plain AMP model's are up to
    # 0.4 from float32. So: ours within the plain AMP model's own distance to float32 of it
    # (measured <= 2e-3 at 2 threads; at 1 thread up to 0.18 where plain AMP is 0.22 from
    # float32), and as close to the float32 gradients as the plain AMP model is.
    ours = {"x": ours_amp[1], **ours_amp[2]}
    theirs = {"x": plain_amp[1], **plain_amp[2]}
    for name, grad in {"x": full[1], **full[2]}.items():
        noise = rel(theirs[name], grad)
        assert rel(ours[name], theirs[name]) <= max(5e-2, noise), name
        assert rel(ours[name], grad) <= 1.5 * noise + 1e-3, name


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_amp_bfloat16_running_stats_and_weights_after_sgd_steps_match_plain(channels_last):
    (plain, eff), x = _layout(pair(torch.float32, drop_rate=0.2), torch.randn(4, 3, 16, 16),
                              channels_last)  # fmt: skip
    for model in (plain, eff):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for i in range(3):
            torch.manual_seed(i)
            optimizer.zero_grad()
            with torch.autocast("cpu", torch.bfloat16):
                out = model(x)
            out.float().square().mean().backward()
            optimizer.step()
    state_a, state_b = plain.state_dict(), eff.state_dict()
    for name, value in state_a.items():
        if not value.is_floating_point():  # num_batches_tracked: BN counted each step once
            assert torch.equal(state_b[name], value), name
        elif "running" in name:
            # float32 statistics of bf16 features equal to one bf16 ulp (see above): measured
            # <= 1e-7 at 2 threads, 1.7e-4 at 1 thread; a wrong channel or a second update is off
            # by 1e-2 or more.
            assert rel(state_b[name], value) <= 1e-3, name
        else:  # weights: bf16-rounded gradients times lr, summed over 3 steps
            assert rel(state_b[name], value) <= 1e-3, name


def test_amp_bfloat16_keeps_the_shared_buffer_in_bfloat16():
    """Under bf16 autocast the block's buffer (what backward keeps) holds bf16, as the plain
    model's concatenations do: about half the float32 bytes (the rest: the float32 input image
    and statistics)."""
    model, x = one_block(16, True), torch.randn(2, 3, 8, 8)
    full = saved_bytes(model, x)
    with torch.autocast("cpu", torch.bfloat16):
        half = saved_bytes(model, x)
        block_in = torch.randn(2, 8, 8, 8, dtype=torch.bfloat16, requires_grad=True)
        assert model.dense_blocks()[0](block_in).dtype == torch.bfloat16
    assert half <= 0.55 * full


def test_channels_last():
    plain, eff = pair(torch.float32)
    plain = plain.to(memory_format=torch.channels_last)
    eff = eff.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    assert_same_step(step(plain, x), step(eff, x), 1e-4)
    block_in = torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    block_out = eff.dense_blocks()[0](block_in.requires_grad_())
    assert block_out.is_contiguous(memory_format=torch.channels_last)


def recorded_calls(monkeypatch) -> list[tuple]:
    """The arguments of every ``_DenseBlockFunction.apply`` from now on (which still runs):
    ``(block, head, x, *params)``."""
    calls = []
    apply = efficient._DenseBlockFunction.apply
    monkeypatch.setattr(
        efficient._DenseBlockFunction, "apply", lambda *a: calls.append(a) or apply(*a)
    )
    return calls


def test_each_transition_runs_as_the_head_of_the_block_before_it(monkeypatch):
    plain, eff = pair(block_config=(2, 2, 2))
    calls = recorded_calls(monkeypatch)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert_same_step(step(plain, x), step(eff, x), 1e-10)
    transitions = [eff.features.transition1, eff.features.transition2]
    heads = [None if head is None else head[2] for _, head, *_ in calls]
    assert heads == [t.conv for t in transitions] + [None]


def test_hooks_on_a_transition_unfuse_it_and_run(monkeypatch):
    # A fused transition is never called as a module: with hooks it runs as one, and they fire.
    plain, eff = pair()
    seen = []
    eff.features.transition1.norm.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert_same_step(step(plain, x), step(eff, x), 1e-10)
    assert seen == [torch.Size((2, 20, 8, 8))]


def test_fusing_the_transition_keeps_less_for_backward():
    _, fused = pair(torch.float32)
    _, unfused = pair(torch.float32)
    unfused.features.transition1.register_forward_hook(lambda *args: None)
    x = torch.randn(4, 3, 16, 16)
    block_output = 4 * 20 * 16 * 16 * 4  # bytes of transition1's input (float32)
    # Unfused, autograd also keeps the block's output and its BN-ReLU for the transition.
    assert saved_bytes(unfused, x) - saved_bytes(fused, x) >= 2 * block_output


def test_forward_intermediates_with_gradients_match_plain():
    plain, eff = pair()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    maps = [model.forward_intermediates(x) for model in (plain, eff)]
    for a, b in zip(*maps, strict=True):
        assert rel(b, a) <= 1e-10
    grads = [
        torch.autograd.grad(sum(m.square().sum() for m in ms), model.features.conv0.weight)[0]
        for ms, model in zip(maps, (plain, eff), strict=True)
    ]
    assert rel(grads[1], grads[0]) <= 1e-10


class _ClampedNorm(torch.nn.BatchNorm2d):  # a subclass with its own forward
    def forward(self, x):
        return super().forward(x).clamp(max=0.5)


class _ScaledTransition(Transition):
    def forward(self, x):
        return super().forward(2 * x)


def _weight_norm(module):
    torch.nn.utils.parametrizations.weight_norm(module)


def _affine_free_norm(transition):
    old = transition.norm
    transition.norm = torch.nn.BatchNorm2d(
        old.num_features, affine=False, dtype=old.running_mean.dtype
    )


def _inserted_before_conv(transition):
    modules = list(transition.named_children())
    transition._modules.clear()
    for name, module in modules[:2] + [("scale", torch.nn.Hardtanh(-0.5, 0.5))] + modules[2:]:
        transition.add_module(name, module)


CHANGES = {  # what users do to a model, each applied to both models of the pair
    "transition norm affine=False": lambda m: _affine_free_norm(m.features.transition1),
    "weight_norm on a transition conv": lambda m: _weight_norm(m.features.transition1.conv),
    "weight_norm on a layer conv": lambda m: _weight_norm(m.features.denseblock1.denselayer2.conv1),
    "BatchNorm2d subclass in a transition": lambda m: setattr(
        m.features.transition1.norm, "__class__", _ClampedNorm
    ),
    "BatchNorm2d subclass in a layer": lambda m: setattr(
        m.features.denseblock2.denselayer1.norm1, "__class__", _ClampedNorm
    ),
    "Transition subclass": lambda m: setattr(
        m.features.transition1, "__class__", _ScaledTransition
    ),
    "module inserted before a transition conv": lambda m: _inserted_before_conv(
        m.features.transition1
    ),
}


@pytest.mark.filterwarnings("ignore:memory_efficient. a dense block has modules")
@pytest.mark.parametrize("change", CHANGES)
def test_replaced_or_parametrized_modules_give_plain_results_and_gradients(change):
    # A module the Function cannot compute itself runs as a module (its block or transition plain).
    plain, eff = pair()
    for model in (plain, eff):
        CHANGES[change](model)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    assert_same_step(step(plain, x), step(eff, x), 1e-10)


def test_a_block_that_cannot_be_computed_warns_and_runs_plain(monkeypatch):
    _, eff = pair()
    _weight_norm(eff.features.denseblock1.denselayer1.conv2)
    calls = recorded_calls(monkeypatch)
    with pytest.warns(UserWarning, match="runs the plain way: same results, more memory"):
        eff(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    assert [block for block, *_ in calls] == [eff.features.denseblock2]


def test_the_per_block_flag_and_frozen_blocks_are_honoured(monkeypatch):
    _, eff = pair(block_config=(2, 2, 2))
    calls = recorded_calls(monkeypatch)
    eff.features.denseblock2.memory_efficient = False
    for p in [*eff.features.conv0.parameters(), *eff.features.denseblock1.parameters()]:
        p.requires_grad_(False)  # nothing before transition1 needs a gradient: block 1 runs plain
    eff(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    assert [block for block, *_ in calls] == [eff.features.denseblock3]
    assert eff.features.transition1.conv.weight.grad is not None


def test_functional_call_gets_a_clear_error_not_wrong_gradients():
    _, eff = pair()
    params = {k: v.detach().clone().requires_grad_() for k, v in eff.named_parameters()}
    out = torch.func.functional_call(eff, params, (torch.randn(2, 3, 8, 8, dtype=torch.float64),))
    with pytest.raises(RuntimeError, match="changed between forward and backward"):
        out.sum().backward()


def test_torch_compile_runs_the_blocks_eagerly_with_the_same_results(monkeypatch):
    # The blocks are excluded from tracing (torch.compiler.disable), the rest is compiled.
    plain, eff = pair(torch.float32)
    calls = recorded_calls(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(eff, backend="aot_eager")
    assert_same_step(step(plain, x), step(compiled, x), 1e-4)
    assert len(calls) == len(eff.dense_blocks())  # the shared-buffer blocks really ran


# --- memory, measured independently of the allocator ---------------------------------------------
def saved_bytes(model: DenseNet, x: torch.Tensor) -> int:
    """Bytes of the unique non-parameter storages autograd holds for backward after forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return sum(held.values())


def one_block(num_layers: int, memory_efficient: bool) -> DenseNet:
    return DenseNet(growth_rate=4, block_config=(num_layers,), num_init_features=8, stem="cifar",
                    num_classes=3, memory_efficient=memory_efficient)  # fmt: skip


def test_saved_memory_is_linear_in_depth_for_ours_and_quadratic_for_plain():
    x = torch.randn(2, 3, 8, 8)
    depths = (4, 8, 16)
    ours = [saved_bytes(one_block(n, True), x) for n in depths]
    plain = [saved_bytes(one_block(n, False), x) for n in depths]
    # Linear: equal increments for equal steps in depth (8 -> 16 adds twice what 4 -> 8 adds).
    assert ours[2] - ours[1] == 2 * (ours[1] - ours[0])
    # Plain keeps every layer's concatenation: the increments grow with depth.
    assert plain[2] - plain[1] > 2.5 * (plain[1] - plain[0])
    assert ours[2] < plain[2] / 3


# --- DDP ------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world_size: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        grads = []
        for memory_efficient in (False, True):
            torch.manual_seed(0)
            model = densenet.cifar_densenet(16, 4, num_classes=3, memory_efficient=memory_efficient)
            ddp = torch.nn.parallel.DistributedDataParallel(model.double())
            torch.manual_seed(10 + rank)  # each rank its own data
            x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
            target = torch.randint(0, 3, (2,))
            F.cross_entropy(ddp(x), target).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        queue.put((rank, max(rel(b, a) for a, b in zip(*grads, strict=True))))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_gradients_equal_plain_on_two_gloo_processes():
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), queue), nprocs=2)
    errors = dict(queue.get(timeout=10) for _ in range(2))
    assert set(errors) == {0, 1}
    assert max(errors.values()) <= 1e-10
