"""Write the published recipes as YAML: ``python configs/generate.py`` (run from anywhere).

Each file holds only what differs from the defaults of ``densenet.config.TrainConfig`` plus the
paper's optimizer settings spelled out, so a reader sees the whole recipe in one place.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PAPER_OPTIM = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
FULL_DATA = {"train_subset": None, "val_subset": None}
CIFAR_MODELS = (
    "densenet40_k12", "densenet100_k12", "densenet100_k24",
    "densenet_bc100_k12", "densenet_bc250_k24", "densenet_bc190_k40",
)  # fmt: skip
# (file prefix, dataset, augmentation, train split, epochs): Huang et al. 2017, section 4.
CIFAR_SETUPS = (
    ("cifar10", "cifar10", "none", "train", 300),
    ("cifar10plus", "cifar10", "standard", "train", 300),
    ("cifar100", "cifar100", "none", "train", 300),
    ("cifar100plus", "cifar100", "standard", "train", 300),
    ("svhn", "svhn", "none", "train+extra", 40),
)
IMAGENET_MODELS = ("densenet121", "densenet169", "densenet201", "densenet161", "densenet264")


def cifar_recipe(model: str, dataset: str, augment: str, train_split: str, epochs: int) -> dict:
    """Batch 64, lr /10 at 50% and 75% of the epochs; dropout 0.2 without augmentation."""
    return {
        "model": model, "dataset": dataset, "data_dir": f"data/{dataset}", **FULL_DATA,
        "augment": augment, "drop_rate": 0.2 if augment == "none" else 0.0,
        "train_split": train_split, "val_split": "test", "epochs": epochs, "batch_size": 64,
        **PAPER_OPTIM, "schedule": "multistep", "milestones": [0.5, 0.75], "gamma": 0.1,
    }  # fmt: skip


def imagenet_recipe(model: str, schedule: str) -> dict:
    """Batch 256, 90 epochs: lr /10 every 30 epochs (the paper) or cosine per step (Lua README)."""
    recipe = {
        "model": model, "dataset": "imagenet", "data_dir": "data/imagenet", **FULL_DATA,
        "augment": "imagenet", "train_split": "train", "val_split": "val",
        "crop_pct": 0.875, "workers": 8, "epochs": 90, "batch_size": 256, **PAPER_OPTIM,
        "schedule": schedule,
    }  # fmt: skip
    recipe.update({"step_size": 30, "gamma": 0.1} if schedule == "step" else {"min_lr": 0.0})
    return recipe


def recipes() -> dict[str, dict]:
    out = {}
    for model in CIFAR_MODELS:
        for prefix, *setup in CIFAR_SETUPS:
            out[f"{prefix}_{model}"] = cifar_recipe(model, *setup)
    for model in IMAGENET_MODELS:
        for schedule in ("step", "cosine"):
            out[f"imagenet_{model}_{schedule}"] = imagenet_recipe(model, schedule)
    # The memory-efficiency tech report's DenseNet-cosine-264 (k=48), 20.26% top-1 error.
    out["imagenet_densenet264_k48_cosine"] = imagenet_recipe("densenet264_k48", "cosine")
    return out


def main() -> None:
    for name, recipe in recipes().items():
        header = f"# {name}: densenet train --config configs/{name}.yaml --data-dir DIR\n"
        (HERE / f"{name}.yaml").write_text(header + yaml.safe_dump(recipe, sort_keys=False))


if __name__ == "__main__":
    main()
