"""Loading weights into a model: input-conv adaptation, the fit check, BatchNorm counters.

:func:`load_pretrained` copies a :class:`~densenet.hub.sources.Source` into a
:class:`~densenet.models.DenseNet` (compiled or wrapped ones too) only after checking that every
key and shape fits, so a model is never half-loaded; BatchNorm counters that old files lack start
at 0, as in torchvision.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from densenet.hub.formats import FIRST_CONV
from densenet.hub.sources import Source, num_classes_of, resolve_source, suggest_architecture
from densenet.io import CheckpointError
from densenet.messages import notice
from densenet.models import DenseNet, FeatureExtractor


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """First-conv weight ``(out, c, kh, kw)`` adapted to ``in_chans`` input channels.

    1 channel: the sum over the input channels (a gray image gives what its RGB copy gave). More:
    the filters repeated cyclically and scaled by ``c / in_chans``, so an input whose channels
    repeat the original ones cyclically gives the same activation scale (as timm).
    """
    chans = weight.shape[1]
    if in_chans == chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // chans)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (chans / in_chans)


# BatchNorm's batch counter: absent from files saved before PyTorch 0.4.1 (torchvision's published
# DenseNets among them); BatchNorm's own loader then starts it at 0, and so does ours.
BN_COUNTER = "num_batches_tracked"


def mismatch_report(model: nn.Module, state_dict: dict[str, torch.Tensor], limit: int = 5) -> str:
    """Missing and unexpected keys and differing shapes of ``state_dict`` for ``model`` ('' if
    it fits), ``limit`` of each named. A missing BatchNorm ``num_batches_tracked`` fits: it is
    only a counter, which loading starts at 0 (see :func:`with_bn_counters`)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("." + BN_COUNTER)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: weights {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def with_bn_counters(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict:
    """``state_dict`` with each BatchNorm ``num_batches_tracked`` of ``model`` it lacks set to 0,
    as torchvision's loader ends for its published files (which predate the counter)."""
    counters = {
        k: torch.zeros((), dtype=v.dtype)
        for k, v in model.state_dict().items()
        if k.endswith("." + BN_COUNTER) and k not in state_dict
    }
    return {**state_dict, **counters}


def load_pretrained(model: nn.Module, source: Source | str | Path) -> nn.Module:
    """Copy ``source``'s weights into ``model`` (a :class:`DenseNet`, possibly compiled or
    wrapped); return ``model``.

    ``source``: a :class:`Source`, or anything ``create_model(pretrained=...)`` takes. The first
    conv is adapted to ``model.in_chans``; a classifier of another size is left as it is, with a
    notice. Any other mismatch raises :class:`CheckpointError` listing missing and unexpected keys
    and differing shapes, and suggesting the architecture the weights fit; the model is then
    untouched (checked before anything is copied).
    """
    if not isinstance(source, Source):
        source = resolve_source(None, source)
    net = unwrap_model(model)
    state_dict = dict(source.state_dict)
    if FIRST_CONV in state_dict:
        state_dict[FIRST_CONV] = adapt_input_conv(state_dict[FIRST_CONV], net.in_chans)
    weight_classes, model_classes = num_classes_of(source), net.num_classes
    # A file without "classifier.weight" but with other classifier keys is partial, not headless.
    headless = not any(k.startswith("classifier.") for k in state_dict)
    if weight_classes != model_classes and (weight_classes or headless):
        notice(
            f"{source.description}: weights have {weight_classes} classes, the model "
            f"{model_classes}; keeping the model's new classifier (train it before use)"
        )
        own = net.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
        state_dict.update({k: v for k, v in own.items() if k.startswith("classifier.")})
    report = mismatch_report(net, state_dict)
    if report:
        guess = suggest_architecture(state_dict)
        hint = f" The weights look like {guess}." if guess else ""
        raise CheckpointError(
            f"{source.description}: the weights do not fit the architecture ({report}).{hint}"
        )
    net.load_state_dict(with_bn_counters(net, state_dict))
    return model


def unwrap_model(model: nn.Module) -> DenseNet:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DataParallel / DDP
    if isinstance(model, FeatureExtractor):
        model = model.model
    if not isinstance(model, DenseNet):
        raise ValueError(f"expected a densenet.DenseNet, got {type(model).__name__}")
    return model
