"""Memory-efficient dense blocks: recompute each layer's bottleneck during backward.

Only the bottleneck (concat -> BN -> ReLU -> conv1x1) has an input that grows with depth, so only its
intermediates are dropped and recomputed. The recompute normalizes with the batch statistics but does
not update BatchNorm's running statistics a second time, so they equal the plain model's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from densenet.models import DenseBlock, DenseLayer


class _Recompute:
    """Tells the checkpointed function whether it runs for the first time or in backward."""

    def __init__(self) -> None:
        self.first_call = True


def _bottleneck(layer: DenseLayer, state: _Recompute, *features: torch.Tensor) -> torch.Tensor:
    x = torch.cat(features, 1)
    norm = layer.norm1
    if state.first_call or not norm.training:
        x = norm(x)
    else:
        # Throw-away copies of the running statistics: the recompute must save the same tensors
        # for backward as the first call, but must not update the real statistics twice.
        stats = (norm.running_mean.clone(), norm.running_var.clone())
        x = F.batch_norm(x, *stats, norm.weight, norm.bias, True, norm.momentum or 0.0, norm.eps)
    state.first_call = False
    return layer.drop1(layer.conv1(layer.relu1(x)))


def dense_block_memory_efficient(block: DenseBlock, x: torch.Tensor) -> torch.Tensor:
    """Same result as ``DenseBlock.forward`` with the bottleneck intermediates recomputed."""
    features = [x]
    for layer in block.values():
        if layer.has_bottleneck:
            hidden = checkpoint(_bottleneck, layer, _Recompute(), *features, use_reentrant=False)
        else:
            hidden = torch.cat(features, 1)
        features.append(layer.drop2(layer.conv2(layer.relu2(layer.norm2(hidden)))))
    return torch.cat(features, 1)
