"""``densenet eval``: top-1, top-5, loss, per-class accuracy and a confusion-matrix PNG of a model on
a dataset split, single-crop or ten-crop; for a multi-label model per-label AUROC, average
precision, sensitivity and specificity at per-label thresholds, and a ROC-curves PNG."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from densenet.cli import CLIError
from densenet.cli._common import (
    add_model_arguments,
    add_precision_arguments,
    at_precision,
    calibration_batches,
    model_device,
    model_from_args,
    unused_calibration_notice,
)

# int8 calibrates on this many training images of the dataset unless --calibration is given.
CALIBRATION_IMAGES = 256

if TYPE_CHECKING:  # the heavy modules are imported when the command runs, not for --help
    import torch

    from densenet.evaluation import EvalResult, MultilabelResult
    from densenet.loader import ModelInfo


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="accuracy, loss, per-class accuracy and confusion matrix on a dataset",
        description="Evaluate a checkpoint or a named model on a dataset split.",
    )
    add_model_arguments(parser)
    parser.add_argument("--dataset", help="dataset name (default: the checkpoint's dataset)")
    parser.add_argument(
        "--data-dir", help="the dataset's folder, or a .zip of <split>/<class>/ images (folder)"
    )
    parser.add_argument(
        "--split",
        help="split to evaluate (default test; a folder without val/ or test/ sub-folders: the "
        "part training held out if the model was trained on it, else all of it; 'val' there is "
        "the held-out part)",
    )
    parser.add_argument(
        "--ten-crop",
        action="store_true",
        help="average the softmax over 10 crops (corners, center and flips) as in the paper",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="evaluate only N images, evenly spaced over the split",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="where the PNG and JSON go (default: beside the checkpoint, or .)",
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip files of a folder dataset that are not readable images (named on stderr)",
    )
    _add_labels_file_arguments(parser)
    add_precision_arguments(
        parser, f"{CALIBRATION_IMAGES} images of the dataset's train split, evenly spaced"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _add_labels_file_arguments(parser: argparse.ArgumentParser) -> None:
    """How a labels file is split (csv) and a multi-label model's thresholds are chosen."""
    parser.add_argument(
        "--split-by",
        metavar="COLUMN",
        help="csv with one labels file: deal train/val/test by this column (group) as training did",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="with --split-by: the training run's seed, which chose the groups of each split "
        "(default: the one the checkpoint records, else 0)",
    )
    parser.add_argument(
        "--fit-thresholds-on",
        metavar="SPLIT",
        help="multi-label models: fit each label's decision threshold on this split (e.g. val) "
        "instead of using the checkpoint's",
    )
    parser.add_argument(
        "--threshold-method",
        metavar="METHOD",
        help="with --fit-thresholds-on: f1 (maximize F1, the default) or youden (maximize "
        "sensitivity + specificity - 1)",
    )


def _check(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise CLIError(f"--workers must be >= 0, got {args.workers}")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be at least 1, got {args.limit}")
    if args.split_by and args.dataset not in (None, "csv"):
        raise CLIError("--split-by applies to labels-file datasets only (--dataset csv)")
    if args.threshold_method and not args.fit_thresholds_on:
        raise CLIError("--threshold-method goes with --fit-thresholds-on SPLIT (e.g. val)")
    if args.threshold_method:
        from densenet.multilabel import THRESHOLD_METHODS

        if args.threshold_method not in THRESHOLD_METHODS:
            raise CLIError(
                f"--threshold-method must be one of {', '.join(THRESHOLD_METHODS)}, "
                f"got {args.threshold_method!r}"
            )


def _load_data(
    args: argparse.Namespace,
    dataset_name: str,
    info: ModelInfo,
    device: torch.device,
    split: str,
    say: bool = True,
):
    """A loader over the (possibly truncated) ``split`` with the model's eval transform, and the
    dataset's class names; ``say``: print how classes are matched (once per command)."""
    import torch
    from torch.utils.data import Subset

    from densenet.data import build_dataset, build_loader, dataset_info

    stats = dataset_info(dataset_name)
    transform = info.transform(args.ten_crop, stats.mean, stats.std)
    matching = _class_matching(args, info, say) if dataset_name == "folder" else {}
    if dataset_name == "csv":  # targets in the model's label order, for the model's task
        matching = dict(
            classes=list(info.class_names), task=info.task, split_by=args.split_by, seed=args.seed
        )
    dataset = build_dataset(
        dataset_name,
        args.data_dir,
        split,
        transform,
        skip_bad_images=args.skip_bad_images,
        **matching,
    )
    for problem in getattr(dataset, "bad_images", []):
        print(f"densenet eval: skipped {problem}", file=sys.stderr)
    _check_task(dataset, dataset_name, info)
    classes = getattr(dataset, "classes", None) or stats.class_names
    if len(classes) > len(info.class_names):
        raise CLIError(
            f"{dataset_name} has {len(classes)} classes but the model predicts "
            f"{len(info.class_names)}; evaluate on the data the model was trained for"
        )
    if say and dataset_name not in ("folder", "csv"):  # those match classes by name
        _other_classes_notice(dataset_name, list(classes), list(info.class_names))
    if args.limit is not None and args.limit < len(dataset):
        # Evenly spaced rather than the first N: class-sorted splits then still cover every class.
        dataset = Subset(dataset, torch.linspace(0, len(dataset) - 1, args.limit).long().tolist())
    loader = build_loader(
        dataset, args.batch_size, train=False, workers=args.workers, device=device
    )
    return loader, list(classes)


def _calibration(
    args: argparse.Namespace,
    dataset_name: str,
    info: ModelInfo,
    device: torch.device,
    record: dict,
) -> list[torch.Tensor]:
    """int8 calibration batches: ``--calibration``'s images, else :data:`CALIBRATION_IMAGES`
    evenly spaced images of the dataset's train split (never the split evaluated, unless that
    is train or all). What it calibrated on goes into ``record`` (the report's "calibration")."""
    import torch

    if args.calibration:
        batches = calibration_batches(
            args.calibration, info, "eval", "--calibration", args.skip_bad_images
        )
        record.update(
            images=sum(len(b) for b in batches), source="--calibration", paths=args.calibration
        )
        return batches
    one_crop = argparse.Namespace(**{**vars(args), "ten_crop": False, "limit": CALIBRATION_IMAGES})
    # --split all scores every image of a folder: none is left to calibrate on that is not scored.
    split = "all" if args.split == "all" else "train"
    try:
        loader, _ = _load_data(one_crop, dataset_name, info, device, split, say=False)
    except (OSError, ValueError) as error:
        raise CLIError(
            f"int8 calibrates on {dataset_name}'s train split, which could not be read "
            f"({error}); give --calibration IMAGES"
        ) from None
    images = torch.cat([inputs for inputs, _ in loader]).float()
    others = "--calibration IMAGES calibrates on others"
    if split == "all":
        source = (
            f"the images evaluated (split all: every image of {args.data_dir} is scored, none is "
            f"left apart; {others})"
        )
    elif args.split == "train":
        source = f"{dataset_name} train, the split evaluated ({others})"
    else:
        source = f"{dataset_name} train"
    print(f"densenet eval: int8 calibrates on {len(images)} images of {source}", file=sys.stderr)
    record.update(images=len(images), source=f"{dataset_name} {split}")
    return list(images.split(32))


def _check_task(dataset, dataset_name: str, info: ModelInfo) -> None:
    """A multi-label model needs multi-hot targets, a single-label one class indices."""
    task = getattr(dataset, "task", "multiclass")
    if task != info.task:
        raise CLIError(
            f"the model is {info.task} but {dataset_name} gives {task} targets; evaluate a "
            "multi-label model on a multi-label labels file (--dataset csv), and a single-label "
            "one on single-label data"
        )


def _names_of_its_own(names: list[str]) -> bool:
    """Does a model with these class names have names of its own (not the default indices, or
    ImageNet's for 1000 classes, that a checkpoint without names gets)?"""
    from densenet.catalog import default_class_names

    return list(names) != default_class_names(len(names))


def _other_classes_notice(dataset_name: str, classes: list[str], model_names: list[str]) -> None:
    """Say so when a model with class names of its own is scored on a built-in dataset whose
    classes are others (scored by position, e.g. a Fashion-MNIST model on MNIST)."""
    if not _names_of_its_own(model_names) or classes == model_names[: len(classes)]:
        return
    differ = [
        (i, c, m) for i, (c, m) in enumerate(zip(classes, model_names, strict=False)) if c != m
    ]
    shown = "; ".join(f"output {i}: model {m!r}, {dataset_name} {c!r}" for i, c, m in differ[:2])
    print(
        f"densenet eval: note: the model's classes are not {dataset_name}'s ({len(differ)} of "
        f"{len(classes)} differ; {shown}); its outputs are scored by position, which measures "
        "nothing if it was trained on other data",
        file=sys.stderr,
    )


def _class_matching(args: argparse.Namespace, info: ModelInfo, say: bool = True) -> dict:
    """How a folder's class folders map to the model's outputs: by name to its class names
    (a subset is fine), or, for a model without names of its own, by sorted position when the
    folder holds exactly as many classes."""
    from densenet.data import dataset_info

    names = list(info.class_names)
    folders = dataset_info("folder", args.data_dir).class_names
    by_name = dict(classes=names, classes_from=f"the model's {len(names)} classes")
    if _names_of_its_own(names) or set(folders) <= set(names):
        return by_name
    if len(folders) == len(names):
        if say:
            print(
                f"densenet eval: the model has no class names of its own; its {len(names)} "
                f"outputs are taken to be the class folders of {args.data_dir} in sorted order",
                file=sys.stderr,
            )
        return {}
    raise CLIError(
        f"{args.data_dir} has {len(folders)} class folders but the model predicts {len(names)} "
        "classes and has no class names to match them by; give a folder with all its classes "
        "(matched in sorted order) or a checkpoint that records class_names"
    )


def _recorded_data_dir(args: argparse.Namespace, info: ModelInfo) -> str | None:
    """Where the checkpoint's training run read its data: the checkpoint's metadata, else the
    config.yaml of the run directory it lies in (``RUN/checkpoints/FILE``; an absolute path
    only: a relative one was relative to wherever training ran)."""
    if info.data_dir or not args.checkpoint:
        return info.data_dir
    import yaml

    from densenet.train.run_dir import RunDir

    checkpoint = Path(args.checkpoint).resolve()
    run = RunDir(checkpoint.parent.parent)
    if checkpoint.parent != run.last.parent or not run.config.is_file():
        return None
    try:
        saved = yaml.safe_load(run.config.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict) or saved.get("dataset") != info.dataset:
        return None
    recorded = saved.get("data_dir")
    return recorded if recorded and Path(recorded).is_absolute() else None


def _data_dir(args: argparse.Namespace, dataset_name: str, recorded: str | None) -> str | None:
    """``--data-dir``, else ``recorded``, where the checkpoint was trained from (said on stderr).
    When that is gone: an error for data only found there (folders, labels files, ImageNet),
    else the dataset's default place, with a notice."""
    if args.data_dir or not recorded:
        return args.data_dir
    if Path(recorded).exists():
        print(
            f"densenet eval: --data-dir {recorded} (the checkpoint's training data)",
            file=sys.stderr,
        )
        return recorded
    if dataset_name in ("folder", "csv", "imagenet"):
        raise CLIError(
            f"the checkpoint was trained on {dataset_name} from {recorded}, which does not exist "
            "here; give --data-dir"
        )
    print(
        f"densenet eval: the checkpoint's training data {recorded} is not here: reading "
        f"{dataset_name} from its default place (--data-dir DIR chooses one)",
        file=sys.stderr,
    )
    return None


def _resolve_split(
    args: argparse.Namespace, dataset_name: str, info: ModelInfo, recorded: str | None
) -> str:
    """The split to score, named as what is read: ``--split`` (default test), and for folders
    the sub-folder that stands in for it, or 'val' for the held-out part of a folder without
    splits (or with train/ alone): by default that part of the folder the model was trained on,
    all of any other folder (``recorded``: the folder it was trained on, if known)."""
    if dataset_name != "folder" or not args.data_dir:
        return args.split or "test"
    from densenet.data import folder_splits, holdout_description, holds_out, split_folder
    from densenet.data.folders import HOLDOUT_PERCENT

    splits = folder_splits(args.data_dir)
    if not holds_out(splits):
        split = args.split or "test"
        used = split_folder(args.data_dir, split) or split
        if used != split:
            _say(f"{args.data_dir} has no {split}/ sub-folder: evaluating {used}/")
        return used
    described = holdout_description(args.data_dir, splits)
    trained_here = _trained_on(args.data_dir, info.holdout, recorded)
    if args.split == "test":
        role = (
            "training picked its best checkpoint on it: a validation score, not an unseen test"
            if trained_here
            else f"the {HOLDOUT_PERCENT}% of each class a training run on it would validate on"
        )
        _say(f"{described}: --split test scores the part held out for validation ({role})")
    if args.split in ("test", "val"):
        return "val"
    if args.split is not None:
        return args.split
    if trained_here:
        _say(
            f"{described}, and the model was trained on it: evaluating the part training held "
            "out (--split all scores every image, most of them seen in training)"
        )
        return "val"
    _say(
        f"{described}: evaluating all of it; if the model was trained on this folder, --split "
        "val evaluates only the images training held out"
    )
    return "all"


def _trained_on(data_dir: str, holdout: str | None, recorded: str | None) -> bool:
    """Was the model trained on this folder: the one it was trained on (``recorded``; if the
    held-out part changed since, say so: it may now hold trained images), or one whose held-out
    part is the one its checkpoint records (``holdout``: the folder moved or copied)?"""
    from densenet.data import holdout_digest

    held_out = holdout_digest(data_dir) if holdout else None
    if _same_path(recorded, data_dir):
        if held_out != holdout:
            _say(
                f"{data_dir} has changed since the model was trained (files added or removed): "
                "the part held out now is not the one training held out, and may hold images it "
                "trained on, so its score can be optimistic; score a separate folder"
            )
        return True
    return held_out is not None and held_out == holdout


def _resolve_split_by(args: argparse.Namespace, info: ModelInfo, recorded: str | None) -> None:
    """``--split-by``/``--seed`` for a single labels file: on the file the model was trained
    on, by default as training dealt it (another deal puts training groups in the test split,
    which is said)."""
    if not _same_path(recorded, args.data_dir) or not info.split_by:
        args.seed = 0 if args.seed is None else args.seed
        return
    if args.split_by is None and args.seed is None:
        _say(f"--split-by {info.split_by} --seed {info.seed} (as training dealt {args.data_dir})")
    args.split_by = args.split_by or info.split_by
    args.seed = info.seed if args.seed is None else args.seed
    if (args.split_by, args.seed) != (info.split_by, info.seed):
        _say(
            f"training dealt {args.data_dir} by {info.split_by} with seed {info.seed}; "
            f"--split-by {args.split_by} --seed {args.seed} deals it otherwise, so the split "
            "scored may hold images the model trained on"
        )


def _results_name(args: argparse.Namespace, dataset: str, recorded: str | None, low: str) -> str:
    """``eval_<dataset>[-<folder>]_<split>[_10crop][_<precision>]``: data other than what the
    run was trained on (``recorded``) adds its folder's name, so that scoring another folder
    does not overwrite the results on the run's own data."""
    other = ""
    if recorded and args.data_dir and not _same_path(recorded, args.data_dir):
        name = Path(args.data_dir).resolve().name
        name = name[:-4] if name.lower().endswith(".zip") else name
        other = "-" + re.sub(r"[^A-Za-z0-9_-]+", "_", name)
    crops = "_10crop" if args.ten_crop else ""
    return f"eval_{dataset}{other}_{args.split}{crops}{low}"


def _same_path(a: str | None, b: str | None) -> bool:
    return bool(a and b) and Path(a).resolve() == Path(b).resolve()


def _say(message: str) -> None:
    print(f"densenet eval: {message}", file=sys.stderr)


def _report_lines(result: EvalResult, title: str) -> list[str]:
    from densenet.evaluation import shows_top5

    lines = [
        title,
        f"  images {result.images}   crops {result.crops}",
        f"  top-1  {result.top1:6.2f}%   "
        + (f"top-5  {result.top5:6.2f}%   " if shows_top5(result.confusion.shape[0]) else "")
        + f"loss {result.loss:.4f}",
    ]
    scored = [
        (acc, name)
        for name, acc in zip(result.class_names, result.per_class, strict=True)
        if acc is not None
    ]
    if len(scored) > 20:  # too many to list: show the hardest classes
        lines.append("  lowest per-class accuracy:")
        scored = sorted(scored)[:10]
    else:
        lines.append("  per-class accuracy:")
    return lines + [f"    {acc:6.2f}%  {name}" for acc, name in scored]


def _thresholds(args: argparse.Namespace, model, info: ModelInfo, dataset_name: str) -> dict:
    """The per-label thresholds to decide at, ``ThresholdFit.to_dict`` form plus ``source``:
    fitted on ``--fit-thresholds-on``, else the checkpoint's, else the default for every label."""
    from densenet.evaluation import collect_probabilities
    from densenet.multilabel import fit_thresholds

    names = list(info.class_names)
    if not args.fit_thresholds_on:
        stored = "the checkpoint" if info.thresholds else "default: the checkpoint stores none"
        return {**info.threshold_summary(), "source": stored}
    split = args.fit_thresholds_on
    if split == args.split:
        print(
            f"densenet eval: thresholds fitted on {split}, the split evaluated: sensitivity and "
            "specificity are optimistic; fit on another split (e.g. val) for honest figures",
            file=sys.stderr,
        )
    device = model_device(model)
    loader, _ = _load_data(args, dataset_name, info, device, split)
    probabilities, targets, _ = collect_probabilities(model, loader, device, progress=True)
    fitted = fit_thresholds(probabilities, targets, args.threshold_method or "f1", names)
    return {**fitted.to_dict(names), "source": f"fitted on {dataset_name} {split}"}


def _multilabel(args, model, info: ModelInfo, loader, dataset_name: str, stem: Path, title: str):
    """Evaluate a multi-label model: ``(summary dict, report lines)``; draws the ROC curves."""
    from densenet.evaluation import collect_probabilities, multilabel_result
    from densenet.visualize import roc_curves_figure

    device = model_device(model)
    thresholds = _thresholds(args, model, info, dataset_name)
    probabilities, targets, crops = collect_probabilities(model, loader, device, progress=True)
    result = multilabel_result(probabilities, targets, info.class_names, thresholds, crops)
    png = roc_curves_figure(
        probabilities, targets, info.class_names, stem.with_name(f"{stem.name}_roc.png"), title
    )
    return {**result.to_dict(), "roc_png": str(png)}, _multilabel_lines(result, title, png)


def _multilabel_lines(result: MultilabelResult, title: str, png: Path) -> list[str]:
    def show(value: float | None, width: int) -> str:
        return f"{value:{width}.3f}" if value is not None else "-".rjust(width)

    metrics, thresholds = result.metrics, result.thresholds
    width = max(12, *(len(name) for name in metrics["auroc"]))
    lines = [
        title,
        f"  images {result.images}   crops {result.crops}",
        f"  mean AUROC {show(metrics['mean_auroc'], 5)}   mAP {show(metrics['map'], 5)}",
        f"  thresholds: {thresholds['method']}, {thresholds['source']}",
        f"    {'label':<{width}}  AUROC     AP  threshold  sensitivity  specificity  positives",
    ]
    for name, auroc in metrics["auroc"].items():
        lines.append(
            f"    {name:<{width}}  {show(auroc, 5)}  {show(metrics['average_precision'][name], 5)}"
            f"  {show(thresholds['thresholds'][name], 9)}  {show(result.sensitivity[name], 11)}"
            f"  {show(result.specificity[name], 11)}  {metrics['positives'][name]:9d}"
        )
    return [*lines, f"  ROC curves: {png}"]


def _multiclass(model, info: ModelInfo, loader, classes: list[str], stem: Path, title: str):
    """Evaluate a single-label model: ``(summary dict, report lines)``; draws the confusion
    matrix."""
    from densenet.evaluation import evaluate
    from densenet.visualize import confusion_matrix_figure

    names = info.class_names
    if not _names_of_its_own(names) and len(classes) == len(names):
        names = classes  # the model has no names of its own: use the dataset's
    device = model_device(model)
    result = evaluate(model, loader, device, class_names=names, progress=True)
    png = confusion_matrix_figure(
        result.confusion, result.class_names, stem.with_suffix(".png"), title
    )
    return {**result.to_dict(), "confusion_png": str(png)}, [
        *_report_lines(result, title),
        f"  confusion matrix: {png}",
    ]


def run(args: argparse.Namespace) -> int:
    from densenet.io import atomic_write

    _check(args)
    unused_calibration_notice("eval", args.calibration, args.precision == "int8")
    model, info = model_from_args(args)
    dataset_name = args.dataset or info.dataset
    if not dataset_name:
        raise CLIError("which data? give --dataset NAME (the checkpoint does not name its dataset)")
    if args.fit_thresholds_on and info.task != "multilabel":
        raise CLIError("--fit-thresholds-on is for multi-label models; this one is single-label")
    device = model_device(model)
    recorded = _recorded_data_dir(args, info) if dataset_name == info.dataset else None
    args.data_dir = _data_dir(args, dataset_name, recorded)
    args.split = _resolve_split(args, dataset_name, info, recorded)
    if dataset_name == "csv":
        _resolve_split_by(args, info, recorded)
    loader, classes = _load_data(args, dataset_name, info, device, args.split)
    calibrated: dict = {}
    model, precision = at_precision(
        model, args.precision, lambda: _calibration(args, dataset_name, info, device, calibrated)
    )
    out = Path(args.out or (Path(args.checkpoint).parent if args.checkpoint else "."))
    low = "" if precision == "fp32" else f"_{precision}"
    stem = out / _results_name(args, dataset_name, recorded, low)
    title = f"{info.source} on {dataset_name} {args.split}" + (
        " (10-crop)" if args.ten_crop else ""
    )
    title += "" if precision == "fp32" else f", {precision}"
    if info.task == "multilabel":
        results, lines = _multilabel(args, model, info, loader, dataset_name, stem, title)
    else:
        results, lines = _multiclass(model, info, loader, classes, stem, title)
    summary = dict(
        model=info.name,
        source=info.source,
        dataset=dataset_name,
        split=args.split,
        precision=precision,
        **({"calibration": calibrated} if calibrated else {}),
        **results,
    )
    metrics_path = stem.with_suffix(".json")
    atomic_write(metrics_path, lambda f: json.dump(summary, f, indent=1), mode="w")
    if args.json:
        print(json.dumps(summary))
    else:
        print("\n".join([*lines, f"  metrics: {metrics_path}"]))
    return 0
