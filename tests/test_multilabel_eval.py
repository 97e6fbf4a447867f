"""Multi-label evaluation: the sigmoid outputs over a split, per-label AUROC / average precision
against scikit-learn, sensitivity and specificity at the thresholds a checkpoint stores or eval
fits, the ROC-curves PNG, and `densenet eval` on a multi-label checkpoint."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import save_checkpoint, tiny_model
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from densenet.evaluation import (
    collect_probabilities,
    multilabel_result,
    sensitivity_specificity,
)
from densenet.loader import load_model
from densenet.visualize import roc_curves_figure

LABELS = ["Atelectasis", "Effusion", "Pleural Thickening", "Hernia"]


class Scores(nn.Module):
    """Logits chosen per sample: the first pixel of each input is the row of ``table``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]


def scored_split(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(n, 4)`` that carry signal, and multi-hot targets; label 3 has no positive."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, 4, generator=generator) < 0.4).float()
    targets[:, 3] = 0
    logits = 1.5 * (2 * targets - 1) + 2 * torch.randn(n, 4, generator=generator)
    logits[:5, 0] = logits[5, 0]  # ties
    return logits, targets


def loader_of(logits: torch.Tensor, targets: torch.Tensor, batch: int = 7):
    ids = torch.arange(len(logits), dtype=torch.float32)[:, None, None, None].expand(-1, 1, 2, 2)
    return [(ids[i : i + batch], targets[i : i + batch]) for i in range(0, len(ids), batch)]


def test_collect_probabilities_is_the_sigmoid_in_order_and_averages_crops():
    logits, targets = scored_split()
    probabilities, seen, crops = collect_probabilities(Scores(logits), loader_of(logits, targets))
    assert crops == 1 and torch.equal(seen, targets)
    assert torch.allclose(probabilities, logits.sigmoid())
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    inputs = torch.randn(5, 3, 3, 2, 2)  # 5 images, 3 crops
    probabilities, _, crops = collect_probabilities(model, [(inputs, torch.zeros(5, 4))])
    with torch.no_grad():
        expected = model(inputs.flatten(0, 1)).sigmoid().view(5, 3, 4).mean(1)
    assert crops == 3 and torch.allclose(probabilities, expected)


def test_collect_probabilities_names_a_label_count_mismatch():
    logits, targets = scored_split()
    with pytest.raises(ValueError, match=r"targets of shape \(3,\) but the model predicts 4"):
        collect_probabilities(Scores(logits), loader_of(logits, targets[:, :3]))
    with pytest.raises(ValueError, match="empty"):
        collect_probabilities(Scores(logits), [])


def test_sensitivity_and_specificity_by_hand():
    decisions = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]]).bool()
    targets = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]]).float()
    sensitivity, specificity = sensitivity_specificity(decisions, targets)
    # label 0: positives rows 0, 2 (row 0 called); negatives rows 1, 3 (row 3 called negative)
    assert sensitivity == [0.5, None] and specificity == [0.5, 0.5]


def test_result_matches_scikit_learn_and_decides_at_the_given_thresholds():
    logits, targets = scored_split()
    probabilities = logits.sigmoid()
    thresholds = {
        "method": "f1",
        "thresholds": dict(zip(LABELS, [0.3, 0.5, 0.7, 0.5], strict=True)),
    }
    summary = multilabel_result(probabilities, targets, LABELS, thresholds).to_dict()
    for column, name in enumerate(LABELS[:3]):
        truth, scores = targets[:, column].numpy(), probabilities[:, column].numpy()
        assert summary["auroc"][name] == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
        assert summary["average_precision"][name] == pytest.approx(
            average_precision_score(truth, scores), abs=1e-12
        )
        called = scores >= thresholds["thresholds"][name]
        assert summary["sensitivity"][name] == pytest.approx(called[truth == 1].mean())
        assert summary["specificity"][name] == pytest.approx(1 - called[truth == 0].mean())
    assert summary["auroc"]["Hernia"] is None and summary["sensitivity"]["Hernia"] is None
    assert summary["mean_auroc"] == pytest.approx(
        sum(summary["auroc"][n] for n in LABELS[:3]) / 3, abs=1e-12
    )
    assert summary["thresholds"] is thresholds and summary["images"] == 60


def test_roc_figure_skips_labels_with_one_class(tmp_path):
    logits, targets = scored_split()
    path = roc_curves_figure(logits.sigmoid(), targets, LABELS, tmp_path / "roc.png", "test")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300
        assert len(image.convert("L").getcolors(maxcolors=1_000_000)) > 10


# --- densenet eval on a checkpoint -----------------------------------------------------------
def multilabel_checkpoint(path, thresholds: dict | None = None, **metadata):
    """A tiny 1-channel model with four labels, saved as a multi-label training checkpoint."""
    model = tiny_model(num_classes=len(LABELS), in_chans=1)
    stored = None
    if thresholds is not None:
        stored = {"method": "youden", "thresholds": thresholds, "scores": {}, "defaulted": {}}
    meta = dict(class_names=LABELS, task="multilabel", thresholds=stored, input_size=[1, 32, 32])
    return model, save_checkpoint(path, model, **{**meta, **metadata})


def test_a_checkpoint_keeps_its_task_and_thresholds(tmp_path):
    stored = dict(zip(LABELS, [0.1, 0.2, 0.3, 0.4], strict=True))
    _, path = multilabel_checkpoint(tmp_path / "ck.safetensors", stored)
    _, info = load_model(path)
    assert info.task == "multilabel" and info.label_thresholds() == [0.1, 0.2, 0.3, 0.4]
    _, bare = multilabel_checkpoint(tmp_path / "bare.safetensors")
    assert load_model(bare)[1].label_thresholds() == [0.5] * 4
    _, wrong = multilabel_checkpoint(tmp_path / "wrong.safetensors", {"Effusion": 0.3})
    with pytest.raises(ValueError, match="stored thresholds do not match its multilabel labels"):
        load_model(wrong)
    _, odd = multilabel_checkpoint(tmp_path / "odd.safetensors", task="regression")
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        load_model(odd)
    plain = save_checkpoint(tmp_path / "plain.safetensors", tiny_model())
    assert load_model(plain)[1].task == "multiclass"  # no task key: single-label
