"""Memory-efficient dense blocks: one shared feature buffer per block, linear memory in depth.

A plain dense block concatenates all earlier features before every layer and autograd keeps each
concatenation and its BN-ReLU output for backward: memory and copying grow quadratically with the
number of layers. Here one autograd Function runs the whole block (the design of the Lua code's
``-optMemory 4`` and Pleiss et al. 2017, written for current autograd):

* forward writes the block input and each layer's k new channels once into a pre-allocated buffer
  of all ``C_in + L*k`` channels, stored channel-major, ``(C, N, H, W)``: the prefix a layer reads
  (its first channels) is one dense block of memory, viewed as the NCHW tensor
  ``(1, width, N*H, W)``, so BatchNorm runs on its fast dense kernels without copying the prefix
  out, and the bottleneck's 1x1 conv is one matrix product (no ``torch.cat``). The block's output
  is a copy of the buffer in the model's layout (``(N, C, H, W)``, contiguous or channels_last);
  backward keeps the buffer, the next layer the output only until its own backward;
* BatchNorm's batch statistics of a channel are the same for every layer that reads it, so they are
  computed once, when the channel is written; each layer's BatchNorm then only normalizes (and
  updates its running statistics exactly once, as ``nn.BatchNorm2d`` does);
* the stage of a layer whose input grows with depth (BN-ReLU-conv of the prefix: the bottleneck, or
  the 3x3 conv of a basic layer) keeps nothing for backward: backward recomputes its BN-ReLU from the
  saved statistics and re-runs the bottleneck's 1x1 conv for the second stage (keeping every
  bottleneck output would hold ``bn_size*k`` channels per layer, 4x the buffer's k); the conv is
  never re-run for its own gradient (``aten.convolution_backward``, or two matrix products);
* a bottleneck's 1x1 conv is computed as ``prefix^T @ weight^T``, so its output comes out
  channels_last and the layer's second stage (BN-ReLU-conv3x3, forward and backward) runs in the
  layout oneDNN is fastest in, whatever the model's layout;
* the transition after a block (its BN-ReLU-1x1 conv: the *head*) runs in the same Function when
  the model calls it (``DenseNet.forward_features``): it reads the buffer like one more layer, so
  neither the block's output nor its BN-ReLU is ever stored (backward recomputes the BN-ReLU), and
  the conv is a matrix product as well; its pool and dropout stay ordinary modules;
* dropout keeps its own tiny autograd graph: the plain model's call, so the same random numbers in
  the same order and the same mask;
* backward walks the layers in reverse and adds every prefix gradient into one shared,
  channel-major gradient buffer instead of creating and accumulating per-feature gradient tensors.

Outputs, gradients and running statistics equal the plain model's up to rounding (tested to 1e-10
in float64). Under autocast the convs and matrix products run in the autocast dtype as in the plain
model, and the buffer, workspaces and gradient buffer hold what the plain model's concatenations
would (bfloat16 under bf16 autocast): half the float32 memory, statistics still in float32.
Parameters get their gradients as ordinary outputs of the Function (one per parameter per step), so
DDP's hooks see the usual pattern. Under ``torch.compile`` the blocks run eagerly
(``torch.compiler.disable``) and everything between them is compiled. The Function computes the
layers' (and the head's) BatchNorm, ReLU, conv and dropout itself: a block (or transition) with a
module it cannot compute so (a subclass such as SyncBatchNorm, a parametrization such as
weight_norm, a hook) runs the plain way, with a warning for a block (:func:`computable`). Limits:
a second backward through the same graph (``retain_graph=True``) raises, and so does a backward
after the parameters were swapped back (``torch.func.functional_call``). Inference (no grad) never
takes this path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize

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


# --- the channel-major buffer ---------------------------------------------------------------------
# The buffer is stored channel-major, (C, N, H, W) contiguous: the first ``width`` channels (the
# prefix a layer reads) are then one dense block of memory, viewed as ``(1, width, N*H, W)``, a
# dense NCHW tensor with the same per-channel values. BatchNorm (statistics, normalization,
# backward) over it is BatchNorm over (N, H, W), on its fast dense kernels, without copying the
# prefix out; a 1x1 conv of it is one matrix product ``weight (out, width) @ prefix (width, N*H*W)``.
# Between channels_last and channel-major a copy is a transpose of (N*H*W, C). ATen's 2D transpose
# kernel is the faster one for many channels; for few (a layer's k new channels) the plain strided
# copy is, up to 3.5x (measured on bf16 and float32, 12-64 channels, 8x8 to 56x56, on AVX-512).
_FEW_CHANNELS = 32


def _copy_channel_major(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(N, C, H, W)`` (contiguous or channels_last) copied into the channel-major ``out``
    ``(C, N, H, W)`` (contiguous)."""
    n, c, h, w = x.shape
    if _memory_format(x) == torch.channels_last and c > _FEW_CHANNELS:
        out.view(c, -1).copy_(x.permute(0, 2, 3, 1).reshape(-1, c).t())
    else:
        out.copy_(x.transpose(0, 1))
    return out


def _channel_major(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> a channel-major copy ``(C, N, H, W)``."""
    n, c, h, w = x.shape
    return _copy_channel_major(x.new_empty((c, n, h, w)), x)


def _flat(features: torch.Tensor) -> torch.Tensor:
    """Channel-major ``(C, N, H, W)`` (contiguous) as the NCHW tensor ``(1, C, N*H, W)``."""
    c, n, h, w = features.shape
    return features.view(1, c, n * h, w)


def _copy_batch_major(out: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Channel-major ``features`` (contiguous, ``C*N*H*W`` values) copied into ``out``
    ``(N, C, H, W)`` (contiguous or channels_last)."""
    n, c, h, w = out.shape
    if _memory_format(out) == torch.channels_last and c > _FEW_CHANNELS:
        out.permute(0, 2, 3, 1).reshape(-1, c).copy_(features.reshape(c, -1).t())
    else:
        out.copy_(features.reshape(c, n, h, w).transpose(0, 1))
    return out


def _batch_major(
    features: torch.Tensor, shape: torch.Size, memory_format: torch.memory_format
) -> torch.Tensor:
    """Channel-major ``features`` as a new ``(N, C, H, W)`` tensor of ``shape`` in
    ``memory_format``, the layout of the model's own tensors."""
    out = torch.empty(
        shape, dtype=features.dtype, device=features.device, memory_format=memory_format
    )
    return _copy_batch_major(out, features)


def _is_pointwise(conv: nn.Conv2d) -> bool:
    """A 1x1 conv without stride, padding, dilation, groups or bias: a matrix product."""
    return (
        conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is None
    )


def _pointwise(
    conv: nn.Conv2d,
    flat: torch.Tensor,
    shape: torch.Size,
    memory_format: torch.memory_format = torch.channels_last,
) -> torch.Tensor:
    """``conv`` (1x1) of :func:`_flat` features ``(1, C, N*H, W)`` (``shape``: their batch-major
    shape ``(N, C, H, W)``): ``(N, C', H, W)`` in ``memory_format``.

    For channels_last the product is taken as ``prefix^T @ weight^T``, whose rows are pixels: it
    comes out channels_last without a copy, the layout in which the bottleneck's BN-ReLU-conv3x3
    (forward and backward, bf16 and float32) runs fastest on oneDNN.
    """
    n, _, h, w = shape
    weight = conv.weight.view(conv.out_channels, -1)
    features = flat.view(flat.shape[1], -1)
    if memory_format != torch.channels_last:
        out_shape = torch.Size((n, conv.out_channels, h, w))
        return _batch_major(torch.mm(weight, features), out_shape, memory_format)
    pixels = torch.mm(features.t(), weight.t())
    return pixels.view(n, h, w, conv.out_channels).permute(0, 3, 1, 2)


def _workspace_view(workspace: torch.Tensor, shape: torch.Size, memory_format=None) -> torch.Tensor:
    """A dense tensor of ``shape`` (in ``memory_format``; default: contiguous) at the front of
    ``workspace``.

    Temporaries of every prefix width go to one block-sized workspace: allocating them one by one
    in growing sizes fragments the CPU heap (glibc keeps the holes in the RSS).
    """
    n, c, h, w = shape
    flat = workspace[: n * c * h * w]
    if memory_format == torch.channels_last:
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(n, c, h, w)


class _Workspaces:
    """Two flat temporaries of ``numel`` elements for one block, each allocated on first use
    (layers with a 1x1 bottleneck need only the first)."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.numel, self.dtype, self.device = numel, dtype, device
        self._spaces: list[torch.Tensor | None] = [None, None]

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._spaces[i] is None:
            self._spaces[i] = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        return self._spaces[i]


def _prefix_forward(
    stage: Stage,
    prefix: torch.Tensor,
    known: Stats | None,
    workspaces: _Workspaces,
    shape: torch.Size,
    memory_format: torch.memory_format,
    pointwise_format: torch.memory_format = torch.channels_last,
) -> torch.Tensor:
    """A stage that reads the channel-major ``prefix`` (a layer's first, or the transition head:
    BN-ReLU-conv; ``known``: the prefix's batch statistics when computed already): the conv's
    output ``(N, C', H, W)``. A 1x1 conv is a matrix product on the channel-major values, its
    output in ``pointwise_format``; another conv (a basic layer's 3x3) gets a batch-major copy of
    the activation, its output in the model's layout (``memory_format``)."""
    norm, relu, conv, _ = stage
    flat = _flat(prefix)
    out = None
    if workspaces.dtype == prefix.dtype:
        out = _workspace_view(workspaces[0], flat.shape)
    normed, _ = _norm_forward(norm, flat, known, out)
    activated = relu(normed)
    if _is_pointwise(conv):
        return _pointwise(conv, activated, shape, pointwise_format)
    batch_major = None
    if workspaces.dtype == activated.dtype:
        batch_major = _workspace_view(workspaces[1], shape, memory_format)
        _copy_batch_major(batch_major, activated)
    else:
        batch_major = _batch_major(activated, shape, memory_format)
    return conv(batch_major)


def _layer_forward(
    layer: DenseLayer,
    prefix: torch.Tensor,
    known: Stats | None,
    workspaces: _Workspaces,
    shape: torch.Size,
    memory_format: torch.memory_format,
    saved: tuple[list, list, list],
) -> torch.Tensor:
    """One dense layer on the channel-major ``prefix`` of the block (``shape``: its batch-major
    shape): its new features ``(N, k, H, W)``, detached. What backward needs goes into ``saved``:
    the stage inputs, stage statistics and dropout graphs."""
    stage_inputs, stage_stats, dropouts = saved
    features = None
    for s, (norm, relu, conv, drop) in enumerate(_stages(layer)):
        if s == 0:
            first = (norm, relu, conv, drop)
            conv_out = _prefix_forward(first, prefix, known, workspaces, shape, memory_format)
        else:
            normed, stats = _norm_forward(norm, features, None)
            stage_stats.append(stats)
            if dropouts[-1] is not None:  # else backward re-runs the bottleneck conv
                stage_inputs.append(features)
            conv_out = conv(relu(normed))
            del normed
        if drop.training and drop.p > 0:
            # Dropout draws its mask in memory order: the plain model's layout, the same mask.
            conv_out = conv_out.contiguous(memory_format=memory_format)
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

    Saved for backward: the channel-major buffer (the output is a batch-major copy, which the next
    layer keeps only until its own backward), the batch statistics of its channels and, for every
    stage after a layer's first, the stage's statistics and, when its input went through
    dropout, that input (``bn_size*k`` channels). With ``drop_rate > 0`` each dropout also keeps
    its own small graph (``conv_out -> dropped``, holding the mask as in the plain model).
    """

    @staticmethod
    def forward(
        ctx: Any, block: DenseBlock, head: Stage | None, x: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        layers = list(block.values())
        growth, in_channels = block.growth_rate, x.shape[1]
        total = in_channels + len(layers) * growth
        memory_format = _memory_format(x)
        block_input = _channel_major(x)
        norms = [_stages(layer)[0][0] for layer in layers] + ([head[0]] if head else [])
        stats = _block_stats(norms, block_input, total)
        widest = x.numel() // in_channels * (total if head else total - growth)
        workspaces = _Workspaces(widest, x.dtype, x.device)
        buffer, stage_inputs, stage_stats, dropouts = None, [], [], []
        for i, layer in enumerate(layers):
            width = in_channels + i * growth
            prefix = block_input if buffer is None else buffer[:width]
            known = None if stats is None else (stats[0][:width], stats[1][:width])
            shape = torch.Size((x.shape[0], width, *x.shape[2:]))
            saved = (stage_inputs, stage_stats, dropouts)
            features = _layer_forward(layer, prefix, known, workspaces, shape, memory_format, saved)
            if buffer is None:  # its dtype: the plain model's concatenation's
                dtype = torch.promote_types(x.dtype, features.dtype)
                buffer = block_input.new_empty((total, *block_input.shape[1:]), dtype=dtype)
                buffer[:width].copy_(block_input)
                del block_input
                if dtype != workspaces.dtype:
                    workspaces = _Workspaces(widest, dtype, x.device)
            _write_features(buffer, width, features, stats, layers[0])
        shape = torch.Size((x.shape[0], total, *x.shape[2:]))
        if head is None:
            output = _batch_major(buffer, shape, memory_format)
        else:  # the block's output is never made: the head reads the buffer
            formats = (memory_format, memory_format)  # a 3x3 conv's, and a 1x1 conv's
            output = _prefix_forward(head, buffer, stats, workspaces, shape, *formats)
        del workspaces
        ctx.block, ctx.head, ctx.params, ctx.in_channels = block, head, params, in_channels
        ctx.memory_format = memory_format
        device_type = x.device.type
        ctx.autocast = dict(
            device_type=device_type,
            dtype=torch.get_autocast_dtype(device_type),
            enabled=torch.is_autocast_enabled(device_type),
        )
        ctx.stage_stats, ctx.dropouts = stage_stats, dropouts
        mean, var = (None, None) if stats is None else stats
        ctx.save_for_backward(buffer, mean, var, *stage_inputs)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.dropouts is None:
            raise RuntimeError(
                "backward ran twice through a memory-efficient dense block, which frees its graph "
                "after the first backward; use memory_efficient=False for retain_graph=True"
            )
        if list(map(id, _parameters(ctx.block, ctx.head))) != list(map(id, ctx.params)):
            raise RuntimeError(
                "the parameters of a memory-efficient dense block changed between forward and "
                "backward (e.g. torch.func.functional_call swaps them only during forward): "
                "backward reads them from the modules; use memory_efficient=False there"
            )
        buffer, mean, var, *stage_inputs = ctx.saved_tensors
        dropouts, ctx.dropouts = ctx.dropouts, None
        saved = (stage_inputs, ctx.stage_stats, dropouts)
        stats = None if mean is None else (mean, var)
        state = _BlockBackward(ctx, buffer, grad_output, stats, saved)
        for i, layer in reversed(list(enumerate(ctx.block.values()))):
            width = ctx.in_channels + i * ctx.block.growth_rate
            state.layer(layer, width, None if mean is None else (mean[:width], var[:width]))
        grad_x = _batch_major(
            state.grad_buffer[: ctx.in_channels],
            torch.Size((buffer.shape[1], ctx.in_channels, *buffer.shape[2:])),
            ctx.memory_format,
        )
        return (None, None, grad_x, *(state.grads.get(p) for p in ctx.params))


def _block_stats(
    norms: list[nn.BatchNorm2d], block_input: torch.Tensor, total: int
) -> Stats | None:
    """Float statistics for all ``total`` channels of the block, the block input's filled in
    (from its channel-major copy); None when none of the ``norms`` reading the buffer (each
    layer's first, the head's) uses batch statistics."""
    if not any(_uses_batch_stats(norm) for norm in norms):
        return None
    norm = norms[0]
    mean = torch.empty(total, dtype=norm.weight.dtype, device=block_input.device)
    var = torch.empty_like(mean)
    channels = block_input.shape[0]
    mean[:channels], var[:channels] = _batch_stats(_flat(block_input), mean.dtype, norm.eps)
    return mean, var


def _write_features(
    buffer: torch.Tensor,
    width: int,
    features: torch.Tensor,
    stats: Stats | None,
    first: DenseLayer,
) -> None:
    """A layer's new ``features`` ``(N, k, H, W)`` into the buffer's channels from ``width``, and
    their batch statistics into ``stats``; then their own memory is released."""
    new = buffer[width : width + features.shape[1]]
    _copy_channel_major(new, features)
    if stats is not None:
        mean, var = (part[width : width + features.shape[1]] for part in stats)
        mean[:], var[:] = _batch_stats(_flat(new), mean.dtype, _stages(first)[0][0].eps)
    # The new features live in the buffer now; a dropout graph needs only their shape.
    features.untyped_storage().resize_(0)


class _BlockBackward:
    """One block's backward, layer by layer in reverse: the saved channel-major buffer, the
    channel-major gradient buffer every layer adds its prefix gradient into, and the parameters'
    gradients (``grads``)."""

    def __init__(
        self,
        ctx: Any,
        buffer: torch.Tensor,
        grad_output: torch.Tensor,
        stats: Stats | None,
        saved: tuple[list, ...],
    ) -> None:
        self.memory_format, self.autocast = ctx.memory_format, ctx.autocast
        self.buffer = buffer
        channels = buffer.shape[0] if ctx.head else buffer.shape[0] - ctx.block.growth_rate
        widest = buffer.numel() // buffer.shape[0] * channels
        self.workspaces = _Workspaces(widest, self.buffer.dtype, self.buffer.device)
        self.stage_inputs, self.stage_stats, self.dropouts = saved
        self.grads: dict[torch.Tensor, torch.Tensor] = {}
        if ctx.head is None:
            self.grad_buffer = _channel_major(grad_output)
        else:
            self.grad_buffer = self._head(ctx.head, grad_output, stats)

    def _head(self, head: Stage, grad_output: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        """Backward of the head (BN-ReLU-conv1x1 of the whole buffer, ``grad_output``: its
        output's gradient): the buffer's gradient, channel-major."""
        norm, _, conv, _ = head
        flat = _flat(self.buffer)
        activated = _activate(norm, flat, stats, _workspace_view(self.workspaces[0], flat.shape))
        grad = _pointwise_stage_backward(
            norm, conv, flat, stats, activated, grad_output, self.grads
        )
        return grad.view(self.buffer.shape)

    def layer(self, layer: DenseLayer, width: int, stats: Stats | None) -> None:
        """Layer ``layer`` (reading the first ``width`` channels, whose forward statistics are
        ``stats``): its prefix gradient added into the gradient buffer."""
        stages = _stages(layer)
        dropouts = [self.dropouts.pop() for _ in stages][::-1]
        norm, _, conv, _ = stages[0]
        c, n, h, w = self.buffer[:width].shape
        # Recompute the prefix's BN-ReLU from the saved statistics: channel-major for a 1x1
        # conv, else (a basic layer's 3x3 conv) from a batch-major copy of the prefix.
        pointwise = _is_pointwise(conv)
        if pointwise:
            features = _flat(self.buffer[:width])
            layout = dict(shape=features.shape)
        else:
            layout = dict(shape=torch.Size((n, c, h, w)), memory_format=self.memory_format)
            features = _workspace_view(self.workspaces[1], **layout)
            _copy_batch_major(features, self.buffer[:width])
        out = _workspace_view(self.workspaces[0], **layout)
        activated = _activate(norm, features, stats, out)
        # Layer i's output gradient is complete: only later layers read its channels.
        growth = conv.out_channels if len(stages) == 1 else stages[1][2].out_channels
        new = self.grad_buffer[width : width + growth]
        # A bottleneck layer's second stage ran channels_last (see _pointwise).
        layout = torch.channels_last if pointwise and len(stages) == 2 else self.memory_format
        grad = _batch_major(new, torch.Size((n, growth, h, w)), layout)
        if len(stages) == 2:
            grad = self._second_stage(stages, activated, pointwise, dropouts, grad)
        grad = _dropout_backward(dropouts[0], grad)
        if pointwise:
            grad = _pointwise_stage_backward(
                norm, conv, features, stats, activated, grad, self.grads
            )
            self.grad_buffer[:width].add_(grad.view(c, n, h, w))
        else:
            grad = _stage_backward(norm, conv, features, stats, activated, grad, self.grads)
            self.grad_buffer[:width].add_(_channel_major(grad))

    def _second_stage(
        self,
        stages: list[Stage],
        activated: torch.Tensor,
        pointwise: bool,
        dropouts: list,
        grad: torch.Tensor,
    ) -> torch.Tensor:
        """Backward of a bottleneck layer's second stage (BN-ReLU-conv3x3 of the bottleneck,
        ``grad``: its output's gradient): the bottleneck's gradient. The bottleneck is re-run from
        the recomputed ``activated`` prefix, unless dropout made forward keep it."""
        conv = stages[0][2]
        if dropouts[0] is None:
            with torch.autocast(**self.autocast):
                if pointwise:
                    n, _, h, w = grad.shape
                    shape = torch.Size((n, activated.shape[1], h, w))
                    bottleneck = _pointwise(conv, activated, shape)
                else:
                    bottleneck = _conv(conv, activated)
        else:
            bottleneck = self.stage_inputs.pop()
        norm, _, conv, _ = stages[1]
        stats = self.stage_stats.pop()
        grad = _dropout_backward(dropouts[1], grad)
        activated = _activate(norm, bottleneck, stats)
        return _stage_backward(norm, conv, bottleneck, stats, activated, grad, self.grads)


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` without the module's hooks (a re-run, not a new forward)."""
    return F.conv2d(
        x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )


def _dropout_backward(dropout: tuple | None, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` through a stage's dropout (its own small graph), if it had one."""
    if dropout is None:
        return grad
    conv_out, dropped = dropout
    (grad,) = torch.autograd.grad(dropped, conv_out, grad)
    return grad


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


def _norm_backward(
    norm: nn.BatchNorm2d,
    features: torch.Tensor,
    stats: Stats | None,
    grad_normed: torch.Tensor,
    grads: dict[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Gradient of ``norm(features)`` (as forward normalized) w.r.t. ``features``; the
    BatchNorm's parameters' go to ``grads``."""
    batch = _uses_batch_stats(norm)
    mean, var = stats if batch else (norm.running_mean, norm.running_var)
    saved = (mean, (var + norm.eps).rsqrt()) if batch else (None, None)
    grad_features, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        grad_normed,
        features,
        norm.weight,
        None if batch else mean,
        None if batch else var,
        *saved,
        batch,
        norm.eps,
        [True, *(p is not None and p.requires_grad for p in (norm.weight, norm.bias))],
    )
    _put(grads, norm.weight, grad_weight)
    _put(grads, norm.bias, grad_bias)
    return grad_features


def _put(grads: dict, param: torch.Tensor | None, grad: torch.Tensor | None) -> None:
    if param is not None and param.requires_grad:
        grads[param] = grad.to(param.dtype)


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
    _put(grads, conv.weight, grad_weight)
    _put(grads, bias, grad_bias)
    return _norm_backward(norm, features, stats, grad_act.to(normed_dtype), grads)


def _pointwise_stage_backward(
    norm: nn.BatchNorm2d,
    conv: nn.Conv2d,
    prefix: torch.Tensor,
    stats: Stats | None,
    activated: torch.Tensor,
    grad_out: torch.Tensor,
    grads: dict[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """:func:`_stage_backward` of a 1x1 conv on the channel-major ``prefix`` (``(1, C, N*H, W)``):
    the conv's backward as two matrix products; the gradient is channel-major too.

    ``grad_out``: the conv output's gradient ``(N, C', H, W)``, contiguous or channels_last (as
    :func:`_pointwise` wrote the output), read as the matrix ``(C', N*H*W)`` without a transpose.
    """
    normed_dtype = activated.dtype
    channels = prefix.shape[1]
    if _memory_format(grad_out) == torch.channels_last:  # a view of (N*H*W, C')
        grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, conv.out_channels).t()
    else:  # a batched copy
        grad_rows = _channel_major(grad_out).view(conv.out_channels, -1)
    activated = activated.view(channels, -1).to(grad_out.dtype)
    weight = conv.weight.view(conv.out_channels, channels).to(grad_out.dtype)
    if conv.weight.requires_grad:  # (activated @ grad^T)^T: faster than grad @ activated^T
        grad_weight = torch.mm(activated, grad_rows.t()).t()
        _put(grads, conv.weight, grad_weight.reshape(conv.weight.shape))
    grad_act = torch.mm(weight.t(), grad_rows)
    del grad_out, grad_rows
    grad_act = torch.ops.aten.threshold_backward.grad_input(
        grad_act, activated, 0, grad_input=activated
    )
    return _norm_backward(norm, prefix, stats, grad_act.view(prefix.shape).to(normed_dtype), grads)


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


# What the Function computes itself, by position in a BN-ReLU-conv[-dropout] stage.
_STAGE_TYPES = (nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.Dropout)


def _computable(stage: Sequence[nn.Module]) -> bool:
    """Whether the Function may compute ``stage`` itself instead of calling its modules: each
    exactly its type (a subclass such as SyncBatchNorm has its own forward), without
    parametrizations (their weight is computed on every access) and without hooks."""
    return all(
        type(module) is kind and not parametrize.is_parametrized(module) and not has_hooks(module)
        for module, kind in zip(stage, _STAGE_TYPES, strict=False)
    )


def computable(block: DenseBlock) -> bool:
    """Whether the Function may compute every stage of ``block``'s layers itself."""
    return all(_computable(stage) for layer in block.values() for stage in _stages(layer))


def _parameters(block: DenseBlock, head: Stage | None) -> list[torch.Tensor]:
    """The parameters the Function reads: the block's, and the head's norm and conv."""
    head_params = [] if head is None else [*head[0].parameters(), *head[2].parameters()]
    return [*block.parameters(), *head_params]


def needs_grad(x: torch.Tensor, params: Iterable[torch.Tensor]) -> bool:
    """Whether anything computed from ``x`` and ``params`` is to be differentiated."""
    return x.requires_grad or any(p.requires_grad for p in params)


def fusable_head(transition: nn.Module) -> bool:
    """Whether :func:`dense_block_memory_efficient` can run ``transition``'s BN-ReLU-conv (a
    ``Transition``: ``norm``, ``relu``, ``conv`` first) as the head of the block before it:
    computable as a stage, the conv bias-free 1x1, no hooks on the transition (a fused head is
    never called as a module)."""
    if list(transition._modules)[:3] != ["norm", "relu", "conv"]:
        return False
    stage = [transition._modules[name] for name in ("norm", "relu", "conv")]
    return _computable(stage) and _is_pointwise(stage[2]) and not has_hooks(transition)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones)."""
    hooks = (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
        torch_module._global_forward_hooks,
        torch_module._global_forward_pre_hooks,
        torch_module._global_backward_hooks,
        torch_module._global_backward_pre_hooks,
    )
    return any(hooks)


@_compiler_disabled_when_compiling
def dense_block_memory_efficient(
    block: DenseBlock, x: torch.Tensor, head: nn.Module | None = None
) -> torch.Tensor:
    """Same result as ``DenseBlock.forward`` with memory linear in the number of layers.

    ``head``: the transition after the block (see :func:`fusable_head`); the result is then its
    1x1 conv's output, ``head.conv(head.relu(head.norm(block(x))))``, and neither the block's
    output nor its BN-ReLU is ever stored: backward recomputes them from the block's buffer.
    """
    stage = None if head is None else (head.norm, head.relu, head.conv, None)
    params = _parameters(block, stage)
    if not needs_grad(x, params):
        with torch.no_grad():  # nothing to differentiate: the plain forward
            out = block(x)
            return out if head is None else head.conv(head.relu(head.norm(out)))
    return _DenseBlockFunction.apply(block, stage, x, *params)
