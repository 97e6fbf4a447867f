"""One epoch: the optimizer steps over the training loader (:func:`train_one_epoch`), then the
validation pass (:func:`evaluate_epoch`) and the epoch's metrics row.

Launched by ``torchrun``, each process trains on its strided share of every batch inside
DistributedDataParallel: ``batch_size`` is the global batch, split over the processes and
``grad_accum_steps`` micro-batches. Per step the ranks sum their loss and accuracy counts and agree
on a stop (signal or non-finite loss).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from densenet import data, multilabel, runtime
from densenet.config import TrainConfig
from densenet.evaluation import evaluate
from densenet.progress import progress
from densenet.runtime import DistEnv
from densenet.train.errors import TrainingError
from densenet.train.optim import lr_at, set_lr
from densenet.train.signals import StopSignal
from densenet.train.state import Run, TrainState, save_checkpoint


def train_one_epoch(state: TrainState, run: Run, stop: StopSignal) -> int:
    """Train the rest of epoch ``state.epoch`` (from batch ``state.epoch_step``); returns the
    images this part of the epoch trained on, over all ranks. A signal saves the step and raises
    :class:`Interrupted`; a non-finite loss stops or skips the step (``nonfinite``)."""
    cfg = run.cfg
    state.model.train()
    if cfg.freeze_backbone:
        state.model.features.eval()  # frozen BN statistics too
    data.set_epoch(run.data.train_loader, state.epoch, state.epoch_step)
    batches = _progress(
        run.data.train_loader,
        run.steps_per_epoch - state.epoch_step,
        f"epoch {state.epoch + 1}/{cfg.epochs}",
        run.progress,
    )
    started, seen = time.perf_counter(), 0
    for images, targets in batches:
        images, targets = _to_device(images, targets, run, run.data.train_transform)
        set_lr(state.optimizer, lr_at(cfg, state.step, run.steps_per_epoch))
        loss_sum, correct = _forward_backward(state, run, images, targets)
        loss_sum, correct, count, stopping = sum_over_ranks(
            (loss_sum, correct, len(targets), stop.signum is not None), run.env, run.device
        )
        if not math.isfinite(loss_sum):
            _nonfinite(loss_sum, state, run)
        else:
            _optimizer_step(state, cfg)
            state.totals.add(loss_sum, correct, count)
        state.step += 1
        state.epoch_step += 1
        seen += int(count)
        if run.progress and hasattr(batches, "set_postfix"):
            accuracy = {} if run.data.task == "multilabel" else {"acc": f"{state.totals.top1:.1f}%"}
            batches.set_postfix(
                loss=f"{state.totals.loss:.4f}",
                **accuracy,
                img_s=f"{seen / (time.perf_counter() - started):.0f}",
            )
        if stopping:
            save_checkpoint(state, run, run.dir.last)
            raise stop.interrupted(state, run.dir)
    return seen


def _forward_backward(
    state: TrainState, run: Run, images: torch.Tensor, targets: torch.Tensor
) -> tuple[float, int]:
    """Gradients of one step, micro-batch by micro-batch; returns this rank's summed loss and
    correct predictions."""
    accum = run.cfg.grad_accum_steps
    state.optimizer.zero_grad(set_to_none=True)
    loss_sum, correct = 0.0, 0
    for micro in range(accum):
        x, y = images[micro::accum], targets[micro::accum]
        # DDP averages the gradients over the ranks in the last micro-batch's backward.
        last = micro == accum - 1
        with contextlib.nullcontext() if last or state.ddp is state.model else state.ddp.no_sync():
            with run.autocast():
                logits = state.forward(x)
                loss = run.criterion(logits, y)
            state.scaler.scale(loss / accum).backward()
        loss_sum += float(loss.detach()) * len(y)
        if y.dim() == 1:  # class indices; multi-hot targets have no top-1
            correct += int((logits.argmax(1) == y).sum())
    return loss_sum, correct


def _optimizer_step(state: TrainState, cfg: TrainConfig) -> None:
    if cfg.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.ema is not None:
        state.ema.update(state.model)


def _nonfinite(loss_sum: float, state: TrainState, run: Run) -> None:
    """Stop the run naming the step (its last checkpoint stays as it is), or skip the step."""
    if run.cfg.nonfinite == "stop":
        raise TrainingError(
            f"loss is {loss_sum} at step {state.step} (epoch {state.epoch + 1}, batch "
            f"{state.epoch_step + 1}); stopped. The last good checkpoint is {run.dir.last}. "
            "Lower the lr, add grad_clip, or set nonfinite: skip"
        )
    run.log(f"skipping step {state.step}: loss is {loss_sum}")


@dataclass
class Validation:
    """One epoch's validation. multiclass: ``loss`` (cross-entropy), ``top1``/``top5`` (%);
    multilabel: ``loss`` (the training criterion), ``mean_auroc`` and ``thresholds`` fitted on
    the split (:meth:`densenet.multilabel.ThresholdFit.to_dict`). What a task lacks is NaN/None."""

    loss: float
    top1: float = math.nan
    top5: float = math.nan
    mean_auroc: float = math.nan
    thresholds: dict | None = None

    def score(self, task: str) -> float:
        """What the best checkpoint maximizes: top-1, or mean AUROC (0 when no label has one)."""
        if task != "multilabel":
            return self.top1
        return 0.0 if math.isnan(self.mean_auroc) else self.mean_auroc


def evaluate_epoch(model: nn.Module, run: Run) -> Validation:
    """``model`` scored on the validation data; every rank scores rank 0's model."""
    runtime.broadcast_buffers(model, run.env)
    if run.data.task == "multilabel":
        return _validate_multilabel(model, run)
    result = evaluate(
        model,
        run.data.val_loader,
        run.device,
        run.data.num_classes,
        transform=run.data.val_transform,
        autocast=run.autocast,
        channels_last=run.cfg.channels_last,
        env=run.env,
    )
    return Validation(result.loss, result.top1, result.top5)


@torch.no_grad()
def _validate_multilabel(model: nn.Module, run: Run) -> Validation:
    """Sigmoid probabilities of every validation image (gathered from all ranks): the loss, mean
    AUROC and per-label thresholds (``threshold_method``) of the split."""
    was_training = model.training
    model.eval()
    width = run.data.num_classes
    probabilities, targets = [torch.zeros(0, width)], [torch.zeros(0, width)]
    loss_sum = 0.0
    for images, target in run.data.val_loader:
        images, target = _to_device(images, target, run, run.data.val_transform)
        with run.autocast():
            logits = model(images).float()
        loss_sum += float(run.criterion(logits, target)) * len(target)
        probabilities.append(torch.sigmoid(logits).cpu())
        targets.append(target.cpu())
    model.train(was_training)
    shares = runtime.gather_objects((torch.cat(probabilities), torch.cat(targets)), run.env)
    probs = torch.cat([p for p, _ in shares])
    labels = torch.cat([t for _, t in shares])
    (loss_sum,) = sum_over_ranks((loss_sum,), run.env, run.device)
    names = list(run.data.info.class_names)
    names = names if len(names) == width else None
    metrics = multilabel.multilabel_metrics(probs, labels, names)
    fit = multilabel.fit_thresholds(probs, labels, run.cfg.threshold_method, names)
    mean_auroc = metrics["mean_auroc"]
    return Validation(
        loss_sum / max(len(labels), 1),
        mean_auroc=math.nan if mean_auroc is None else mean_auroc,
        thresholds=fit.to_dict(names),
    )


def epoch_row(
    state: TrainState, run: Run, result: Validation, seen: int, train_time: float, started: float
) -> dict:
    """The metrics.csv row of epoch ``state.epoch`` (before it is counted as done). A multilabel
    row has ``val_mean_auroc`` and no top-1/top-5 keys; a multiclass row the reverse (their
    columns stay empty in metrics.csv)."""
    if run.data.task == "multilabel":
        scores = {"val_mean_auroc": result.mean_auroc}
    else:
        scores = {
            "train_top1": state.totals.top1,
            "val_top1": result.top1,
            "val_top5": result.top5,
        }
    return {
        "epoch": state.epoch + 1,
        "train_loss": state.totals.loss,
        "val_loss": result.loss,
        **scores,
        "lr": lr_at(run.cfg, state.step - 1, run.steps_per_epoch),
        "img_per_s": seen / max(train_time, 1e-9),
        "time_s": time.perf_counter() - started,
    }


def epoch_line(row: dict, epochs: int, top5: bool = True) -> str:
    """The epoch's log line; ``top5``: show top-5 accuracy (:func:`shows_top5`)."""
    if "val_mean_auroc" in row:
        scores = (
            f"train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f} "
            f"mean AUROC {row['val_mean_auroc']:.4f}"
        )
    else:
        scores = (
            f"train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f}%  val loss "
            f"{row['val_loss']:.4f} top1 {row['val_top1']:.2f}%"
        )
        if top5:
            scores += f" top5 {row['val_top5']:.2f}%"
    return (
        f"epoch {int(row['epoch'])}/{epochs}  {scores}  lr {row['lr']:.4g}  "
        f"{row['img_per_s']:.0f} img/s  {row['time_s']:.1f}s"
    )


def sum_over_ranks(values: tuple, env: DistEnv, device: torch.device) -> tuple:
    """``values`` (numbers or flags) summed over the ranks: one all-reduce per step under DDP."""
    if not env.enabled:
        return values
    summed = runtime.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device), env)
    return tuple(summed.tolist())


def resolve_amp(cfg: TrainConfig, device: torch.device) -> tuple[TrainConfig, str | None]:
    """``cfg`` with ``amp: auto`` made concrete for ``device``, and a line saying what auto chose
    (None when ``amp`` was given).

    auto is bf16 where the device computes bfloat16 natively (:func:`densenet.runtime.native_bf16`:
    x86 CPUs with AVX512_BF16 or AMX, CUDA GPUs of compute capability 8.0 or above), else none
    (emulated bfloat16 is slower than float32; MPS is never bf16 here). A run resolves it once
    and records the result in its config.yaml, so its resumes keep that precision.
    """
    if cfg.amp != "auto":
        return cfg, None
    what = {"cpu": "this CPU", "cuda": "this GPU"}.get(device.type, device.type)
    if runtime.native_bf16(device):
        amp, why = "bf16", f"{what} computes bfloat16 natively; --set amp=none trains in float32"
    else:
        amp, why = "none", f"{what} has no native bfloat16: float32"
    return dataclasses.replace(cfg, amp=amp), f"amp: auto -> {amp} ({why})"


def autocast_factory(cfg: TrainConfig, device: torch.device):
    """A function giving a fresh autocast context for ``cfg.amp`` (a null one for none; auto is
    resolved for ``device`` first, see :func:`resolve_amp`)."""
    amp = resolve_amp(cfg, device)[0].amp
    if amp == "none":
        return contextlib.nullcontext
    if amp == "fp16" and device.type != "cuda":
        raise TrainingError("amp fp16 needs CUDA; use amp: bf16 on the CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _to_device(
    images: torch.Tensor, targets: torch.Tensor, run: Run, transform: data.BatchTransform | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the run's device, preprocessed there by ``transform`` when the data is
    batched."""
    images = images.to(run.device, non_blocking=True)
    targets = targets.to(run.device, non_blocking=True)
    if transform is not None:
        images = transform(images)
    if run.cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def _progress(iterable, total: int, desc: str, enabled: bool):
    """A bar in a terminal, a line every few seconds elsewhere (see densenet.progress)."""
    return progress(iterable, total=total, desc=desc, unit="batch", enabled=enabled)
