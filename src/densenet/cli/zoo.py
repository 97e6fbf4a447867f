"""``densenet models``: the model zoo with parameters, MACs and published accuracy, and
(``--weights``) the pretrained-weights registry."""

from __future__ import annotations

import argparse
import fnmatch
import json
import urllib.parse
from typing import TYPE_CHECKING

from densenet.complexity import spec_complexity
from densenet.messages import did_you_mean
from densenet.zoo import get_model_spec, list_models

if TYPE_CHECKING:
    from densenet.hub.registry import Weights


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list the model zoo")
    parser.add_argument(
        "pattern", nargs="?", default="*", help="shell pattern, e.g. 'densenet_bc*'"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per model (or weights)"
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="write the published error against parameters instead"
    )
    parser.add_argument(
        "--weights",
        action="store_true",
        help="list the pretrained weights registry instead (tags for create_model/--pretrained; "
        "the pattern matches tags or model names)",
    )
    parser.set_defaults(func=run)


_ORIGINS = {"download.pytorch.org": "torchvision", "huggingface.co": "timm (Hugging Face)"}


def _origin(weights: Weights) -> str:
    host = urllib.parse.urlparse(weights.url).hostname or ""
    return _ORIGINS.get(host, host)


def weights_rows(pattern: str = "*") -> list[dict]:
    """One dict per registered weights whose tag or model name matches ``pattern``."""
    from densenet.hub.registry import WEIGHTS

    rows = []
    for tag in sorted(WEIGHTS):
        w = WEIGHTS[tag]
        if not (fnmatch.fnmatch(tag, pattern) or fnmatch.fnmatch(w.model_name, pattern)):
            continue
        rows.append(
            dict(
                tag=tag,
                model=w.model_name,
                source=_origin(w),
                url=w.url,
                license=w.license,
                input_size=list(w.input_size),
                crop_pct=w.crop_pct,
                interpolation=w.interpolation,
                mean=list(w.mean),
                std=list(w.std),
                num_classes=w.num_classes,
                top1=w.top1,
                top5=w.top5,
                metrics_source=w.metrics_source,
                sha256=w.sha256,
                full_sha256=bool(w.sha256 and len(w.sha256) == 64),
                hash_checked=w.hash_checked,
                file_size=w.file_size,
                notes=w.notes,
            )
        )
    return rows


def _print_weights(rows: list[dict]) -> None:
    print(
        f"{'tag':26s} {'model':17s} {'source':20s} {'license':13s} {'input':>9s} {'crop':>5s} "
        f"{'interp':8s} {'top-1':>7s} {'top-5':>7s}  sha256"
    )
    for row in rows:
        size = "x".join(str(n) for n in row["input_size"])
        top5 = f"{row['top5']:7.3f}" if row["top5"] is not None else f"{'-':>7s}"
        sha = "full" if row["full_sha256"] else ("prefix" if row["sha256"] else "none")
        print(
            f"{row['tag']:26s} {row['model']:17s} {row['source']:20s} "
            f"{row['license'].split(' ', 1)[0]:13s} {size:>9s} {row['crop_pct']:>5.3f} "
            f"{row['interpolation']:8s} {row['top1']:7.3f} {top5}  {sha}"
        )
    print(
        "top-1/top-5: ImageNet-1k validation accuracy (%) as reported by the source, with this "
        "input size, crop and interpolation; sha256: full digest, file-name prefix only, or none "
        "published (--json has the details)"
    )


def zoo_rows(pattern: str = "*") -> list[dict]:
    """One dict per registered model: name, params, GMACs at native resolution, published result.

    Parameters and MACs come in closed form from the architecture: no model is built.
    """
    rows = []
    for name in list_models(pattern):
        spec = get_model_spec(name)
        complexity = spec_complexity(name)
        best = spec.published[0] if spec.published else None
        rows.append(
            dict(
                name=name,
                family=spec.family,
                params=complexity.params,
                macs=complexity.macs,
                gmacs=round(complexity.macs / 1e9, 3),
                resolution=spec.input_size[-1],
                published_dataset=best.dataset if best else None,
                published_top1_error=best.top1_error if best else None,
                published_source=best.source if best else None,
            )
        )
    return rows


def run(args: argparse.Namespace) -> int:
    if args.weights:
        if args.plot:
            raise ValueError("--plot draws the model zoo; it does not combine with --weights")
        rows = weights_rows(args.pattern)
        if not rows:
            raise ValueError(
                f"no weights match {args.pattern!r}; try 'densenet models --weights' for all"
            )
        if args.json:
            for row in rows:
                print(json.dumps(row))
        else:
            _print_weights(rows)
        return 0
    if args.plot:
        from densenet.visualize import parameter_efficiency_figure, parameter_efficiency_points

        points = parameter_efficiency_points(args.pattern)
        print(f"wrote {parameter_efficiency_figure(points, args.plot)}")
        return 0
    rows = zoo_rows(args.pattern)
    if not rows:
        wildcard = any(char in args.pattern for char in "*?[")
        hint = "" if wildcard else did_you_mean(args.pattern, list_models())
        raise ValueError(f"no model matches {args.pattern!r}{hint} ('densenet models' lists all)")
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'model':20s} {'params':>12s} {'GMACs':>7s} {'res':>4s}  published top-1 error")
    for row in rows:
        result = "-"
        if row["published_top1_error"] is not None:
            result = (
                f"{row['published_top1_error']:.2f}% on {row['published_dataset']} "
                f"({row['published_source']})"
            )
        print(
            f"{row['name']:20s} {row['params']:>12,d} {row['gmacs']:>7.3f} "
            f"{row['resolution']:>4d}  {result}"
        )
    return 0
