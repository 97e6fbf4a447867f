"""``densenet bench``: inference speed of one model on several backends, measured in one run.

Backends run interleaved (one call of each per round), so load from other processes hits them
alike and the ratios stay meaningful on a busy machine. Reported per backend and batch size:
img/s (batch x rounds / total time), latency p50/p90 (ms), the extra resident memory while it ran
(MB, sampled from /proc), and the speed ratio to the torchvision eager model and to onnxruntime and
OpenVINO on the plain export (when they run): the ratio of the img/s (``vs_*``) and the median
over rounds of each round's ratio (``vs_*_round_median``, the one least moved by load that comes
and goes).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from densenet.benchmark import load_average, measure
from densenet.cli import CLIError
from densenet.cli._common import add_model_arguments, model_from_args, random_weights_notice

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
)
DEFAULT_BACKENDS = (
    "torchvision,optimized,optimized-eager,optimized-onnxruntime,onnxruntime,openvino"
)


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
        default=DEFAULT_BACKENDS,
        help=f"comma-separated, from {', '.join(BACKENDS)} (default {DEFAULT_BACKENDS}); "
        "openvino is skipped with a note when not installed",
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
    parser.add_argument(
        "--calibration",
        nargs="+",
        metavar="IMAGE_OR_FOLDER",
        help="real images to calibrate the int8 backend on (required for int8)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show onnxruntime's own warnings (int8 calibration prints dozens)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


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
    import torch

    from densenet.data import load_image
    from densenet.predict import list_images

    if not args.calibration:
        raise CLIError("the int8 backend calibrates on real images: add --calibration IMAGES")
    transform = info.transform()
    images = [transform(load_image(p)) for p in list_images(args.calibration)]
    return list(torch.stack(images).split(32))


def build_backends(
    names: list[str],
    model: nn.Module,
    example: torch.Tensor,
    threads: int,
    calibration: Callable[[], list[torch.Tensor]] | None = None,
    micro_batch: int | None = None,
    streams: int | None = None,
    verbose: bool = False,
) -> tuple[dict[str, Callable], dict[str, str]]:
    """Callables for the requested backends, and a note for each one skipped (and why).

    ``example`` is a ``(1, C, H, W)`` input for tracing; ``calibration`` returns the int8
    calibration batches (called only when int8 is requested); ``micro_batch`` and ``streams`` as
    in :func:`~densenet.inference.optimize_for_inference`; ``verbose`` shows onnxruntime's
    warnings during int8 calibration.
    """
    from densenet.inference import RUNTIMES, ChannelsLast, onnx_bytes, optimize_for_inference

    made: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    plain_onnx = None
    size = tuple(example.shape[2:])
    for name in names:
        if name == "torchvision":
            made[name] = torchvision_model(model)
        elif name == "eager":
            made[name] = model
        elif name == "channels_last":
            made[name] = ChannelsLast(copy.deepcopy(model))
        elif name == "optimized" or name.startswith("optimized-"):
            backend = name.removeprefix("optimized").removeprefix("-") or "auto"
            made[name] = optimize_for_inference(
                model,
                backend,
                input_size=size,
                threads=threads,
                micro_batch=micro_batch,
                streams=streams if backend in ("auto", "openvino") else None,
            )
        elif name.removesuffix("-microbatch") in RUNTIMES:
            plain_onnx = plain_onnx or onnx_bytes(model, example[:1])
            try:
                made[name] = _plain_runtime(name, plain_onnx, model, threads, micro_batch, streams)
            except ValueError as error:
                skipped[name] = str(error)
        elif name == "int8":
            from densenet.quantization import quantize_model

            if calibration is None:
                raise ValueError("the int8 backend needs calibration batches of real images")
            made[name] = quantize_model(model, calibration(), threads=threads, verbose=verbose)
        else:
            raise CLIError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return made, skipped


def _plain_runtime(
    name: str,
    onnx: bytes,
    model: nn.Module,
    threads: int,
    micro_batch: int | None,
    streams: int | None,
) -> Callable:
    """Backend ``onnxruntime``/``openvino`` on the plain export, or ``*-microbatch``: the plain
    export run in our default micro-batches (and OpenVINO streams), which shows how much of our
    gain a user of the runtime alone would get by scheduling the batch the same. A missing
    runtime is a ``ValueError`` (the backend is skipped)."""
    from densenet.inference import RUNTIMES, micro_batched

    options = {"streams": streams or threads} if name == "openvino-microbatch" else {}
    runtime = RUNTIMES[name.removesuffix("-microbatch")](onnx, threads, **options)
    if name.endswith("-microbatch"):
        return micro_batched(runtime, model, micro_batch)
    return runtime


# Table columns: title, report key.
RATIO_COLUMNS = (
    ("vs tv", "vs_torchvision"),
    ("vs ort", "vs_onnxruntime"),
    ("ort rnd", "vs_onnxruntime_round_median"),
    ("vs ov", "vs_openvino"),
    ("ov rnd", "vs_openvino_round_median"),
)


def _parse_args(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    """The batch sizes and backend names asked for; a ``CLIError`` for any impossible value."""
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
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise CLIError(
            f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}"
        )
    return batches, names


def run(args: argparse.Namespace) -> int:
    batches, names = _parse_args(args)
    import torch

    torch.set_num_threads(args.threads)
    random_weights_notice(args)
    model, info = model_from_args(args)
    model = model.cpu().eval()
    size = args.size or info.input_size[-1]
    example = torch.randn(1, model.in_chans, size, size)
    backends, skipped = build_backends(
        names,
        model,
        example,
        args.threads,
        lambda: _calibration_batches(args, info),
        args.micro_batch,
        args.streams,
        args.verbose,
    )
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
        report["results"][str(n)] = measure(backends, batch, args.iters, args.warmup, args.min_time)
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
    header = f"{'batch':>5} {'backend':22} {'img/s':>8} {'p50 ms':>9} {'p90 ms':>9} {'+MB':>7}"
    print(header + "".join(f" {title:>7}" for title, _ in RATIO_COLUMNS))
    for n, rows in report["results"].items():
        for name, r in rows.items():
            ratios = " ".join(
                f"{r[key]:7.2f}" if key in r else f"{'-':>7}" for _, key in RATIO_COLUMNS
            )
            print(
                f"{n:>5} {name:22} {r['img_per_s']:8.2f} {r['p50_ms']:9.1f} {r['p90_ms']:9.1f} "
                f"{r['extra_memory_mb']:7.1f} {ratios}"
            )
    print("vs tv/ort/ov: img/s ratio to torchvision, onnxruntime, openvino (plain export, whole")
    print("batch); ort rnd, ov rnd: median over the rounds of each round's ratio")
    for name, why in report["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"load after: {report['load_after']}")
