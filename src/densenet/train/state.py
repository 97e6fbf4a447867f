"""Where a run stands and what it is: :class:`TrainState` (what the loop changes and a checkpoint
keeps), :class:`Run` (what stays fixed), and the checkpoint written from and restored into them.

A checkpoint (``checkpoints/{last,best}.safetensors``, atomic) holds the model, optimizer,
schedule, EMA, grad scaler, every rank's RNG states, epoch, step and the epoch's running totals;
with weight EMA, ``best``'s ``model`` holds the EMA weights that scored best.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import densenet
from densenet import runtime
from densenet.config import TrainConfig
from densenet.hub.loading import mismatch_report
from densenet.io import save_state
from densenet.runtime import SEED_STRIDE, DistEnv
from densenet.train.errors import TrainingError
from densenet.train.inputs import RunData
from densenet.train.model import ModelEma, build_model, model_line
from densenet.train.optim import build_optimizer, lr_at, set_hyperparameters
from densenet.train.rng import rng_state, seed_everything, set_rng_state
from densenet.train.run_dir import RunDir


@dataclass
class Run:
    """What stays fixed while a run trains: its settings, processes, data, files and loss."""

    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    data: RunData
    dir: RunDir
    log: Callable[[str], None]  # prints on rank 0 only
    progress: bool  # progress bar or lines
    autocast: Callable  # a fresh autocast context per forward (a null one without amp)
    criterion: nn.Module

    @property
    def steps_per_epoch(self) -> int:
        return self.data.steps_per_epoch


@dataclass
class EpochTotals:
    """The current epoch's training totals over all ranks: summed loss (per image), correct
    top-1 predictions and images."""

    loss_sum: float = 0.0
    correct: int = 0
    images: int = 0

    def add(self, loss_sum: float, correct: float, images: float) -> None:
        self.loss_sum += loss_sum
        self.correct += int(correct)
        self.images += int(images)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    @property
    def top1(self) -> float:
        return 100 * self.correct / max(self.images, 1)


@dataclass
class TrainState:
    """What the loop changes, and a checkpoint keeps, as a run trains."""

    model: nn.Module
    ddp: nn.Module  # the model in DistributedDataParallel (``model`` itself in one process)
    forward: Callable  # ``ddp``, compiled when configured: what a step calls
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done
    epoch_step: int = 0  # steps done in the current epoch
    best_top1: float = -1.0  # the best validation top-1 so far (%)
    best_mean_auroc: float = -1.0  # multilabel: the best validation mean AUROC so far
    # multilabel: the per-label thresholds fitted at the last validation (ThresholdFit.to_dict)
    thresholds: dict | None = None
    totals: EpochTotals = field(default_factory=EpochTotals)

    @property
    def evaluated(self) -> nn.Module:
        """The weights validation scores: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model


def build_state(
    cfg: TrainConfig,
    run_data: RunData,
    env: DistEnv,
    device: torch.device,
    log: Callable,
    resumed: bool = False,
) -> TrainState:
    """A new run's state: the configured model (logged), its optimizer, grad scaler and EMA.
    Rank 0 of a new run says where its data differ from the pretrained weights'."""
    compared_data = run_data.info if env.is_main and not resumed else None
    # A resumed run's checkpoint holds every weight: the file it started from is not read again
    # (it may have moved since).
    built = dataclasses.replace(cfg, pretrained=None) if resumed else cfg
    model = build_model(built, run_data.num_classes, run_data.info.in_chans, compared_data)
    model = model.to(device)
    log(model_line(model, cfg))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp = runtime.wrap_model(model, env, device, cfg.sync_bn)  # ``model`` itself if one process
    return TrainState(
        model=model,
        ddp=ddp,
        forward=torch.compile(ddp) if cfg.compile else ddp,
        optimizer=build_optimizer(cfg, model),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
        ema=ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None,
    )


def save_checkpoint(
    state: TrainState, run: Run, path: Path, weights: nn.Module | None = None
) -> None:
    """Write ``state`` (with ``weights`` as its model, if given) to ``path``. Every rank calls
    this (the RNG states are gathered); rank 0 writes."""
    rngs = runtime.gather_objects(rng_state(), run.env)
    if run.env.is_main:
        step, cfg = state.step, run.cfg
        tree = {
            "model": (weights or state.model).state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": {
                "name": cfg.schedule,
                "step": step,
                "lr": lr_at(cfg, step, run.steps_per_epoch),
            },
            "scaler": state.scaler.state_dict(),
            "rng": rngs[0],
            "epoch": state.epoch,
            "step": step,
            "epoch_step": state.epoch_step,
            "train_sums": [state.totals.loss_sum, state.totals.correct, state.totals.images],
            "best_top1": state.best_top1,
            "best_mean_auroc": state.best_mean_auroc,
            "thresholds": state.thresholds,
        }
        if run.env.enabled:
            tree["rng_ranks"] = rngs
        if state.ema is not None:
            tree["ema"] = state.ema.module.state_dict()
        meta = {**_metadata(state.model, run), "epoch": state.epoch}
        if state.thresholds is not None:
            meta["thresholds"] = state.thresholds
        save_state(path, tree, meta)
    runtime.barrier(run.env)  # no rank exits before the file is complete


def _metadata(model: nn.Module, run: Run) -> dict:
    """What a checkpoint says about its model and data (read by ``create_model``, predict, ...)."""
    info = run.data.info
    return {
        "model": model.model_name,
        "model_config": model.config,
        "dataset": info.name,
        # Absolute, so densenet eval finds the data from any directory; null: the default place.
        "data_dir": str(Path(run.cfg.data_dir).resolve()) if run.cfg.data_dir else None,
        "num_classes": run.data.num_classes,
        "class_names": list(info.class_names),
        "task": run.data.task,
        "mean": list(info.mean),
        "std": list(info.std),
        "input_size": list(run.data.input_size),
        "crop_pct": run.cfg.crop_pct,
        "interpolation": run.cfg.interpolation,
        "holdout": run.data.holdout,
        # A single labels file is dealt into splits by these: eval deals it the same way.
        "split_by": run.cfg.split_by,
        "seed": run.cfg.seed,
        "densenet_version": densenet.__version__,
    }


def restore(state: TrainState, saved: dict, run: Run) -> None:
    """Continue from checkpoint ``saved`` (read from ``run.dir.last``): weights, optimizer,
    scaler, EMA, counters and every RNG; the hyperparameters in force are ``run.cfg``'s."""
    mismatch = mismatch_report(state.model, saved["model"])
    if mismatch:
        raise TrainingError(
            f"{run.dir.last} does not fit the configured model ({mismatch}); resume with the "
            "run's own model and model_args"
        )
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    set_hyperparameters(state.optimizer, run.cfg)  # the settings in force now, not the saved ones
    if saved["scaler"] and state.scaler.is_enabled():  # amp: fp16 may be new in this part
        state.scaler.load_state_dict(saved["scaler"])
    if state.ema is not None and "ema" in saved:
        state.ema.module.load_state_dict(saved["ema"])
    state.epoch, state.step, state.epoch_step = saved["epoch"], saved["step"], saved["epoch_step"]
    state.best_top1, state.totals = saved["best_top1"], EpochTotals(*saved["train_sums"])
    # Checkpoints written before multi-label training lack these.
    state.best_mean_auroc = saved.get("best_mean_auroc", -1.0)
    state.thresholds = saved.get("thresholds")
    rngs = saved.get("rng_ranks", [saved["rng"]])
    if len(rngs) == run.env.world_size:
        set_rng_state(rngs[run.env.rank])
    else:
        run.log(
            f"note: {run.dir.last} was written by {len(rngs)} processes and this run has "
            f"{run.env.world_size}; the data order continues exactly, the random streams restart"
        )
        seed = run.cfg.seed + run.env.rank + SEED_STRIDE * state.step
        seed_everything(seed, run.cfg.deterministic)
