"""The model every command runs: :func:`load_model` loads our checkpoint, or a named model with
weights, for inference (``predict``, ``eval``, ``export``, ``bench``, ``visualize``).

It returns the model in eval mode and a :class:`ModelInfo` with what inference needs: class
names, normalization, input size, crop and interpolation, taken from the checkpoint's metadata,
else from the model's weights entry (``pretrained_cfg``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from densenet.catalog import default_class_names
from densenet.data import dataset_info, eval_transform
from densenet.factory import create_model
from densenet.io import CheckpointError, folder_reason, read_metadata
from densenet.models import DenseNet
from densenet.multilabel import DEFAULT_THRESHOLD, TASKS


@dataclass
class ModelInfo:
    """What inference needs besides the weights. ``input_size`` is ``(C, H, W)``.

    ``mean``/``std`` are None when neither the checkpoint nor the weights entry knows them; the
    caller then takes the dataset's (see :meth:`transform`). ``task`` is ``"multiclass"``
    (softmax over ``class_names``) or ``"multilabel"`` (a sigmoid per label); ``thresholds`` the
    per-label operating points a multi-label checkpoint stores, as
    :meth:`densenet.multilabel.ThresholdFit.to_dict` writes them (None when it stores none).
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
    data_dir: str | None = field(default=None, compare=False)  # where the training run read it
    holdout: str | None = field(default=None, compare=False)  # its held-out part's fingerprint
    split_by: str | None = field(default=None, compare=False)  # how it dealt a labels file
    seed: int | None = field(default=None, compare=False)
    task: str = "multiclass"
    thresholds: dict | None = None

    def label_thresholds(self) -> list[float]:
        """One decision threshold per label, in ``class_names`` order: the stored ones, else
        :data:`~densenet.multilabel.DEFAULT_THRESHOLD` for every label."""
        if self.thresholds is None:
            return [DEFAULT_THRESHOLD] * len(self.class_names)
        return [float(self.thresholds["thresholds"][name]) for name in self.class_names]

    def threshold_summary(self) -> dict:
        """The thresholds in ``ThresholdFit.to_dict`` form: the stored ones, else the default
        for every label (``method`` "default", each label in ``defaulted`` with the reason)."""
        if self.thresholds is not None:
            return self.thresholds
        names = self.class_names
        return dict(
            method="default",
            thresholds=dict.fromkeys(names, DEFAULT_THRESHOLD),
            scores=dict.fromkeys(names),
            defaulted=dict.fromkeys(names, "the checkpoint stores no thresholds"),
        )

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
                "'mean'/'std' metadata and names no known dataset; give --mean and --std"
            )
        return eval_transform(
            self.input_size, mean, std, self.crop_pct, self.interpolation, ten_crop=ten_crop
        )


def _checkpoint_metadata(path: Path) -> dict:
    """The JSON metadata of our safetensors file; {} for other files (create_model explains)."""
    if path.is_dir():
        raise CheckpointError(f"{path}: {folder_reason(path)}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return read_metadata(path)


def _normalization(meta: dict) -> dict:
    """mean/std a checkpoint was trained with: its own metadata, else its dataset's, else none."""
    saved = {**(meta.get("pretrained_cfg") or {}), **meta}
    if saved.get("mean") and saved.get("std"):
        return dict(mean=saved["mean"], std=saved["std"])
    if meta.get("dataset"):
        stats = dataset_info(meta["dataset"])
        return dict(mean=stats.mean, std=stats.std)
    return dict(mean=None, std=None)


def _task_and_thresholds(cfg: dict, class_names: list[str], source: str) -> dict:
    """The checkpoint's ``task`` (absent: multiclass) and its ``thresholds``, checked against
    its label names: a threshold for another label set would silently decide wrong."""
    task = cfg.get("task") or "multiclass"
    if task not in TASKS:
        raise CheckpointError(f"{source}: unknown task {task!r}; expected one of {TASKS}")
    stored = cfg.get("thresholds")
    if stored is None:
        return dict(task=task, thresholds=None)
    values = stored.get("thresholds") if isinstance(stored, dict) else None
    if task != "multilabel" or not isinstance(values, dict) or set(values) != set(class_names):
        raise CheckpointError(
            f"{source}: its stored thresholds do not match its {task} labels "
            f"({len(class_names)} names); re-fit them with densenet eval --fit-thresholds-on val"
        )
    return dict(task=task, thresholds=stored)


def _model_info(model: DenseNet, cfg: dict, source: str) -> ModelInfo:
    """:class:`ModelInfo` from a config dict (pretrained_cfg keys, our checkpoint metadata)."""
    num_classes = model.num_classes
    class_names = list(cfg.get("class_names") or default_class_names(num_classes))
    if len(class_names) != num_classes:
        raise CheckpointError(
            f"{source}: {len(class_names)} class names for a {num_classes}-class classifier"
        )
    size = cfg.get("input_size") or (model.in_chans, 224, 224)

    def as_tuple(value):
        return tuple(value) if value is not None else None

    return ModelInfo(
        name=getattr(model, "model_name", None),
        class_names=class_names,
        input_size=(model.in_chans, int(size[-2]), int(size[-1])),
        mean=as_tuple(cfg.get("mean")),
        std=as_tuple(cfg.get("std")),
        crop_pct=float(cfg.get("crop_pct") or 1.0),
        interpolation=cfg.get("interpolation") or "bilinear",
        dataset=cfg.get("dataset"),
        source=source,
        data_dir=cfg.get("data_dir"),
        holdout=cfg.get("holdout"),
        split_by=cfg.get("split_by"),
        seed=cfg.get("seed"),
        **_task_and_thresholds(cfg, class_names, source),
    )


def load_model(
    checkpoint: str | Path | None = None,
    name: str | None = None,
    pretrained: bool | str | Path | None = None,
    device: str | torch.device = "cpu",
    model_args: dict | None = None,
) -> tuple[DenseNet, ModelInfo]:
    """The model in eval mode on ``device`` and its :class:`ModelInfo`.

    Either ``checkpoint`` (a weights file or training checkpoint of ours, whose metadata names
    the architecture) or ``name`` with optional ``pretrained`` (tag, file, URL or True) and
    ``model_args`` (DenseNet keyword arguments overriding the name's).
    """
    if (checkpoint is None) == (name is None):
        raise ValueError("give either a checkpoint (--checkpoint PATH) or a model (--model NAME)")
    if checkpoint is not None:
        path = Path(checkpoint)
        meta = _checkpoint_metadata(path)
        model = create_model(pretrained=path)  # its architecture, in_chans included
        # The zoo's crop describes its ImageNet weights, not how a run evaluated: unless the file
        # says otherwise, use densenet train's default (crop_pct 1, bilinear).
        cfg = {
            **model.pretrained_cfg,
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            **(meta.get("pretrained_cfg") or {}),
            **meta,
            **_normalization(meta),
        }
        source = f"{path} ({meta.get('model') or 'custom architecture'})"
    else:
        model = create_model(name, pretrained=pretrained, **(model_args or {}))
        cfg = model.pretrained_cfg
        weights = {True: "default weights", None: "random weights", False: "random weights"}.get(
            pretrained, f"weights {pretrained}"
        )
        source = f"{name} ({weights})"
    return model.to(device).eval(), _model_info(model, cfg, source)
