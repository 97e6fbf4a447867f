"""Wording shared by every user-facing message (kept free of heavy imports: the CLI uses it)."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6, most: int = 3) -> str:
    """``"; did you mean a, b?"`` for the up to ``most`` ``choices`` closest to ``word``, else
    ``""``.

    ``cutoff`` is difflib's similarity ratio in [0, 1] a choice needs to be offered.
    """
    close = difflib.get_close_matches(word, list(choices), n=most, cutoff=cutoff)
    return f"; did you mean {', '.join(close)}?" if close else ""


def count(n: int, noun: str) -> str:
    """``"1 epoch"``, ``"2 epochs"``, ``"1,200 images"``: ``n`` with ``noun`` in the right number."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def notice(message: str) -> None:
    """A one-line message to the user on stderr (never silent, never an exception)."""
    print(f"densenet: {message}", file=sys.stderr)


_said: set[str] = set()


def notice_once(message: str) -> None:
    """:func:`notice`, the first time this process says ``message`` (a dataset read once per
    split, or by several commands in one process, says what it found once)."""
    if message not in _said:
        _said.add(message)
        notice(message)
