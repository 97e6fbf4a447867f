"""Pretrained weights (stub until the weights registry lands)."""

from __future__ import annotations

import sys
from dataclasses import asdict


def notice(message: str) -> None:
    print(f"densenet: {message}", file=sys.stderr)


def resolve_source(name, pretrained):
    if not pretrained:
        return None
    raise NotImplementedError("pretrained weights are not implemented yet")


def architecture_of(source):
    raise NotImplementedError


def num_classes_of(source):
    return None


def pretrained_cfg(spec, source) -> dict:
    cfg = asdict(spec)
    cfg.pop("published", None)
    return cfg


def load_pretrained(model, source) -> None:
    raise NotImplementedError
