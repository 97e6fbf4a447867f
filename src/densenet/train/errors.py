"""How a run stops early: an error that says what to fix, or a signal after a saved checkpoint."""

from __future__ import annotations


class TrainingError(ValueError):
    """A run that cannot start or continue; the message says why and what to do."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint of the current step was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
