"""Parameters and multiply-accumulates of a :class:`~densenet.models.DenseNet`: the one home of
counting them.

:func:`model_complexity` computes both in closed form from the constructor's arguments alone,
without torch, so ``densenet models`` answers at once instead of building every network. The walk
mirrors ``DenseNet.__init__`` layer by layer and is exact: tests compare it with a built model's
:func:`count_parameters` and :func:`count_macs` (``torch.utils.flop_counter``: convolutions,
BlurPool's fixed depthwise filter included, and the classifier; BatchNorm, ReLU and pooling are
not MACs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from densenet.zoo import get_model_spec

if TYPE_CHECKING:  # torch only where a built model is counted
    from torch import nn


@dataclass(frozen=True)
class Complexity:
    """``params``: learnable parameters (BatchNorm running statistics excluded);
    ``macs``: multiply-accumulates of one forward pass of one image."""

    params: int
    macs: int


class _Tally:
    """Running totals while walking the network at the current feature-map size."""

    def __init__(self, height: int, width: int) -> None:
        self.params = 0
        self.macs = 0
        self.height = height
        self.width = width

    def conv(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        """A bias-free conv with ``kernel // 2`` padding, as every conv of the network has."""
        pad = kernel // 2
        self.height = (self.height + 2 * pad - kernel) // stride + 1
        self.width = (self.width + 2 * pad - kernel) // stride + 1
        self.macs += c_out * (c_in // groups) * kernel * kernel * self.height * self.width

    def learnable_conv(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        self.params += c_in * c_out * kernel * kernel
        self.conv(c_in, c_out, kernel, stride)

    def batch_norm(self, channels: int) -> None:
        self.params += 2 * channels  # weight and bias

    def conv_bn(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        self.learnable_conv(c_in, c_out, kernel, stride)
        self.batch_norm(c_out)

    def max_pool(self, stride: int) -> None:
        """3x3 max-pool, padding 1."""
        self.height = (self.height - 1) // stride + 1
        self.width = (self.width - 1) // stride + 1

    def blur_pool(self, channels: int) -> None:
        """BlurPool2d: a fixed 3x3 depthwise filter, stride 2, after reflect padding 1 (the same
        output size as the zero padding of :meth:`conv`)."""
        self.conv(channels, channels, 3, stride=2, groups=channels)

    def avg_pool(self) -> None:
        """2x2 average pool, stride 2."""
        self.height //= 2
        self.width //= 2


def model_complexity(arch: Mapping, input_size: Sequence[int] = (3, 224, 224)) -> Complexity:
    """Parameters and MACs of ``DenseNet(**arch)`` on one ``input_size`` image ``(C, H, W)``.

    ``arch`` holds :class:`~densenet.models.DenseNet` arguments (missing ones take its defaults);
    arguments that change neither count (dropout, pooling type, memory_efficient) are ignored.
    """
    growth_rate = arch.get("growth_rate", 32)
    block_config = arch.get("block_config", (6, 12, 24, 16))
    init_features = arch.get("num_init_features", 64)
    bn_size = arch.get("bn_size", 4)
    compression = arch.get("compression", 0.5)
    stem = arch.get("stem", "imagenet")
    blur = arch.get("blur", "none")
    in_chans = arch.get("in_chans", 3)
    num_classes = arch.get("num_classes", 1000)
    tally = _Tally(*input_size[-2:])

    if stem in ("cifar", "cifar_bn"):
        tally.learnable_conv(in_chans, init_features, 3)
        if stem == "cifar_bn":
            tally.batch_norm(init_features)
    else:
        if stem == "deep":
            width = arch.get("stem_width") or growth_rate
            tally.conv_bn(in_chans, width, 3, stride=2)
            tally.conv_bn(width, width, 3)
            tally.conv_bn(width, init_features, 3)
        else:
            tally.conv_bn(in_chans, init_features, 7, stride=2)
        if blur != "none":
            tally.max_pool(stride=1)
            tally.blur_pool(init_features)
        else:
            tally.max_pool(stride=2)

    channels = init_features
    for index, num_layers in enumerate(block_config):
        for _ in range(num_layers):
            tally.batch_norm(channels)
            if bn_size:
                tally.learnable_conv(channels, bn_size * growth_rate, 1)
                tally.batch_norm(bn_size * growth_rate)
                tally.learnable_conv(bn_size * growth_rate, growth_rate, 3)
            else:
                tally.learnable_conv(channels, growth_rate, 3)
            channels += growth_rate
        if index != len(block_config) - 1:
            out_channels = int(math.floor(channels * compression))  # as DenseNet.__init__
            tally.batch_norm(channels)
            tally.learnable_conv(channels, out_channels, 1)
            channels = out_channels
            if blur == "all":
                tally.blur_pool(channels)
            else:
                tally.avg_pool()
    tally.batch_norm(channels)  # norm5
    if num_classes:
        tally.params += channels * num_classes + num_classes
        tally.macs += channels * num_classes
    return Complexity(tally.params, tally.macs)


def spec_complexity(name: str) -> Complexity:
    """Parameters and MACs of a registered model at its native input size, without building it."""
    spec = get_model_spec(name)
    return model_complexity(spec.kwargs, spec.input_size)


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters of a built model (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on a ``(1, *input_size)`` input (conv + linear)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_size))
    model.train(was_training)
    return counter.get_total_flops() // 2
