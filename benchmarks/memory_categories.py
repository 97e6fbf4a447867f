"""Where a training step's memory peak is, and what it holds, by torch.profiler's categories.

    python benchmarks/memory_categories.py --configs efficient,efficient+bf16

For each configuration of ``benchmarks/memory.py`` (``plain``, ``efficient``, ``+bf16``, ``+cl``)
it runs three SGD steps of ``--model`` at ``--batch-size`` on the CPU, profiles the third with
``profile_memory=True`` and prints the live bytes at the step's peak by category (parameters,
optimizer state, inputs, activations, gradients, autograd's saved tensors, unclassified), the
operator running at that moment, and where in the step (0 = start, 1 = end) it falls.
"""

from __future__ import annotations

import argparse

import torch
from memory import _training_step
from torch.profiler import _memory_profiler as memory_profiler


def peak_breakdown(model: str, config: str, batch_size: int) -> dict:
    """The peak (bytes) of one training step and its split by category."""
    spec = dict(model=model, config=config, batch_size=batch_size, device="cpu")
    step, _ = _training_step(spec, config)
    step(), step()  # gradients and optimizer state exist, as in every later step
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(
        activities=activities, profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    timeline = memory_profiler.MemoryProfileTimeline(prof._memory_profile())
    times, sizes = timeline._coalesce_timeline("cpu")
    peak = max(range(len(times)), key=lambda i: sum(sizes[i]))
    names = [
        "unclassified" if c is None else c.name.lower() for c in memory_profiler._CATEGORY_TO_INDEX
    ]
    # Column 0 is unused; column k + 1 is category k (torch/profiler/_memory_profiler.py).
    split = {name: sizes[peak][k + 1] for k, name in enumerate(names)}
    running = [
        (e.duration_ns(), e.name())
        for e in prof.profiler.kineto_results.events()
        if e.name() != "[memory]"
        and e.start_ns() / 1000 <= times[peak] <= (e.start_ns() + e.duration_ns()) / 1000
    ]
    return dict(
        peak=sum(sizes[peak]),
        split=split,
        operator=min(running)[1] if running else None,
        at=(times[peak] - times[0]) / max(times[-1] - times[0], 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="densenet_bc100_k12")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--configs", default="efficient,efficient+bf16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for config in args.configs.split(","):
        result = peak_breakdown(args.model, config, args.batch_size)
        print(
            f"{config}: peak {result['peak'] / 1e6:.1f} MB during {result['operator']} "
            f"(at {result['at']:.2f} of the step)"
        )
        for name, size in result["split"].items():
            if size:
                print(f"  {name:16s} {size / 1e6:8.2f} MB")


if __name__ == "__main__":
    main()
