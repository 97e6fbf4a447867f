"""The network a run trains: built from the config, its weight EMA, and the line that names it."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import densenet
from densenet.catalog import DatasetInfo
from densenet.config import TrainConfig, model_kwargs, model_label
from densenet.io import read_metadata
from densenet.messages import count, notice
from densenet.train.resume import inline_yaml


def build_model(
    cfg: TrainConfig, num_classes: int, in_chans: int, data: DatasetInfo | None = None
) -> nn.Module:
    """The configured DenseNet (optionally pretrained; the classifier resized to ``num_classes``,
    or new with ``reset_classifier``). With the run's ``data``, what the pretrained weights were
    trained on and the run differs in (class names, normalization, channels) is said on stderr."""
    kwargs = model_kwargs(cfg)
    kwargs.pop("num_classes", None)
    kwargs.pop("in_chans", None)
    model = densenet.create_model(
        cfg.model,
        pretrained=cfg.pretrained,
        num_classes=num_classes,
        in_chans=in_chans,
        memory_efficient=cfg.memory_efficient,
        **kwargs,
    )
    model.model_name = model_label(cfg)  # what was built, not only what it was built from
    if cfg.pretrained and cfg.reset_classifier:
        model.reset_classifier(num_classes)
    if cfg.pretrained and data is not None:
        _note_pretrained_differences(cfg.pretrained, data, in_chans, cfg.reset_classifier)
    if cfg.freeze_backbone:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("classifier.")
    return model


def _note_pretrained_differences(
    pretrained: str, data: DatasetInfo, in_chans: int, reset_classifier: bool
) -> None:
    """Fine-tuning keeps what the weights fit; say where this run's data differ from theirs."""
    meta = read_metadata(Path(str(pretrained)).expanduser())
    names = list(meta.get("class_names") or [])
    if (
        names
        and not reset_classifier
        and len(names) == len(data.class_names)
        and names != list(data.class_names)
    ):
        notice(
            f"{pretrained}: keeping its classifier (as many classes as {data.name}: "
            f"{len(names)}), its outputs taken in order as {data.name}'s classes ({names[0]} -> "
            f"{data.class_names[0]}, ...); --set reset_classifier=true starts a new one"
        )
    size = meta.get("input_size") or []
    if size and int(size[0]) != in_chans:
        notice(
            f"{pretrained}: weights for {size[0]}-channel input, {data.name} gives "
            f"{count(in_chans, 'channel')}: the first conv is adapted (its filters summed or "
            "repeated)"
        )
    mean, std = meta.get("mean"), meta.get("std")
    if mean and std and _differ(mean, data.mean) + _differ(std, data.std):
        notice(
            f"{pretrained}: trained on inputs normalized with mean {_short(mean)} std "
            f"{_short(std)}; this run normalizes {data.name} with mean {_short(data.mean)} std "
            f"{_short(data.std)}"
        )


def _differ(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) != len(b) or any(abs(x - y) > 1e-3 for x, y in zip(a, b, strict=False))


def _short(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def model_line(model: nn.Module, cfg: TrainConfig) -> str:
    """``model densenet_bc16_k12: 43,978 parameters, 1 input channel, 10 classes`` (and what
    ``model_args`` changed when the network is not the registered ``model``)."""
    built = model.model_name
    made = (
        f" ({cfg.model} with model_args {inline_yaml(cfg.model_args)})"
        if built != cfg.model
        else ""
    )
    return (
        f"model {built}{made}: {densenet.count_parameters(model):,} parameters, {model.in_chans} "
        f"input channel{'s' if model.in_chans > 1 else ''}, {model.num_classes} classes"
    )


class ModelEma:
    """Exponential moving average of the weights (buffers copied), updated after each step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                ema_state[name].lerp_(value, 1 - self.decay)
            else:
                ema_state[name].copy_(value)
