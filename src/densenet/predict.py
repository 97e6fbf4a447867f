"""Classify images: top-k classes and probabilities of a loaded model (see
:func:`densenet.loader.load_model`) for image files and folders; for a multi-label model every
label's probability and the labels at or above their thresholds; Grad-CAM overlays of the
explained classes or labels."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from densenet.data import (
    IMAGE_EXTENSIONS,
    SKIP_HINT,
    BadImageError,
    is_data_name,
    load_image,
)
from densenet.inference import model_device
from densenet.loader import ModelInfo
from densenet.multilabel import positive_labels
from densenet.progress import progress as report_progress


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named in ``inputs``; folders are searched recursively (sorted)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                # As in folder datasets: hidden files and folders (._name.jpg, .git/) are not data.
                and all(is_data_name(part) for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not found:
        raise ValueError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, inputs))}"
        )
    return found


@torch.no_grad()
def predict(
    model: nn.Module,
    info: ModelInfo,
    paths: Sequence[str | Path],
    topk: int = 5,
    batch_size: int = 32,
    skip_bad_images: bool = False,
) -> list[dict]:
    """Top-``topk`` classes per image: ``[{"file", "top": [{"index", "label", "probability"}]}]``.

    Probabilities are softmax outputs in [0, 1], best first. A multi-label model's entries hold
    sigmoid outputs: ``top`` (the ``topk`` most probable labels), ``"probabilities": {label: p}``
    with every label and ``"positive"``: the labels at or above
    :meth:`~densenet.loader.ModelInfo.label_thresholds`, most probable first. Images are decoded by
    :func:`densenet.data.load_image` (the rule training uses). A file it refuses raises its
    one-line ``ValueError``; with ``skip_bad_images`` its entry is ``{"file", "skipped": reason}``
    instead.
    """
    transform = info.transform()
    device = model_device(model)
    k = min(topk, len(info.class_names))
    results: list[dict] = []
    starts = report_progress(
        range(0, len(paths), batch_size),
        total=len(paths),
        desc="predict",
        size=lambda start: min(batch_size, len(paths) - start),
    )
    for start in starts:
        chunk = [dict(file=str(path)) for path in paths[start : start + batch_size]]
        inputs = []
        for entry in chunk:
            try:
                inputs.append(transform(load_image(entry["file"], hint=SKIP_HINT)))
            except BadImageError as error:
                if not skip_bad_images:
                    raise
                entry["skipped"] = str(error).removesuffix(f"; {SKIP_HINT}")
        results += chunk
        if not inputs:
            continue
        logits = model(torch.stack(inputs).to(device)).float()
        probs = (logits.sigmoid() if info.task == "multilabel" else logits.softmax(dim=1)).cpu()
        readable = [entry for entry in chunk if "skipped" not in entry]
        for entry, row in zip(readable, probs, strict=True):
            entry.update(_describe(row, info, k))
    return results


def _describe(probabilities: torch.Tensor, info: ModelInfo, k: int) -> dict:
    """One image's ``top`` (and, multi-label, ``probabilities`` and ``positive``) from its
    ``(K,)`` probabilities."""
    names = info.class_names
    top = probabilities.topk(k)
    described = dict(
        top=[
            dict(index=i, label=names[i], probability=p)
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
    )
    if info.task == "multilabel":
        described["probabilities"] = dict(zip(names, probabilities.tolist(), strict=True))
        described["positive"] = positive_labels(probabilities, info.label_thresholds(), names)
    return described


# --- Grad-CAM -----------------------------------------------------------------------------------
def explained_indices(entry: dict, info: ModelInfo) -> list[int]:
    """What ``--cam`` explains for one :func:`predict` entry: the top class (single-label), each
    positive label, or the most probable label when none is positive."""
    if info.task == "multilabel" and entry["positive"]:
        return [info.class_names.index(name) for name in entry["positive"]]
    return [entry["top"][0]["index"]]


def cam_on_image(cam: torch.Tensor, width: int, height: int, info: ModelInfo) -> torch.Tensor:
    """A Grad-CAM of the model's input ``(S, S)`` placed on the original ``width`` x ``height``
    image: the eval transform resized the short side to ``S / crop_pct`` and took the centre
    ``S`` x ``S``, so the map covers that square and is 0 outside it. ``(height, width)``."""
    size = cam.shape[-1]
    resized = math.floor(size / info.crop_pct)
    scale = min(width, height) / resized  # original pixels per resized pixel
    resized_width = resized if width <= height else int(resized * width / height)
    resized_height = resized if height <= width else int(resized * height / width)
    left = round(round((resized_width - size) / 2) * scale)
    top = round(round((resized_height - size) / 2) * scale)
    side = max(1, round(size * scale))
    if side != size:
        cam = F.interpolate(cam[None, None], size=(side, side), mode="bilinear")[0, 0]
    full = torch.zeros(height, width)
    rows = slice(max(top, 0), min(top + side, height))
    columns = slice(max(left, 0), min(left + side, width))
    full[rows, columns] = cam[
        rows.start - top : rows.stop - top, columns.start - left : columns.stop - left
    ]
    return full


def file_safe(name: str) -> str:
    """``name`` usable in a file name on every system: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_.") or "label"


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """Each image's stem; images whose stems repeat (``cat/001.png``, ``dog/001.png``) are named
    by their path below the folder the inputs share instead, so no overlay overwrites another."""
    stems = [path.stem for path in paths]
    repeated = {stem for stem in stems if stems.count(stem) > 1}
    if not repeated:
        return stems
    common = Path(os.path.commonpath([path.resolve().parent for path in paths]))
    return [
        file_safe(str(path.resolve().relative_to(common).with_suffix("")))
        if stem in repeated
        else stem
        for path, stem in zip(paths, stems, strict=True)
    ]


def save_cams(model: nn.Module, info: ModelInfo, results: Sequence[dict], out: str | Path) -> None:
    """Write a Grad-CAM overlay PNG per explained class or label of each :func:`predict` entry
    (:func:`explained_indices`) into ``out`` as ``<image stem>_<label>.png``, the size of the
    image; each entry gets ``"cams": {label: path}``. Skipped entries are left alone."""
    from densenet.gradcam import grad_cam, save_cam_overlay

    out = Path(out)
    device = next(model.parameters()).device
    transform = info.transform()
    readable = [entry for entry in results if "skipped" not in entry]
    stems = _unique_stems([Path(entry["file"]) for entry in readable])
    for entry, stem in zip(readable, stems, strict=True):
        image = load_image(entry["file"], hint=SKIP_HINT)
        x = transform(image).to(device)
        entry["cams"] = {}
        for index in explained_indices(entry, info):
            label = info.class_names[index]
            cam = grad_cam(model, x, index, task=info.task).cam
            placed = cam_on_image(cam, image.width, image.height, info)
            path = save_cam_overlay(image, placed, out / f"{stem}_{file_safe(label)}.png")
            entry["cams"][label] = str(path)
