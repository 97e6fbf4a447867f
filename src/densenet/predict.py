"""Classify images: top-k classes and probabilities of a loaded model (see
:func:`densenet.loader.load_model`) for image files and folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from densenet.data import (
    IMAGE_EXTENSIONS,
    SKIP_HINT,
    BadImageError,
    load_image,
)
from densenet.loader import ModelInfo
from densenet.progress import progress as report_progress


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named in ``inputs``; folders are searched recursively (sorted)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
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

    Probabilities are softmax outputs in [0, 1], best first. Images are decoded by
    :func:`densenet.data.load_image` (the rule training uses). A file it refuses raises its
    one-line ``ValueError``; with ``skip_bad_images`` its entry is ``{"file", "skipped": reason}``
    instead.
    """
    transform = info.transform()
    device = next(model.parameters()).device
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
        probs = model(torch.stack(inputs).to(device)).float().softmax(dim=1)
        top = probs.topk(k, dim=1)
        readable = [entry for entry in chunk if "skipped" not in entry]
        for entry, values, indices in zip(
            readable, top.values.tolist(), top.indices.tolist(), strict=True
        ):
            entry["top"] = [
                dict(index=i, label=info.class_names[i], probability=p)
                for p, i in zip(values, indices, strict=True)
            ]
    return results
