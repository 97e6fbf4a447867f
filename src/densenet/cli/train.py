"""``densenet train``: train a DenseNet from a recipe, flags and ``--set key=value`` overrides."""

from __future__ import annotations

import argparse
import sys

# Flags for the common keys: (flag, config key, type, help).
FLAGS = (
    ("--model", "model", str, "registered model name (densenet models lists them)"),
    (
        "--dataset",
        "dataset",
        str,
        "cifar10, cifar100, svhn, mnist, fashion_mnist, imagenet, folder, csv",
    ),
    (
        "--data-dir",
        "data_dir",
        str,
        "where the dataset is (a folder, or a .zip for folder; csv: the folder of "
        "train.csv, val.csv, test.csv)",
    ),
    (
        "--split-by",
        "split_by",
        str,
        "csv: make train/val/test from one labels.csv without dividing a group (group)",
    ),
    ("--task", "task", str, "auto, multiclass or multilabel (auto: from the labels file)"),
    ("--epochs", "epochs", int, "training epochs"),
    ("--batch-size", "batch_size", int, "images per step"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--out", "out", str, "run directory (default runs/<model>-<dataset>-<time>)"),
    ("--device", "device", str, "auto, cpu, cuda, cuda:N or mps"),
    ("--workers", "workers", int, "data-loading worker processes"),
    ("--seed", "seed", int, "random seed (data order, init, augmentation)"),
    ("--pretrained", "pretrained", str, "start from weights: a tag or a checkpoint path"),
    ("--backbone-lr-scale", "backbone_lr_scale", float, "backbone lr relative to the classifier's"),
)
SWITCHES = (
    ("--freeze-backbone", "freeze_backbone", "train only the classifier (fine-tuning)"),
    ("--skip-bad-images", "skip_bad_images", "skip unreadable images in a folder dataset"),
    ("--download", "download", "download the dataset with torchvision when it is missing"),
    ("--deterministic", "deterministic", "deterministic algorithms (bit-reproducible on the CPU)"),
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (no flags: a small DenseNet-BC on Fashion-MNIST in a few minutes)",
        description="Train a DenseNet. Keys come from the defaults, then --config, then flags and "
        "--set key=value (any config key; values are YAML, e.g. --set milestones=[0.5,0.75]).",
        epilog="Every config key, with its resolved value: densenet train --print-config "
        "(add --config/flags to see their effect; the output is a recipe to start from). "
        "Their meaning: the TrainConfig class in densenet/config.py.",
    )
    parser.add_argument(
        "--config",
        metavar="RECIPE",
        help="a recipe: a YAML file, or the name of one in configs/ "
        "(e.g. cifar10plus_densenet_bc100_k12)",
    )
    for flag, key, type_, help_ in FLAGS:
        parser.add_argument(flag, dest=key, type=type_, help=help_)
    for flag, key, help_ in SWITCHES:
        parser.add_argument(flag, dest=key, action="store_true", default=None, help=help_)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config key (repeatable)",
    )
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML (every key) and exit without training",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from densenet.cli import CLIError
    from densenet.config import load_config, parse_overrides
    from densenet.recipes import find_recipe
    from densenet.runtime import is_main_process
    from densenet.train import Interrupted, resume_config, train

    overrides = {key: getattr(args, key) for _, key, *_ in FLAGS + SWITCHES}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.update(parse_overrides(args.overrides))
    if args.resume:
        if args.config:
            raise ValueError("--resume uses the run's own config.yaml; drop --config")
        if args.out is not None or args.overwrite:
            raise ValueError(
                "--resume continues the run in its own directory; drop --out/--overwrite"
            )
        cfg = resume_config(args.resume, overrides)
    else:
        try:
            recipe = find_recipe(args.config) if args.config else None
        except FileNotFoundError as error:
            raise CLIError(f"--config {error}") from None
        cfg = load_config(recipe, overrides, check_data=not args.print_config)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        result = train(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
        )
    except Interrupted as stop:
        print(f"densenet train: {stop}", file=sys.stderr)
        return 128 + stop.signum  # the shell's convention for death by a signal
    if not is_main_process():
        return 0  # under torchrun, rank 0 reports
    final = result.final
    if result.task == "multilabel":
        scores = f"mean AUROC {final['val_mean_auroc']:.4f} (best {result.best_mean_auroc:.4f})"
    else:
        from densenet.evaluation import shows_top5

        top5 = f"top-5 {final['val_top5']:.2f}%, " if shows_top5(result.num_classes) else ""
        scores = f"top-1 {final['val_top1']:.2f}% ({top5}best top-1 {result.best_top1:.2f}%)"
    from densenet.train.inputs import validation_split_name

    print(
        f"done: {cfg.dataset} {validation_split_name(cfg)} {scores} after {result.epochs} "
        f"epoch{'s' if result.epochs != 1 else ''}\nrun directory: {result.run_dir}"
    )
    return 0
