"""Timing inference callables side by side: :func:`measure` (used by ``densenet bench`` and
``benchmarks/inference.py``).

Backends run interleaved (one call of each per round), so load from other processes hits them
alike and their ratios stay meaningful on a busy machine. Reported per backend: img/s (batch x
rounds / total time), latency p50/p90 (ms), the extra resident memory while it warmed up (MB,
sampled from /proc), and the speed ratio to the references (``vs_*``: ratio of the img/s;
``vs_*_round_median``: median over rounds of each round's ratio, the one least moved by load that
comes and goes).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from densenet.progress import progress

if TYPE_CHECKING:  # torch is imported when a measurement runs
    import torch


class PeakRSS:
    """Peak resident memory (bytes) of this process while the context is open, sampled."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.current())
            self.done.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


REFERENCES = ("torchvision", "torchvision-bf16", "onnxruntime", "openvino", "openvino-default")
SETTLE_S = 0.05  # pause between timed calls, not timed


def measure(
    backends: dict[str, Callable],
    batch: torch.Tensor,
    iters: int,
    warmup: int,
    min_time: float = 0.0,
) -> dict[str, dict]:
    """Interleaved timing of every backend on ``batch``: img/s, p50/p90 ms, extra memory MB.

    ``iters`` rounds, then more until every backend's timed calls add up to ``min_time`` seconds.
    """
    import torch

    with torch.no_grad():
        times, extra_mb, rounds = _time_rounds(backends, batch, iters, warmup, min_time)
    return _summarize(times, extra_mb, rounds, batch.shape[0])


def _time_rounds(
    backends: dict[str, Callable], batch: torch.Tensor, iters: int, warmup: int, min_time: float
) -> tuple[dict[str, list[float]], dict[str, float], int]:
    """Per-backend call times (s), extra memory (MB) while warming up, and the rounds run."""
    times: dict[str, list[float]] = {name: [] for name in backends}
    extra_mb: dict[str, float] = {}
    for name, fn in backends.items():
        base = PeakRSS.current()
        with PeakRSS() as rss:
            for _ in range(warmup):
                fn(batch)
        extra_mb[name] = (rss.peak - base) / 2**20
    rounds = 0
    # With --min-time the number of rounds is open-ended: no total, no ETA.
    total = None if min_time else iters
    with progress(total=total, desc=f"bench batch {len(batch)}", unit="round") as bar:
        while rounds < iters or min(map(sum, times.values())) < min_time:
            rounds += 1
            for name, fn in backends.items():
                start = time.perf_counter()
                fn(batch)
                times[name].append(time.perf_counter() - start)
                # onnxruntime's idle workers spin for a while after a run (its default) and would
                # take the cores from the next backend timed: measured 1.5x slower at batch 1
                # without this.
                time.sleep(SETTLE_S)
            bar.update()
    return times, extra_mb, rounds


def _summarize(times: dict[str, list[float]], extra_mb: dict[str, float], rounds: int, n: int):
    """Each backend's img/s, p50/p90 ms, extra memory and ratios to the references."""
    results = {}
    for name, values in times.items():
        q = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
        results[name] = dict(
            img_per_s=n * rounds / sum(values),
            rounds=rounds,
            p50_ms=1000 * statistics.median(values),
            p90_ms=1000 * q[8],
            extra_memory_mb=round(extra_mb[name], 1),
        )
    for name, row in results.items():
        for ref in REFERENCES:
            if ref in results:
                row[f"vs_{ref}"] = row["img_per_s"] / results[ref]["img_per_s"]
                # Calls of one round run seconds apart, so their ratio is the least disturbed
                # by load that comes and goes (on shared VMs: memory contention for seconds).
                per_round = [t_ref / t for t_ref, t in zip(times[ref], times[name], strict=True)]
                row[f"vs_{ref}_round_median"] = statistics.median(per_round)
    return results


def load_average() -> str:
    """The 1, 5 and 15-minute load averages as text (\"unknown\" where the OS has none)."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"
