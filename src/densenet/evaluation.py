"""Classification metrics and the evaluation loop: top-k accuracy, loss, per-class accuracy,
confusion matrix, single-crop and ten-crop (the paper's ImageNet table); for multi-label models
the sigmoid outputs over a split, per-label AUROC, average precision, and sensitivity and
specificity at per-label thresholds.

The loop takes any model and any ``DataLoader`` yielding ``(images, targets)``. Images are
``(N, C, H, W)`` for one crop or ``(N, crops, C, H, W)`` for multi-crop; with several crops the
softmax is averaged over them, as in the paper's 10-crop numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from densenet.multilabel import apply_thresholds, multilabel_metrics
from densenet.progress import progress as report_progress
from densenet.runtime import DistEnv, all_reduce_sum


def topk_correct(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> list[int]:
    """How many of the ``N`` rows of ``logits`` ``(N, K)`` have the target among their top k.

    A k larger than the number of classes counts every row as correct.
    """
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices  # (N, max_k), best first
    hits = top.eq(targets[:, None])
    return [int(hits[:, : min(k, max_k)].any(dim=1).sum()) for k in ks]


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts; row = true class, column = predicted class."""
    flat = targets.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Recall of each class in % (diagonal over row sum); None for a class with no samples."""
    totals = confusion.sum(dim=1).tolist()
    correct = confusion.diag().tolist()
    return [100.0 * c / t if t else None for c, t in zip(correct, totals, strict=True)]


def shows_top5(num_classes: int) -> bool:
    """Is top-5 accuracy worth printing? Not with 5 classes or fewer, where it is always 100%
    (it stays in the JSON and metrics files, whose keys do not change with the data)."""
    return num_classes > 5


@dataclass
class EvalResult:
    """Metrics over ``images`` samples: accuracies in %, ``loss`` = mean cross-entropy (nats)."""

    top1: float
    top5: float
    loss: float
    images: int
    confusion: torch.Tensor
    class_names: list[str] = field(default_factory=list)
    crops: int = 1

    @property
    def per_class(self) -> list[float | None]:
        return per_class_accuracy(self.confusion)

    def to_dict(self) -> dict:
        """JSON-ready summary, with per-class accuracy keyed by class name and the raw matrix."""
        names = self.class_names or [str(i) for i in range(self.confusion.shape[0])]
        return dict(
            top1=self.top1,
            top5=self.top5,
            loss=self.loss,
            images=self.images,
            crops=self.crops,
            per_class=dict(zip(names, self.per_class, strict=True)),
            confusion=self.confusion.tolist(),
        )


def _output_width(model: nn.Module) -> int:
    """The number of classes of a (DDP-wrapped) model that declares it, for a rank that ran no
    batch to see its output."""
    classes = getattr(getattr(model, "module", model), "num_classes", None)
    if not classes:
        raise ValueError(
            "this process got no evaluation images and the model does not declare num_classes; "
            "pass num_classes to evaluate"
        )
    return int(classes)


def _sample_count(loader: Iterable) -> int | None:
    """Images a loader yields (this rank's share under DDP), when it can tell."""
    try:
        return len(loader.sampler)
    except (AttributeError, TypeError):
        return None


@dataclass
class _Tally:
    """Running sums of an evaluation: summed cross-entropy (nats), top-1/top-5 hits, images and
    the confusion matrix (made at the first batch, when the number of classes is known)."""

    loss: float = 0.0
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.long))
    images: int = 0
    confusion: torch.Tensor | None = None

    def add(self, log_probs: torch.Tensor, targets: torch.Tensor, num_classes: int | None) -> None:
        """Count one batch: ``log_probs (N, K)`` against ``targets (N,)``."""
        classes = num_classes or log_probs.shape[1]
        if self.confusion is None:
            self.confusion = torch.zeros(classes, classes, dtype=torch.long)
        if int(targets.max()) >= classes or int(targets.min()) < 0:
            raise ValueError(
                f"the data has label {int(targets.max())} but the model predicts {classes} classes; "
                "evaluate on the dataset the model was trained for"
            )
        self.loss += float(nn.functional.nll_loss(log_probs, targets, reduction="sum"))
        self.correct += torch.tensor(topk_correct(log_probs, targets, (1, 5)))
        self.confusion += confusion_matrix(log_probs.argmax(dim=1), targets, classes).cpu()
        self.images += len(targets)

    def sum_over_ranks(self, env: DistEnv, device: torch.device) -> None:
        """Replace this rank's sums by those of all ranks (nccl reduces GPU tensors only)."""
        totals = torch.tensor([self.loss, *self.correct.tolist(), self.images], dtype=torch.float64)
        totals = all_reduce_sum(totals.to(device), env).cpu()
        self.loss, self.correct, self.images = float(totals[0]), totals[1:3].long(), int(totals[3])
        self.confusion = all_reduce_sum(self.confusion.to(device), env).cpu()


def _log_probs(
    model: nn.Module,
    inputs: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager],
    channels_last: bool,
) -> torch.Tensor:
    """Log-softmax ``(N, K)`` of a batch ``(N, C, H, W)``, or of ``(N, crops, C, H, W)`` with the
    softmax averaged over the crops (``log mean exp``)."""
    log_probs = _crop_logits(model, inputs, autocast, channels_last).log_softmax(dim=2)
    return log_probs.logsumexp(dim=1) - math.log(log_probs.shape[1])


def _batches_with_progress(loader: Iterable, progress: bool) -> Iterable:
    """``loader``'s batches, counted in images on the progress bar or lines when ``progress``."""
    return report_progress(
        loader,
        total=_sample_count(loader),
        desc="eval",
        size=lambda batch: len(batch[1]),
        enabled=progress,
    )


def _crop_logits(
    model: nn.Module,
    inputs: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager],
    channels_last: bool,
) -> torch.Tensor:
    """float32 logits ``(N, crops, K)`` of ``(N, C, H, W)`` (one crop) or ``(N, crops, C, H, W)``."""
    crops = inputs.shape[1] if inputs.dim() == 5 else 1
    flat = inputs.flatten(0, 1) if inputs.dim() == 5 else inputs
    if channels_last:
        flat = flat.contiguous(memory_format=torch.channels_last)
    with autocast():
        logits = model(flat).float()
    return logits.view(len(inputs), crops, -1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    channels_last: bool = False,
    env: DistEnv | None = None,
) -> EvalResult:
    """Run ``model`` in eval mode over ``loader`` and collect the metrics.

    Multi-crop batches ``(N, crops, C, H, W)`` are scored by the mean of the per-crop softmax; the
    loss is then ``-log`` of the averaged probability of the target (plain cross-entropy for one
    crop). ``num_classes`` defaults to the model's output width. ``transform`` preprocesses each
    batch on the device (the training loop's uint8 batches); with ``env`` of a DDP job each rank
    scores its own share of the data and the counts are summed over the ranks.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    tally, crops = _Tally(), 1
    batches = _batches_with_progress(loader, progress)
    for inputs, targets in batches:
        inputs = inputs.to(device, non_blocking=True)
        targets = torch.as_tensor(targets).to(device).long()
        if transform is not None:
            inputs = transform(inputs)
        crops = inputs.shape[1] if inputs.dim() == 5 else 1
        tally.add(_log_probs(model, inputs, autocast, channels_last), targets, num_classes)
    model.train(was_training)
    if env is not None and env.enabled:
        if tally.confusion is None:  # this rank's share was empty; the others still need zeros
            classes = num_classes or _output_width(model)
            tally.confusion = torch.zeros(classes, classes, dtype=torch.long)
        tally.sum_over_ranks(env, device)
    confusion = tally.confusion
    if tally.images == 0 or confusion is None:
        raise ValueError("the evaluation data is empty; check the dataset path, split and --limit")
    top1, top5 = (100.0 * int(c) / tally.images for c in tally.correct)
    names = list(class_names) if class_names is not None else []
    if names and len(names) != confusion.shape[0]:
        raise ValueError(f"{len(names)} class names given for a {confusion.shape[0]}-class model")
    loss = tally.loss / tally.images
    return EvalResult(top1, top5, loss, tally.images, confusion, names, crops)


# --- multi-label --------------------------------------------------------------------------------
@torch.no_grad()
def collect_probabilities(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device = "cpu",
    progress: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A multi-label model's sigmoid outputs over ``loader`` (one process).

    ``loader`` yields ``(images, targets)`` with multi-hot ``targets`` ``(N, L)``; images are
    ``(N, C, H, W)`` or ``(N, crops, C, H, W)`` (the probabilities are then averaged over the
    crops). Returns ``(probabilities (N, L), targets (N, L), crops)``, float32 on the CPU.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    batches = _batches_with_progress(loader, progress)
    probabilities, targets, crops = [], [], 1
    for inputs, labels in batches:
        inputs = inputs.to(device, non_blocking=True)
        logits = _crop_logits(model, inputs, autocast, channels_last)
        crops = logits.shape[1]
        probabilities.append(logits.sigmoid().mean(dim=1).cpu())
        targets.append(torch.as_tensor(labels).float().cpu())
    model.train(was_training)
    if not probabilities:
        raise ValueError("the evaluation data is empty; check the dataset path, split and --limit")
    probabilities, targets = torch.cat(probabilities), torch.cat(targets)
    if targets.dim() != 2 or targets.shape[1] != probabilities.shape[1]:
        raise ValueError(
            f"the data has targets of shape {tuple(targets.shape[1:])} but the model predicts "
            f"{probabilities.shape[1]} labels; evaluate on the dataset the model was trained for"
        )
    return probabilities, targets, crops


def sensitivity_specificity(
    decisions: torch.Tensor, targets: torch.Tensor
) -> tuple[list[float | None], list[float | None]]:
    """Per label: the fraction of positives called positive (sensitivity, recall) and of
    negatives called negative (specificity), from bool ``decisions`` and 0/1 ``targets``
    ``(N, L)``; None for a label without positives (or negatives)."""
    present = targets.bool()
    positives, negatives = present.sum(0).tolist(), (~present).sum(0).tolist()
    true_positives = (decisions & present).sum(0).tolist()
    true_negatives = (~decisions & ~present).sum(0).tolist()
    sensitivity = [tp / p if p else None for tp, p in zip(true_positives, positives, strict=True)]
    specificity = [tn / n if n else None for tn, n in zip(true_negatives, negatives, strict=True)]
    return sensitivity, specificity


@dataclass
class MultilabelResult:
    """A multi-label evaluation: ``metrics`` as :func:`densenet.multilabel.multilabel_metrics`
    returns them, the ``thresholds`` used (``ThresholdFit.to_dict`` form plus ``source``), and
    per-label sensitivity and specificity at those thresholds (fractions in [0, 1])."""

    metrics: dict
    thresholds: dict
    sensitivity: dict[str, float | None]
    specificity: dict[str, float | None]
    images: int
    crops: int = 1

    def to_dict(self) -> dict:
        """JSON-ready: ``auroc``, ``mean_auroc``, ``average_precision``, ``map``, ``positives``,
        ``undefined``, ``thresholds``, ``sensitivity``, ``specificity``, ``images``, ``crops``."""
        return dict(
            task="multilabel",
            images=self.images,
            crops=self.crops,
            **self.metrics,
            thresholds=self.thresholds,
            sensitivity=self.sensitivity,
            specificity=self.specificity,
        )


def multilabel_result(
    probabilities: torch.Tensor,
    targets: torch.Tensor,
    class_names: Sequence[str],
    thresholds: dict,
    crops: int = 1,
) -> MultilabelResult:
    """Metrics of ``probabilities`` against multi-hot ``targets`` ``(N, L)``, and the decisions
    at ``thresholds`` (``{"thresholds": {name: value}, ...}``, one per name)."""
    names = list(class_names)
    metrics = multilabel_metrics(probabilities, targets, names)
    values = [float(thresholds["thresholds"][name]) for name in names]
    sensitivity, specificity = sensitivity_specificity(
        apply_thresholds(probabilities, values), targets
    )
    return MultilabelResult(
        metrics,
        thresholds,
        dict(zip(names, sensitivity, strict=True)),
        dict(zip(names, specificity, strict=True)),
        images=len(targets),
        crops=crops,
    )
