"""``densenet bench``: inference speed of one model on several backends, measured in one run.

Backends run interleaved (one call of each per round), so load from other processes hits them
alike and the ratios stay meaningful on a busy machine. Reported per backend and batch size:
img/s (batch x rounds / total time), latency p50/p90 (ms), the extra resident memory while it ran
(MB, sampled from /proc), and the speed ratio to the torchvision eager model and to onnxruntime and
OpenVINO on the plain export (when they run): the ratio of the img/s (``vs_*``) and the median
over rounds of each round's ratio (``vs_*_round_median``, the one least moved by load that comes
and goes).

``--precision fp32,bf16,int8`` runs each of our ``optimized*`` backends at each precision (rows
``optimized``, ``optimized:bf16``, ``optimized:int8``) beside the references at their own
precision: torchvision eager fp32 (``torchvision``) and under bf16 autocast with channels_last
(``torchvision-bf16``), onnxruntime fp32, OpenVINO pinned to f32 (``openvino``) and OpenVINO's own
default (``openvino-default``: bf16 on CPUs with AVX512_BF16 or AMX). Every row has its
``precision``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from densenet.benchmark import load_average, measure
from densenet.cli import CLIError
from densenet.cli._common import (
    PRECISIONS,
    add_calibration_argument,
    add_model_arguments,
    calibration_batches,
    model_from_args,
    random_weights_notice,
    unused_calibration_notice,
)

if TYPE_CHECKING:  # torch is imported when the command runs, not for --help
    import torch
    from torch import nn

BACKENDS = (
    "torchvision",
    "eager",
    "channels_last",
    "optimized",
    "optimized-eager",
    "optimized-compile",
    "optimized-onnxruntime",
    "optimized-openvino",
    "onnxruntime",
    "openvino",
    "onnxruntime-microbatch",
    "openvino-microbatch",
    "int8",
    "torchvision-bf16",
    "openvino-default",
)
DEFAULT_BACKENDS = (
    "torchvision,optimized,optimized-eager,optimized-onnxruntime,onnxruntime,openvino"
)
# References added to the default backends when a precision is asked for: that precision's
# own best known way to run the model.
LOW_PRECISION_REFERENCES = {"bf16": ("torchvision-bf16", "openvino-default")}
# The precision each reference computes in ("default": the runtime picks; see _reference_row).
REFERENCE_PRECISION = {
    "torchvision": "fp32",
    "eager": "fp32",
    "channels_last": "fp32",
    "onnxruntime": "fp32",
    "openvino": "fp32",
    "onnxruntime-microbatch": "fp32",
    "openvino-microbatch": "fp32",
    "int8": "int8",
    "torchvision-bf16": "bf16",
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="inference speed on several backends (img/s, latency, memory)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--batch", default="1,16", help="comma-separated batch sizes (default 1,16)"
    )
    parser.add_argument(
        "--backends",
        help=f"comma-separated, from {', '.join(BACKENDS)} (default {DEFAULT_BACKENDS}, and "
        "torchvision-bf16,openvino-default when --precision has bf16); openvino is skipped "
        "with a note when not installed",
    )

    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--iters", type=int, default=10, help="timed rounds per batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument(
        "--min-time",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after --iters rounds, more rounds until every backend has run this long in timed "
        "calls (default 0): small batches then get as many seconds of samples as large ones",
    )
    parser.add_argument("--size", type=int, help="input height=width (default: the model's)")
    parser.add_argument(
        "--micro-batch",
        type=int,
        metavar="N",
        help="images per call for the optimized-* and *-microbatch backends (default: sized to "
        "the cache, see optimize_for_inference; 0: never split)",
    )
    parser.add_argument(
        "--streams",
        type=int,
        metavar="N",
        help="openvino streams for the optimized and openvino-microbatch backends (default: "
        "--threads, one thread per stream; see optimize_for_inference)",
    )
    _add_precision_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        help="comma-separated precisions for the optimized* backends, from "
        f"{', '.join(PRECISIONS)} (default fp32; int8 needs --calibration); a backend that "
        "cannot run one is skipped with a note",
    )
    add_calibration_argument(parser, "none: required for int8")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show onnxruntime's own warnings (int8 calibration prints dozens)",
    )


def torchvision_model(model: nn.Module) -> nn.Module:
    """torchvision's DenseNet with ``model``'s weights, or ``model`` itself if torchvision
    cannot build that architecture (CIFAR stems, blur, basic layers)."""
    import torchvision

    from densenet.hub.saving import to_torchvision_state_dict

    try:
        state = to_torchvision_state_dict(model)
    except ValueError:
        return model
    cfg = model.config
    net = torchvision.models.DenseNet(
        cfg["growth_rate"],
        tuple(cfg["block_config"]),
        cfg["num_init_features"],
        cfg["bn_size"],
        num_classes=cfg["num_classes"],
    )
    net.load_state_dict(state)
    return net.eval()


def _calibration_batches(args: argparse.Namespace, info) -> list[torch.Tensor]:
    if not args.calibration:
        raise CLIError("int8 calibrates on real images: add --calibration IMAGES")
    return calibration_batches(
        args.calibration, info, "bench", "--calibration", hint="remove it from --calibration"
    )


def _calibrates(names: list[str], precisions: tuple[str, ...]) -> bool:
    """Will a row run int8 (and so need the calibration images)?"""
    from densenet.inference import PRECISION_BACKENDS

    int8_rows = ("optimized", *(f"optimized-{b}" for b in PRECISION_BACKENDS["int8"]))
    return "int8" in names or ("int8" in precisions and any(n in int8_rows for n in names))


def _unreached(
    precisions: tuple[str, ...], names: list[str], precision_of: dict, skipped: dict
) -> dict[str, str]:
    """A note for each precision asked for that no backend runs and no skipped row explains:
    ``--precision`` applies to the optimized* backends only."""
    tried = {row.split(":")[-1] for row in skipped if ":" in row}
    tried |= {"int8"} if "int8" in skipped else set()  # the legacy int8 backend
    optimized = any(name.startswith("optimized") for name in names)
    return {
        f"--precision {precision}": "no backend given runs it; --precision sets the optimized* "
        "backends' precision (add --backends optimized)"
        for precision in precisions
        if precision not in {*precision_of.values(), *tried}
        and not (optimized and precision == "fp32")
    }


def build_backends(
    names: list[str],
    model: nn.Module,
    example: torch.Tensor,
    threads: int,
    calibration: list[torch.Tensor] | None = None,
    micro_batch: int | None = None,
    streams: int | None = None,
    precisions: tuple[str, ...] = ("fp32",),
    quantize_options: dict | None = None,
) -> tuple[dict[str, Callable], dict[str, str], dict[str, str]]:
    """Callables for the requested backends, a note for each one skipped (and why), and the
    precision each computes in.

    ``example`` is a ``(1, C, H, W)`` input for tracing; ``calibration``: the int8 calibration
    batches (None: int8 rows are skipped, naming --calibration); ``micro_batch`` and
    ``streams`` as in :func:`~densenet.inference.optimize_for_inference`; each ``optimized*``
    backend runs at each of ``precisions`` (rows ``NAME`` for fp32, ``NAME:bf16``, ``NAME:int8``);
    ``quantize_options`` go to :func:`~densenet.quantization.quantize_onnx`.
    """
    made: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    precision_of: dict[str, str] = {}
    options = RunOptions(threads, calibration, micro_batch, streams, quantize_options)
    for name in names:
        if name == "optimized" or name.startswith("optimized-"):
            backend = name.removeprefix("optimized").removeprefix("-") or "auto"
            for precision in precisions:
                row = name if precision == "fp32" else f"{name}:{precision}"
                try:
                    made[row], precision_of[row] = _optimized(
                        model, backend, precision, size_of(example), options
                    )
                except ValueError as error:
                    skipped[row] = str(error)
            continue
        try:
            made[name], precision_of[name] = _reference(name, model, example, options)
        except ValueError as error:
            skipped[name] = str(error)
    return made, skipped, precision_of


def size_of(example: torch.Tensor) -> tuple[int, int]:
    return tuple(example.shape[2:])


@dataclass(frozen=True)
class RunOptions:
    """How every backend of one ``bench`` run is built (see :func:`build_backends`)."""

    threads: int
    calibration: list[torch.Tensor] | None
    micro_batch: int | None
    streams: int | None
    quantize_options: dict | None


def _optimized(
    model: nn.Module, backend: str, precision: str, size: tuple[int, int], options: RunOptions
) -> tuple[Callable, str]:
    """Our graph on ``backend`` at ``precision``; a ``ValueError`` when that cannot run here."""
    from densenet import runtime
    from densenet.inference import backend_for, optimize_for_inference

    if precision == "bf16" and not runtime.native_bf16("cpu"):
        raise ValueError("this CPU has no native bfloat16 (AVX512_BF16 or AMX)")
    backend_for(precision, backend, lambda name: f"optimized-{name}")  # this command's names
    if precision == "int8" and options.calibration is None:
        raise ValueError("int8 calibrates on real images: add --calibration IMAGES")
    fn = optimize_for_inference(
        model,
        backend,
        precision=precision,
        calibration=options.calibration if precision == "int8" else None,
        input_size=size,
        threads=options.threads,
        micro_batch=options.micro_batch,
        streams=options.streams if backend in ("auto", "openvino") else None,
        quantize_options=options.quantize_options,
    )
    return fn, precision


def _reference(
    name: str, model: nn.Module, example: torch.Tensor, options: RunOptions
) -> tuple[Callable, str]:
    """A reference backend (not our ``optimized*`` graph) and its precision; a ``ValueError``
    when it cannot run here (a missing runtime)."""
    from densenet.inference import ChannelsLast
    from densenet.runtimes import RUNTIMES, onnx_bytes

    if name == "torchvision":
        return torchvision_model(model), "fp32"
    if name == "torchvision-bf16":
        from densenet import runtime

        if not runtime.native_bf16("cpu"):  # emulated: no row to compare ours with
            raise ValueError("this CPU has no native bfloat16 (AVX512_BF16 or AMX)")
        return Bf16Autocast(ChannelsLast(torchvision_model(model))), "bf16"
    if name == "eager":
        return model, "fp32"
    if name == "channels_last":
        return ChannelsLast(copy.deepcopy(model)), "fp32"
    if name == "int8":
        return _optimized(model, "auto", "int8", size_of(example), options)
    plain = onnx_bytes(model, example[:1])
    if name == "openvino-default":
        runtime = RUNTIMES["openvino"](plain, options.threads, precision=None)
        return runtime, f"default ({runtime.default_precision()})"
    return _plain_runtime(name, plain, model, options), "fp32"


class Bf16Autocast:
    """``module`` under ``torch.autocast`` in bfloat16 (float32 logits out): how a PyTorch user
    runs bf16 without this package."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.autocast(x.device.type, torch.bfloat16):
            return self.module(x.contiguous(memory_format=torch.channels_last)).float()


def _plain_runtime(name: str, onnx: bytes, model: nn.Module, options: RunOptions) -> Callable:
    """Backend ``onnxruntime``/``openvino`` on the plain export, or ``*-microbatch``: the plain
    export run in our default micro-batches (and OpenVINO streams), which shows how much of our
    gain a user of the runtime alone would get by scheduling the batch the same. A missing
    runtime is a ``ValueError`` (the backend is skipped)."""
    from densenet.inference import micro_batched
    from densenet.runtimes import RUNTIMES

    threads = options.threads
    extra = {"streams": options.streams or threads} if name == "openvino-microbatch" else {}
    runtime = RUNTIMES[name.removesuffix("-microbatch")](onnx, threads, **extra)
    if name.endswith("-microbatch"):
        return micro_batched(runtime, model, options.micro_batch)
    return runtime


# Table columns: title, report key.
RATIO_COLUMNS = (
    ("vs tv", "vs_torchvision"),
    ("vs tvbf", "vs_torchvision-bf16"),
    ("vs ort", "vs_onnxruntime"),
    ("ort rnd", "vs_onnxruntime_round_median"),
    ("vs ov", "vs_openvino"),
    ("ov rnd", "vs_openvino_round_median"),
    ("vs ovd", "vs_openvino-default"),
    ("ovd rnd", "vs_openvino-default_round_median"),
)


def _parse_args(args: argparse.Namespace) -> tuple[list[int], list[str], tuple[str, ...]]:
    """The batch sizes, backend names and precisions asked for; a ``CLIError`` for any
    impossible value."""
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise CLIError(f"--batch must list integers like 1,16, got {args.batch!r}") from None
    if (
        min(batches) < 1
        or args.iters < 1
        or args.threads < 1
        or min(args.warmup, args.min_time) < 0
    ):
        raise CLIError("--batch, --iters and --threads must be >= 1, --warmup and --min-time >= 0")
    if args.micro_batch is not None and args.micro_batch < 0:
        raise CLIError(f"--micro-batch must be >= 0 (0: never split), got {args.micro_batch}")
    if args.streams is not None and not 1 <= args.streams <= args.threads:
        raise CLIError(f"--streams must be between 1 and --threads, got {args.streams}")
    precisions = tuple(_comma_list(args.precision or "fp32", PRECISIONS, "precision"))
    if args.backends is None:
        extra = [ref for p in precisions for ref in LOW_PRECISION_REFERENCES.get(p, ())]
        args.backends = ",".join([DEFAULT_BACKENDS, *extra])
    return batches, _comma_list(args.backends, BACKENDS, "backend"), precisions


def _comma_list(text: str, choices: tuple[str, ...], what: str) -> list[str]:
    """The names in comma-separated ``text``; a ``CLIError`` naming any not in ``choices``."""
    from densenet.messages import did_you_mean

    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        hint = did_you_mean(unknown[0], choices) if unknown else ""
        raise CLIError(
            f"unknown {what}(s) {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(choices)}{hint}"
        )
    return names


def run(args: argparse.Namespace) -> int:
    batches, names, precisions = _parse_args(args)
    import torch

    torch.set_num_threads(args.threads)
    random_weights_notice(args)
    model, info = model_from_args(args)
    model = model.cpu().eval()
    size = args.size or info.input_size[-1]
    example = torch.randn(1, model.in_chans, size, size)
    unused_calibration_notice("bench", args.calibration, "int8" in (*precisions, *names))
    calibration = None
    if _calibrates(names, precisions):  # unreadable images: an error before any work
        # At the size measured, resized as the model's transform does (the graph is traced there).
        at_size = dataclasses.replace(info, input_size=(info.input_size[0], size, size))
        calibration = _calibration_batches(args, at_size)
    backends, skipped, precision_of = build_backends(
        names,
        model,
        example,
        args.threads,
        calibration,
        args.micro_batch,
        args.streams,
        precisions,
        {"verbose": args.verbose},
    )
    if args.precision is not None:  # asked for, not the default
        skipped.update(_unreached(precisions, names, precision_of, skipped))
    if not backends:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise CLIError(f"no backend can run here ({reasons})")
    report = dict(
        model=info.name,
        source=info.source,
        size=size,
        threads=args.threads,
        iters=args.iters,
        min_time=args.min_time,
        load_before=load_average(),
        skipped=skipped,
        results={},
    )
    for n in batches:
        batch = torch.randn(n, model.in_chans, size, size)
        rows = measure(backends, batch, args.iters, args.warmup, args.min_time)
        for name, row in rows.items():
            row["precision"] = precision_of[name]
        report["results"][str(n)] = rows
    report["load_after"] = load_average()
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0


def _print_table(report: dict) -> None:
    """The report of :func:`run` as a table, one row per batch size and backend."""
    size, threads = report["size"], report["threads"]
    print(f"{report['source']}, {size}x{size}, {threads} threads, load {report['load_before']}")
    header = f"{'batch':>5} {'backend':28} {'precision':>16} {'img/s':>8} {'p50 ms':>9} {'p90 ms':>9} {'+MB':>7}"
    print(header + "".join(f" {title:>7}" for title, _ in RATIO_COLUMNS))
    for n, rows in report["results"].items():
        for name, r in rows.items():
            ratios = " ".join(
                f"{r[key]:7.2f}" if key in r else f"{'-':>7}" for _, key in RATIO_COLUMNS
            )
            print(
                f"{n:>5} {name:28} {r['precision']:>16} {r['img_per_s']:8.2f} {r['p50_ms']:9.1f} {r['p90_ms']:9.1f} "
                f"{r['extra_memory_mb']:7.1f} {ratios}"
            )
    print("vs tv/tvbf/ort/ov/ovd: img/s ratio to torchvision fp32, torchvision bf16 autocast,")
    print("onnxruntime fp32, openvino f32 and openvino's default (plain export, whole batch);")
    print("* rnd: median over the rounds of each round's ratio")
    for name, why in report["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"load after: {report['load_after']}")
