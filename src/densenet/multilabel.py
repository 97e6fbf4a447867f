"""Multi-label evaluation: per-label ROC curves, AUROC, average precision and decision thresholds.

Inputs are torch tensors: ``probabilities`` ``(N, L)`` (sigmoid of the logits, one column per
label) and ``targets`` ``(N, L)`` of 0/1; a 1-D pair ``(N,)`` is one label. Outputs are plain
Python floats and lists, ready for JSON. Pure torch, computed in float64 on the CPU.

The curves follow scikit-learn's definitions exactly (its ``roc_curve`` with
``drop_intermediate=False``, ``roc_auc_score`` and ``average_precision_score``): one curve point
per distinct score, so tied scores move true and false positives together; AUROC is the
trapezoid area under those points; average precision is ``sum_n (R_n - R_(n-1)) * P_n``
without interpolation. A label is predicted positive when ``probability >= threshold``.

A label whose targets hold one class only has no ROC curve: its AUROC is ``None`` with the
reason in ``undefined``, and ``mean_auroc`` averages the other labels (likewise average
precision needs one positive, ``map`` averages the labels that have it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

# What a model's outputs mean: one class per image (softmax) or independent labels (sigmoid).
TASKS = ("multiclass", "multilabel")
THRESHOLD_METHODS = ("f1", "youden")
# The operating point used for a label whose validation targets cannot fit one (one class only).
DEFAULT_THRESHOLD = 0.5
# Objectives closer than this are ties (float64 rounding); real differences are >= 1 / (4 N^2).
_SAME_OBJECTIVE = 1e-12


class RocCurve(NamedTuple):
    """Points of a ROC curve, highest threshold first; ``thresholds[0]`` is ``inf`` (the (0, 0)
    point: nothing predicted positive), then each distinct score in decreasing order."""

    fpr: list[float]
    tpr: list[float]
    thresholds: list[float]


class _Counts(NamedTuple):
    """True and false positives when predicting ``score >= thresholds[i]``, one entry per
    distinct score, decreasing; float64 tensors of the same length."""

    tps: torch.Tensor
    fps: torch.Tensor
    thresholds: torch.Tensor


# --- input checks -------------------------------------------------------------------------------
def _as_matrix(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch tensor, got {type(tensor).__name__}")
    if tensor.dim() == 1:
        tensor = tensor[:, None]
    if tensor.dim() != 2:
        raise ValueError(f"{what} must be (N,) or (N, labels), got shape {tuple(tensor.shape)}")
    return tensor.detach().to("cpu", torch.float64)


def _check_pair(probabilities: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Both as float64 ``(N, L)`` on the CPU, or a one-line ``ValueError`` saying what is wrong."""
    scores = _as_matrix(probabilities, "probabilities")
    labels = _as_matrix(targets, "targets")
    if scores.shape != labels.shape:
        raise ValueError(
            f"probabilities {tuple(scores.shape)} and targets {tuple(labels.shape)} must have the "
            "same shape: one row per image, one column per label"
        )
    if scores.shape[0] == 0:
        raise ValueError("no images: metrics need at least one row of probabilities and targets")
    if not torch.isfinite(scores).all():
        raise ValueError("probabilities contain NaN or infinity; check the model's outputs")
    if not ((labels == 0) | (labels == 1)).all():
        raise ValueError("targets must be 0 or 1 (one column per label, 1 = label present)")
    return scores, labels


def _check_names(label_names: Sequence[str] | None, count: int) -> list[str]:
    if label_names is None:
        return [str(i) for i in range(count)]
    if len(label_names) != count:
        raise ValueError(f"{len(label_names)} label names given for {count} label columns")
    return list(label_names)


# --- one label ----------------------------------------------------------------------------------
def _counts(scores: torch.Tensor, labels: torch.Tensor) -> _Counts:
    """Cumulative counts at each distinct score of a 1-D float64 ``scores`` (scikit-learn's
    ``_binary_clf_curve``): the last index of each run of equal scores after a decreasing sort."""
    order = torch.sort(scores, descending=True, stable=True).indices
    scores, labels = scores[order], labels[order]
    last_of_run = torch.nonzero(scores[1:] != scores[:-1]).flatten()
    ends = torch.cat([last_of_run, torch.tensor([scores.numel() - 1])])
    tps = torch.cumsum(labels, 0)[ends]
    fps = (ends + 1).to(torch.float64) - tps
    return _Counts(tps, fps, scores[ends])


def _one_class_reason(positives: int, count: int) -> str | None:
    if positives == 0:
        return f"no positive among {count} images"
    if positives == count:
        return f"all {count} images positive, none negative"
    return None


def roc_curve(scores: torch.Tensor, targets: torch.Tensor) -> RocCurve:
    """ROC curve of one label: ``scores`` and 0/1 ``targets`` of shape ``(N,)``.

    Raises ``ValueError`` when ``targets`` hold one class only (no curve exists).
    """
    scores, labels = _check_pair(scores, targets)
    if scores.shape[1] != 1:
        raise ValueError(f"roc_curve takes one label, (N,); got {tuple(scores.shape)}")
    fpr, tpr, thresholds = _roc(scores[:, 0], labels[:, 0])
    return RocCurve(fpr.tolist(), tpr.tolist(), thresholds.tolist())


def _roc(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(fpr, tpr, thresholds)`` as float64 tensors (see :class:`RocCurve`)."""
    reason = _one_class_reason(int(labels.sum()), labels.numel())
    if reason:
        raise ValueError(f"no ROC curve: {reason}")
    counts = _counts(scores, labels)
    zero = torch.zeros(1, dtype=torch.float64)
    fpr = torch.cat([zero, counts.fps / counts.fps[-1]])
    tpr = torch.cat([zero, counts.tps / counts.tps[-1]])
    thresholds = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), counts.thresholds])
    return fpr, tpr, thresholds


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    fpr, tpr, _ = _roc(scores, labels)
    return float(torch.trapezoid(tpr, fpr))


def _average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """``sum_n (R_n - R_(n-1)) * P_n`` over distinct thresholds, highest first, ``R_(-1) = 0``."""
    counts = _counts(scores, labels)
    precision = counts.tps / (counts.tps + counts.fps)
    recall = counts.tps / counts.tps[-1]
    recall_steps = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((recall_steps * precision).sum())


# --- every label --------------------------------------------------------------------------------
def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def multilabel_metrics(
    probabilities: torch.Tensor, targets: torch.Tensor, label_names: Sequence[str] | None = None
) -> dict:
    """Per-label AUROC and average precision, their means, and why any label has none.

    ``probabilities``, ``targets``: ``(N, L)``. Returns ``{"auroc": {name: float | None},
    "mean_auroc": float | None, "average_precision": {name: float | None}, "map": float | None,
    "positives": {name: int}, "undefined": {name: reason}}``; ``None`` where a label lacks a
    class (its reason in ``undefined``), and for a mean when no label has a value.
    """
    scores, labels = _check_pair(probabilities, targets)
    names = _check_names(label_names, scores.shape[1])
    auroc, precision, positives, undefined = {}, {}, {}, {}
    for column, name in enumerate(names):
        column_scores, column_labels = scores[:, column], labels[:, column]
        positives[name] = int(column_labels.sum())
        reason = _one_class_reason(positives[name], column_labels.numel())
        auroc[name] = None if reason else _auroc(column_scores, column_labels)
        has_positive = positives[name] > 0
        precision[name] = _average_precision(column_scores, column_labels) if has_positive else None
        if reason:
            undefined[name] = reason
    return {
        "auroc": auroc,
        "mean_auroc": _mean(list(auroc.values())),
        "average_precision": precision,
        "map": _mean(list(precision.values())),
        "positives": positives,
        "undefined": undefined,
    }


# --- thresholds ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThresholdFit:
    """Per-label operating points fitted on a validation split; positive when ``p >= value``.

    ``values[i]`` is a probability; ``scores[i]`` the F1 or Youden's J it reaches on the
    validation split (``None`` where the label could not be fitted: ``values[i]`` is then
    :data:`DEFAULT_THRESHOLD` and ``defaulted`` names the label with the reason).
    """

    method: str
    values: list[float]
    scores: list[float | None]
    defaulted: dict[str, str] = field(default_factory=dict)

    def to_dict(self, label_names: Sequence[str] | None = None) -> dict:
        """JSON-ready ``{"method", "thresholds": {name: value}, "scores": {name: score},
        "defaulted": {name: reason}}`` (names default to the column indices)."""
        names = _check_names(label_names, len(self.values))
        return {
            "method": self.method,
            "thresholds": dict(zip(names, self.values, strict=True)),
            "scores": dict(zip(names, self.scores, strict=True)),
            "defaulted": dict(self.defaulted),
        }


def _objective(counts: _Counts, positives: float, negatives: float, method: str) -> torch.Tensor:
    """F1 or Youden's J at each threshold of ``counts``."""
    if method == "f1":
        false_negatives = positives - counts.tps
        return 2 * counts.tps / (2 * counts.tps + counts.fps + false_negatives)
    return counts.tps / positives - counts.fps / negatives


def _fit_one(scores: torch.Tensor, labels: torch.Tensor, method: str) -> tuple[float, float]:
    """``(threshold, objective)``: the distinct score maximizing the objective; among equal
    maxima the highest threshold (the fewest positive calls)."""
    counts = _counts(scores, labels)
    positives = float(labels.sum())
    objective = _objective(counts, positives, labels.numel() - positives, method)
    # Equal in exact arithmetic may differ in the last bits (TPR - FPR summed in another order).
    best = int(torch.nonzero(objective >= objective.max() - _SAME_OBJECTIVE)[0])
    return float(counts.thresholds[best]), float(objective[best])


def fit_thresholds(
    probabilities: torch.Tensor,
    targets: torch.Tensor,
    method: str = "f1",
    label_names: Sequence[str] | None = None,
) -> ThresholdFit:
    """One threshold per label from validation ``probabilities`` and ``targets`` ``(N, L)``.

    ``method="f1"`` maximizes F1, ``"youden"`` maximizes Youden's J = TPR - FPR. Candidates
    are the observed probabilities (the rule is ``p >= threshold``), so the fit is exact on
    the validation split. A label with one class only keeps :data:`DEFAULT_THRESHOLD`.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {method!r}")
    scores, labels = _check_pair(probabilities, targets)
    names = _check_names(label_names, scores.shape[1])
    values, objectives, defaulted = [], [], {}
    for column, name in enumerate(names):
        column_labels = labels[:, column]
        reason = _one_class_reason(int(column_labels.sum()), column_labels.numel())
        if reason:
            values.append(DEFAULT_THRESHOLD)
            objectives.append(None)
            defaulted[name] = f"{reason} in the validation split; using {DEFAULT_THRESHOLD}"
            continue
        value, objective = _fit_one(scores[:, column], column_labels, method)
        values.append(value)
        objectives.append(objective)
    return ThresholdFit(method, values, objectives, defaulted)


def apply_thresholds(probabilities: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Decisions ``probabilities >= thresholds``: a bool tensor of the shape of
    ``probabilities`` (``(N, L)`` or ``(L,)``, the last dimension one entry per threshold)."""
    if probabilities.shape[-1] != len(thresholds):
        raise ValueError(
            f"{len(thresholds)} thresholds for {probabilities.shape[-1]} labels: the model and "
            "the thresholds must come from the same checkpoint"
        )
    cut = torch.tensor(list(thresholds), dtype=probabilities.dtype, device=probabilities.device)
    return probabilities >= cut


def positive_labels(
    probabilities: torch.Tensor, thresholds: Sequence[float], label_names: Sequence[str]
) -> list[str]:
    """Names of the labels of one image ``(L,)`` at or above their thresholds, most probable
    first."""
    if probabilities.dim() != 1:
        raise ValueError(
            f"positive_labels takes one image's (L,) probabilities, got {tuple(probabilities.shape)}"
        )
    names = _check_names(label_names, len(thresholds))
    decisions = apply_thresholds(probabilities, thresholds).tolist()
    chosen = [i for i, positive in enumerate(decisions) if positive]
    return [names[i] for i in sorted(chosen, key=lambda i: -float(probabilities[i]))]
