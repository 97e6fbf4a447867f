"""The training loop: one readable function, :func:`train`, plus the pieces it is made of.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per epoch),
``curves.png`` and ``checkpoints/{last,best}.safetensors`` (atomic safetensors files: model,
optimizer, schedule, EMA, grad scaler, RNG states, epoch and step). With weight EMA the validation
numbers are the EMA weights', and ``best``'s ``model`` holds those EMA weights. ``train(config,
resume=RUN_DIR)`` continues a run exactly where its last checkpoint left it: the data order comes
from ``seed + epoch`` and every RNG is restored, so on the CPU in deterministic mode a resumed run
ends with the same weights, bit for bit, as an uninterrupted one.

A resume continues the run's own schedule: more (or fewer) ``epochs`` pin ``schedule_epochs`` to
the epochs the multistep milestones and the cosine anneal were planned over, and epochs past it
run at the schedule's final lr (refused when that is 0: ``--set schedule_epochs=N`` re-plans).
Settings that define the run (model, data, seed, batch size: :data:`FIXED_ON_RESUME`) cannot
change; any other change applies from the resumed step with a printed notice. ``config.yaml``
holds the settings in force and a ``history`` of the resumes: where each continued and what it
changed (``key: [old, new]``), so one uninterrupted run of its settings repeats a resume that
only added epochs.

SIGINT/SIGTERM save a checkpoint of the current step and raise :class:`Interrupted`; a NaN/Inf
loss stops the run naming the step (:class:`TrainingError`) and leaves the last good checkpoint.

Launched by ``torchrun``, each process trains on its strided share of every batch inside
DistributedDataParallel: ``batch_size`` is the global batch (the paper's 64 or 256), split over
the processes and ``grad_accum_steps`` micro-batches, so a recipe means the same on one GPU or
sixteen. Per step the ranks sum their loss and accuracy counts and agree on a stop (signal or
non-finite loss); rank 0 alone logs and writes; every rank's RNG state goes into the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

import densenet
from densenet import data, runtime
from densenet.config import (
    HISTORY_KEY,
    TrainConfig,
    final_lr,
    load_config,
    model_kwargs,
    model_label,
    read_yaml,
    save_config,
    validate,
)
from densenet.evaluation import evaluate
from densenet.io import atomic_write, load_state, save_state
from densenet.runtime import DistEnv
from densenet.weights import mismatch_report

METRIC_FIELDS = (
    "epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "img_per_s",
    "time_s",
)  # fmt: skip
IN_MEMORY_MAX_SIDE = 64  # folder datasets of images this small are decoded once into RAM


class TrainingError(ValueError):
    """A run that cannot start or continue; the message says why and what to do."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint of the current step was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


# --- setup --------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and numbers (storable in a state file)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },  # fmt: skip
        "python": {
            "version": version,
            "words": torch.tensor(words, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` exactly."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["words"].tolist()), p["gauss"]))


@dataclass
class Data:
    """Everything the loop needs about the data."""

    info: data.DatasetInfo
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    train_transform: data.BatchTransform | None  # batched preprocessing on the device, or None
    val_transform: data.BatchTransform | None
    input_size: tuple[int, int, int]
    skipped_images: int = 0


def _first(dataset: data.InMemoryImages | data.FolderImages, n: int | None, seed: int):
    """The first ``n`` items of a fixed shuffle of ``dataset`` (all of it for None)."""
    if n is None or n >= len(dataset):
        return dataset
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return dataset.subset(index.sort().values)


def build_data(cfg: TrainConfig, device: torch.device, env: DistEnv | None = None) -> Data:
    """Datasets and loaders of ``cfg``; small images stay uint8 in RAM and are augmented batched.

    Each loader yields this rank's share of a global batch: ``batch_size / world_size`` images.
    """
    env = env or DistEnv()
    if cfg.batch_size % (env.world_size * cfg.grad_accum_steps):
        raise TrainingError(
            f"batch_size {cfg.batch_size} must be a multiple of processes x grad_accum_steps "
            f"({env.world_size} x {cfg.grad_accum_steps}); it is the global batch of one step"
        )
    rank_batch = cfg.batch_size // env.world_size
    info = data.dataset_info(cfg.dataset, cfg.data_dir)
    datasets = []
    skipped = 0
    for split, limit in ((cfg.train_split, cfg.train_subset), (cfg.val_split, cfg.val_subset)):
        ds = data.build_dataset(
            cfg.dataset, cfg.data_dir, split, None, cfg.download, cfg.skip_bad_images
        )
        skipped += getattr(ds, "skipped", 0)
        ds = _first(ds, limit, cfg.seed)
        small = isinstance(ds, data.FolderImages) and _image_side(ds) <= IN_MEMORY_MAX_SIDE
        if isinstance(ds, data.FolderImages) and (
            cfg.in_memory or (cfg.in_memory is None and small)
        ):
            ds = ds.to_memory(info.in_chans)
        datasets.append(ds)
    train_ds, val_ds = datasets
    if len(info.class_names) != len(train_ds.classes):  # keep ImageNet's readable names
        info = _with_classes(info, train_ds.classes)
    if isinstance(train_ds, data.InMemoryImages):
        native = int(train_ds.images.shape[-1])
    else:
        native = info.input_size[-1]
    size = cfg.input_size or native
    input_size = (info.in_chans, size, size)
    loaders, transforms = [], []
    for ds, train in ((train_ds, True), (val_ds, False)):
        batched = (
            isinstance(ds, data.InMemoryImages)
            and size == ds.images.shape[-1]
            and cfg.augment in ("none", "standard")
        )
        if batched:
            transforms.append(data.BatchTransform(cfg.augment, train, info.mean, info.std))
        else:
            transforms.append(None)
            per_image = data.build_transforms(
                cfg.augment, train, info.mean, info.std, size, cfg.crop_pct, cfg.interpolation
            )
            ds.transform = per_image
        loaders.append(
            data.build_loader(
                ds,
                rank_batch,
                train,
                cfg.workers,
                cfg.seed,
                device,
                num_replicas=env.world_size,
                rank=env.rank,
            )  # fmt: skip
        )
    if len(loaders[0]) == 0:
        raise TrainingError(
            f"batch_size {cfg.batch_size} is larger than the {len(train_ds)} training images"
        )
    return Data(info, loaders[0], loaders[1], transforms[0], transforms[1], input_size, skipped)


def _image_side(ds: data.FolderImages) -> int:
    return max(ds.load(ds.samples[0][0]).size)


def _with_classes(info: data.DatasetInfo, classes) -> data.DatasetInfo:
    classes = tuple(classes)
    return dataclasses.replace(info, class_names=classes, num_classes=len(classes))


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


def set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """``cfg``'s lr, momentum, weight decay and lr scales on the groups of :func:`build_optimizer`
    (classifier first); also after loading an optimizer state, which brings the saved ones."""
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = cfg.lr
        group["momentum"] = cfg.momentum
        group["nesterov"] = cfg.nesterov and cfg.momentum > 0
        group["weight_decay"] = cfg.weight_decay
        group["lr_scale"] = 1.0 if index == 0 else cfg.backbone_lr_scale  # 0 is the classifier


def build_criterion(cfg: TrainConfig) -> nn.Module:
    """Cross-entropy with ``label_smoothing`` eps: the target puts 1 - eps on the true class and
    eps spread evenly over all K classes, so loss = (1 - eps) * NLL(true) + eps * mean_k NLL(k)."""
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


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


# --- the run directory --------------------------------------------------------------------------
class RunDir:
    """Paths and files of one run; only the main process writes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.csv"
        self.curves = self.path / "curves.png"
        self.last = self.path / "checkpoints" / "last.safetensors"
        self.best = self.path / "checkpoints" / "best.safetensors"

    def holds_run(self) -> bool:
        return any(p.exists() for p in (self.config, self.metrics, self.last, self.best))

    def clear(self) -> None:
        """Remove a previous run's files (only those a run writes)."""
        for p in (self.config, self.metrics, self.curves):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.path / "checkpoints", ignore_errors=True)

    def read_metrics(self, up_to_epoch: int) -> list[dict]:
        if not self.metrics.exists():
            return []
        with open(self.metrics, newline="") as f:
            rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        return [r for r in rows if r["epoch"] <= up_to_epoch]

    def write_metrics(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, METRIC_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row[k]) for k in METRIC_FIELDS})
        atomic_write(self.metrics, lambda f: f.write(buffer.getvalue()), mode="w")
        plot_curves(rows, self.curves)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.6g}"


def plot_curves(rows: list[dict], path: Path) -> None:
    """Loss, top-1 accuracy and learning rate by epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (
        ("loss", (("train_loss", "train"), ("val_loss", "val"))),
        ("top-1 accuracy (%)", (("train_top1", "train"), ("val_top1", "val"))),
        ("learning rate", (("lr", "lr"),)),
    )
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, label in series:
            ax.plot(epochs, [r[key] for r in rows], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{model_label(cfg)}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


# --- signals ------------------------------------------------------------------------------------
class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# --- the loop -----------------------------------------------------------------------------------
@dataclass
class RunResult:
    run_dir: Path
    epochs: int
    best_top1: float
    final: dict  # the last metrics row


def _to_device(images, targets, transform, device, channels_last):
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if transform is not None:
        images = transform(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def _autocast_factory(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext
    if cfg.amp == "fp16" and device.type != "cuda":
        raise TrainingError("amp fp16 needs CUDA; use amp: bf16 on the CPU")
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _progress(iterable, total: int, desc: str, enabled: bool):
    """A bar in a terminal, a line every few seconds elsewhere (see densenet.progress)."""
    from densenet.progress import progress

    return progress(iterable, total=total, desc=desc, unit="batch", enabled=enabled)


def train(
    cfg: TrainConfig,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train ``cfg`` into a run directory (new, ``overwrite``-n, or ``resume``-d); see the module.

    Under ``torchrun`` every process calls this; it joins (and afterwards leaves) the job.
    """
    env, device = runtime.setup(runtime.resolve_device(cfg.device))
    try:
        return _train(
            cfg, env, device, resume, overwrite,
            (progress is None or progress) and env.is_main,
            log if env.is_main else _quiet,
        )  # fmt: skip
    finally:
        runtime.cleanup(env)


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _train(
    cfg: TrainConfig,
    env: DistEnv,
    device: torch.device,
    resume: str | Path | None,
    overwrite: bool,
    progress: bool,
    log: Callable[[str], None],
) -> RunResult:
    run = RunDir(runtime.broadcast_object(resume or cfg.out or default_run_dir(cfg), env))
    if resume is None and run.holds_run():
        if not overwrite:
            raise TrainingError(
                f"run directory {run.path} already holds a run; continue it with --resume "
                f"{run.path}, replace it with --overwrite, or choose another --out"
            )
        runtime.barrier(env)  # every rank has looked before rank 0 clears
        if env.is_main:
            run.clear()
    if resume is not None and not run.last.exists():
        raise TrainingError(
            f"{run.path}: no checkpoint to resume ({run.last} is missing; the run stopped before "
            f"its first one); start it again with --out {run.path} --overwrite"
        )
    state, previous, history = None, None, []
    if resume is not None:
        state, _ = load_state(run.last)
        cfg, previous, history = continue_run(run, cfg, state["epoch"], state["step"])

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)  # fewer than the cores helps on a shared machine
    # Each rank draws its own augmentation and dropout; DDP copies rank 0's initial weights.
    seed_everything(cfg.seed + env.rank, cfg.deterministic)
    d = build_data(cfg, device, env)
    if d.skipped_images:
        log(f"skipped {d.skipped_images} unreadable images (--skip-bad-images)")
    num_classes = cfg.num_classes or d.info.num_classes
    model = build_model(cfg, num_classes, d.info.in_chans).to(device)
    log(_model_line(model, cfg))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp = runtime.wrap_model(model, env, device, cfg.sync_bn)  # ``model`` itself if one process
    forward = torch.compile(ddp) if cfg.compile else ddp
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    autocast = _autocast_factory(cfg, device)
    criterion = build_criterion(cfg)
    steps_per_epoch = len(d.train_loader)
    accum = cfg.grad_accum_steps
    metadata = {
        "model": model.model_name, "model_config": model.config, "dataset": d.info.name,
        "num_classes": num_classes, "class_names": list(d.info.class_names),
        "mean": list(d.info.mean), "std": list(d.info.std), "input_size": list(d.input_size),
        "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation,
        "densenet_version": densenet.__version__,
    }  # fmt: skip

    epoch, step, epoch_step, best_top1 = 0, 0, 0, -1.0
    sums = [0.0, 0, 0]  # train loss sum, correct, images of the current epoch (all ranks)
    if state is not None:
        mismatch = mismatch_report(model, state["model"])
        if mismatch:
            raise TrainingError(
                f"{run.last} does not fit the configured model ({mismatch}); resume with the "
                "run's own model and model_args"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_hyperparameters(optimizer, cfg)  # the settings in force now, not the saved ones
        if state["scaler"] and scaler.is_enabled():  # amp: fp16 may be new in this part
            scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        epoch, step, epoch_step = state["epoch"], state["step"], state["epoch_step"]
        best_top1, sums = state["best_top1"], list(state["train_sums"])
        rngs = state.get("rng_ranks", [state["rng"]])
        if len(rngs) == env.world_size:
            set_rng_state(rngs[env.rank])
        else:
            log(
                f"note: {run.last} was written by {len(rngs)} processes and this run has "
                f"{env.world_size}; the data order continues exactly, the random streams restart"
            )
            seed_everything(cfg.seed + env.rank + 1_000_003 * step, cfg.deterministic)
        log(f"resuming {run.path} at epoch {epoch + 1}, step {step}")
        for line in _change_notices(previous, cfg, epoch, step, steps_per_epoch):
            log(line)
        runtime.barrier(env)  # every rank has read config.yaml before rank 0 rewrites it
        if env.is_main:
            save_config(cfg, run.config, history)
    elif env.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
    rows = run.read_metrics(epoch)
    writer = _tensorboard(cfg, run.path) if env.is_main else None

    def checkpoint(path: Path, weights: nn.Module | None = None) -> None:
        """Every rank calls this (the RNG states are gathered); rank 0 writes."""
        rngs = runtime.gather_objects(rng_state(), env)
        if env.is_main:
            state = {
                "model": (weights or model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": {"name": cfg.schedule, "step": step, "lr": lr_at(cfg, step, steps_per_epoch)},
                "scaler": scaler.state_dict(),
                "rng": rngs[0],
                "epoch": epoch, "step": step, "epoch_step": epoch_step,
                "train_sums": list(sums), "best_top1": best_top1,
            }  # fmt: skip
            if env.enabled:
                state["rng_ranks"] = rngs
            if ema is not None:
                state["ema"] = ema.module.state_dict()
            save_state(path, state, {**metadata, "epoch": epoch})
        runtime.barrier(env)  # no rank exits before the file is complete

    closing = contextlib.closing(writer) if writer is not None else contextlib.nullcontext()
    with StopSignal() as stop, closing:  # the event file is flushed however the run ends
        while epoch < cfg.epochs:
            start_time = time.perf_counter()
            model.train()
            if cfg.freeze_backbone:
                model.features.eval()  # frozen BN statistics too
            data.set_epoch(d.train_loader, epoch, epoch_step)
            batches = _progress(
                d.train_loader, steps_per_epoch - epoch_step, f"epoch {epoch + 1}/{cfg.epochs}",
                progress,
            )  # fmt: skip
            seen = 0
            for images, targets in batches:
                images, targets = _to_device(
                    images, targets, d.train_transform, device, cfg.channels_last
                )
                set_lr(optimizer, lr_at(cfg, step, steps_per_epoch))
                optimizer.zero_grad(set_to_none=True)
                loss_sum, correct = 0.0, 0
                for micro in range(accum):
                    x, y = images[micro::accum], targets[micro::accum]
                    # DDP averages the gradients over the ranks in the last micro-batch's backward.
                    last = micro == accum - 1
                    with contextlib.nullcontext() if last or ddp is model else ddp.no_sync():
                        with autocast():
                            logits = forward(x)
                            loss = criterion(logits, y)
                        scaler.scale(loss / accum).backward()
                    loss_sum += float(loss.detach()) * len(y)
                    correct += int((logits.argmax(1) == y).sum())
                loss_sum, correct, count, stopping = _sum_over_ranks(
                    (loss_sum, correct, len(targets), stop.signum is not None), env, device
                )
                if not math.isfinite(loss_sum):
                    if cfg.nonfinite == "stop":
                        raise TrainingError(
                            f"loss is {loss_sum} at step {step} (epoch {epoch + 1}, batch "
                            f"{epoch_step + 1}); stopped. The last good checkpoint is {run.last}. "
                            "Lower the lr, add grad_clip, or set nonfinite: skip"
                        )
                    log(f"skipping step {step}: loss is {loss_sum}")
                else:
                    if cfg.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    if ema is not None:
                        ema.update(model)
                    sums = [sums[0] + loss_sum, sums[1] + int(correct), sums[2] + int(count)]
                step += 1
                epoch_step += 1
                seen += int(count)
                if progress and hasattr(batches, "set_postfix"):
                    elapsed = time.perf_counter() - start_time
                    batches.set_postfix(
                        loss=f"{sums[0] / max(sums[2], 1):.4f}",
                        acc=f"{100 * sums[1] / max(sums[2], 1):.1f}%",
                        img_s=f"{seen / elapsed:.0f}",
                    )
                if stopping:
                    checkpoint(run.last)
                    raise _interrupted(stop.signum or signal.SIGTERM, step, epoch, epoch_step, run)
            train_time = time.perf_counter() - start_time
            evaluated = ema.module if ema is not None else model
            runtime.broadcast_buffers(evaluated, env)  # every rank scores rank 0's model
            result = evaluate(
                evaluated, d.val_loader, device, num_classes, transform=d.val_transform,
                autocast=autocast, channels_last=cfg.channels_last, env=env,
            )  # fmt: skip
            row = {
                "epoch": epoch + 1,
                "train_loss": sums[0] / max(sums[2], 1),
                "train_top1": 100 * sums[1] / max(sums[2], 1),
                "val_loss": result.loss, "val_top1": result.top1, "val_top5": result.top5,
                "lr": lr_at(cfg, step - 1, steps_per_epoch),
                "img_per_s": seen / max(train_time, 1e-9),
                "time_s": time.perf_counter() - start_time,
            }  # fmt: skip
            epoch, epoch_step, sums = epoch + 1, 0, [0.0, 0, 0]
            improved = row["val_top1"] > best_top1
            best_top1 = max(best_top1, row["val_top1"])
            rows.append(row)
            if env.is_main:  # before the checkpoint: a resume drops rows past its epoch
                run.write_metrics(rows)
                if writer is not None:
                    for key in METRIC_FIELDS[1:]:
                        writer.add_scalar(key, row[key], epoch)
            if improved:
                checkpoint(run.best, evaluated)
            checkpoint(run.last)
            log(_epoch_line(row, cfg.epochs))
            (stopping,) = _sum_over_ranks((stop.signum is not None,), env, device)
            if stopping and epoch < cfg.epochs:  # arrived during evaluation
                raise _interrupted(stop.signum or signal.SIGTERM, step, epoch, epoch_step, run)
    return RunResult(run.path, epoch, best_top1, rows[-1] if rows else {})


def _sum_over_ranks(values: tuple, env: DistEnv, device: torch.device) -> tuple:
    """``values`` (numbers or flags) summed over the ranks: one all-reduce per step under DDP."""
    if not env.enabled:
        return values
    summed = runtime.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device), env)
    return tuple(summed.tolist())


def _interrupted(signum: int, step: int, epoch: int, epoch_step: int, run: RunDir) -> Interrupted:
    return Interrupted(
        f"{signal.Signals(signum).name} received: saved a checkpoint at step {step} (epoch "
        f"{epoch + 1}, batch {epoch_step}) to {run.last}; continue with "
        f"densenet train --resume {run.path}",
        signum,
    )


def _model_line(model: nn.Module, cfg: TrainConfig) -> str:
    """``model densenet_bc16_k12: 43,978 parameters, 1 input channel, 10 classes`` (and what
    ``model_args`` changed when the network is not the registered ``model``)."""
    from densenet.zoo import count_parameters

    built = model.model_name
    made = f" ({cfg.model} with model_args {_yaml(cfg.model_args)})" if built != cfg.model else ""
    return (
        f"model {built}{made}: {count_parameters(model):,} parameters, {model.in_chans} input "
        f"channel{'s' if model.in_chans > 1 else ''}, {model.num_classes} classes"
    )


def _epoch_line(row: dict, epochs: int) -> str:
    return (
        f"epoch {int(row['epoch'])}/{epochs}  train loss {row['train_loss']:.4f} "
        f"top1 {row['train_top1']:.2f}%  val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f}% "
        f"top5 {row['val_top5']:.2f}%  lr {row['lr']:.4g}  {row['img_per_s']:.0f} img/s  "
        f"{row['time_s']:.1f}s"
    )


def _tensorboard(cfg: TrainConfig, path: Path):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError("tensorboard: true needs pip install 'densenet[tensorboard]'") from None
    return SummaryWriter(str(path / "tensorboard"))


def resume_config(run_dir: str | Path, overrides: dict | None = None) -> TrainConfig:
    """The config saved in ``run_dir`` with ``overrides`` (e.g. more ``epochs``) applied."""
    run = RunDir(run_dir)
    if not run.config.exists():
        raise TrainingError(f"{run.path} is not a run directory (no config.yaml); check --resume")
    saved = read_yaml(run.config)
    saved.pop(HISTORY_KEY, None)
    return load_config(None, {**saved, **(overrides or {})})


# --- resuming with changed settings -------------------------------------------------------------
_MODEL = "the checkpoint holds this run's model, which does not fit another one"
_TRAIN_DATA = "it chooses the training images and their order"
_VAL_DATA = "it chooses the validation images that best_top1 compares"
# Settings a resumed run cannot change, and why; every other change applies with a notice.
FIXED_ON_RESUME = {
    "model": _MODEL, "model_args": _MODEL, "num_classes": _MODEL, "freeze_backbone": _MODEL,
    "pretrained": "it chose the starting weights, which the checkpoint has replaced",
    "dataset": _TRAIN_DATA, "train_split": _TRAIN_DATA, "train_subset": _TRAIN_DATA,
    "seed": _TRAIN_DATA, "val_split": _VAL_DATA, "val_subset": _VAL_DATA,
    "input_size": "the run trained and validated at its own input size",
    "batch_size": "it sets the steps of an epoch, by which the checkpoint counts its place",
}  # fmt: skip
SPANNING_SCHEDULES = ("multistep", "cosine")  # those whose shape depends on the epochs they span


def continue_run(
    run: RunDir, cfg: TrainConfig, epoch: int, step: int
) -> tuple[TrainConfig, TrainConfig, list[dict]]:
    """Check ``cfg`` for continuing ``run`` from its checkpoint at ``epoch`` (done) and ``step``.

    Returns ``(config, previous, history)``: the config to continue with, the one the run used
    until now (its config.yaml), and the run's history with this part appended. A changed
    ``epochs`` keeps the run's schedule: ``schedule_epochs`` is pinned to the epochs it was
    planned over. A changed setting of :data:`FIXED_ON_RESUME` raises :class:`TrainingError`
    with the reason, as do more epochs past a schedule that has reached lr 0.
    """
    values = read_yaml(run.config)
    history = list(values.pop(HISTORY_KEY, None) or [])
    previous = load_config(None, values, check_data=False)
    if (
        cfg.epochs != previous.epochs
        and cfg.schedule in SPANNING_SCHEDULES
        and cfg.schedule_epochs is None
        and previous.schedule_epochs is None
    ):
        cfg = dataclasses.replace(cfg, schedule_epochs=previous.epochs)
    changed = _changed(previous, cfg)
    refused = [k for k in changed if k in FIXED_ON_RESUME]
    if refused:
        reasons = "; ".join(f"{_show_change(k, changed[k])}: {FIXED_ON_RESUME[k]}" for k in refused)
        raise TrainingError(
            f"cannot resume {run.path} with another {reasons}. Resume with the run's own "
            f"settings, or start a new run from its weights: densenet train --pretrained "
            f"{run.last} --out NEW_DIR ..."
        )
    if epoch >= cfg.epochs:
        raise TrainingError(
            f"{run.path} already finished {epoch} epochs; raise --epochs to train further"
        )
    horizon = cfg.schedule_epochs or cfg.epochs
    if cfg.epochs > horizon and final_lr(cfg) == 0:
        floor = "--set min_lr=LR" if cfg.schedule == "cosine" else "a gamma above 0"
        raise TrainingError(
            f"{run.path}: its {cfg.schedule} schedule reaches lr 0 at the end of epoch "
            f"{horizon}, so {_epochs(max(horizon, epoch) + 1, cfg.epochs)} would not train; re-plan the "
            f"schedule over all {cfg.epochs} epochs with --set schedule_epochs={cfg.epochs} (the "
            f"lr goes up again), or give it a floor with {floor}"
        )
    validate(cfg)
    part = {"from_epoch": epoch + 1, "from_step": step, "changed": changed}
    if history and history[-1]["from_step"] == step:  # that part saved no checkpoint: one part
        merged = history.pop()["changed"]
        for key, (old, new) in changed.items():
            merged[key] = [merged.get(key, [old])[0], new]
        part["changed"] = {k: v for k, v in merged.items() if v[0] != v[1]}
    return cfg, previous, [*history, part]


def _changed(previous: TrainConfig, cfg: TrainConfig) -> dict[str, list]:
    """``{key: [old, new]}`` of the settings ``cfg`` changes (``out`` is where, not how)."""
    before, after = previous.to_dict(), cfg.to_dict()
    return {k: [before[k], after[k]] for k in after if k != "out" and before[k] != after[k]}


def _yaml(value) -> str:
    """``value`` as YAML writes it on one line: null, true, [0.5, 0.75], {depth: 40}."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).split("\n")[0]


def _show_change(key: str, change: list) -> str:
    """``lr (0.1 -> 0.05)``."""
    return f"{key} ({_yaml(change[0])} -> {_yaml(change[1])})"


def _epochs(first: int, last: int) -> str:
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


def _change_notices(
    previous: TrainConfig, cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int
) -> list[str]:
    """What a resume changes, in the user's keys, and the lr it gives the resumed step."""
    changed = _changed(previous, cfg)
    if not changed:
        return []
    lines = [
        "changed settings from here on (recorded in config.yaml): "
        + ", ".join(_show_change(k, v) for k, v in changed.items())
    ]
    horizon = cfg.schedule_epochs or cfg.epochs
    if cfg.schedule in SPANNING_SCHEDULES and {"epochs", "schedule_epochs"} & set(changed):
        if horizon == cfg.epochs:
            lines.append(f"the {cfg.schedule} lr schedule is re-planned over {horizon} epochs")
        else:
            if cfg.epochs > horizon:
                extra = _epochs(max(horizon, epoch) + 1, cfg.epochs)
                rest = f"{extra} run at its final lr {final_lr(cfg):.4g}"
            else:
                rest = f"the run stops at epoch {cfg.epochs}"
            lines.append(
                f"the {cfg.schedule} lr schedule keeps its {horizon}-epoch span (schedule_epochs: "
                f"{horizon}): {rest}; --set schedule_epochs={cfg.epochs} re-plans it over "
                f"{cfg.epochs} epochs instead"
            )
    old_lr, new_lr = lr_at(previous, step, steps_per_epoch), lr_at(cfg, step, steps_per_epoch)
    if old_lr != new_lr:
        lines.append(
            f"the lr of step {step} is {new_lr:.4g} (the run's settings gave {old_lr:.4g})"
        )
    return lines
