"""``densenet export``: write ONNX or a torch.export program (dynamic batch), then verify it.

After writing, the file is loaded back (onnxruntime for ONNX, ``torch.export.load`` for .pt2) and
compared with the PyTorch model on random batches of 1 and 3 and on real images when given,
printing the max absolute and relative (to the largest logit) error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from densenet.cli import CLIError
from densenet.cli._common import (
    add_model_arguments,
    add_precision_arguments,
    calibration_batches,
    model_from_args,
    random_weights_notice,
    unused_calibration_notice,
)

if TYPE_CHECKING:  # torch-free at import: --help stays instant
    from densenet.loader import ModelInfo

# Largest relative error (to the largest logit) of a written file against the fp32 model, per
# precision: fp32 is the same arithmetic; bf16 rounds to 8 mantissa bits (the 2e-2);
# int8 quantizes activations to 256 levels (measured 0.03 on the CIFAR checkpoints here).
MAX_REL_ERROR = {"fp32": 1e-4, "bf16": 2e-2, "int8": 0.1}
MAX_IMAGES = 16
# densenet.export.SUFFIXES, written out so that --help needs no torch (a test keeps them equal).
SUFFIXES = {"onnx": ".onnx", "exported-program": ".pt2"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export to ONNX or torch.export with dynamic batch, verified against PyTorch",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--format",
        choices=tuple(SUFFIXES),
        help="default: from --out's extension ("
        + ", ".join(f"{suffix}: {name}" for name, suffix in SUFFIXES.items())
        + ")",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="output .onnx or .pt2 file")
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="export the inference graph (BN folded, pool-first transitions); bf16 and int8 "
        "always export it",
    )
    parser.add_argument("--size", type=int, help="traced input height=width (default: the model's)")
    parser.add_argument(
        "--images",
        nargs="+",
        metavar="IMAGE_OR_FOLDER",
        help=f"real images to verify on too (the first {MAX_IMAGES})",
    )
    add_precision_arguments(
        parser,
        "the --images",
        bf16="bf16 (written as bf16 whatever this machine's CPU: the file is for where it runs)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def output_format(out: str, fmt: str | None) -> str:
    """The format to write: ``fmt``, or the one ``out``'s extension names; a ``CLIError`` when
    they disagree or neither says."""
    suffix = Path(out).suffix
    if fmt is None:
        by_suffix = {value: name for name, value in SUFFIXES.items()}
        if suffix not in by_suffix:
            raise CLIError(
                f"--out {out}: name the file .onnx or .pt2 (its extension chooses the format: "
                + ", ".join(f"{suffix} {name}" for name, suffix in SUFFIXES.items())
                + ")"
            )
        return by_suffix[suffix]
    if suffix != SUFFIXES[fmt]:
        raise CLIError(
            f"--format {fmt} writes a {SUFFIXES[fmt]} file; name --out FILE{SUFFIXES[fmt]}"
        )
    return fmt


@contextlib.contextmanager
def unchecked_file(out: Path) -> Iterator[Path]:
    """A hidden name beside ``out`` to export to while the file is checked against PyTorch.

    It is moved to ``out`` when the block finishes and removed when the block fails or is
    interrupted, so that ``out`` never holds an unchecked file (an older one there is kept).
    """
    unchecked = out.with_name(f".{out.stem}.unchecked-{os.getpid()}{out.suffix}")
    try:
        yield unchecked
    except KeyboardInterrupt:
        unchecked.unlink(missing_ok=True)
        raise KeyboardInterrupt(
            f"{out} not written (its check against PyTorch did not finish)"
        ) from None
    except BaseException:
        unchecked.unlink(missing_ok=True)
        raise
    os.replace(unchecked, out)


def _verify_inputs(
    args: argparse.Namespace, info: ModelInfo, calibration: list | None
) -> tuple[dict, list[str]]:
    """Named batches to compare on (random batches of 1 and 3, ``--images`` when given) at
    ``info``'s (the exported) size, and the names of those that pass or fail the export: all
    of them, but for int8 only real images (the calibration images when no --images are
    given), since random noise lies outside the activation ranges calibration measured."""
    import torch

    from densenet.data import load_image
    from densenet.predict import list_images

    gen = torch.Generator().manual_seed(0)
    inputs = {f"random batch {n}": torch.randn(n, *info.input_size, generator=gen) for n in (1, 3)}
    if args.images:
        transform = info.transform()
        paths = list_images(args.images)
        images = [transform(load_image(p)) for p in paths[:MAX_IMAGES]]
        first = f" (the first of {len(paths)})" if len(paths) > MAX_IMAGES else ""
        inputs[f"{len(images)} real images{first}"] = torch.stack(images)
    elif calibration is not None:
        images = torch.cat(calibration)[:MAX_IMAGES]
        inputs[f"{len(images)} calibration images"] = images
    if calibration is None:
        return inputs, list(inputs)
    return inputs, [name for name in inputs if not name.startswith("random")]


def _calibration(args: argparse.Namespace, info):
    """int8's calibration batches (``--calibration``, else ``--images``); None for other
    precisions."""
    if args.precision != "int8":
        return None
    paths = args.calibration or args.images
    if not paths:
        raise CLIError(
            "--precision int8 calibrates on real images: add --calibration IMAGES (or --images)"
        )
    source = "--calibration" if args.calibration else "--images"
    return calibration_batches(paths, info, "export", source, hint=f"remove it from {source}")


def _metadata(info: ModelInfo, precision: str, size: int) -> dict[str, str]:
    """What a user of the exported file needs besides the graph, as JSON strings: the class
    names, the input's size and normalization, the task."""
    values = dict(
        model=info.name,
        class_names=list(info.class_names),
        task=info.task,
        precision=precision,
        input_size=[info.input_size[0], size, size],
        mean=list(info.mean) if info.mean else None,
        std=list(info.std) if info.std else None,
        interpolation=info.interpolation,
        crop_pct=info.crop_pct,
        thresholds=info.thresholds,  # multi-label: each label's decision threshold
    )
    return {key: json.dumps(value) for key, value in values.items() if value is not None}


def _input_line(metadata: dict[str, str]) -> str:
    """How to feed the exported file, from its metadata."""
    size = json.loads(metadata["input_size"])
    norm = (
        f", normalized with mean {metadata['mean']} std {metadata['std']}"
        if "mean" in metadata
        else ""
    )
    return (
        f"  input: float (N, {size[0]}, {size[1]}, {size[2]}), pixels scaled to 0-1{norm}; "
        "class names, mean/std and input size are in the file's metadata"
    )


def run(args: argparse.Namespace) -> int:
    from densenet.export import check_precision, export_model, verify_export

    args.format = output_format(args.out, args.format)
    check_precision(args.precision, args.format)  # before any image is read for calibration
    unused_calibration_notice("export", args.calibration, args.precision == "int8")
    args.device = "cpu"
    random_weights_notice(args)
    model, info = model_from_args(args)
    size = args.size or info.input_size[-1]
    # Images for int8 and the check at the exported size, resized as the model's transform does.
    info = dataclasses.replace(info, input_size=(info.input_size[0], size, size))
    out = Path(args.out)
    calibration = _calibration(args, info)
    inputs, judged = _verify_inputs(args, info, calibration)
    limit = MAX_REL_ERROR[args.precision]
    metadata = _metadata(info, args.precision, size)
    with unchecked_file(out) as unchecked:
        try:
            export_model(
                model,
                unchecked,
                args.format,
                input_size=(size, size),
                optimize=args.optimize,
                precision=args.precision,
                calibration=calibration,
                metadata=metadata,
            )
        except ValueError as error:
            raise CLIError(str(error)) from None
        errors = verify_export(model, unchecked, inputs)
        worst = max(errors[name]["max_rel_error"] for name in judged)
        if worst > limit:
            hint = "; calibrate on more images (a few hundred)" if calibration else ""
            raise CLIError(
                f"exported outputs differ from PyTorch on {', '.join(judged)}: max rel error "
                f"{worst:.3g} > {limit:g} ({args.precision}); {out} not written{hint}"
            )
    report = dict(
        model=info.name,
        format=args.format,
        out=str(out),
        optimized=args.optimize or args.precision != "fp32",
        precision=args.precision,
        input_size=[model.in_chans, size, size],
        errors=errors,
        max_rel_error=worst,
        judged=judged,
        ok=True,
    )
    print(json.dumps(report) if args.json else _report_text(report, metadata))
    return 0


def _report_text(report: dict, metadata: dict[str, str]) -> str:
    """The export's report for a person: the file, how to feed it, each check's error."""
    size = report["input_size"][-1]
    lines = [
        f"wrote {report['out']} ({report['format']}, {report['precision']}, batch dynamic, "
        f"{size}x{size})",
        _input_line(metadata),
    ]
    for name, e in report["errors"].items():
        judged = name in report["judged"]
        aside = "" if judged else "  (not judged: random inputs, outside int8's range)"
        lines.append(
            f"  {name:>18}: max abs error {e['max_abs_error']:.3g}, "
            f"max rel error {e['max_rel_error']:.3g}{aside}"
        )
    return "\n".join(lines)
