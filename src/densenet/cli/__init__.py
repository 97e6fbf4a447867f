"""The ``densenet`` command: one sub-command per module in this package.

Building the argument parser imports no torch (each command imports what it needs when it runs),
so ``densenet --help`` and ``densenet COMMAND --help`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from densenet import __version__
from densenet.messages import did_you_mean
from densenet.progress import enabled_while

# Command name -> the module of this package that defines it (``models`` lists the zoo). Each
# module defines ``add_parser(subparsers)``, which registers its sub-command and sets
# ``func(args) -> int`` as the handler. Their imports must stay light (no torch at module level).
COMMAND_MODULES = {
    "models": "zoo",
    "eval": "eval",
    "predict": "predict",
    "visualize": "visualize",
    "train": "train",
    "export": "export",
    "bench": "bench",
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default: X)`` to the help of each option that has a default worth showing and
    does not state it already (argparse's ArgumentDefaultsHelpFormatter would also print
    ``default: None`` and skip options without help)."""
    for action in parser._actions:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or text == argparse.SUPPRESS
            or "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or default == []
        ):
            continue
        action.help = f"{text} (default: %(default)s)".lstrip()


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options every sub-command takes, after its own."""
    common = parser.add_argument_group("common options")
    common.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars or periodic progress lines on stderr (they never go to stdout)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densenet",
        description="DenseNet models, training, evaluation and deployment.",
        epilog="'densenet COMMAND --help' describes each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"densenet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES.values():
        importlib.import_module(f"densenet.cli.{module_name}").add_parser(subparsers)
    for command_parser in subparsers.choices.values():
        _add_common_options(command_parser)
        _show_defaults(command_parser)
    return parser


# The library's messages speak Python (create_model(...), pretrained=...); the command line's
# user typed flags. Each rule rewrites one such phrase into the flags that do the same.
_CLI_TERMS = (
    (r"create_model\('([^']+)', pretrained=True\)", r"--model \1 --pretrained default"),
    (r"create_model\(NAME, pretrained=\.\.\.\)", "--model NAME with --pretrained FILE"),
    (r"`densenet models` or densenet\.list_models\(\)", "`densenet models`"),
    (r"densenet\.list_models\(\)", "`densenet models`"),
    (r"densenet\.list_weights\(\)", "`densenet models --weights`"),
    (r"\bpretrained=True\b", "--pretrained default"),
    (r"\bpretrained=(?=')", "--pretrained "),
    (r"\bpretrained= ", "--pretrained "),
)


def in_cli_terms(message: str) -> str:
    """``message`` with the Python calls it suggests rewritten as the command line's flags."""
    for pattern, replacement in _CLI_TERMS:
        message = re.sub(pattern, replacement, message)
    return message


def _unknown_command(word: str) -> str | None:
    """The error for a first word that names no command (with the closest ones), else None."""
    if word.startswith("-") or word in COMMAND_MODULES:
        return None
    hint = did_you_mean(word, COMMAND_MODULES, cutoff=0.5)
    return f"unknown command {word!r}{hint} (commands: {', '.join(COMMAND_MODULES)})"


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-command's own parser (argparse keeps it in the subparsers action)."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]


def _reject_unknown(parser: argparse.ArgumentParser, command: str | None, extras: list[str]):
    """Exit 2 naming the first unrecognized flag with the command's usage and the closest
    flag the command has (argparse alone prints the top-level usage and no suggestion)."""
    if command is not None:
        parser = _command_parser(parser, command)
    flags = [word.split("=", 1)[0] for word in extras if word.startswith("-")]
    if not flags:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    known = [flag for flag in parser._option_string_actions if flag.startswith("--")]
    # The one closest flag: a typo of --model is not also --model-args.
    parser.error(f"unrecognized argument {flags[0]}{did_you_mean(flags[0], known, most=1)}")


def _unknown_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The ``--flags`` in ``argv`` its command does not have (nor abbreviates), found before
    parsing: argparse would first complain of a required option the typo was meant to give."""
    if not argv or argv[0] not in COMMAND_MODULES:
        return []
    known = _command_parser(parser, argv[0])._option_string_actions
    words = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    flags = [word.split("=", 1)[0] for word in words if word.startswith("--")]
    return [flag for flag in flags if not any(name.startswith(flag) for name in known)]


def _out_of_memory(error: BaseException, command: str) -> str | None:
    """What to tell the user of ``command`` when ``error`` is a lack of memory (the allocator's
    failure on CPU, CUDA or MPS; a data-loading worker killed, usually by the kernel's OOM killer;
    shared memory too small for the workers), not a bug; else None."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    advice = {
        "train": "use a smaller --batch-size (--set grad_accum_steps=N keeps the batch and splits "
        "it) or a smaller input_size; --set memory_efficient=true keeps deep models in less "
        "memory and --set in_memory=false reads images from disk",
        "eval": "use a smaller --batch-size",
        "predict": "use a smaller --batch-size",
        "bench": "use smaller --batch sizes",
    }.get(command, "use a smaller model or input size")
    if "DataLoader worker" in text and "Bus error" in text:
        return (
            "a data-loading worker ran out of shared memory (/dev/shm; in Docker raise "
            "--shm-size): use fewer --workers or --workers 0"
        )
    if "DataLoader worker" in text and ("signal: Killed" in text or "exited unexpectedly" in text):
        return (
            f"a data-loading worker died ({lines[-1][:200]}), most often killed by the system for "
            f"lack of memory: {advice}, or use fewer --workers"
        )
    allocator = "out of memory" in text.lower() or "can't allocate memory" in text
    if not (isinstance(error, MemoryError) or allocator):
        return None
    # torch's message is lines of allocator detail (or a DataLoader worker's wrapping of them):
    # the line that names the size says what failed.
    named = [line for line in lines if "memory" in line.lower()]
    detail = (named or lines or [type(error).__name__])[0]
    return f"out of memory ({detail[:200]}); {advice}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and (error := _unknown_command(argv[0])):
        parser.error(error)
    if unknown := _unknown_flags(parser, argv):
        _reject_unknown(parser, argv[0], unknown)
    args, extras = parser.parse_known_args(argv)
    if extras:
        _reject_unknown(parser, args.command, extras)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        with enabled_while(not args.no_progress):
            return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as error:
        print(f"densenet {args.command}: error: {in_cli_terms(str(error))}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if (message := _out_of_memory(error, args.command)) is None:
            raise
        print(f"densenet {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        # Ctrl-C: one line, not a traceback; a command may say in the exception what it undid.
        detail = f"; {stop}" if str(stop) else ""
        print(f"densenet {args.command}: interrupted{detail}", file=sys.stderr)
        return 130  # 128 + SIGINT, the shell's status for a command stopped by Ctrl-C
    except BrokenPipeError:
        # The reader of stdout left (`densenet ... | head`): stop quietly, as cat does. Python
        # would report the pipe again when it flushes stdout at exit, so point it at devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the shell's status for a writer whose reader left


if __name__ == "__main__":
    sys.exit(main())
