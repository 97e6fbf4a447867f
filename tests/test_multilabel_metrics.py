"""Multi-label metrics against scikit-learn (random and tied scores), edge cases, thresholds by
brute force."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as sk

from densenet import multilabel


def _scores_and_targets(draw, size: int, levels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``levels`` distinct score values (many ties) or continuous scores when ``None``."""
    if levels is None:
        scores = draw(st.lists(st.floats(0, 1, width=32), min_size=size, max_size=size))
    else:
        scores = [
            v / levels for v in draw(st.lists(st.integers(0, levels), min_size=size, max_size=size))
        ]
    targets = draw(st.lists(st.integers(0, 1), min_size=size, max_size=size))
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(targets)


@st.composite
def binary_problems(draw):
    size = draw(st.integers(2, 60))
    levels = draw(st.sampled_from([None, 1, 2, 3, 10]))
    scores, targets = _scores_and_targets(draw, size, levels)
    # Both classes present, so every metric is defined.
    targets[0], targets[1] = 0, 1
    return scores, targets


@settings(max_examples=150, deadline=None)
@given(binary_problems())
def test_auroc_average_precision_and_curve_match_scikit_learn(problem):
    scores, targets = problem
    report = multilabel.multilabel_metrics(scores, targets)
    assert report["auroc"]["0"] == pytest.approx(sk.roc_auc_score(targets, scores), abs=1e-12)
    expected_ap = sk.average_precision_score(targets, scores)
    assert report["average_precision"]["0"] == pytest.approx(expected_ap, abs=1e-12)
    curve = multilabel.roc_curve(scores, targets)
    fpr, tpr, thresholds = sk.roc_curve(targets, scores, drop_intermediate=False)
    assert curve.fpr == pytest.approx(fpr.tolist(), abs=1e-12)
    assert curve.tpr == pytest.approx(tpr.tolist(), abs=1e-12)
    assert curve.thresholds == thresholds.tolist()


def test_float32_scores_with_ties_and_many_labels_match_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(500, 14, generator=generator) < 0.1).int()
    # Rounded to 2 decimals: many ties, the form real sigmoid outputs take after rounding.
    probabilities = (torch.rand(500, 14, generator=generator) + 0.3 * targets).clamp(0, 1)
    probabilities = (probabilities * 100).round().float() / 100
    names = [f"finding {i}" for i in range(14)]
    report = multilabel.multilabel_metrics(probabilities, targets, names)
    expected = sk.roc_auc_score(targets.numpy(), probabilities.numpy(), average=None)
    assert list(report["auroc"].values()) == pytest.approx(expected.tolist(), abs=1e-12)
    assert report["mean_auroc"] == pytest.approx(expected.mean(), abs=1e-12)
    expected_map = sk.average_precision_score(targets.numpy(), probabilities.numpy())
    assert report["map"] == pytest.approx(expected_map, abs=1e-12)
    assert report["undefined"] == {} and list(report["auroc"]) == names
    json.dumps(report, allow_nan=False)  # plain floats, no NaN: ready for `eval --json`


def test_one_class_labels_are_reported_with_a_reason_and_left_out_of_the_means():
    probabilities = torch.tensor([[0.9, 0.2, 0.8], [0.1, 0.3, 0.4], [0.6, 0.7, 0.5]])
    targets = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 1, 0]])
    report = multilabel.multilabel_metrics(probabilities, targets, ["a", "all", "none"])
    assert report["auroc"] == {"a": 1.0, "all": None, "none": None}
    assert report["mean_auroc"] == 1.0
    assert report["undefined"] == {
        "all": "all 3 images positive, none negative",
        "none": "no positive among 3 images",
    }
    # Average precision needs a positive only: an all-positive label has precision 1 everywhere.
    assert report["average_precision"] == {"a": 1.0, "all": 1.0, "none": None}
    assert report["map"] == 1.0
    assert report["positives"] == {"a": 2, "all": 3, "none": 0}
    with pytest.raises(ValueError, match="no ROC curve: no positive among 3 images"):
        multilabel.roc_curve(probabilities[:, 2], targets[:, 2])
    only_one_class = multilabel.multilabel_metrics(probabilities[:, 1:], targets[:, 1:])
    assert only_one_class["mean_auroc"] is None


def test_constant_scores_give_chance_auroc_and_prevalence_precision():
    targets = torch.tensor([1, 0, 0, 1, 0])
    report = multilabel.multilabel_metrics(torch.full((5,), 0.3), targets)
    assert report["auroc"]["0"] == 0.5 == sk.roc_auc_score(targets, [0.3] * 5)
    assert report["average_precision"]["0"] == pytest.approx(0.4)
    assert multilabel.roc_curve(torch.full((5,), 0.3), targets).fpr == [0.0, 1.0]


@pytest.mark.parametrize(
    ("probabilities", "targets", "message"),
    [
        (torch.rand(4, 3), torch.ones(4, 2), "same shape"),
        (torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), "NaN or infinity"),
        (torch.rand(3), torch.tensor([0, 1, 2]), "targets must be 0 or 1"),
        (torch.rand(0, 2), torch.zeros(0, 2), "no images"),
        (torch.rand(2, 2, 2), torch.zeros(2, 2, 2), r"must be \(N,\) or \(N, labels\)"),
    ],
)
def test_bad_inputs_say_what_is_wrong(probabilities, targets, message):
    with pytest.raises(ValueError, match=message):
        multilabel.multilabel_metrics(probabilities, targets)


def test_label_names_must_match_the_columns():
    with pytest.raises(ValueError, match="2 label names given for 3 label columns"):
        multilabel.multilabel_metrics(torch.rand(4, 3), torch.ones(4, 3), ["a", "b"])


# --- thresholds ---------------------------------------------------------------------------------
def _brute_force(scores: list[float], targets: list[int], method: str) -> tuple[float, float]:
    """Every observed score as the cut ``p >= t``; the best objective and the highest cut
    reaching it."""
    positives = sum(targets)
    negatives = len(targets) - positives
    best = (-math.inf, None)
    for cut in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, targets, strict=True) if s >= cut and y)
        fp = sum(1 for s, y in zip(scores, targets, strict=True) if s >= cut and not y)
        fn = positives - tp
        value = 2 * tp / (2 * tp + fp + fn) if method == "f1" else tp / positives - fp / negatives
        if value > best[0] + 1e-12:
            best = (value, cut)
    return best[1], best[0]


@settings(max_examples=150, deadline=None)
@given(binary_problems(), st.sampled_from(multilabel.THRESHOLD_METHODS))
def test_fitted_threshold_is_the_brute_force_best(problem, method):
    scores, targets = problem
    fit = multilabel.fit_thresholds(scores, targets, method)
    cut, objective = _brute_force(scores.tolist(), targets.tolist(), method)
    assert fit.method == method and fit.defaulted == {}
    assert fit.scores[0] == pytest.approx(objective, abs=1e-12)
    assert fit.values[0] == cut
    decisions = multilabel.apply_thresholds(scores[:, None], fit.values)[:, 0]
    assert decisions.tolist() == [s >= cut for s in scores.tolist()]


def test_youden_threshold_matches_scikit_learn_roc_curve():
    generator = torch.Generator().manual_seed(1)
    targets = (torch.rand(300, generator=generator) < 0.4).int()
    scores = torch.rand(300, generator=generator) * 0.7 + 0.3 * targets
    fpr, tpr, thresholds = sk.roc_curve(targets, scores.double(), drop_intermediate=False)
    best = (tpr - fpr).argmax()  # the first maximum: the highest threshold, as ours
    fit = multilabel.fit_thresholds(scores[:, None], targets[:, None], "youden")
    assert fit.values == [pytest.approx(float(thresholds[best]))]
    assert fit.scores == [pytest.approx(float(tpr[best] - fpr[best]))]


def test_one_class_label_keeps_the_default_threshold_and_says_why():
    probabilities = torch.tensor([[0.9, 0.2], [0.1, 0.3], [0.6, 0.7]], dtype=torch.float64)
    targets = torch.tensor([[1, 0], [0, 0], [1, 0]])
    fit = multilabel.fit_thresholds(probabilities, targets, "f1", ["a", "rare"])
    assert fit.values == [0.6, multilabel.DEFAULT_THRESHOLD]
    assert fit.scores == [1.0, None]
    as_json = fit.to_dict(["a", "rare"])
    assert as_json["thresholds"] == {"a": 0.6, "rare": 0.5}
    assert as_json["defaulted"] == {
        "rare": "no positive among 3 images in the validation split; using 0.5"
    }
    json.dumps(as_json, allow_nan=False)


def test_unknown_threshold_method_is_refused():
    with pytest.raises(ValueError, match=r"one of \('f1', 'youden'\), got 'accuracy'"):
        multilabel.fit_thresholds(torch.rand(4), torch.tensor([0, 1, 0, 1]), "accuracy")


def test_applying_thresholds_and_naming_the_positive_labels():
    probabilities = torch.tensor([[0.2, 0.9, 0.5], [0.7, 0.1, 0.49]])
    thresholds = [0.3, 0.8, 0.5]
    assert multilabel.apply_thresholds(probabilities, thresholds).tolist() == [
        [False, True, True],
        [True, False, False],
    ]
    names = ["a", "b", "c"]
    assert multilabel.positive_labels(probabilities[0], thresholds, names) == ["b", "c"]
    assert multilabel.positive_labels(probabilities[1], thresholds, names) == ["a"]
    with pytest.raises(ValueError, match="2 thresholds for 3 labels"):
        multilabel.apply_thresholds(probabilities, thresholds[:2])
