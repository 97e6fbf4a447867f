"""``densenet predict``: top-5 classes and probabilities for images or folders of images; for a
multi-label model every label's probability and the labels at or above their thresholds;
``--cam DIR``: a Grad-CAM overlay per explained class or label."""

from __future__ import annotations

import argparse
import json
import sys

from densenet.cli import CLIError
from densenet.cli._common import (
    add_model_arguments,
    add_precision_arguments,
    at_precision,
    calibration_batches,
    model_from_args,
    unused_calibration_notice,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify images: top-5 classes with probabilities",
        description="Classify images (files or folders) with a checkpoint or a named model.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    add_model_arguments(parser)
    parser.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip files that are not readable images (each one named on stderr)",
    )
    parser.add_argument(
        "--cam",
        metavar="DIR",
        help="write a Grad-CAM overlay PNG per image into DIR (<image>_<label>.png): of the top "
        "class, or of each positive label of a multi-label model (the top one if none is)",
    )
    add_precision_arguments(parser, "the images predicted")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _thresholds_notice(info) -> None:
    """Say on stderr when a multi-label checkpoint stores no thresholds (0.5 is then a guess)."""
    if info.task == "multilabel" and info.thresholds is None:
        print(
            "densenet predict: the checkpoint stores no thresholds; every label is positive at "
            f"probability >= {info.label_thresholds()[0]} (fit them with densenet eval "
            "--fit-thresholds-on val)",
            file=sys.stderr,
        )


def _print_predictions(results: list[dict], info) -> None:
    """Each image, then its classes; multi-label: the positive labels (with their thresholds),
    then the most probable others."""
    thresholds = dict(zip(info.class_names, info.label_thresholds(), strict=True))
    indent = "    " if info.task == "multilabel" else "  "  # others line up under the "+ " lines
    for result in results:
        print(result["file"])
        positive = result.get("positive", [])
        for label in positive:
            probability = result["probabilities"][label]
            print(f"  + {100 * probability:6.2f}%  {label}  (threshold {thresholds[label]:.3f})")
        if info.task == "multilabel" and not positive:
            print("  no label at or above its threshold")
        for entry in result["top"]:
            if entry["label"] not in positive:
                print(f"{indent}{100 * entry['probability']:6.2f}%  {entry['label']}")
        for label, path in result.get("cams", {}).items():
            print(f"  Grad-CAM of {label}: {path}")


def run(args: argparse.Namespace) -> int:
    from densenet.predict import list_images, predict, save_cams

    if args.topk < 1 or args.batch_size < 1:
        raise CLIError("--topk and --batch-size must be at least 1")
    paths = list_images(args.inputs)
    unused_calibration_notice("predict", args.calibration, args.precision == "int8")
    model, info = model_from_args(args)
    source, advice = "--calibration", ""
    if not args.calibration:
        source = "the images predicted"
        advice = "--calibration IMAGES picks others (a few hundred are best)"
    fast, precision = at_precision(
        model,
        args.precision,
        lambda: calibration_batches(
            args.calibration or paths, info, "predict", source, args.skip_bad_images, advice=advice
        ),
    )
    results = predict(
        fast, info, paths, args.topk, args.batch_size, skip_bad_images=args.skip_bad_images
    )
    skipped = [r for r in results if "skipped" in r]
    results = [r for r in results if "skipped" not in r]
    for entry in skipped:
        print(f"densenet predict: skipped {entry['skipped']}", file=sys.stderr)
    if skipped:
        print(
            f"densenet predict: skipped {len(skipped)} of {len(paths)} files (--skip-bad-images)",
            file=sys.stderr,
        )
    if args.cam:
        if precision != "fp32":
            print(
                f"densenet predict: note: Grad-CAM needs gradients, so its maps come from the "
                f"fp32 model, for the classes {precision} predicted",
                file=sys.stderr,
            )
        save_cams(model, info, results, args.cam)
    _thresholds_notice(info)
    if args.json:
        summary = dict(model=info.name, source=info.source, task=info.task, precision=precision)
        if info.task == "multilabel":
            summary["thresholds"] = info.threshold_summary()
        print(json.dumps(dict(summary, predictions=results, skipped=skipped)))
        return 0
    print(f"model: {info.source}" + ("" if precision == "fp32" else f" ({precision})"))
    _print_predictions(results, info)
    return 0
