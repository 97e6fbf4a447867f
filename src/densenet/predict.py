"""Load a model for inference (our checkpoint or a named model with weights) and classify images.

:func:`load_model` returns the model in eval mode and a :class:`ModelInfo` with what inference
needs: class names, normalization, input size, crop and interpolation, taken from the checkpoint's
metadata, else from the model's weights entry (``pretrained_cfg``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from densenet.data import dataset_info
from densenet.evaluation import eval_transform
from densenet.io import CheckpointError, load_state
from densenet.models import DenseNet
from densenet.zoo import create_model, get_model_spec

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order (WordNet lemmas, comma-separated)."""
    text = resources.files("densenet").joinpath("resources/imagenet_classes.txt").read_text("utf-8")
    return tuple(text.splitlines())


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet names for a 1000-class model, else the class indices as strings."""
    return (
        list(imagenet_class_names())
        if num_classes == 1000
        else [str(i) for i in range(num_classes)]
    )


@dataclass
class ModelInfo:
    """What inference needs besides the weights. ``input_size`` is ``(C, H, W)``.

    ``mean``/``std`` are None when neither the checkpoint nor the weights entry knows them; the
    caller then takes the dataset's (see :meth:`transform`).
    """

    name: str | None
    class_names: list[str]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    dataset: str | None = None
    source: str = field(default="", compare=False)

    def transform(
        self,
        ten_crop: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        """The eval transform; ``mean``/``std`` fill in only what the model does not know."""
        mean = self.mean or mean
        std = self.std or std
        if mean is None or std is None:
            raise ValueError(
                f"{self.source}: no normalization (mean/std) is known: the checkpoint has no "
                "'mean'/'std' metadata and names no known dataset"
            )
        return eval_transform(
            self.input_size, mean, std, self.crop_pct, self.interpolation, ten_crop=ten_crop
        )


def _state_dict_of(state) -> dict[str, torch.Tensor]:
    """Training checkpoints keep the weights under 'model'; weights files are the state dict."""
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        return state["model"]
    if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state
    raise CheckpointError("no model weights found (expected a state dict or a 'model' entry)")


def _model_from_checkpoint(path: Path, meta: dict, state) -> DenseNet:
    try:
        weights = _state_dict_of(state)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if "model_config" in meta:
        model = DenseNet(**meta["model_config"])
    elif "model" in meta:
        num_classes = (
            weights["classifier.weight"].shape[0] if "classifier.weight" in weights else None
        )
        model = create_model(meta["model"], num_classes=num_classes)
    else:
        raise CheckpointError(
            f"{path}: the checkpoint does not say which architecture it holds (no 'model' or "
            "'model_config' metadata); use --model NAME --pretrained PATH instead"
        )
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0:2]
        raise CheckpointError(
            f"{path}: weights do not fit the architecture ({' '.join(first)})"
        ) from None
    return model


def _info_from_cfg(
    model: nn.Module, name: str | None, cfg: dict, meta: dict, source: str
) -> ModelInfo:
    num_classes = model.num_classes
    class_names = list(meta.get("class_names") or default_class_names(num_classes))
    if len(class_names) != num_classes:
        raise CheckpointError(
            f"{source}: {len(class_names)} class names for a {num_classes}-class classifier"
        )
    size = meta.get("input_size") or cfg.get("input_size") or (model.in_chans, 224, 224)
    if len(size) == 2:  # (H, W)
        size = (model.in_chans, *size)

    def pick(key: str, default=None):
        value = meta.get(key, cfg.get(key, default))
        return tuple(value) if isinstance(value, list) else value

    return ModelInfo(
        name=name,
        class_names=class_names,
        input_size=(model.in_chans, int(size[-2]), int(size[-1])),
        mean=pick("mean"),
        std=pick("std"),
        crop_pct=float(pick("crop_pct", 1.0)),
        interpolation=pick("interpolation", "bilinear"),
        dataset=meta.get("dataset"),
        source=source,
    )


def load_model(
    checkpoint: str | Path | None = None,
    name: str | None = None,
    pretrained: bool | str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[DenseNet, ModelInfo]:
    """The model in eval mode on ``device`` and its :class:`ModelInfo`.

    Either ``checkpoint`` (a file written by ``densenet train`` or :func:`densenet.io.save_state`
    with model metadata) or ``name`` with optional ``pretrained`` (tag, path or True).
    """
    if (checkpoint is None) == (name is None):
        raise ValueError("give either a checkpoint (--checkpoint PATH) or a model (--model NAME)")
    if checkpoint is not None:
        path = Path(checkpoint)
        state, meta = load_state(path)
        model = _model_from_checkpoint(path, meta, state)
        name = meta.get("model")
        cfg = _spec_cfg(name, model)
        # mean/std of a checkpoint come from its own metadata or its dataset, not the zoo default.
        cfg = {k: v for k, v in cfg.items() if k not in ("mean", "std")}
        if meta.get("dataset"):
            stats = dataset_info(meta["dataset"])
            cfg.update(mean=stats.mean, std=stats.std)
        info = _info_from_cfg(model, name, cfg, meta, f"{path} ({name or 'custom architecture'})")
    else:
        model = create_model(name, pretrained=pretrained)
        cfg = dict(getattr(model, "pretrained_cfg", None) or _spec_cfg(name, model))
        weights = {True: "default weights", None: "random weights", False: "random weights"}.get(
            pretrained, f"weights {pretrained}"
        )
        info = _info_from_cfg(model, name, {}, cfg, f"{name} ({weights})")
    return model.to(device).eval(), info


def _spec_cfg(name: str | None, model: nn.Module) -> dict:
    """The zoo entry's input config, or an empty dict for an unregistered architecture."""
    try:
        spec = get_model_spec(name) if name else None
    except ValueError:
        spec = None
    if spec is None:
        return {}
    return dict(
        input_size=spec.input_size, mean=spec.mean, std=spec.std, crop_pct=spec.crop_pct,
        interpolation=spec.interpolation,
    )  # fmt: skip


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


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully; a ``ValueError`` naming the file if it is not a readable image."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path}: not a readable image file ({error})") from None


@torch.no_grad()
def predict(
    model: nn.Module,
    info: ModelInfo,
    paths: Sequence[str | Path],
    topk: int = 5,
    batch_size: int = 32,
) -> list[dict]:
    """Top-``topk`` classes per image: ``[{"file", "top": [{"index", "label", "probability"}]}]``.

    Probabilities are softmax outputs in [0, 1], best first.
    """
    transform = info.transform()
    device = next(model.parameters()).device
    k = min(topk, len(info.class_names))
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        batch = torch.stack([transform(load_image(p)) for p in chunk]).to(device)
        probs = model(batch).float().softmax(dim=1)
        top = probs.topk(k, dim=1)
        for path, values, indices in zip(
            chunk, top.values.tolist(), top.indices.tolist(), strict=True
        ):
            results.append(
                dict(
                    file=str(path),
                    top=[
                        dict(index=i, label=info.class_names[i], probability=p)
                        for p, i in zip(values, indices, strict=True)
                    ],
                )
            )
    return results
