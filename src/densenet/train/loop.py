"""The training loop, top to bottom: set a run up (new, or resumed where its checkpoint left it),
then per epoch train, validate, write the metrics row and the checkpoints."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from densenet import runtime
from densenet.config import TrainConfig, save_config
from densenet.evaluation import shows_top5
from densenet.io import load_state
from densenet.messages import count
from densenet.runtime import DistEnv
from densenet.train.epoch import (
    Validation,
    autocast_factory,
    epoch_line,
    epoch_row,
    evaluate_epoch,
    resolve_amp,
    sum_over_ranks,
    train_one_epoch,
)
from densenet.train.inputs import build_data, note_validation_folder
from densenet.train.optim import build_criterion
from densenet.train.resume import check_same_data, continue_run, record_resume
from densenet.train.rng import seed_everything
from densenet.train.run_dir import METRIC_FIELDS, open_run_dir, open_tensorboard
from densenet.train.signals import StopSignal
from densenet.train.state import EpochTotals, Run, TrainState, build_state, restore, save_checkpoint

SKIPPED_NAMED = 10  # unreadable images named one by one in the log; the rest are counted


@dataclass
class RunResult:
    run_dir: Path
    epochs: int
    best_top1: float  # multiclass (%)
    final: dict  # the last metrics row
    task: str = "multiclass"
    best_mean_auroc: float = -1.0  # multilabel: the best validation mean AUROC
    num_classes: int = 0


def train(
    cfg: TrainConfig,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train ``cfg`` into a run directory (new, ``overwrite``-n, or ``resume``-d); see
    :mod:`densenet.train`. Under ``torchrun`` every process calls this; it joins (and afterwards
    leaves) the job."""
    env, device = runtime.setup(runtime.resolve_device(cfg.device))
    progress = (progress is None or progress) and env.is_main
    try:
        run, state = _start(
            cfg, env, device, resume, overwrite, progress, log if env.is_main else _quiet
        )
        try:
            return _train_epochs(run, state)
        except BaseException:
            if resume is None and env.is_main:
                run.dir.forget_failed_start()
            raise
    finally:
        runtime.cleanup(env)


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _start(
    cfg: TrainConfig,
    env: DistEnv,
    device: torch.device,
    resume: str | Path | None,
    overwrite: bool,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[Run, TrainState]:
    """The run and its state at the first step to train: its directory checked (and, resumed,
    its settings checked against the saved ones), data, model and optimizer built, and a
    checkpoint's state restored."""
    run_dir = open_run_dir(cfg, env, resume, overwrite)
    cfg, amp_line = resolve_amp(cfg, device)  # config.yaml records what auto chose
    if amp_line:
        log(amp_line)
    saved, saved_meta, previous, history = None, {}, None, []
    if resume is not None:
        saved, saved_meta = load_state(run_dir.last)
        cfg, previous, history = continue_run(run_dir, cfg, saved["epoch"], saved["step"])
    autocast = autocast_factory(cfg, device)  # an impossible amp is refused before any work
    if cfg.amp == "bf16" and not runtime.native_bf16(device):
        log(
            f"amp: bf16 on a {device.type} without native bfloat16 arithmetic is emulated: "
            "slower than float32 (--set amp=none, or amp: auto, which picks float32 here)"
        )
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)  # fewer than the cores helps on a shared machine
    # Each rank draws its own augmentation and dropout; DDP copies rank 0's initial weights.
    seed_everything(cfg.seed + env.rank, cfg.deterministic)
    run_data = build_data(cfg, device, env)
    if saved is not None:
        check_same_data(run_dir, saved_meta, run_data)
    _log_skipped(run_data.bad_images, log)
    state = build_state(cfg, run_data, env, device, log, resumed=saved is not None)
    criterion = build_criterion(cfg, run_data.task, run_data.pos_weight).to(device)
    run = Run(cfg, env, device, run_data, run_dir, log, progress, autocast, criterion)
    if saved is not None:
        restore(state, saved, run)
        record_resume(run, previous, history, state.epoch, state.step)
    elif env.is_main:
        note_validation_folder(cfg)
        run_dir.make()
        save_config(cfg, run_dir.config)
    return run, state


def _log_skipped(bad_images: list[str], log: Callable[[str], None]) -> None:
    """Name the images --skip-bad-images dropped (the first ``SKIPPED_NAMED``, then a count)."""
    for problem in bad_images[:SKIPPED_NAMED]:
        log(f"skipped {problem}")
    if len(bad_images) > SKIPPED_NAMED:
        log(f"... and {count(len(bad_images) - SKIPPED_NAMED, 'more unreadable image')}")
    if bad_images:
        log(f"skipped {count(len(bad_images), 'unreadable image')} (--skip-bad-images)")


def _train_epochs(run: Run, state: TrainState) -> RunResult:
    """Train, validate and checkpoint each epoch still to run; the result of the last."""
    cfg, env = run.cfg, run.env
    rows = run.dir.read_metrics(state.epoch)
    writer = open_tensorboard(cfg, run.dir) if env.is_main else None
    closing = contextlib.closing(writer) if writer is not None else contextlib.nullcontext()
    with StopSignal() as stop, closing:  # the event file is flushed however the run ends
        while state.epoch < cfg.epochs:
            started = time.perf_counter()
            seen = train_one_epoch(state, run, stop)
            train_time = time.perf_counter() - started
            evaluated = state.evaluated
            with stop.validating():
                result = evaluate_epoch(evaluated, run)
            state.thresholds = result.thresholds
            row = epoch_row(state, run, result, seen, train_time, started)
            state.epoch, state.epoch_step, state.totals = state.epoch + 1, 0, EpochTotals()
            improved = _note_best(state, run, result)
            rows.append(row)
            if env.is_main:  # before the checkpoint: a resume drops rows past its epoch
                run.dir.write_metrics(rows)
                if writer is not None:
                    for key in METRIC_FIELDS[1:]:
                        if key in row:  # the metrics of the run's task
                            writer.add_scalar(key, row[key], state.epoch)
            if improved:
                save_checkpoint(state, run, run.dir.best, evaluated)
            save_checkpoint(state, run, run.dir.last)
            run.log(epoch_line(row, cfg.epochs, shows_top5(run.data.num_classes)))
            (stopping,) = sum_over_ranks((stop.signum is not None,), env, run.device)
            if stopping and state.epoch < cfg.epochs:  # arrived during evaluation
                raise stop.interrupted(state, run.dir)
    return RunResult(
        run.dir.path,
        state.epoch,
        state.best_top1,
        rows[-1] if rows else {},
        run.data.task,
        state.best_mean_auroc,
        run.data.num_classes,
    )


def _note_best(state: TrainState, run: Run, result: Validation) -> bool:
    """Record the epoch's score (top-1, or mean AUROC for multilabel); is it the best so far?"""
    best = "best_mean_auroc" if run.data.task == "multilabel" else "best_top1"
    score = result.score(run.data.task)
    improved = score > getattr(state, best)
    setattr(state, best, max(getattr(state, best), score))
    return improved
