"""Progress of long operations: a tqdm bar in a terminal, a periodic line everywhere else.

Every long loop (training, evaluation, prediction over a folder, export verification, bench, int8
calibration, decoding a dataset) reports through :func:`progress`, always on stderr so that
``--json`` output on stdout stays pure JSON. Out of a terminal (logs, CI, ``nohup``) a line such as
``eval: 640/2000 img (32%), 21.3 img/s, ETA 1:04`` is written at most every
:data:`INTERVAL_S` seconds (``DENSENET_PROGRESS_INTERVAL`` overrides it), and a summary line at
the end when any line was written. ``densenet ... --no-progress`` (:func:`set_enabled`) turns all of
it off; ranks other than 0 of a ``torchrun`` job never report.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

INTERVAL_S = 10.0
INTERVAL_ENV = "DENSENET_PROGRESS_INTERVAL"

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn progress reporting on or off for the whole process (``--no-progress``)."""
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def enabled_while(enabled: bool) -> Iterator[None]:
    """Progress on or off for the duration of the block, then as it was (one command's
    ``--no-progress`` must not outlive the command when ``densenet.cli.main`` is called in-process)."""
    global _enabled
    previous = _enabled
    _enabled = bool(enabled)
    try:
        yield
    finally:
        _enabled = previous


def is_enabled() -> bool:
    """Whether progress is reported: not switched off, and rank 0 (or no ``torchrun``)."""
    from densenet.runtime import is_main_process

    return _enabled and is_main_process()


def _interval() -> float:
    value = os.environ.get(INTERVAL_ENV)
    if value is None:
        return INTERVAL_S
    try:
        return max(float(value), 0.0)
    except ValueError:
        raise ValueError(
            f"{INTERVAL_ENV}={value!r} must be a number of seconds between progress lines"
        ) from None


def format_duration(seconds: float) -> str:
    """``75.4 -> '1:15'``, ``3725 -> '1:02:05'``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Counts ``unit``s of work done out of ``total`` (None: unknown) and reports them.

    Use as a context manager with :meth:`update`, or iterate it when made with an ``iterable``
    (:func:`progress`). ``stream`` (default stderr), ``interval`` (seconds between lines) and
    ``clock`` exist for tests.
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "img",
        size: Callable[[Any], int] | None = None,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__") and not size:
            total = len(iterable)
        self.total = total
        self.desc = desc
        self.unit = unit
        self.size = size
        self.enabled = is_enabled() if enabled is None else enabled and is_enabled()
        self.stream = stream if stream is not None else sys.stderr
        self.interval = _interval() if interval is None else interval
        self.clock = clock
        self.done = 0
        self.postfix = ""
        self.lines = 0
        self.start = clock()
        self.last_line = self.start
        self.bar = None
        if self.enabled and _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
            )

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this Progress was made without an iterable: call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(self.size(item) if self.size else 1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more units are done."""
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._write(self._status(now))

    def set_postfix(self, **values: Any) -> None:
        """Extra ``key=value`` figures shown after the counts (e.g. the running loss)."""
        if self.bar is not None:
            self.bar.set_postfix(**values)
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.lines:
            elapsed = self.clock() - self.start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            self._write(
                f"{self.desc}: {self.done} {self.unit} in {format_duration(elapsed)}, "
                f"{rate:.3g} {self.unit}/s" + (f", {self.postfix}" if self.postfix else "")
            )
        self.enabled = False  # closing twice writes nothing more

    def _status(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            count = f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            count = f"{self.done} {self.unit}"
        line = f"{self.desc}: {count}, {rate:.3g} {self.unit}/s"
        if self.total and rate > 0:
            line += f", ETA {format_duration(max(self.total - self.done, 0) / rate)}"
        return line + (f", {self.postfix}" if self.postfix else "")

    def _write(self, line: str) -> None:
        self.lines += 1
        print(line, file=self.stream, flush=True)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return False


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "img",
    size: Callable[[Any], int] | None = None,
    enabled: bool | None = None,
) -> Progress:
    """A :class:`Progress` over ``iterable`` (or to :meth:`~Progress.update` by hand).

    ``size(item)`` is how many ``unit``s an item is (e.g. the images of a batch); ``total``
    defaults to ``len(iterable)`` when items count one each. ``enabled=False`` silences this one
    (e.g. on a library call whose caller asked for quiet); otherwise the process-wide switch holds.
    """
    return Progress(iterable, total=total, desc=desc, unit=unit, size=size, enabled=enabled)
