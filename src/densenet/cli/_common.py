"""Options and helpers shared by the commands that run a model (eval, predict, visualize,
export, bench): which model to load, and what to tell the user about it."""

from __future__ import annotations

import argparse
import sys

from densenet.cli import CLIError


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
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def model_from_args(args: argparse.Namespace):
    """``(model, ModelInfo)`` for the model the command line names, on ``args.device``."""
    from densenet.loader import load_model
    from densenet.runtime import resolve_device

    if args.pretrained and not args.model:
        raise CLIError(
            "--pretrained goes with --model NAME; a --checkpoint already has its weights"
        )
    pretrained = True if args.pretrained == "default" else args.pretrained
    return load_model(args.checkpoint, args.model, pretrained, resolve_device(args.device))


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
