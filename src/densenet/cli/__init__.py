"""The ``densenet`` command: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``add_parser(subparsers)``, which registers its sub-command and sets
# ``func(args) -> int`` as the handler.
COMMAND_MODULES = ("models", "eval", "predict", "visualize", "train", "export", "bench")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densenet",
        description="DenseNet models, training, evaluation and deployment.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(f"densenet.cli.{module_name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as error:
        print(f"densenet {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
