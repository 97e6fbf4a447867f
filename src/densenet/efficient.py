"""Memory-efficient dense blocks: one shared feature buffer per block, linear memory in depth.

A plain dense block concatenates all earlier features before every layer and autograd keeps each
concatenation and its BN-ReLU output for backward: memory and copying grow quadratically with the
number of layers. Here one autograd Function runs the whole block (the design of the Lua code's
``-optMemory 4`` and Pleiss et al. 2017, written for current autograd):

* forward writes the block input and each layer's k new channels once into a pre-allocated buffer
  ``(N, C_in + L*k, H, W)``, which is also the block's output; each layer reads a ``narrow`` view of
  the buffer's prefix (no ``torch.cat``);
* BatchNorm's batch statistics of a channel are the same for every layer that reads it, so they are
  computed once, when the channel is written; each layer's BatchNorm then only normalizes (and
  updates its running statistics exactly once, as ``nn.BatchNorm2d`` does);
* the stage of a layer whose input grows with depth (BN-ReLU-conv of the prefix: the bottleneck, or
  the 3x3 conv of a basic layer) keeps nothing for backward: backward recomputes its BN-ReLU from the
  saved statistics and calls ``aten.convolution_backward``, so the conv is never re-run; the
  bottleneck's output (``bn_size*k`` channels, linear in depth) is kept for the second stage;
* dropout keeps its own tiny autograd graph: the plain model's call, so the same random numbers in
  the same order and the same mask;
* backward walks the layers in reverse and adds every prefix gradient into one shared gradient buffer
  instead of creating and accumulating per-feature gradient tensors.

Outputs, gradients and running statistics equal the plain model's up to rounding (tested to 1e-10
in float64). Under autocast the convs run in the autocast dtype as in the plain model. Parameters
get their gradients as ordinary outputs of the Function (one per parameter per step), so DDP's hooks
see the usual pattern. Under ``torch.compile`` the blocks run eagerly (``torch.compiler.disable``)
and everything between them is compiled. Limits: forward hooks on the BatchNorm modules inside dense
layers are not called, and a second backward through the same graph (``retain_graph=True``) raises.
Inference (no grad) never takes this path.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from densenet.models import DenseBlock, DenseLayer


Stage = tuple[nn.BatchNorm2d, nn.Module, nn.Conv2d, nn.Module]
Stats = tuple[torch.Tensor, torch.Tensor]  # per-channel batch mean and biased variance


def _stages(layer: DenseLayer) -> list[Stage]:
    """The layer as BN-ReLU-conv-dropout stages; the first reads the block's growing prefix."""
    stages = [(layer.norm2, layer.relu2, layer.conv2, layer.drop2)]
    if layer.has_bottleneck:
        stages.insert(0, (layer.norm1, layer.relu1, layer.conv1, layer.drop1))
    return stages


def _uses_batch_stats(norm: nn.BatchNorm2d) -> bool:
    return norm.training or norm.running_mean is None


def _batch_stats(x: torch.Tensor, dtype: torch.dtype, eps: float) -> Stats:
    """Per-channel mean and biased variance of ``x`` (N, C, H, W), from BatchNorm's own kernel.

    The ``dtype`` weight makes the kernel return float statistics for bfloat16 input, as the plain
    model's BatchNorm (float parameters) computes them.
    """
    ones = torch.ones(x.shape[1], dtype=dtype, device=x.device)
    _, mean, invstd = torch.ops.aten.native_batch_norm(x, ones, None, None, None, True, 0.0, eps)
    return mean, invstd.pow(-2).sub_(eps)


def _normalize(
    norm: nn.BatchNorm2d, x: torch.Tensor, stats: Stats, out: torch.Tensor | None = None
) -> torch.Tensor:
    """BatchNorm of ``x`` with the given (mean, var), written to ``out`` when given."""
    args = (x, norm.weight, norm.bias, *stats, False, 0.0, norm.eps)
    if out is None:
        return torch.ops.aten.native_batch_norm(*args)[0]
    empty = stats[0].new_empty(0)
    return torch.ops.aten.native_batch_norm.out(
        *args, out=out, save_mean=empty, save_invstd=empty.clone()
    )[0]


def _norm_forward(
    norm: nn.BatchNorm2d, x: torch.Tensor, stats: Stats | None, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, Stats | None]:
    """``norm(x)``, including its running-statistics update; also returns the batch statistics.

    ``stats``: ``x``'s batch statistics when already known (a prefix of the block buffer, whose
    channels' statistics are the same for every layer), so only the normalization runs, into
    ``out`` when given.
    """
    if not _uses_batch_stats(norm):
        return _normalize(norm, x, (norm.running_mean, norm.running_var), out), None
    count = x.numel() // x.shape[1]
    if count < 2:
        raise ValueError(
            f"BatchNorm needs more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)}; use a batch size above 1 or call model.eval()"
        )
    if stats is None:
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, norm.weight, norm.bias, None, None, True, 0.0, norm.eps
        )
        stats = (mean, invstd.pow(-2).sub_(norm.eps))
    else:
        out = _normalize(norm, x, stats, out)
    if norm.training and norm.running_mean is not None:  # as nn.BatchNorm2d.forward does
        norm.num_batches_tracked.add_(1)
        momentum = norm.momentum
        factor = 1.0 / float(norm.num_batches_tracked) if momentum is None else momentum
        mean, var = stats
        norm.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        norm.running_var.mul_(1 - factor).add_(var * (count / (count - 1)), alpha=factor)
    return out, stats


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def _workspace_view(
    workspace: torch.Tensor, like: torch.Tensor, memory_format: torch.memory_format
) -> torch.Tensor:
    """A dense tensor shaped like ``like``, in ``memory_format``, at the front of ``workspace``.

    Temporaries of every prefix width go to one block-sized workspace: allocating them one by one
    in growing sizes fragments the CPU heap (glibc keeps the holes in the RSS).
    """
    n, c, h, w = like.shape
    flat = workspace[: like.numel()]
    if memory_format == torch.channels_last:
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(n, c, h, w)


def _layer_forward(
    layer: DenseLayer,
    features: torch.Tensor,
    known: tuple[torch.Tensor, torch.Tensor] | None,
    workspace: torch.Tensor,
    memory_format: torch.memory_format,
    saved: tuple[list, list, list],
) -> torch.Tensor:
    """One dense layer's stages on ``features`` (the buffer's first channels, whose batch
    statistics are ``known`` when computed already): its new features, detached. What backward
    needs goes into ``saved``: the stage inputs, stage statistics and dropout graphs."""
    stage_inputs, stage_stats, dropouts = saved
    for s, (norm, relu, conv, drop) in enumerate(_stages(layer)):
        out = None
        if s == 0 and workspace.dtype == features.dtype:
            out = _workspace_view(workspace, features, memory_format)
        normed, stats = _norm_forward(norm, features, known if s == 0 else None, out)
        if s > 0:
            stage_stats.append(stats)
            if dropouts[-1] is not None:  # else backward re-runs the bottleneck conv
                stage_inputs.append(features)
        conv_out = conv(relu(normed))
        del normed
        with torch.enable_grad():  # the plain model's dropout call: same RNG, same mask
            features = drop(conv_out.requires_grad_())
        if features is conv_out:
            dropouts.append(None)
        else:
            dropouts.append((conv_out, features))
            # Dropout's backward needs only its mask, not its input.
            conv_out.untyped_storage().resize_(0)
        features = features.detach()
    return features


class _DenseBlockFunction(torch.autograd.Function):
    """``(block, x, *block.parameters()) -> (N, C_in + L*k, H, W)``; see the module docstring.

    Saved for backward: the buffer, the batch statistics of its channels and, for every stage after
    a layer's first, the stage's input (``bn_size*k`` channels) and statistics. With
    ``drop_rate > 0`` each dropout also keeps its own small graph (``conv_out -> dropped``, holding
    the mask as in the plain model).
    """

    @staticmethod
    def forward(
        ctx: Any, block: DenseBlock, x: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        layers = list(block.values())
        growth, in_channels = block.growth_rate, x.shape[1]
        first_norm = _stages(layers[0])[0][0]
        stats_dtype, eps = first_norm.weight.dtype, first_norm.eps
        total = in_channels + len(layers) * growth
        # Batch statistics of the buffer's channels: the same for every layer that reads them.
        mean = var = None
        if any(_uses_batch_stats(_stages(layer)[0][0]) for layer in layers):
            mean = torch.empty(total, dtype=stats_dtype, device=x.device)
            var = torch.empty_like(mean)
            stats = _batch_stats(x, stats_dtype, eps)
            mean[:in_channels], var[:in_channels] = stats
        memory_format = _memory_format(x)
        widest = x.numel() // in_channels * (total - growth)
        workspace = torch.empty(widest, dtype=x.dtype, device=x.device)
        buffer, stage_inputs, stage_stats, dropouts = None, [], [], []
        for i, layer in enumerate(layers):
            width = in_channels + i * growth
            features = x if buffer is None else buffer.narrow(1, 0, width)
            known = None if mean is None else (mean[:width], var[:width])
            features = _layer_forward(
                layer,
                features,
                known,
                workspace,
                memory_format,
                (stage_inputs, stage_stats, dropouts),
            )
            if buffer is None:
                shape = (x.shape[0], total, *x.shape[2:])
                dtype = torch.promote_types(x.dtype, features.dtype)
                buffer = torch.empty(
                    shape, dtype=dtype, device=x.device, memory_format=memory_format
                )
                buffer.narrow(1, 0, width).copy_(x)
            buffer.narrow(1, width, growth).copy_(features)
            if mean is not None:
                mean[width : width + growth], var[width : width + growth] = _batch_stats(
                    features, stats_dtype, eps
                )
            # The new features live in the buffer now; a dropout graph needs only their shape.
            features.untyped_storage().resize_(0)
        ctx.block, ctx.params, ctx.in_channels = block, params, in_channels
        device_type = x.device.type
        ctx.autocast = dict(
            device_type=device_type,
            dtype=torch.get_autocast_dtype(device_type),
            enabled=torch.is_autocast_enabled(device_type),
        )
        ctx.stage_stats, ctx.dropouts = stage_stats, dropouts
        ctx.save_for_backward(buffer, mean, var, *stage_inputs)
        return buffer

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.dropouts is None:
            raise RuntimeError(
                "backward ran twice through a memory-efficient dense block, which frees its graph "
                "after the first backward; use memory_efficient=False for retain_graph=True"
            )
        buffer, mean, var, *stage_inputs = ctx.saved_tensors
        dropouts, ctx.dropouts = ctx.dropouts, None
        stage_stats = ctx.stage_stats
        memory_format = _memory_format(buffer)
        grads: dict[torch.Tensor, torch.Tensor] = {}
        grad_buffer = grad_output.clone()
        widest = buffer.numel() // buffer.shape[1] * (buffer.shape[1] - ctx.block.growth_rate)
        workspaces = [buffer.new_empty(widest) for _ in range(2)]
        for i, layer in reversed(list(enumerate(ctx.block.values()))):
            width = ctx.in_channels + i * ctx.block.growth_rate
            stages = _stages(layer)
            layer_dropouts = [dropouts.pop() for _ in stages][::-1]
            # Recompute each stage's BN-ReLU output; the prefix first, as a dense copy, because
            # BatchNorm's kernels are several times faster on it.
            prefix = buffer.narrow(1, 0, width)
            inputs = [_workspace_view(workspaces[0], prefix, memory_format).copy_(prefix)]
            stats = [None if mean is None else (mean[:width], var[:width])]
            out = _workspace_view(workspaces[1], prefix, memory_format)
            activated = [_activate(stages[0][0], inputs[0], stats[0], out)]
            if len(stages) == 2:
                if layer_dropouts[0] is None:  # re-run the bottleneck conv instead of keeping it
                    conv = stages[0][2]
                    with torch.autocast(**ctx.autocast):
                        inputs.append(
                            F.conv2d(
                                activated[0],
                                conv.weight,
                                conv.bias,
                                conv.stride,
                                conv.padding,
                                conv.dilation,
                                conv.groups,
                            )
                        )
                else:
                    inputs.append(stage_inputs.pop())
                stats.append(stage_stats.pop())
                activated.append(_activate(stages[1][0], inputs[1], stats[1]))
            # Layer i's output gradient is complete: only later layers read its channels.
            grad = grad_buffer.narrow(1, width, ctx.block.growth_rate)
            for s in reversed(range(len(stages))):
                norm, _, conv, _ = stages[s]
                if layer_dropouts[s] is not None:
                    conv_out, dropped = layer_dropouts[s]
                    (grad,) = torch.autograd.grad(dropped, conv_out, grad)
                grad = _stage_backward(norm, conv, inputs[s], stats[s], activated[s], grad, grads)
            grad_buffer.narrow(1, 0, width).add_(grad)
        grad_x = grad_buffer.narrow(1, 0, ctx.in_channels)
        return (None, grad_x, *(grads.get(p) for p in ctx.params))


def _activate(
    norm: nn.BatchNorm2d,
    features: torch.Tensor,
    stats: Stats | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """BN-ReLU of ``features`` as forward computed it: from the batch statistics forward used
    (``stats``), or the running ones when ``norm`` used them; into ``out`` when given."""
    running = (norm.running_mean, norm.running_var)
    return _normalize(norm, features, stats if _uses_batch_stats(norm) else running, out).relu_()


def _stage_backward(
    norm: nn.BatchNorm2d,
    conv: nn.Conv2d,
    features: torch.Tensor,
    stats: Stats | None,
    activated: torch.Tensor,
    grad_out: torch.Tensor,
    grads: dict[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Gradient of ``conv(relu(norm(features)))`` w.r.t. ``features``; parameters' go to ``grads``.

    ``activated``: the recomputed ``relu(norm(features))`` (see ``_activate``); it is overwritten.
    The conv is not re-run: its backward needs only its input and weight.
    """
    batch = _uses_batch_stats(norm)
    mean, var = stats if batch else (norm.running_mean, norm.running_var)
    # Under autocast the conv ran in a lower precision (grad_out's dtype): cast as autocast did.
    normed_dtype = activated.dtype
    activated = activated.to(grad_out.dtype)
    bias = conv.bias
    grad_act, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_out,
        activated,
        conv.weight.to(grad_out.dtype),
        None if bias is None else [conv.out_channels],
        conv.stride,
        conv.padding,
        conv.dilation,
        False,
        [0, 0],
        conv.groups,
        [True, conv.weight.requires_grad, bias is not None and bias.requires_grad],
    )
    # ReLU's backward, written over its no longer needed output.
    grad_act = torch.ops.aten.threshold_backward.grad_input(
        grad_act, activated, 0, grad_input=activated
    )
    grad_act = grad_act.to(normed_dtype)
    saved = (mean, (var + norm.eps).rsqrt()) if batch else (None, None)
    grad_features, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_batch_norm_backward(
        grad_act,
        features,
        norm.weight,
        None if batch else mean,
        None if batch else var,
        *saved,
        batch,
        norm.eps,
        [True, norm.weight.requires_grad, norm.bias.requires_grad],
    )
    for param, grad in (
        (conv.weight, grad_weight),
        (bias, grad_bias),
        (norm.weight, grad_norm_weight),
        (norm.bias, grad_norm_bias),
    ):
        if param is not None and param.requires_grad:
            grads[param] = grad.to(param.dtype)
    return grad_features


def _compiler_disabled_when_compiling(fn):
    """``fn``, run eagerly under ``torch.compile`` as ``torch.compiler.disable(fn)`` would be.

    The decorator itself imports ``torch._dynamo`` (about 1.6 s of ``import densenet`` on a small
    CPU), so it is applied on the first call made while compiling, when dynamo is loaded anyway.
    """
    disabled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return wrapper


@_compiler_disabled_when_compiling
def dense_block_memory_efficient(block: DenseBlock, x: torch.Tensor) -> torch.Tensor:
    """Same result as ``DenseBlock.forward`` with memory linear in the number of layers."""
    params = list(block.parameters())
    if not x.requires_grad and not any(p.requires_grad for p in params):
        with torch.no_grad():  # nothing to differentiate: the plain forward
            return block(x)
    return _DenseBlockFunction.apply(block, x, *params)
