"""SIGINT/SIGTERM as a flag the loop checks after each step, and the :class:`Interrupted` it raises
once the step's checkpoint is saved."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from densenet.train.errors import Interrupted

if TYPE_CHECKING:
    from densenet.train.run_dir import RunDir
    from densenet.train.state import TrainState


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}
        self._validating = False

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    @contextlib.contextmanager
    def validating(self) -> Iterator[None]:
        """Mark the epoch's validation: a first SIGINT there is answered at once on stderr, as
        the checkpoint it waits for is saved only when validation ends."""
        self._validating = True
        try:
            yield
        finally:
            self._validating = False

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            # A second Ctrl-C: stop now, as an Interrupted (one line from the CLI, exit 130).
            raise Interrupted(
                "SIGINT received again: stopped without saving this epoch's training; the last "
                "checkpoint is unchanged",
                signum,
            )
        self.signum = signum
        if self._validating and signum == signal.SIGINT:
            print(
                "densenet train: SIGINT received: finishing this epoch's validation to save a "
                "checkpoint; press Ctrl-C again to stop now (the epoch's training is then lost)",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def interrupted(self, state: TrainState, run_dir: RunDir) -> Interrupted:
        """The error to raise once ``state`` is saved to ``run_dir.last``: which signal (SIGTERM
        when another rank got it), where the checkpoint is and how to continue."""
        signum = self.signum or signal.SIGTERM
        return Interrupted(
            f"{signal.Signals(signum).name} received: saved a checkpoint at step {state.step} "
            f"(epoch {state.epoch + 1}, batch {state.epoch_step}) to {run_dir.last}; continue "
            f"with densenet train --resume {run_dir.path}",
            signum,
        )
