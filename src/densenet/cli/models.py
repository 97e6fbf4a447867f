"""``densenet models``: the model zoo with parameters, MACs and published accuracy."""

from __future__ import annotations

import argparse
import json

import torch

from densenet.zoo import count_macs, count_parameters, create_model, get_model_spec, list_models


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list the model zoo")
    parser.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'densenet_bc*'")
    parser.add_argument("--json", action="store_true", help="print one JSON object per model")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="write the published error against parameters instead"
    )
    parser.set_defaults(func=run)


def zoo_rows(pattern: str = "*") -> list[dict]:
    """One dict per registered model: name, params, GMACs at native resolution, published result."""
    rows = []
    for name in list_models(pattern):
        spec = get_model_spec(name)
        with torch.device("meta"):
            model = create_model(name)
        params = count_parameters(model)
        macs = count_macs(model.to_empty(device="cpu"), spec.input_size)
        best = spec.published[0] if spec.published else None
        rows.append(
            dict(
                name=name,
                family=spec.family,
                params=params,
                gmacs=round(macs / 1e9, 3),
                resolution=spec.input_size[-1],
                published_dataset=best.dataset if best else None,
                published_top1_error=best.top1_error if best else None,
                published_source=best.source if best else None,
            )
        )
    return rows


def run(args: argparse.Namespace) -> int:
    if args.plot:
        from densenet.visualize import parameter_efficiency_figure, parameter_efficiency_points

        points = parameter_efficiency_points(args.pattern)
        print(f"wrote {parameter_efficiency_figure(points, args.plot)}")
        return 0
    rows = zoo_rows(args.pattern)
    if not rows:
        raise ValueError(f"no model matches {args.pattern!r}; try 'densenet models' for all")
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
