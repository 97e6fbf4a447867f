"""Start-up time of the command line and of ``import densenet`` (issue 13; results go in
docs/benchmarks.md):

    .venv/bin/python benchmarks/cli_startup.py [--rounds N] [--json OUT.json]

Each command runs in a fresh interpreter, wall-clock time from spawn to exit. The commands run
interleaved (one of each per round), so load from other processes on a shared machine hits them
alike; the medians over the rounds are compared. Targets:

* ``densenet --help`` under 0.5x ``python -c "import torch"``;
* ``densenet models`` under 2x ``python -c "import torch"``;
* ``python -c "import densenet"`` no slower than ``python -c "import torch, torchvision"`` + 10%.

Also reported: ``densenet train --help`` and importing the library's model code (torch included),
for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PYTHON = sys.executable
DENSENET = str(Path(PYTHON).with_name("densenet"))  # the installed console script

COMMANDS = {
    "import torch": [PYTHON, "-c", "import torch"],
    "import torch, torchvision": [PYTHON, "-c", "import torch, torchvision"],
    "densenet --help": [DENSENET, "--help"],
    "densenet train --help": [DENSENET, "train", "--help"],
    "densenet models": [DENSENET, "models"],
    "import densenet": [PYTHON, "-c", "import densenet"],
    "import densenet; densenet.DenseNet": [PYTHON, "-c", "import densenet; densenet.DenseNet"],
}
# (command, reference, limit on the ratio of their medians)
TARGETS = (
    ("densenet --help", "import torch", 0.5),
    ("densenet models", "import torch", 2.0),
    ("import densenet", "import torch, torchvision", 1.1),
)


def time_once(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--json", metavar="OUT.json", help="also write the results here")
    args = parser.parse_args()

    for command in COMMANDS.values():  # warm the file cache: the first start reads from disk
        time_once(command)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            times[name].append(time_once(command))
    medians = {name: statistics.median(values) for name, values in times.items()}

    print(f"median of {args.rounds} interleaved rounds, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, load {' '.join(f'{v:.2f}' for v in os.getloadavg())}")  # fmt: skip
    for name, median in medians.items():
        spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
        print(f"  {name:38s} {median:7.3f} s   (range {spread} s)")
    results = []
    for name, reference, limit in TARGETS:
        ratio = medians[name] / medians[reference]
        met = "met" if ratio < limit else "MISSED"
        results.append(
            dict(command=name, reference=reference, ratio=ratio, limit=limit, met=ratio < limit)
        )
        print(f"  {name} / {reference}: {ratio:.3f} (target < {limit}): {met}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                dict(rounds=args.rounds, times=times, medians=medians, targets=results), indent=1
            )
        )


if __name__ == "__main__":
    main()
