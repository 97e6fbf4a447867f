"""A run's images: the training and validation datasets and loaders of a config, with their
preprocessing (batched on the device for small images held in RAM, per image otherwise)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from densenet import data
from densenet.config import TrainConfig
from densenet.messages import notice
from densenet.runtime import DistEnv
from densenet.train.errors import TrainingError

IN_MEMORY_MAX_SIDE = 64  # folder datasets of images this small are decoded once into RAM


@dataclass
class RunData:
    """Everything the loop needs about the data."""

    info: data.DatasetInfo
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    train_transform: data.BatchTransform | None  # batched preprocessing on the device, or None
    val_transform: data.BatchTransform | None
    input_size: tuple[int, int, int]
    num_classes: int  # the model's outputs: ``num_classes`` of the config, else the dataset's
    # Batches of a whole epoch (the loader's length shrinks while it resumes inside an epoch).
    steps_per_epoch: int
    skipped_images: int = 0
    # With --skip-bad-images: each skipped file and why ("<file> is not a readable image (...)").
    bad_images: list[str] = dataclasses.field(default_factory=list)
    task: str = "multiclass"  # or "multilabel": targets are multi-hot (N, L) float
    # Multilabel with pos_weight auto: each label's negatives / positives in the training data.
    pos_weight: torch.Tensor | None = None
    # A folder that holds out its validation part: the fingerprint of that part (checkpoints
    # record it; resume and eval compare it).
    holdout: str | None = None


def build_data(cfg: TrainConfig, device: torch.device, env: DistEnv | None = None) -> RunData:
    """Datasets and loaders of ``cfg``; small images stay uint8 in RAM and are augmented batched.

    Each loader yields this rank's share of a global batch: ``batch_size / world_size`` images.
    """
    env = env or DistEnv()
    if cfg.batch_size % (env.world_size * cfg.grad_accum_steps):
        raise TrainingError(
            f"batch_size {cfg.batch_size} must be a multiple of processes x grad_accum_steps "
            f"({env.world_size} x {cfg.grad_accum_steps}); it is the global batch of one step"
        )
    info = data.dataset_info(cfg.dataset, cfg.data_dir, cfg.split_by, cfg.seed, cfg.task)
    if cfg.label_smoothing and info.task == "multilabel":
        raise TrainingError(
            "label_smoothing applies to multiclass cross-entropy; this multilabel task trains with "
            "BCEWithLogitsLoss (set label_smoothing: 0)"
        )
    if cfg.pos_weight == "auto" and info.task != "multilabel":
        raise TrainingError(
            f"pos_weight auto weighs the labels of a multilabel task; {cfg.dataset} is "
            f"{info.task} here (drop pos_weight, or set task: multilabel)"
        )
    (train_ds, val_ds), bad_images = _datasets(cfg, info)
    if len(info.class_names) != len(train_ds.classes):  # keep ImageNet's readable names
        info = _with_classes(info, train_ds.classes)
    if isinstance(train_ds, data.InMemoryImages):
        native = int(train_ds.images.shape[-1])
    else:
        native = info.input_size[-1]
    size = cfg.input_size or native
    rank_batch = cfg.batch_size // env.world_size
    train_loader, train_transform = _loader(
        cfg, train_ds, True, info, size, rank_batch, env, device
    )
    val_loader, val_transform = _loader(cfg, val_ds, False, info, size, rank_batch, env, device)
    if len(train_loader) == 0:
        raise TrainingError(
            f"batch_size {cfg.batch_size} is larger than the {len(train_ds)} training images; "
            f"give a smaller --batch-size (at most {len(train_ds)})"
        )
    return RunData(
        info,
        train_loader,
        val_loader,
        train_transform,
        val_transform,
        input_size=(info.in_chans, size, size),
        num_classes=cfg.num_classes or info.num_classes,
        steps_per_epoch=len(train_loader),
        skipped_images=len(bad_images),
        bad_images=bad_images,
        task=info.task,
        pos_weight=label_pos_weight(train_ds.targets) if cfg.pos_weight == "auto" else None,
        holdout=data.holdout_digest(cfg.data_dir) if cfg.dataset == "folder" else None,
    )


def label_pos_weight(targets: torch.Tensor) -> torch.Tensor | None:
    """BCEWithLogitsLoss's ``pos_weight`` ``(L,)`` from multi-hot ``targets`` ``(N, L)``: each
    label's negatives / positives (1 for a label without positives: nothing to weigh); None for
    class-index targets."""
    targets = torch.as_tensor(targets)
    if targets.dim() != 2:
        return None
    positives = targets.sum(0)
    negatives = len(targets) - positives
    return torch.where(
        positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives)
    )


def validation_split_name(cfg: TrainConfig) -> str:
    """What a run validates on, as a user sees it: a folder's sub-folder ('val/', 'test/') or
    'held-out part'; the split name for other datasets."""
    if cfg.dataset != "folder" or not cfg.data_dir:
        return cfg.val_split
    subdir = data.split_folder(cfg.data_dir, cfg.val_split)
    return f"{subdir}/" if subdir else "held-out part"


def note_validation_folder(cfg: TrainConfig) -> None:
    """For a folder dataset, say which sub-folder picks the best checkpoint when it is not the
    one asked for, or when a test/ sub-folder stays out of training."""
    if cfg.dataset != "folder" or not cfg.data_dir:
        return
    splits = data.folder_splits(cfg.data_dir)
    used = data.split_folder(cfg.data_dir, cfg.val_split)
    if used is None:
        return
    if used != cfg.val_split:
        notice(f"{cfg.data_dir} has no {cfg.val_split}/ sub-folder: validating on {used}/")
    elif used == "val" and "test" in splits:
        notice(
            f"validating on {cfg.data_dir}/val/ (it picks the best checkpoint); test/ stays "
            "unseen: densenet eval --split test scores it"
        )
    elif used == "test" and "val" in splits:  # a paper recipe's val_split: test, on a folder
        notice(
            f"validating on {cfg.data_dir}/test/ (val_split: test), so it picks the best "
            "checkpoint and a later test score is optimistic; --set val_split=val validates on "
            "val/ and leaves test/ unseen"
        )


def _datasets(cfg: TrainConfig, info: data.DatasetInfo) -> tuple[list, list[str]]:
    """The training and validation datasets (subsets as configured, small folder images decoded
    into RAM) and the unreadable images skipped (each file and why)."""
    datasets, bad_images = [], []
    for split, limit in ((cfg.train_split, cfg.train_subset), (cfg.val_split, cfg.val_subset)):
        ds = data.build_dataset(
            cfg.dataset,
            cfg.data_dir,
            split,
            None,
            cfg.download,
            cfg.skip_bad_images,
            split_by=cfg.split_by,
            seed=cfg.seed,
            task=info.task,
        )
        bad_images += getattr(ds, "bad_images", [])
        ds = _first(ds, limit, cfg.seed)
        files = isinstance(ds, (data.FolderImages, data.LabelsFileImages))
        small = files and _image_side(ds) <= IN_MEMORY_MAX_SIDE
        if files and (cfg.in_memory or (cfg.in_memory is None and small)):
            ds = _in_memory(ds, info.in_chans, chosen=bool(cfg.in_memory))
        datasets.append(ds)
    return datasets, bad_images


def _loader(
    cfg: TrainConfig,
    ds: data.InMemoryImages | data.FolderImages,
    train: bool,
    info: data.DatasetInfo,
    size: int,
    batch_size: int,
    env: DistEnv,
    device: torch.device,
) -> tuple[torch.utils.data.DataLoader, data.BatchTransform | None]:
    """This rank's loader of ``ds`` and its batched transform (None: ``ds`` transforms each
    image itself)."""
    batched = (
        isinstance(ds, data.InMemoryImages)
        and size == ds.images.shape[-1]
        and cfg.augment in data.BATCHED_RECIPES
    )
    transform = None
    if batched:
        transform = data.BatchTransform(cfg.augment, train, info.mean, info.std)
    else:
        ds.transform = data.build_transforms(
            cfg.augment, train, info.mean, info.std, size, cfg.crop_pct, cfg.interpolation
        )
    loader = data.build_loader(
        ds,
        batch_size,
        train,
        cfg.workers,
        cfg.seed,
        device,
        num_replicas=env.world_size,
        rank=env.rank,
    )
    return loader, transform


def _first(dataset: data.InMemoryImages | data.FolderImages, n: int | None, seed: int):
    """The first ``n`` items of a fixed shuffle of ``dataset`` (all of it for None)."""
    if n is None or n >= len(dataset):
        return dataset
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return dataset.subset(index.sort().values)


def _in_memory(
    ds: data.FolderImages | data.LabelsFileImages, channels: int, chosen: bool
) -> data.InMemoryImages | data.FolderImages | data.LabelsFileImages:
    """``ds`` decoded into RAM; small images of several sizes stay read per image (resized by
    the transforms), with a notice, unless ``in_memory: true`` asked for RAM."""
    try:
        return ds.to_memory(channels)
    except data.MixedSizesError as error:
        if chosen:
            raise ValueError(
                f"{error}; in_memory: true needs one size (set in_memory: false)"
            ) from None
        notice(f"{error}: read per image and resized, not decoded into RAM once")
        return ds


def _image_side(ds: data.FolderImages | data.LabelsFileImages) -> int:
    if isinstance(ds, data.LabelsFileImages):
        return ds.image_side()
    return max(ds.load(ds.samples[0][0]).size)


def _with_classes(info: data.DatasetInfo, classes) -> data.DatasetInfo:
    classes = tuple(classes)
    return dataclasses.replace(info, class_names=classes, num_classes=len(classes))
