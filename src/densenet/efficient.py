"""Memory-efficient dense blocks: one shared feature buffer per block, linear memory in depth.

A plain dense block concatenates all earlier features before every layer and autograd keeps each
concatenation and its BN-ReLU output for backward: memory and copying grow quadratically with the
number of layers. Here one autograd Function runs the whole block (the design of the Lua code's
``-optMemory 4`` and Pleiss et al. 2017, written for current autograd):

* forward writes the block input and each layer's k new channels once into a pre-allocated buffer
  ``(N, C_in + L*k, H, W)``, which is also the block's output; each layer reads a ``narrow`` view of
  the buffer's prefix (no ``torch.cat``);
* the part of a layer whose input grows with depth (BN-ReLU-conv of the prefix: the bottleneck, or
  the 3x3 conv of a basic layer) keeps nothing for backward; its BN-ReLU is recomputed in backward and
  its conv's gradients come from ``aten.convolution_backward``, so the conv is never re-run;
* the rest of the layer (dropout, and BN-ReLU-conv3x3 of the bottleneck's ``bn_size*k`` channels)
  keeps its ordinary autograd graph, whose size does not depend on depth;
* backward walks the layers in reverse and adds every prefix gradient into one shared gradient buffer
  instead of creating and accumulating per-feature gradient tensors.

The math is the plain model's: BatchNorm normalizes with the same batch statistics and updates its
running statistics once (in forward; the recompute passes no running statistics), dropout draws the
same random numbers in the same order, and AMP's autocast state is replayed for the recompute.
Parameters get their gradients as ordinary Function outputs (one per parameter per step), so DDP's
hooks see the usual pattern. Under ``torch.compile`` the blocks run eagerly (``torch.compiler.
disable``) and everything between them is compiled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from densenet.models import DenseBlock, DenseLayer


Stage = tuple[nn.BatchNorm2d, nn.Module, nn.Conv2d, nn.Module]


def _stages(layer: DenseLayer) -> list[Stage]:
    """The layer as BN-ReLU-conv-dropout stages; the first reads the block's growing prefix."""
    stages = [(layer.norm2, layer.relu2, layer.conv2, layer.drop2)]
    if layer.has_bottleneck:
        stages.insert(0, (layer.norm1, layer.relu1, layer.conv1, layer.drop1))
    return stages


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


class _DenseBlockFunction(torch.autograd.Function):
    """``(block, x, *block.parameters()) -> (N, C_in + L*k, H, W)``; see the module docstring.

    Saved for backward: the buffer and, for every stage after a layer's first, the stage's input
    (``bn_size*k`` channels). With ``drop_rate > 0`` each dropout also keeps its own small graph
    (``conv_out -> dropped``, holding the mask as in the plain model).
    """

    @staticmethod
    def forward(
        ctx: Any, block: DenseBlock, x: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.block, ctx.params, ctx.in_channels = block, params, x.shape[1]
        buffer, stage_inputs, dropouts = None, [], []
        for i, layer in enumerate(block.values()):
            width = ctx.in_channels + i * block.growth_rate
            features = x if buffer is None else buffer.narrow(1, 0, width)
            for s, (norm, relu, conv, drop) in enumerate(_stages(layer)):
                if s > 0:
                    stage_inputs.append(features)
                conv_out = conv(relu(norm(features)))
                with torch.enable_grad():  # the plain model's dropout call: same RNG, same mask
                    features = drop(conv_out.requires_grad_())
                if features is conv_out:
                    dropouts.append(None)
                else:
                    dropouts.append((conv_out, features))
                    # Dropout's backward needs only its mask, not its input.
                    conv_out.untyped_storage().resize_(0)
                features = features.detach()
            if buffer is None:
                shape = (x.shape[0], width + len(block) * block.growth_rate, *x.shape[2:])
                dtype = torch.promote_types(x.dtype, features.dtype)
                buffer = torch.empty(shape, dtype=dtype, device=x.device,
                                     memory_format=_memory_format(x))  # fmt: skip
                buffer.narrow(1, 0, width).copy_(x)
            buffer.narrow(1, width, block.growth_rate).copy_(features)
            # The new features live in the buffer now; a dropout graph needs only their shape.
            features.untyped_storage().resize_(0)
        ctx.dropouts = dropouts
        ctx.save_for_backward(buffer, *stage_inputs)
        return buffer

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.dropouts is None:
            raise RuntimeError(
                "backward ran twice through a memory-efficient dense block, which frees its graph "
                "after the first backward; use memory_efficient=False for retain_graph=True"
            )
        buffer, *stage_inputs = ctx.saved_tensors
        dropouts, ctx.dropouts = ctx.dropouts, None
        grads: dict[torch.Tensor, torch.Tensor] = {}
        grad_buffer = grad_output.clone()
        for i, layer in reversed(list(enumerate(ctx.block.values()))):
            width = ctx.in_channels + i * ctx.block.growth_rate
            # Layer i's output gradient is complete: only later layers read its channels.
            grad = grad_buffer.narrow(1, width, ctx.block.growth_rate)
            for s, (norm, _, conv, _) in reversed(list(enumerate(_stages(layer)))):
                dropout = dropouts.pop()
                if dropout is not None:
                    (grad,) = torch.autograd.grad(dropout[1], dropout[0], grad)
                features = stage_inputs.pop() if s > 0 else buffer.narrow(1, 0, width)
                grad = _stage_backward(norm, conv, features, grad, grads)
            grad_buffer.narrow(1, 0, width).add_(grad)
        grad_x = grad_buffer.narrow(1, 0, ctx.in_channels)
        return (None, grad_x, *(grads.get(p) for p in ctx.params))


def _stage_backward(
    norm: nn.BatchNorm2d,
    conv: nn.Conv2d,
    features: torch.Tensor,
    grad_out: torch.Tensor,
    grads: dict[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Gradient of ``conv(relu(norm(features)))`` w.r.t. ``features``; parameters' go to ``grads``.

    BN-ReLU is recomputed with the batch statistics forward used (without updating the running
    ones); the conv is not re-run: its backward needs only its input and weight. Explicit aten
    backward ops keep just two ``features``-sized temporaries alive at a time.
    """
    use_batch_stats = norm.training or norm.running_mean is None
    running = (None, None) if use_batch_stats else (norm.running_mean, norm.running_var)
    normed, mean, invstd = torch.ops.aten.native_batch_norm(
        features, norm.weight, norm.bias, *running, use_batch_stats, 0.0, norm.eps
    )
    # Under autocast the conv ran in a lower precision (grad_out's dtype): cast as autocast did.
    activated = normed.relu_().to(grad_out.dtype)
    del normed
    weight = conv.weight.to(grad_out.dtype)
    bias = conv.bias
    grad_act, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_out, activated, weight, None if bias is None else [conv.out_channels],
        conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
        [True, conv.weight.requires_grad, bias is not None and bias.requires_grad],
    )  # fmt: skip
    grad_act = grad_act.masked_fill_(activated <= 0, 0)  # ReLU's backward, in place
    del activated
    grad_features, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_batch_norm_backward(
        grad_act, features, norm.weight, *running, mean, invstd, use_batch_stats, norm.eps,
        [True, norm.weight.requires_grad, norm.bias.requires_grad],
    )  # fmt: skip
    for param, grad in ((conv.weight, grad_weight), (bias, grad_bias),
                        (norm.weight, grad_norm_weight), (norm.bias, grad_norm_bias)):  # fmt: skip
        if param is not None and param.requires_grad:
            grads[param] = grad.to(param.dtype)
    return grad_features


@torch.compiler.disable
def dense_block_memory_efficient(block: DenseBlock, x: torch.Tensor) -> torch.Tensor:
    """Same result as ``DenseBlock.forward`` with memory linear in the number of layers."""
    params = list(block.parameters())
    if not x.requires_grad and not any(p.requires_grad for p in params):
        with torch.no_grad():  # nothing to differentiate: the plain forward
            return block(x)
    return _DenseBlockFunction.apply(block, x, *params)
