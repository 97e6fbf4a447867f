"""``densenet visualize``: an image's feature maps after each dense block and a Grad-CAM of its top
class or label (densenet.gradcam, the map ``predict --cam`` writes), as one PNG."""

from __future__ import annotations

import argparse

from densenet.cli import CLIError
from densenet.cli._common import add_model_arguments, model_from_args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "visualize",
        help="feature maps and Grad-CAM of one image, as a PNG",
        description="Draw the input, the top-5 classes, a Grad-CAM of the top class "
        "and the most active feature maps after each dense block.",
    )
    parser.add_argument("image", metavar="IMAGE")
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="FILE.png", help="where to write the PNG")
    parser.add_argument(
        "--channels", type=int, default=6, help="feature maps per block (default 6)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from densenet.data import load_image
    from densenet.visualize import feature_map_figure

    if args.channels < 1:
        raise CLIError("--channels must be at least 1")
    image = load_image(args.image)
    model, info = model_from_args(args)
    transform = info.transform()
    path = feature_map_figure(
        model,
        image,
        transform,
        info.mean,
        info.std,
        info.class_names,
        args.out,
        args.channels,
        task=info.task,
    )
    print(f"wrote {path}")
    return 0
