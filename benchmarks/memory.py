"""Training-step memory and time: plain DenseNet, torchvision-style checkpointing, ours.

Every (model, configuration) is measured in fresh subprocesses, so one measurement's memory cannot
leak into another's. Per configuration it reports:

* ``peak``: peak memory of the first training step (forward, loss, backward, SGD step) over the
  process's baseline: on CPU the growth of the peak RSS (``ru_maxrss`` after the step minus before);
  on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step;
* ``later``: the same for the second step, over the memory before it (on CPU, Linux only: the peak
  RSS is reset through ``/proc/self/clear_refs``): what every step after the first needs, without
  the first step's one-time allocations (gradients, optimizer state, and oneDNN's kernels and
  caches for each new tensor shape, which stay resident);
* ``default`` (CPU): the same RSS growth with glibc malloc's default settings (see below);
* ``live``: the allocator-independent peak of live tensor bytes during one training step, from the
  profiler's allocation events (``profile_memory=True``);
* ``saved``: bytes held for backward at the end of the forward pass (unique storages packed by
  autograd, parameters excluded). torch.utils.checkpoint keeps its inputs outside autograd's saved
  tensors, so for ``checkpoint`` this misses the features its closures hold;
* ``step``: the median step time over ``--steps`` steps, from one more child that builds all of a
  model's configurations and interleaves their steps, so machine load hits them alike;
* ``best``: the fastest of those steps (on a shared machine the one least slowed by other jobs);
* ``cpu``: the median CPU time (user + system, all threads) of those steps, divided by the number of
  torch threads: on a shared machine, time spent waiting for a core counts in ``step`` but not here.

Configurations: ``plain``; ``checkpoint``, torchvision's ``memory_efficient`` design built here as the
reference (cat -> BN -> ReLU -> conv1x1 under ``torch.utils.checkpoint(use_reentrant=False)``, as in
``torchvision.models.densenet._DenseLayer.call_checkpoint_bottleneck``); ``efficient``, this
package's ``memory_efficient=True``. Each may take options after ``+``: ``+bf16`` (forward and loss
under ``torch.autocast(device, torch.bfloat16)``, as ``amp: bf16`` trains) and ``+cl`` (model and
input in ``channels_last``), e.g. ``efficient+bf16+cl``.

On CPU, glibc's malloc raises its mmap threshold after large frees and then serves big tensors from
the heap, where freed memory stays in the RSS. ``peak``, ``live`` and ``saved`` therefore come from a
child with ``MALLOC_MMAP_THRESHOLD_`` fixed (RSS then follows the live tensors, but every big
allocation page-faults, which is slow); ``default`` (what users see) and ``step`` from children with
glibc's defaults.

    python benchmarks/memory.py                       # the full run documented in docs/benchmarks.md
    python benchmarks/memory.py --depths 100 --models none --batch-size 16 --steps 2  # a quick look
    python benchmarks/memory.py --models densenet_bc100_k12 --depths '' --steps 10 \
        --configs plain,efficient,plain+bf16,efficient+bf16,plain+bf16+cl,efficient+bf16+cl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import densenet
from densenet.models import DenseBlock

CONFIGS = ("plain", "checkpoint", "efficient")
OPTIONS = ("bf16", "cl")  # config+option: bf16 autocast, channels_last
MODELS = ("densenet_bc100_k12", "densenet_bc190_k40:16")  # name[:batch size]
DEPTHS = (100, 190, 250, 400, 700, 1000)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
GB = 1e9


# --- the torchvision-style reference --------------------------------------------------------------
def _torchvision_block_forward(block: DenseBlock, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_DenseBlock``/``_DenseLayer`` forward with ``memory_efficient=True``."""
    features = [x]
    for layer in block.values():

        def bn_function(*inputs: torch.Tensor, layer=layer) -> torch.Tensor:
            return layer.conv1(layer.relu1(layer.norm1(torch.cat(inputs, 1))))

        hidden = checkpoint(bn_function, *features, use_reentrant=False)
        features.append(layer.drop2(layer.conv2(layer.relu2(layer.norm2(hidden)))))
    return torch.cat(features, 1)


def parse_config(config: str) -> tuple[str, set[str]]:
    """``"efficient+bf16+cl"`` -> ``("efficient", {"bf16", "cl"})``."""
    base, *options = config.split("+")
    if base not in CONFIGS or not set(options) <= set(OPTIONS) or len(set(options)) < len(options):
        raise ValueError(
            f"unknown configuration {config!r}; choose from {CONFIGS}, each with optional "
            f"{', '.join('+' + o for o in OPTIONS)}"
        )
    return base, set(options)


def build_model(model: str, config: str) -> torch.nn.Module:
    """``model``: a registered name or ``bc<L>`` (DenseNet-BC, k=12, depth L) on 32x32 inputs."""
    config, options = parse_config(config)
    if model.startswith("bc"):
        net = densenet.cifar_densenet(int(model[2:]), 12)
    else:
        net = densenet.create_model(model)
    if config == "efficient":
        net.set_grad_checkpointing(True)
    elif config == "checkpoint":
        for block in net.dense_blocks():
            block.forward = types.MethodType(_torchvision_block_forward, block)
    if "cl" in options:
        net = net.to(memory_format=torch.channels_last)
    return net


# --- one measurement (runs in the child process) --------------------------------------------------
def _allocator_stats(step, params: list[torch.Tensor], profile: bool) -> dict:
    """One training step's ``saved`` bytes and (with ``profile``, CPU) ``live`` peak bytes."""
    exclude = {p.untyped_storage().data_ptr() for p in params}
    held: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    activities = [torch.profiler.ProfilerActivity.CPU]
    profiler = torch.profiler.profile(activities=activities, profile_memory=True)
    with profiler if profile else contextlib.nullcontext() as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step(backward=False)
        stats = dict(saved=sum(held.values()))
        loss.backward()
    if profile:
        # The public event list aggregates memory per op; the raw events keep the time order.
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        )
        live = stats["live"] = 0
        for _, nbytes in events:
            live += nbytes
            stats["live"] = max(stats["live"], live)
    return stats


def _training_step(spec: dict, config: str):
    """A closure running one SGD step of ``spec``'s model in ``config``, and the parameters."""
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    model = build_model(spec["model"], config).to(device).train()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    _, options = parse_config(config)
    x = torch.randn(spec["batch_size"], 3, 32, 32, device=device)
    if "cl" in options:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, model.num_classes, (spec["batch_size"],), device=device)

    def step(backward: bool = True) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled="bf16" in options):
            loss = F.cross_entropy(model(x), target)
        if backward:
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    return step, params


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` memory figure (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _later_step_peak(step) -> int | None:
    """Peak RSS growth of one more step over the RSS before it (Linux: the peak is reset through
    ``/proc/self/clear_refs``); None where that is not available."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
        base = _proc_status("VmRSS")
    except OSError:
        return None
    step()
    return _proc_status("VmHWM") - base


def measure_memory(spec: dict) -> dict:
    """Peak memory (bytes) of the first training step over the process's baseline, of a later
    step over the memory before it, and allocator stats."""
    step, params = _training_step(spec, spec["config"])
    if spec["device"] == "cpu":
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        later = _later_step_peak(step)
    else:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        later = torch.cuda.max_memory_allocated() - base
    result = dict(spec, peak=peak, later=later, params=sum(p.numel() for p in params))
    if spec["allocator_stats"]:
        result.update(_allocator_stats(step, params, profile=spec["device"] == "cpu"))
    return result


def measure_time(spec: dict) -> dict:
    """Median step time (s) of each configuration, the configurations' steps interleaved.

    Interleaving in one process exposes every configuration to the same machine load. The
    first ``warmup`` rounds are not counted: the first allocates gradients and optimizer state,
    and on this project's CPU the plain model's float32 step was seen to get faster for another
    10-20 steps in a process holding several models (docs/benchmarks.md, "bf16 training").
    """
    steps = {config: _training_step(spec, config)[0] for config in spec["configs"]}
    times: dict[str, list[float]] = {config: [] for config in steps}
    cpu_times: dict[str, list[float]] = {config: [] for config in steps}
    threads = torch.get_num_threads()
    warmup = spec.get("warmup", 1)
    for round_ in range(warmup + spec["steps"]):
        order = list(steps) if round_ % 2 == 0 else list(reversed(steps))
        for config in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[config]()
            times[config].append(time.perf_counter() - start)
            cpu_times[config].append((time.process_time() - cpu_start) / threads)
    step = {config: statistics.median(t[warmup:]) for config, t in times.items()}
    best = {config: min(t[warmup:]) for config, t in times.items()}
    cpu = {config: statistics.median(t[warmup:]) for config, t in cpu_times.items()}
    return dict(spec, step=step, best=best, cpu=cpu, times=times, threads=threads)


def run_child(spec: dict, malloc_env: bool, timeout: float) -> dict:
    """``measure_<kind>(spec)`` in a fresh interpreter; failures (e.g. out of memory) -> ``error``."""
    env = dict(os.environ, **(MALLOC_ENV if malloc_env else {}))
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout:.0f} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return dict(spec, error=tail)
    return json.loads(lines[-1])


def measure_model(model: str, configs: list[str], args: argparse.Namespace) -> list[dict]:
    """One row per configuration: memory children (fresh processes), then one timing child.

    On CPU, each configuration's memory is measured twice: with the fixed mmap threshold (``peak``,
    ``live``, ``saved``) and with glibc's defaults (``peak_default``).
    """
    model, _, batch_size = model.partition(":")
    spec = dict(model=model, batch_size=int(batch_size or args.batch_size), device=args.device)
    cpu = args.device == "cpu"
    rows = []
    for config in configs:
        memory = dict(spec, kind="memory", config=config)
        row = run_child(dict(memory, allocator_stats=True), cpu, args.timeout)
        if cpu and "error" not in row:
            default = run_child(dict(memory, allocator_stats=False), False, args.timeout)
            row["peak_default"] = default.get("peak")
        rows.append(row)
    measured = [row["config"] for row in rows if "error" not in row]
    if measured and args.steps > 0:
        timing = dict(spec, kind="time", configs=measured, steps=args.steps, warmup=args.warmup)
        timing = run_child(timing, False, args.timeout)
        for row in rows:
            if row["config"] in timing.get("step", {}):
                for key in ("step", "best", "cpu", "times"):
                    row[key] = timing[key][row["config"]]
                # ``times`` holds every round; the first ``warmup`` are not in the statistics.
                row.update(steps=args.steps, warmup=args.warmup)
    for row in rows:
        print(fmt_row(row), flush=True)
    return rows


# --- the run --------------------------------------------------------------------------------------
def _predict_peak(points: list[tuple[int, float]], depth: int) -> float | None:
    """Quadratic (or, with two points, linear) extrapolation of peak memory to ``depth``."""
    if len(points) < 2:
        return None
    import numpy as np

    depths, peaks = zip(*points, strict=True)
    coeffs = np.polyfit(depths, peaks, min(2, len(points) - 1))
    return float(np.polyval(coeffs, depth))


def _deepest_within(
    points: list[tuple[int, float]], budget: float, limit: int = 5000
) -> int | None:
    """Largest DenseNet-BC depth L = 6n + 4 whose extrapolated peak stays within ``budget``."""
    best = None
    for depth in range(100, limit + 1, 6):
        predicted = _predict_peak(points, depth)
        if predicted is None or predicted > budget:
            break
        best = depth
    return best


HEADER = f"{'model':>20} {'batch':>5} {'config':>17} {'peak':>7} {'later':>7} {'default':>7} {'live':>7} {'saved':>7} {'step s':>8} {'best s':>6} {'cpu s':>6}"


def fmt_row(r: dict) -> str:
    def gb(key: str) -> str:
        return f"{r[key] / GB:7.2f}" if r.get(key) is not None else "      -"

    if "error" in r:
        return f"{r['model']:>20} {r['batch_size']:>5} {r['config']:>17}   {r['error']}"
    memory = " ".join(gb(key) for key in ("peak", "later", "peak_default", "live", "saved"))
    step = f"{r['step']:8.2f}" if "step" in r else "       -"
    times = " ".join(f"{r[key]:6.2f}" if key in r else "     -" for key in ("best", "cpu"))
    return f"{r['model']:>20} {r['batch_size']:>5} {r['config']:>17} {memory} {step} {times}"


def _references(config: str) -> list[str]:
    """What ``config`` is compared with: for ours, plain and checkpointing with the same options;
    for bf16, the same configuration in float32 (in its layout and in the default one) and, for
    ours, plain bf16 in either layout and plain float32 (issue 14's targets)."""
    base, options = parse_config(config)
    suffix = "".join(f"+{o}" for o in OPTIONS if o in options)
    refs = [ref + suffix for ref in ("plain", "checkpoint") if base == "efficient"]
    if "bf16" in options:
        refs += ["+".join([base, *(o for o in OPTIONS if o in options and o != "bf16")]), base]
        refs += ["plain+bf16", "plain+bf16+cl", "plain"] if base == "efficient" else []
    return list(dict.fromkeys(ref for ref in refs if ref != config))


def summary(results: list[dict]) -> list[str]:
    """Per model: memory and step time of ours and of bf16 relative to their references
    (:func:`_references`); ``step 0.95x plain+bf16`` = 0.95 times plain bf16's step time."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        by_config = {r["config"]: r for r in results if r["model"] == model and "error" not in r}
        for config, ours in by_config.items():
            parts = [
                f"{key} {ours[key] / by_config[ref][key]:.2f}x {ref}"
                for ref in _references(config)
                if ref in by_config
                for key in ("peak", "later", "live", "step", "best", "cpu")
                if key in ours and key in by_config[ref]
            ]
            if parts:
                lines.append(f"{model:>20} {config}: " + ", ".join(parts))
    return lines


def run(args: argparse.Namespace) -> list[dict]:
    print(
        "memory in GB (1e9 bytes); peak: RSS growth in the first step (fixed mmap threshold), "
        "later: in the second, default: the first with default malloc, live: profiler's live "
        "tensor bytes, saved: held for backward"
    )
    print(HEADER)
    results = []
    for model in args.models:
        results += measure_model(model, args.configs, args)
    curves: dict[str, list[tuple[int, float]]] = {c: [] for c in args.configs}
    for depth in args.depths:
        configs = []
        for config in args.configs:
            predicted = _predict_peak(curves[config], depth)
            if predicted is not None and predicted > args.max_gb * GB:
                print(f"{'bc' + str(depth):>20} {args.batch_size:>5} {config:>10}   skipped: "
                      f"predicted {predicted / GB:.1f} GB > --max-gb {args.max_gb}")  # fmt: skip
            else:
                configs.append(config)
        for row in measure_model(f"bc{depth}", configs, args):
            results.append(row)
            if "error" not in row:
                curves[row["config"]].append((depth, row["peak"]))
    if args.budget_gb:
        for config in args.configs:
            depth = _deepest_within(curves[config], args.budget_gb * GB)
            # Verify the extrapolation; step down while the measured peak is over the budget.
            while depth is not None and depth > 40:
                (row,) = measure_model(f"bc{depth}", [config], args)
                results.append(dict(row, budget_probe=args.budget_gb))
                if "error" not in row and row["peak"] <= args.budget_gb * GB:
                    break
                depth -= 6 * max(1, depth // 60)
    return results


def plot(results: list[dict], path: str, budget_gb: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for config in dict.fromkeys(r["config"] for r in results):
        points = sorted(
            (int(r["model"][2:]), r["peak"] / GB)
            for r in results
            if r["config"] == config and r["model"].startswith("bc") and "error" not in r
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=config)
    if budget_gb:
        ax.axhline(budget_gb, color="gray", linestyle="--", linewidth=1, label="budget")
    first = results[0]
    ax.set_xlabel("depth L (DenseNet-BC, k=12, 32x32)")
    ax.set_ylabel(f"peak training-step memory (GB, {first['device']})")
    ax.set_title(f"Training memory against depth, batch {first['batch_size']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed training steps per configuration after the --warmup ones (0 = memory only)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed interleaved rounds before the timed ones (at least 1)",
    )
    p.add_argument(
        "--depths",
        type=lambda s: [int(d) for d in s.split(",") if d],
        default=DEPTHS,
        help="DenseNet-BC k=12 depths for the sweep, comma-separated ('' = none)",
    )
    p.add_argument(
        "--models",
        type=lambda s: [m for m in s.split(",") if m not in ("", "none")],
        default=MODELS,
        help="named models to measure, comma-separated, each NAME or NAME:BATCH ('none' = none)",
    )
    p.add_argument("--configs", type=lambda s: s.split(","), default=CONFIGS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--max-gb",
        type=float,
        default=16.0,
        help="skip sweep points whose extrapolated peak exceeds this",
    )
    p.add_argument(
        "--budget-gb",
        type=float,
        default=0.0,
        help="also find the deepest model that trains within this budget (0 = skip)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads in children (0 = default)")
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("--plot", help="write a PNG of memory against depth")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step allocates gradients and state)")
    for config in args.configs:
        try:
            parse_config(config)
        except ValueError as e:
            p.error(str(e))
    return args


def _load() -> str:
    """The 1, 5 and 15-minute load averages (all cores busy = the number of cores)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        measure = measure_memory if spec["kind"] == "memory" else measure_time
        print(json.dumps(measure(spec)))
        return 0
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup} untimed, "
          f"memory children with {MALLOC_ENV}")  # fmt: skip
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {_load()}")
    results = run(args)
    print("\n".join(summary(results)))
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot, args.budget_gb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
