"""Pictures: confusion matrix, ROC curves of a multi-label model, feature maps with a Grad-CAM,
the zoo's parameter-efficiency plot. Every function writes one PNG and returns its path.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot), so nothing depends on a display
or on global plotting state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter
from PIL import Image

from densenet.gradcam import grad_cam
from densenet.io import atomic_write
from densenet.models import DenseNet
from densenet.multilabel import multilabel_metrics, roc_curve

# Confusion matrices with more classes than this get no tick labels or cell numbers.
MAX_LABELLED_CLASSES = 30


def _save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: plots are written as PNG; give a file name ending in .png")
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))


def _short(name: str, width: int = 18) -> str:
    """First lemma of an ImageNet-style 'a, b, c' name, cut to ``width`` characters."""
    first = name.split(",")[0].strip()
    return first if len(first) <= width else first[: width - 1] + "…"


def confusion_matrix_figure(
    confusion: torch.Tensor,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "Confusion matrix",
) -> Path:
    """Row-normalized confusion matrix (row = true class, % of that class) as a PNG."""
    counts = confusion.double()
    rates = 100 * counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = rates.shape[0]
    labelled = n <= MAX_LABELLED_CLASSES
    side = min(4 + 0.45 * n, 16) if labelled else 9
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    if labelled:
        names = [_short(c) for c in class_names] if class_names else [str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=60, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), names)
        if n <= 15:  # numbers stay readable up to about 15 columns
            for (i, j), value in zip(
                torch.cartesian_prod(torch.arange(n), torch.arange(n)).tolist(),
                rates.flatten().tolist(),
                strict=True,
            ):
                label = f"{value:.0f}"
                if label != "0":
                    color = "white" if value > 60 else "black"
                    ax.text(j, i, label, ha="center", va="center", color=color, fontsize=8)
    accuracy = 100 * float(counts.diag().sum() / counts.sum().clamp(min=1))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\n{int(counts.sum())} images, top-1 {accuracy:.2f}%")
    return _save(fig, path)


def roc_curves_figure(
    probabilities: torch.Tensor,
    targets: torch.Tensor,
    label_names: Sequence[str],
    path: str | Path,
    title: str = "ROC curves",
) -> Path:
    """One ROC curve per label of ``probabilities`` against 0/1 ``targets`` ``(N, L)``, its
    AUROC in the legend, as a PNG; labels whose targets hold one class have no curve and are
    listed under the axes instead."""
    metrics = multilabel_metrics(probabilities, targets, label_names)
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.add_subplot()
    # tab20 pairs each color with a pale twin: only when ten distinct colors are not enough.
    palette = colormaps["tab10" if len(label_names) <= 10 else "tab20"]
    for column, name in enumerate(label_names):
        if metrics["auroc"][name] is None:
            continue
        curve = roc_curve(probabilities[:, column], targets[:, column])
        label = f"{_short(name, 24)} ({metrics['auroc'][name]:.3f})"
        ax.plot(curve.fpr, curve.tpr, color=palette(column % palette.N), label=label, linewidth=1.4)
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=0.8, label="chance (0.500)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    mean = metrics["mean_auroc"]
    summary = f"mean AUROC {mean:.3f}" if mean is not None else "no label has both classes"
    ax.set_title(f"{title}\n{len(targets)} images, {summary}")
    ax.legend(loc="lower right", fontsize=8, title="label (AUROC)", title_fontsize=8)
    ax.grid(alpha=0.3)
    if metrics["undefined"]:
        skipped = "; ".join(f"{n}: {why}" for n, why in metrics["undefined"].items())
        fig.text(0.02, 0.005, f"no curve: {skipped}", fontsize=7, wrap=True, va="bottom")
    return _save(fig, path)


def _denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(C, H, W)`` normalized -> ``(H, W, C)`` in [0, 1] for imshow (gray: ``(H, W)``)."""
    image = x.cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    image = image.clamp(0, 1).permute(1, 2, 0)
    return (image[..., 0] if image.shape[-1] == 1 else image).numpy()


def _most_active(feature_map: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` channels of ``(C, h, w)`` with the largest mean activation."""
    return feature_map.mean(dim=(1, 2)).topk(min(count, feature_map.shape[0])).indices.tolist()


@torch.no_grad()
def feature_map_figure(
    model: DenseNet,
    image: Image.Image,
    transform,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    path: str | Path,
    channels: int = 6,
    task: str = "multiclass",
) -> Path:
    """The model's view of ``image``, its top-5 classes (softmax; ``task="multilabel"``: labels
    by sigmoid), a Grad-CAM (:func:`densenet.gradcam.grad_cam`) of the top one, and the
    ``channels`` most active feature maps after each dense block (one row per block)."""
    if not model.num_classes:
        raise ValueError("a class-activation map needs the model's classifier (num_classes > 0)")
    device = next(model.parameters()).device
    x = transform(image)[None].to(device)
    model.eval()
    intermediates = model.forward_intermediates(x)
    maps = [m[0].float().cpu() for m in intermediates]
    # The head on the last block's output: grad_cam below makes the one full forward pass.
    logits = model.forward_head(intermediates[-1])[0].float().cpu()
    probs = logits.sigmoid() if task == "multilabel" else logits.softmax(0)
    cam = grad_cam(model, x, task=task).cam
    shown = _denormalize(x[0], mean, std)
    columns = max(channels, 4)
    fig = Figure(figsize=(1.9 * columns, 2.0 * len(maps) + 3.2))
    header, grid = fig.subfigures(2, 1, height_ratios=[3.2, 2.0 * len(maps)])
    top_title = "top-5 labels (each its own sigmoid)" if task == "multilabel" else "top-5 classes"
    _draw_header(header, shown, cam, probs, class_names, top_title)
    _draw_feature_maps(grid, maps, channels)
    return _save(fig, path)


def _draw_header(
    fig, shown: np.ndarray, cam: torch.Tensor, probs: torch.Tensor, class_names, top_title: str
) -> None:
    """Input image, Grad-CAM ``(H, W)`` in [0, 1] over it, bar chart of the top-5
    probabilities."""
    image_ax, cam_ax, bar_ax = fig.subplots(1, 3, width_ratios=[1, 1, 1.5])
    fig.subplots_adjust(left=0.03, right=0.97, wspace=0.75, top=0.85, bottom=0.15)
    cmap = "gray" if shown.ndim == 2 else None
    top = probs.topk(min(5, len(probs)))
    labels = [_short(class_names[i], 24) for i in top.indices.tolist()]
    image_ax.imshow(shown, cmap=cmap)
    image_ax.set_title("input, as the model sees it", fontsize=9)
    cam_ax.imshow(shown, cmap=cmap)
    cam_ax.imshow(cam.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    cam_ax.set_title(f"Grad-CAM:\n{labels[0]}", fontsize=9)
    for ax in (image_ax, cam_ax):
        ax.axis("off")
    positions = list(range(len(labels)))[::-1]
    bar_ax.barh(positions, (100 * top.values).tolist(), color="tab:blue")
    bar_ax.set_yticks(positions, labels, fontsize=9)
    bar_ax.set_xlim(0, 100)
    bar_ax.set_xlabel("probability (%)", fontsize=9)
    bar_ax.set_title(top_title, fontsize=9)


def _draw_feature_maps(fig, maps: Sequence[torch.Tensor], channels: int) -> None:
    """One row per dense block: its ``channels`` most active maps."""
    axes = fig.subplots(len(maps), max(channels, 4), squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.89, bottom=0.02, hspace=0.3, wspace=0.1)
    fig.suptitle("feature maps after each dense block (most active channels)", fontsize=10)
    for block, (row, feature_map) in enumerate(zip(axes, maps, strict=True), start=1):
        c, h, w = feature_map.shape
        row[0].set_ylabel(f"block {block}\n{c}x{h}x{w}", fontsize=9)
        chosen = _most_active(feature_map, channels)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
        for ax, channel in zip(row, chosen, strict=False):
            ax.imshow(feature_map[channel].numpy(), cmap="viridis")
            ax.set_title(f"channel {channel}", fontsize=8)


def parameter_efficiency_points(pattern: str = "*") -> list[dict]:
    """Parameter count and published top-1 errors (ImageNet, CIFAR-10+) of each registered model
    matching ``pattern``.

    Parameters come in closed form from the architecture (no model is built).
    """
    from densenet.complexity import spec_complexity
    from densenet.zoo import get_model_spec, list_models

    points = []
    for name in list_models(pattern):
        spec = get_model_spec(name)
        params = spec_complexity(name).params
        bc = bool(spec.kwargs.get("bn_size", 4)) and spec.kwargs.get("compression", 0.5) < 1
        for result in spec.published:
            if result.dataset in ("imagenet", "cifar10+"):
                points.append(
                    dict(
                        name=name,
                        params=params,
                        dataset=result.dataset,
                        error=result.top1_error,
                        bc=bc,
                    )
                )
    return points


def _label_points(ax, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str]) -> None:
    """Annotate points, moving each label to the first of four spots that overlaps no earlier one."""
    renderer = FigureCanvasAgg(ax.figure).get_renderer()
    spots = [((5, 4), "left"), ((5, -11), "left"), ((-5, 4), "right"), ((-5, -11), "right")]
    placed = []
    for x, y, label in zip(xs, ys, labels, strict=True):
        for offset, align in spots:
            text = ax.annotate(
                label, (x, y), xytext=offset, textcoords="offset points", ha=align, fontsize=8
            )
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            text.remove()
        else:
            text = ax.annotate(
                label, (x, y), xytext=spots[0][0], textcoords="offset points", fontsize=8
            )
            box = text.get_window_extent(renderer)
        placed.append(box)


def parameter_efficiency_figure(points: Sequence[dict], path: str | Path) -> Path:
    """Two panels, published top-1 error (%) against parameters (millions): ImageNet models
    (single crop) and CIFAR models on CIFAR-10+ (the paper's parameter-efficiency figure).

    DenseNet-BC models (bottleneck + compression) and basic DenseNets get their own colors.
    """
    if not points:
        raise ValueError("no models with published ImageNet or CIFAR-10+ results to plot")
    panels = (
        ("imagenet", "ImageNet-1k (224x224, single crop)"),
        ("cifar10+", "CIFAR-10+ (augmented)"),
    )
    fig = Figure(figsize=(13, 5.5))
    for i, (dataset, title) in enumerate(panels):
        chosen = sorted((p for p in points if p["dataset"] == dataset), key=lambda p: p["params"])
        _efficiency_panel(fig.add_subplot(1, 2, i + 1), chosen, title)
    fig.suptitle(
        "DenseNet parameter efficiency: published error against size (lower left is better)"
    )
    return _save(fig, path)


def _efficiency_panel(ax, points: Sequence[dict], title: str) -> None:
    ax.set_title(title)
    if not points:
        ax.text(
            0.5, 0.5, "no selected model has a result here", ha="center", transform=ax.transAxes
        )
        ax.set_axis_off()
        return
    for bc, color, label in ((True, "tab:blue", "DenseNet-BC"), (False, "tab:orange", "DenseNet")):
        series = [p for p in points if p["bc"] == bc]
        if series:
            xs = [p["params"] / 1e6 for p in series]
            ax.plot(xs, [p["error"] for p in series], "o", color=color, label=label, zorder=3)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.margins(x=0.2, y=0.12)
    ax.set_xlabel("parameters (millions, log scale)")
    ax.set_ylabel("published top-1 error (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    xs = [p["params"] / 1e6 for p in points]
    _label_points(ax, xs, [p["error"] for p in points], [p["name"] for p in points])


def curve_panels(rows: Sequence[dict]) -> tuple:
    """``(title, ((metrics.csv column, legend label), ...))`` of each panel of :func:`plot_curves`."""
    multilabel = any(not math.isnan(r.get("val_mean_auroc", math.nan)) for r in rows)
    score = (
        ("validation mean AUROC", (("val_mean_auroc", "val"),))
        if multilabel
        else ("top-1 accuracy (%)", (("train_top1", "train"), ("val_top1", "val")))
    )
    return (
        ("loss", (("train_loss", "train"), ("val_loss", "val"))),
        score,
        ("learning rate", (("lr", "lr"),)),
    )


def plot_curves(rows: Sequence[dict], path: str | Path) -> Path:
    """A run's loss, score and learning rate by epoch (``metrics.csv`` rows, a missing value NaN)
    as a PNG; the score is top-1 accuracy, or the validation mean AUROC of a multi-label run."""
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(13, 3.6))
    for ax, (title, series) in zip(fig.subplots(1, 3), curve_panels(rows), strict=True):
        for key, label in series:
            ax.plot(epochs, [r[key] for r in rows], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    fig.tight_layout()
    return _save(fig, path, dpi=100)
