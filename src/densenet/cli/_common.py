"""Options and helpers shared by the commands that run a model (eval, predict, visualize,
export, bench): which model to load, and what to tell the user about it."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from densenet.cli import CLIError
from densenet.messages import count

if TYPE_CHECKING:  # torch is imported when a command runs, not for --help
    import torch
    from torch import nn

    from densenet.loader import ModelInfo

PRECISIONS = ("fp32", "bf16", "int8")  # densenet.inference.PRECISIONS (a test keeps them equal)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint PATH | --model NAME [--pretrained X]`` and ``--device``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", metavar="PATH", help="a checkpoint written by densenet train"
    )
    source.add_argument("--model", metavar="NAME", help="a model name (densenet models lists them)")
    parser.add_argument(
        "--pretrained",
        metavar="TAG|PATH",
        help="weights for --model: a registry tag, a weights file or URL ('default' = the model's)",
    )
    parser.add_argument(
        "--model-args",
        metavar="YAML",
        help="architecture arguments for --model, a YAML mapping, e.g. '{block_config: [6, 12, "
        "24]}' (weights of a layout no registered name has)",
    )
    for stat in ("mean", "std"):
        parser.add_argument(
            f"--{stat}",
            type=_floats,
            metavar="X,X,X",
            help=f"per-channel {stat} of the pixels (0-1) the weights were trained with, comma-"
            "separated, when the file does not record it (third-party weights)",
        )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def _floats(text: str) -> list[float]:
    """``"0.49,0.48,0.45"`` -> ``[0.49, 0.48, 0.45]``."""
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, like 0.485,0.456,0.406; got {text!r}"
        ) from None


def _model_args(text: str | None) -> dict:
    """``--model-args``' YAML mapping (``{}`` when not given)."""
    if not text:
        return {}
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise CLIError(f"--model-args is not YAML ({error})") from None
    if not isinstance(value, dict):
        raise CLIError(f"--model-args must be a mapping like '{{growth_rate: 12}}', got {text!r}")
    reserved = sorted(set(value) & {"pretrained", "features_only", "out_indices"})
    if reserved:
        raise CLIError(f"--model-args takes architecture arguments, not {', '.join(reserved)}")
    return value


def model_from_args(args: argparse.Namespace) -> tuple[nn.Module, ModelInfo]:
    """``(model, ModelInfo)`` for the model the command line names, on ``args.device``."""
    from densenet.loader import load_model
    from densenet.runtime import resolve_device

    if args.pretrained and not args.model:
        raise CLIError(
            "--pretrained goes with --model NAME; a --checkpoint already has its weights"
        )
    if args.model_args and not args.model:
        raise CLIError("--model-args goes with --model NAME; a --checkpoint records its own")
    pretrained = True if args.pretrained == "default" else args.pretrained
    device = resolve_device(args.device)
    model_args = _model_args(args.model_args)
    try:
        model, info = load_model(args.checkpoint, args.model, pretrained, device, model_args)
    except TypeError as error:
        if not model_args:
            raise  # not the user's arguments: a bug, kept as the traceback it is
        raise CLIError(f"--model-args: {error}") from None  # an argument DenseNet does not take
    return model, _normalization(args, info, model.in_chans)


def _normalization(args: argparse.Namespace, info: ModelInfo, channels: int) -> ModelInfo:
    """``info`` with ``--mean``/``--std``; without them, say where a weights file that records
    none gets its normalization from (a wrong one costs accuracy without an error)."""
    import dataclasses

    from densenet.io import read_metadata

    given = {k: getattr(args, k, None) for k in ("mean", "std")}
    for key, values in given.items():
        if values is not None and len(values) != channels:
            raise CLIError(f"--{key} needs {channels} values (one per input channel)")
        if values is not None and not all(math.isfinite(v) for v in values):
            raise CLIError(f"--{key} must be finite numbers, got {values}")
    if given["std"] and min(given["std"]) <= 0:
        raise CLIError(f"--std must be positive (it divides the pixels), got {given['std']}")
    if given["mean"] or given["std"]:
        chosen = dataclasses.replace(
            info,
            mean=tuple(given["mean"] or info.mean or ()) or None,
            std=tuple(given["std"] or info.std or ()) or None,
        )
        if info.mean and (chosen.mean, chosen.std) != (info.mean, info.std):
            print(
                f"densenet {args.command}: normalizing with mean {_rounded(chosen.mean)} std "
                f"{_rounded(chosen.std)} (--mean/--std), not the model's mean "
                f"{_rounded(info.mean)} std {_rounded(info.std)}",
                file=sys.stderr,
            )
        return chosen
    weights = args.pretrained if args.model else None
    if weights and Path(weights).is_file() and not read_metadata(weights).get("mean"):
        print(
            f"densenet {args.command}: {weights} records no normalization: using "
            f"{args.model}'s mean {_rounded(info.mean)} std {_rounded(info.std)}; give "
            "--mean/--std if its author normalized otherwise",
            file=sys.stderr,
        )
    return info


def _rounded(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]" if values else "(none)"


def random_weights_notice(args: argparse.Namespace) -> None:
    """Say on stderr that ``--model NAME`` without ``--pretrained`` means random weights (as
    ``densenet predict`` shows in its ``model:`` line): exports and timings of an untrained model
    are rarely what was meant. ``--pretrained default`` is offered only where the registry has
    weights for the model."""
    from densenet.hub.registry import WEIGHTS, list_weights

    model = getattr(args, "model", None)
    if not model or getattr(args, "pretrained", None):
        return
    published = model in WEIGHTS or list_weights(f"{model}.*")
    advice = (
        "add --pretrained default for the published ones"
        if published
        else ("none are published for it (--pretrained takes a weights file or URL)")
    )
    print(
        f"densenet {args.command}: note: {model} has random weights (no --pretrained); {advice}",
        file=sys.stderr,
    )


BF16_HELP = "bf16 (on CPUs with AVX512_BF16 or AMX and on GPUs; fp32 with a notice elsewhere)"


def add_precision_arguments(
    parser: argparse.ArgumentParser, calibration_default: str, bf16: str = BF16_HELP
) -> None:
    """``--precision`` and ``--calibration`` (int8's images; ``calibration_default`` says which
    images are used without it); ``bf16``: what the bf16 choice does, for the help."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help=f"arithmetic to run the model in: fp32 (the model itself, exact), {bf16} or int8 "
        "(CPU, calibrated on --calibration); accuracy and speed of each: docs/benchmarks.md",
    )
    add_calibration_argument(parser, calibration_default)


def add_calibration_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--calibration IMAGE_OR_FOLDER...``: int8's images (``default`` says which without it)."""
    parser.add_argument(
        "--calibration",
        nargs="+",
        metavar="IMAGE_OR_FOLDER",
        help=f"int8: real images to calibrate the activation ranges on (default: {default})",
    )


def unused_calibration_notice(command: str, calibration: list[str] | None, int8: bool) -> None:
    """Say that ``--calibration`` is ignored when no int8 model is made (it is not checked
    either), instead of ignoring it silently."""
    if calibration and not int8:
        print(
            f"densenet {command}: note: --calibration calibrates int8 only; ignored here "
            "(add --precision int8 to use it)",
            file=sys.stderr,
        )


def calibration_batches(
    paths: list[str],
    info: ModelInfo,
    command: str,
    source: str,
    skip_bad_images: bool = False,
    hint: str | None = None,
    advice: str = "",
) -> list[torch.Tensor]:
    """The images in ``paths`` (files or folders) through the model's eval transform, as
    batches of 32: int8 calibration data. Says on stderr how many it calibrates on and from
    where (``source``, e.g. "--calibration"), then ``advice``. An unreadable file stops it (its
    message ends with ``hint``, default: remove it or pass --skip-bad-images), or with
    ``skip_bad_images`` is left out and counted (the command names it where it reads it)."""
    import torch

    from densenet.data import SKIP_HINT, BadImageError, load_image
    from densenet.predict import list_images

    transform = info.transform()
    images, skipped = [], 0
    for path in list_images(paths):
        try:
            images.append(transform(load_image(path, hint=hint or SKIP_HINT)))
        except BadImageError:
            if not skip_bad_images:
                raise
            skipped += 1
    left_out = f" ({count(skipped, 'unreadable image')} left out)" if skipped else ""
    if not images:
        raise CLIError(f"no readable image to calibrate int8 on in {source}{left_out}")
    print(
        f"densenet {command}: int8 calibrates on {count(len(images), 'image')} of {source}"
        f"{left_out}{'; ' + advice if advice else ''}",
        file=sys.stderr,
    )
    return list(torch.stack(images).split(32))


def at_precision(
    model: nn.Module, precision: str, calibration: Callable[[], list[torch.Tensor]]
) -> tuple[nn.Module, str]:
    """``model`` to run in ``precision`` and the precision that runs: fp32 is the model itself
    (exact); bf16 and int8 its :func:`~densenet.inference.optimize_for_inference` graph (CPU:
    the fastest installed runtime; a GPU: PyTorch, bf16 only). ``calibration`` gives int8's
    batches and is called only for int8."""
    from densenet.inference import optimize_for_inference, resolve_precision

    device = model_device(model)
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return model, precision
    if precision == "int8" and device.type != "cpu":
        raise CLIError("int8 runs on the CPU (OpenVINO or onnxruntime): add --device cpu")
    backend = "auto" if device.type == "cpu" else "eager"
    batches = calibration() if precision == "int8" else None
    try:
        return optimize_for_inference(model, backend, precision=precision, calibration=batches), (
            precision
        )
    except ValueError as error:
        raise CLIError(str(error)) from None


def model_device(model: nn.Module) -> torch.device:
    """:func:`densenet.inference.model_device`, imported when a command runs."""
    from densenet.inference import model_device as device_of

    return device_of(model)
