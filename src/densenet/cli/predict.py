"""``densenet predict``: top-5 classes and probabilities for images or folders of images."""

from __future__ import annotations

import argparse
import json
import sys

from densenet.cli import CLIError
from densenet.cli._common import add_model_arguments, model_from_args


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
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from densenet.predict import list_images, predict

    if args.topk < 1 or args.batch_size < 1:
        raise CLIError("--topk and --batch-size must be at least 1")
    paths = list_images(args.inputs)
    model, info = model_from_args(args)
    results = predict(
        model, info, paths, args.topk, args.batch_size, skip_bad_images=args.skip_bad_images
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
    if args.json:
        summary = dict(model=info.name, source=info.source, predictions=results, skipped=skipped)
        print(json.dumps(summary))
        return 0
    print(f"model: {info.source}")
    for result in results:
        print(result["file"])
        for entry in result["top"]:
            print(f"  {100 * entry['probability']:6.2f}%  {entry['label']}")
    return 0
