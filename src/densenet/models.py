"""DenseNet (Huang et al., CVPR 2017) as one explicit, readable module.

Every published variant is an instance of :class:`DenseNet` with different arguments; there are no
hidden constants. Module names follow torchvision's layout (``features.conv0``,
``features.denseblock1.denselayer1.norm1``, ``features.transition1.conv``, ``features.norm5``,
``classifier``) so torchvision and timm state dicts load without renaming, except for the legacy
``norm.1`` form handled in :mod:`densenet.hub.formats`.

Shapes: inputs are ``(N, in_chans, H, W)`` float tensors; logits are ``(N, num_classes)``.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from densenet.efficient import (
    computable,
    dense_block_memory_efficient,
    fusable_head,
    has_hooks,
    needs_grad,
)

STEMS = ("imagenet", "cifar", "cifar_bn", "deep")
BLUR_MODES = ("none", "stem", "all")
GLOBAL_POOLS = ("avg", "max")


class BlurPool2d(nn.Module):
    """Anti-aliased downsampling (Zhang 2019): a fixed binomial low-pass filter, then stride.

    Matches timm's ``BlurPool2d`` (filter size 3, reflect padding) so timm weights give the same
    outputs. ``(N, C, H, W) -> (N, C, ceil(H/stride), ceil(W/stride))``.
    """

    def __init__(self, channels: int, filt_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.stride = stride
        pad = ((stride - 1) + (filt_size - 1)) // 2
        self.padding = (pad, pad, pad, pad)
        # Binomial taps (1, 2, 1)/4 for size 3: the (0.5, 0.5) filter convolved with itself.
        taps = torch.tensor(
            [math.comb(filt_size - 1, i) for i in range(filt_size)], dtype=torch.float32
        )
        taps = taps / taps.sum()
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("filt", kernel[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.padding, mode="reflect")
        return F.conv2d(x, self.filt, stride=self.stride, groups=self.channels)


class DenseLayer(nn.Module):
    """One composite function H_l: [BN-ReLU-Conv1x1(bn_size*k)] - BN-ReLU-Conv3x3(k).

    With ``bn_size`` 0 or None the bottleneck is absent (basic DenseNet): the 3x3 conv reads the
    concatenated input directly. Dropout follows every conv (the paper puts it after each conv but
    the network's first).
    """

    def __init__(
        self, in_channels: int, growth_rate: int, bn_size: int | None, drop_rate: float
    ) -> None:
        super().__init__()
        self.drop_rate = float(drop_rate)
        conv2_in = in_channels
        if bn_size:
            conv2_in = bn_size * growth_rate
            self.norm1 = nn.BatchNorm2d(in_channels)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv1 = nn.Conv2d(in_channels, conv2_in, 1, bias=False)
            self.drop1 = nn.Dropout(self.drop_rate)
        self.norm2 = nn.BatchNorm2d(conv2_in)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(conv2_in, growth_rate, 3, padding=1, bias=False)
        self.drop2 = nn.Dropout(self.drop_rate)

    @property
    def has_bottleneck(self) -> bool:
        return hasattr(self, "conv1")

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The part whose input grows with depth: concatenated features -> conv2's input."""
        if not self.has_bottleneck:
            return x
        return self.drop1(self.conv1(self.relu1(self.norm1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the concatenation of all earlier features, ``(N, C_in, H, W)`` -> ``(N, k, H, W)``."""
        return self.drop2(self.conv2(self.relu2(self.norm2(self.bottleneck(x)))))


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; each reads the concatenation of the block input and all
    earlier layers' outputs. ``(N, C, H, W) -> (N, C + num_layers * k, H, W)``."""

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bn_size: int | None,
        drop_rate: float,
    ) -> None:
        super().__init__()
        self.growth_rate = growth_rate
        self.memory_efficient = False
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    @property
    def out_channels(self) -> int:
        first = next(iter(self.values()))
        in_channels = first.norm1.num_features if first.has_bottleneck else first.norm2.num_features
        return in_channels + len(self) * self.growth_rate

    def memory_efficient_path(self, warn: bool = True) -> bool:
        """Whether forward (with gradients) takes the memory-efficient path: when it is on and the
        block's modules are the ones it computes itself (:func:`densenet.efficient.computable`;
        a replaced, hooked or parametrized module runs the plain way, with a warning)."""
        if not self.memory_efficient:
            return False
        if all(type(layer) is DenseLayer for layer in self.values()) and computable(self):
            return True
        if warn:
            warnings.warn(
                "memory_efficient: a dense block has modules the memory-efficient path cannot "
                "compute (a subclass such as SyncBatchNorm, a parametrization or a hook); it runs "
                "the plain way: same results, more memory",
                stacklevel=3,
            )
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.memory_efficient_path():
            return dense_block_memory_efficient(self, x)
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1(floor(theta*C)) - [Dropout] - 2x2 average pool (or blur pool)."""

    def __init__(
        self, in_channels: int, out_channels: int, drop_rate: float, blur: bool = False
    ) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_channels))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, bias=False))
        if drop_rate > 0:
            self.add_module("drop", nn.Dropout(drop_rate))
        pool = BlurPool2d(out_channels, stride=2) if blur else nn.AvgPool2d(2, stride=2)
        self.add_module("pool", pool)

    def after_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The modules after the conv ([dropout,] pool) on the conv's output ``x``."""
        names = list(self._modules)
        for name in names[names.index("conv") + 1 :]:
            x = self._modules[name](x)
        return x


def _conv_bn_relu(index: int, in_ch: int, out_ch: int, kernel: int, stride: int) -> list:
    return [
        (f"conv{index}", nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False)),
        (f"norm{index}", nn.BatchNorm2d(out_ch)),
        (f"relu{index}", nn.ReLU(inplace=True)),
    ]


def build_stem(
    stem: str, in_chans: int, num_init_features: int, stem_width: int, blur: bool
) -> list[tuple[str, nn.Module]]:
    """The layers before the first dense block, as named (name, module) pairs."""
    if stem == "cifar":
        return [("conv0", nn.Conv2d(in_chans, num_init_features, 3, padding=1, bias=False))]
    if stem == "cifar_bn":
        return _conv_bn_relu(0, in_chans, num_init_features, 3, 1)
    if stem == "imagenet":
        layers = _conv_bn_relu(0, in_chans, num_init_features, 7, 2)
    elif stem == "deep":
        layers = (
            _conv_bn_relu(0, in_chans, stem_width, 3, 2)
            + _conv_bn_relu(1, stem_width, stem_width, 3, 1)
            + _conv_bn_relu(2, stem_width, num_init_features, 3, 1)
        )
    else:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if blur:
        pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), BlurPool2d(num_init_features))
    else:
        pool = nn.MaxPool2d(3, stride=2, padding=1)
    return layers + [("pool0", pool)]


def check_batch(x: torch.Tensor, in_chans: int) -> None:
    """Raise ``ValueError`` unless ``x`` is a float ``(N, in_chans, H, W)`` tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"expected a 4-D batch (N, {in_chans}, H, W), got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"expected a floating-point tensor, got {x.dtype}; convert with x.float() "
            "(and normalize to the model's mean/std)"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels (N, {in_chans}, H, W), got shape "
            f"{tuple(x.shape)}; build the model with in_chans={x.shape[1]} to adapt it"
        )


def input_too_small(height: int, width: int, min_size: int) -> ValueError:
    return ValueError(
        f"input {height}x{width} is too small for this network: it needs at least "
        f"{min_size}x{min_size} pixels; resize the images (training: --set input_size=N)"
    )


class DenseNet(nn.Module):
    """Densely connected convolutional network, every published variant.

    Args:
        growth_rate: k, channels each dense layer adds.
        block_config: layers per dense block, any number of blocks.
        num_init_features: channels out of the stem (paper: 2k for BC, 16 for basic CIFAR nets).
        bn_size: bottleneck width multiplier (4 in the paper); 0 or None = no bottleneck.
        compression: theta, transitions keep ``floor(theta * C)`` channels (1 = no compression).
        drop_rate: dropout after each conv inside dense layers and transitions.
        stem: 'imagenet' (7x7/2 conv-BN-ReLU + 3x3/2 max-pool), 'cifar' (3x3/1 conv),
            'cifar_bn' (3x3/1 conv-BN-ReLU) or 'deep' (three 3x3 conv-BN-ReLU + max-pool).
        stem_width: channels of the deep stem's first two convs (timm: k).
        blur: anti-aliased downsampling: 'none', 'stem' (stem pool only, timm's default) or 'all'.
        in_chans: input channels.
        num_classes: classifier outputs; 0 = no classifier (``forward`` returns pooled features).
        global_pool: 'avg' or 'max'.
        head_drop_rate: dropout before the classifier.
        memory_efficient: recompute the bottlenecks in backward to save memory (same results).
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int | None = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        stem: str = "imagenet",
        stem_width: int | None = None,
        blur: str = "none",
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        head_drop_rate: float = 0.0,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        # The full constructor arguments, saved with checkpoints to rebuild the architecture.
        self.config = dict(
            growth_rate=growth_rate,
            block_config=list(block_config),
            num_init_features=num_init_features,
            bn_size=bn_size,
            compression=compression,
            drop_rate=drop_rate,
            stem=stem,
            stem_width=stem_width,
            blur=blur,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            head_drop_rate=head_drop_rate,
        )
        _check_args(self.config)
        self.growth_rate = growth_rate
        self.block_config = tuple(int(n) for n in block_config)
        self.in_chans = in_chans
        self.stem_type = stem
        stem_layers = build_stem(
            stem, in_chans, num_init_features, stem_width or growth_rate, blur != "none"
        )
        self.features = nn.Sequential(OrderedDict(stem_layers))
        channels = self._add_blocks(num_init_features, bn_size, compression, drop_rate, blur)
        self._add_head(channels, num_classes, global_pool, head_drop_rate)
        self._init_weights()
        self.set_grad_checkpointing(memory_efficient)

    def _add_blocks(
        self, channels: int, bn_size: int | None, compression: float, drop_rate: float, blur: str
    ) -> int:
        """Append the dense blocks and the transitions between them to ``self.features`` (and
        their entries to ``feature_info``); returns the channels out of the last block."""
        stride = 1 if self.stem_type.startswith("cifar") else 4
        self.feature_info: list[dict] = []
        for i, num_layers in enumerate(self.block_config):
            block = DenseBlock(num_layers, channels, self.growth_rate, bn_size, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels = block.out_channels
            self.feature_info.append(
                dict(num_chs=channels, reduction=stride, module=f"features.denseblock{i + 1}")
            )
            if i != len(self.block_config) - 1:
                out_channels = int(math.floor(channels * compression))
                if out_channels < 1:
                    raise ValueError(
                        f"invalid DenseNet arguments: compression {compression} leaves transition"
                        f"{i + 1} with 0 of its {channels} channels; raise compression to at "
                        f"least {1 / channels:.4g}"
                    )
                transition = Transition(channels, out_channels, drop_rate, blur == "all")
                self.features.add_module(f"transition{i + 1}", transition)
                channels = out_channels
                stride *= 2
        return channels

    def _add_head(
        self, channels: int, num_classes: int, global_pool: str, head_drop_rate: float
    ) -> None:
        """The final BN-ReLU (in ``features``, as torchvision), pooling, dropout, classifier."""
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.features.add_module("relu5", nn.ReLU(inplace=True))
        self.num_features = channels
        self.global_pool_type = global_pool
        self.head_drop = nn.Dropout(head_drop_rate)
        self.classifier = nn.Linear(channels, num_classes) if num_classes else nn.Identity()
        self.num_classes = num_classes

    def _init_weights(self) -> None:
        # The Lua reference code draws conv weights from N(0, 2/n), n = k*k*out_channels (fan_out).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    # --- timm-style model interface -------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute bottlenecks during backward (memory linear in depth); same results."""
        self.memory_efficient = bool(enable)
        for block in self.dense_blocks():
            block.memory_efficient = bool(enable)

    def dense_blocks(self) -> list[DenseBlock]:
        return [m for m in self.features if isinstance(m, DenseBlock)]

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one (0 = no classifier)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
            self.global_pool_type = global_pool
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        self.config["global_pool"] = self.global_pool_type
        device = next(self.parameters()).device
        if num_classes:
            self.classifier = nn.Linear(self.num_features, num_classes, device=device)
            nn.init.zeros_(self.classifier.bias)
        else:
            self.classifier = nn.Identity()

    def min_input_size(self) -> int:
        """Smallest square input (pixels) for which every feature map keeps at least 1x1."""
        size = 1
        while self._final_size(size) < 1:
            size += 1
        return size

    def _final_size(self, size: int) -> int:
        for module in self.features.modules():
            if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.Conv2d)):
                k, s, p = (_pair0(getattr(module, a)) for a in ("kernel_size", "stride", "padding"))
                size = (size + 2 * p - k) // s + 1
            elif isinstance(module, BlurPool2d):
                if size <= module.padding[0]:  # reflect padding needs the input wider than the pad
                    return 0
                size = (size - 1) // module.stride + 1
            if size < 1:
                return 0
        return size

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the expected shape when ``x`` cannot pass the network."""
        check_batch(x, self.in_chans)
        height, width = int(x.shape[2]), int(x.shape[3])
        if self._final_size(height) < 1 or self._final_size(width) < 1:
            raise input_too_small(height, width, self.min_input_size())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_chans, H, W) -> (N, num_features, H/32, W/32)`` after the final BN-ReLU."""
        if not torch.compiler.is_compiling():
            self.check_input(x)
        if self.memory_efficient and torch.is_grad_enabled() and not has_hooks(self.features):
            return self._features_memory_efficient(x)
        return self.features(x)

    def _features_memory_efficient(self, x: torch.Tensor) -> torch.Tensor:
        """``self.features(x)``, each dense block run with the BN-ReLU-conv of the transition
        after it as one memory-efficient step: backward keeps the block's buffer only, not also
        the block's output and its BN-ReLU (DenseNet-BC-100: 0.26 against 0.35 GB per step, and
        faster; docs/benchmarks.md)."""
        modules = list(self.features.children())
        fused = False
        for module, following in zip(modules, modules[1:] + [None], strict=True):
            if fused:  # the transition already ran with its block
                fused = False
                continue
            fused = (
                type(module) is DenseBlock
                and type(following) is Transition
                and not has_hooks(module)
                and needs_grad(x, module.parameters())
                and fusable_head(following)
                and module.memory_efficient_path(warn=False)  # its own call warns
            )
            if fused:
                x = following.after_conv(dense_block_memory_efficient(module, x, following))
            else:
                x = module(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool, dropout and classifier: ``(N, C, h, w) -> (N, num_classes)``."""
        x = x.amax((2, 3)) if self.global_pool_type == "max" else x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Normalized (BN-ReLU applied) output of each dense block selected by ``indices``.

        Block ``i < last`` is normalized by transition ``i``'s BN-ReLU, the last by norm5/relu5,
        so each map is what the next stage consumes. Strides in ``feature_info``.
        """
        self.check_input(x)
        wanted = set(range(len(self.block_config)) if indices is None else indices)
        outputs = []
        block_index = 0
        modules = iter(self.features.named_children())
        for name, module in modules:
            if isinstance(module, Transition):
                x = module.relu(module.norm(x))
                if block_index - 1 in wanted:
                    outputs.append(x)
                for sub_name, sub in module.named_children():
                    if sub_name not in ("norm", "relu"):
                        x = sub(x)
                continue
            x = module(x)
            if isinstance(module, DenseBlock):
                block_index += 1
            if name == "relu5" and block_index - 1 in wanted:
                outputs.append(x)
        return outputs


class FeatureExtractor(nn.Module):
    """``features_only`` wrapper: returns the list of normalized multi-scale maps.

    ``feature_info`` lists the selected maps' channels (``num_chs``) and strides (``reduction``).
    """

    def __init__(self, model: DenseNet, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        num_blocks = len(model.block_config)
        indices = list(range(num_blocks)) if out_indices is None else list(out_indices)
        for i in indices:
            if not -num_blocks <= i < num_blocks:
                raise ValueError(f"out_indices entry {i} is out of range for {num_blocks} blocks")
        self.out_indices = sorted(i % num_blocks for i in indices)
        model.reset_classifier(0)
        self.model = model
        self.feature_info = [model.feature_info[i] for i in self.out_indices]

    def channels(self) -> list[int]:
        return [info["num_chs"] for info in self.feature_info]

    def reduction(self) -> list[int]:
        return [info["reduction"] for info in self.feature_info]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices)


def _pair0(value) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


def _check_args(args: dict) -> None:
    """A ``ValueError`` listing every impossible value among DenseNet's constructor ``args``."""
    a = SimpleNamespace(**args)
    problems = []
    if not isinstance(a.growth_rate, int) or a.growth_rate < 1:
        problems.append(f"growth_rate must be a positive integer, got {a.growth_rate!r}")
    if len(a.block_config) < 1 or any(not isinstance(n, int) or n < 1 for n in a.block_config):
        problems.append(f"block_config must list positive layer counts, got {a.block_config!r}")
    if a.num_init_features < 1:
        problems.append(f"num_init_features must be >= 1, got {a.num_init_features}")
    if a.bn_size is not None and a.bn_size < 0:
        problems.append(f"bn_size must be >= 0 (0 or None = no bottleneck), got {a.bn_size}")
    if not 0 < a.compression <= 1:
        problems.append(f"compression (theta) must be in (0, 1], got {a.compression}")
    if not 0 <= a.drop_rate < 1:
        problems.append(f"drop_rate must be in [0, 1), got {a.drop_rate}")
    if a.stem not in STEMS:
        problems.append(f"stem must be one of {STEMS}, got {a.stem!r}")
    if a.blur not in BLUR_MODES:
        problems.append(f"blur must be one of {BLUR_MODES}, got {a.blur!r}")
    if a.in_chans < 1:
        problems.append(f"in_chans must be >= 1, got {a.in_chans}")
    if a.num_classes < 0:
        problems.append(f"num_classes must be >= 0 (0 = no classifier), got {a.num_classes}")
    if a.global_pool not in GLOBAL_POOLS:
        problems.append(f"global_pool must be one of {GLOBAL_POOLS}, got {a.global_pool!r}")
    if problems:
        raise ValueError("invalid DenseNet arguments: " + "; ".join(problems))
