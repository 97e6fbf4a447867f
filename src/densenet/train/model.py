"""The network a run trains: built from the config, its weight EMA, and the line that names it."""

from __future__ import annotations

import copy

import torch
from torch import nn

import densenet
from densenet.config import TrainConfig, model_kwargs, model_label
from densenet.train.resume import inline_yaml


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """The configured DenseNet (optionally pretrained; the classifier resized to ``num_classes``)."""
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
    if cfg.freeze_backbone:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("classifier.")
    return model


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
