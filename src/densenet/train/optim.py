"""How a run learns: the SGD optimizer and its parameter groups, the learning-rate schedule and
the loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from densenet.config import TrainConfig


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum, weight decay) with the classifier at ``lr`` and the backbone at
    ``lr * backbone_lr_scale``; each group's ``lr_scale`` is applied by :func:`set_lr`."""
    head, backbone = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if name.startswith("classifier.") else backbone).append(param)
    optimizer = torch.optim.SGD([{"params": head}, *([{"params": backbone}] if backbone else [])])
    set_hyperparameters(optimizer, cfg)
    return optimizer


def set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """``cfg``'s lr, momentum, weight decay and lr scales on the groups of :func:`build_optimizer`
    (classifier first); also after loading an optimizer state, which brings the saved ones."""
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = cfg.lr
        group["momentum"] = cfg.momentum
        group["nesterov"] = cfg.nesterov and cfg.momentum > 0
        group["weight_decay"] = cfg.weight_decay
        group["lr_scale"] = 1.0 if index == 0 else cfg.backbone_lr_scale  # 0 is the classifier


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup, then the schedule.

    step and multistep decay at epoch boundaries (the paper: /10 at 50% and 75% of the epochs);
    cosine anneals per step from ``lr`` to ``min_lr`` over the epochs after warmup. The epochs
    are ``schedule_epochs`` (default ``epochs``); past them the lr stays at its final value.
    """
    horizon = cfg.schedule_epochs or cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    epoch = step // steps_per_epoch
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** (epoch // cfg.step_size)
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(epoch >= round(m * horizon) for m in cfg.milestones)
    if cfg.schedule == "cosine":
        total = horizon * steps_per_epoch - warmup_steps
        progress = min((step - warmup_steps) / max(total, 1), 1.0)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def build_criterion(
    cfg: TrainConfig, task: str = "multiclass", pos_weight: torch.Tensor | None = None
) -> nn.Module:
    """The loss of ``task``.

    multiclass: cross-entropy with ``label_smoothing`` eps: the target puts 1 - eps on the true
    class and eps spread evenly over all K classes, so loss = (1 - eps) * NLL(true) + eps *
    mean_k NLL(k). multilabel: ``BCEWithLogitsLoss`` over the ``(N, L)`` logits and multi-hot
    targets, averaged over images and labels; ``pos_weight`` ``(L,)`` scales each label's
    positive term (negatives / positives balances a rare finding).
    """
    if task == "multilabel":
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
