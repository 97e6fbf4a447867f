"""Building models: :func:`create_model` (a named model from the zoo's table, with weights) and
:func:`cifar_densenet` (any CIFAR/SVHN DenseNet of depth L and growth rate k).

The table itself is :mod:`densenet.zoo` (data only); weights are found, read and loaded by
:mod:`densenet.hub`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from densenet.hub.loading import load_pretrained
from densenet.hub.sources import (
    Source,
    architecture_of,
    in_chans_of,
    num_classes_of,
    pretrained_cfg,
    resolve_source,
    saved_kwargs,
)
from densenet.messages import did_you_mean, notice
from densenet.models import DenseNet, FeatureExtractor
from densenet.zoo import ModelSpec, cifar_densenet_kwargs, get_model_spec

# Arguments create_model and cifar_densenet take besides DenseNet's own (for suggestions).
_FACTORY_ARGUMENTS = ("pretrained", "features_only", "out_indices")


def cifar_densenet(
    depth: int,
    growth_rate: int,
    bottleneck: bool = True,
    compression: float = 0.5,
    **kwargs,
) -> nn.Module:
    """Any CIFAR/SVHN DenseNet(-BC) of depth L and growth rate k (paper section 3).

    ``kwargs`` are those of :func:`create_model` (``num_classes``, ``memory_efficient``,
    ``drop_rate``, ``in_chans``, ``features_only``, ...).
    """
    arch = cifar_densenet_kwargs(depth, growth_rate, bottleneck, compression)
    return _build(arch, **kwargs)


def create_model(
    name: str | None = None,
    *,
    pretrained: bool | str | Path | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    memory_efficient: bool = False,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    **overrides,
) -> nn.Module:
    """Build a named DenseNet, optionally with weights.

    Args:
        name: a registered name (``list_models()``), optionally with a weight tag
            (``"densenet121.tv_in1k"``). May be None when ``pretrained`` is one of our own
            checkpoints, whose metadata names the architecture.
        pretrained: True (the name's tag or the model's default weights), a registry tag, a local
            file or an http(s)/file URL.
        num_classes: classifier outputs; defaults to the weights' (or the model's) class count.
            A different count than the weights' resets the classifier.
        in_chans: input channels; default: those of the weights (the ``model_config`` of our
            files, else their first conv), 3 without weights. Pretrained filters of another
            channel count are adapted to it.
        memory_efficient: recompute bottlenecks in backward (linear memory in depth).
        features_only: return a :class:`FeatureExtractor` giving normalized multi-scale maps.
        out_indices: which dense blocks' maps ``features_only`` returns (default all).
        overrides: any other :class:`DenseNet` argument (``drop_rate``, ``compression``, ...).
            When ``pretrained`` is one of our files of ``name``'s model (or ``name`` is None),
            the arguments it saved are the defaults.
    """
    if num_classes is not None and num_classes < 0:
        raise ValueError(f"num_classes must be >= 1 (or 0 for no classifier), got {num_classes}")
    source = resolve_source(name, pretrained)
    spec, arch = _architecture(name, source, overrides)
    name = name or spec.name
    if in_chans is None:
        in_chans = (in_chans_of(source) if source is not None else None) or 3
    model = _build(arch, in_chans=in_chans)
    model.pretrained_cfg = pretrained_cfg(spec, source, in_chans)
    if source is not None:
        load_pretrained(model, source)
    if num_classes is not None and num_classes != model.num_classes:
        if source is not None:
            notice(
                f"{name}: weights have {model.num_classes} classes; using a new "
                f"{num_classes}-class classifier (train it before use)"
            )
        model.reset_classifier(num_classes)
        model.pretrained_cfg.update(num_classes=num_classes, class_names=None)
    model.model_name = name
    model.set_grad_checkpointing(memory_efficient)
    return FeatureExtractor(model, out_indices) if features_only else model


def _architecture(
    name: str | None, source: Source | None, overrides: dict
) -> tuple[ModelSpec, dict]:
    """``(spec, DenseNet arguments)`` for :func:`create_model`: the spec's arguments, then those
    our own weights file saved, then ``overrides``; the class count is the weights'."""
    if name is None:
        if source is None:
            raise ValueError(
                "create_model needs a model name, or pretrained= one of our checkpoints"
            )
        spec, saved = architecture_of(source)
    else:
        spec = get_model_spec(name)
        saved = saved_kwargs(spec, source) if source is not None else {}
    arch = {**spec.kwargs, **saved, **overrides}
    if source is not None:
        arch["num_classes"] = num_classes_of(source)
    arch.setdefault("num_classes", spec.num_classes)
    return spec, arch


def _build(
    arch: dict,
    *,
    num_classes: int | None = None,
    in_chans: int = 3,
    memory_efficient: bool = False,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    **overrides,
) -> nn.Module:
    kwargs = {**arch, **overrides, "in_chans": in_chans, "memory_efficient": memory_efficient}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    _check_arguments(kwargs)
    model = DenseNet(**kwargs)
    return FeatureExtractor(model, out_indices) if features_only else model


def _check_arguments(kwargs: dict) -> None:
    """A ``TypeError`` naming each argument ``DenseNet`` does not take, with the nearest names."""
    known = inspect.signature(DenseNet).parameters
    unknown = [key for key in kwargs if key not in known]
    if unknown:
        choices = [*known, *_FACTORY_ARGUMENTS]
        named = []
        for key in unknown:
            hint = did_you_mean(key, choices).removeprefix("; ")
            named.append(f"{key!r} ({hint})" if hint else repr(key))
        raise TypeError(
            f"unknown DenseNet argument {', '.join(named)}; help(densenet.DenseNet) lists them"
        )
