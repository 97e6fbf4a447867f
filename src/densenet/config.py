"""The training configuration: one typed, flat schema, checked completely before any work starts.

A config comes from defaults, then a YAML file, then ``key=value`` overrides (values parsed as
YAML: ``lr=0.05``, ``milestones=[0.5,0.75]``, ``model_args={growth_rate: 12}``). Unknown keys,
wrong types and impossible values raise ``ValueError`` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from densenet.data.labels import SPLIT_BY
from densenet.messages import did_you_mean
from densenet.multilabel import TASKS as LABEL_TASKS
from densenet.multilabel import THRESHOLD_METHODS

SCHEDULES = ("step", "multistep", "cosine", "constant")
AMP_MODES = ("auto", "none", "bf16", "fp16")
NONFINITE = ("stop", "skip")
TASKS = ("auto", *LABEL_TASKS)  # auto: multilabel when a training row has no or several labels
POS_WEIGHTS = ("none", "auto")


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved as ``config.yaml`` in the run directory)."""

    # Model: a registered name (``densenet models``), built as published unless ``model_args``
    # (DenseNet argument overrides) say otherwise; for the CIFAR family ``depth`` in
    # ``model_args`` sets the three blocks by the paper's rule.
    model: str = "densenet_bc16_k12"
    model_args: dict = field(default_factory=dict)
    pretrained: str | None = None  # a weight tag or a checkpoint path, for fine-tuning
    num_classes: int | None = None  # default: the dataset's
    drop_rate: float | None = None  # default: the model's (the paper: 0.2 without augmentation)
    memory_efficient: bool = False
    freeze_backbone: bool = False  # train only the classifier
    # Fine-tuning: a new classifier even when the weights have as many classes as the data
    reset_classifier: bool = False
    backbone_lr_scale: float = 1.0  # the backbone's lr relative to the classifier's

    # Data
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    download: bool = False
    train_split: str = "train"
    val_split: str = "test"
    train_subset: int | None = 20000  # first N images of a fixed shuffle; None = all
    val_subset: int | None = None
    augment: str = "none"  # none | standard | imagenet | randaugment
    input_size: int | None = None  # default: the dataset's
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    in_memory: bool | None = None  # decode a folder dataset once into RAM; None = auto (<= 64 px)
    skip_bad_images: bool = False
    workers: int = 2
    # Labels-file (csv) datasets: make train/val/test from one labels.csv by its group column
    # (null: train.csv, val.csv, test.csv as given).
    split_by: str | None = None

    # Task: multiclass (softmax, cross-entropy) or multilabel (sigmoid per label,
    # BCEWithLogitsLoss, the best checkpoint by validation mean AUROC); auto = multilabel when
    # a training row of a csv dataset has no label or several.
    task: str = "auto"
    pos_weight: str = "none"  # multilabel: auto = each label's negatives / positives in training
    threshold_method: str = (
        "f1"  # multilabel: per-label thresholds fitted on validation (f1 | youden)
    )

    # Optimization (the paper: SGD, Nesterov momentum 0.9, weight decay 1e-4, lr 0.1)
    epochs: int = 3
    batch_size: int = 64  # images per optimizer step over all processes (the paper's batch)
    grad_accum_steps: int = 1  # micro-batches per step (batch_size / (processes * this) each)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # step | multistep | cosine | constant
    milestones: list = field(default_factory=lambda: [0.5, 0.75])  # multistep: epoch fractions
    step_size: int = 30  # step: epochs between decays
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    # Epochs the multistep milestones and the cosine anneal span; null = epochs. A resume with
    # more epochs keeps the run's own (past it, the lr stays at the schedule's final value).
    schedule_epochs: int | None = None
    min_lr: float = 0.0  # cosine floor
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # weight EMA per step; 0 = off
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    nonfinite: str = "stop"  # on NaN/Inf loss: stop, or skip the step

    # Execution
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int | None = None  # CPU threads for torch; None = torch's default (all cores)
    # Mixed precision: none | bf16 | fp16 (fp16 needs CUDA) | auto: bf16 where the device computes
    # bfloat16 natively (CPUs with AVX512_BF16 or AMX, CUDA GPUs of compute capability 8.0+), else
    # none; a run resolves auto once and records the result in its config.yaml.
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False  # torchrun on GPUs: BatchNorm statistics over all ranks' micro-batches
    seed: int = 0
    deterministic: bool = False
    out: str | None = None  # default runs/<model>-<dataset>-<timestamp>
    tensorboard: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _allowed_types(annotation: str) -> tuple[type, ...]:
    hint = typing.get_type_hints(TrainConfig)[annotation]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(type(None) if a is type(None) else typing.get_origin(a) or a for a in args)


def _check_type(key: str, value: Any) -> Any:
    allowed = _allowed_types(key)
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    elif isinstance(value, int) and float in allowed and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, str) and float in allowed and str not in allowed:
        # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string.
        try:
            return float(value)
        except ValueError:
            ok = False
    else:
        ok = isinstance(value, allowed)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(
            f"config key {key!r} must be {names}, got {value!r} ({type(value).__name__})"
        )
    return value


def _unknown(key: str) -> ValueError:
    hint = did_you_mean(key, FIELDS)
    return ValueError(f"unknown config key {key!r}{hint} (valid keys: {', '.join(FIELDS)})")


def merge(config: TrainConfig, values: dict) -> TrainConfig:
    """``config`` with ``values`` applied, each key and type checked."""
    if not isinstance(values, dict):
        raise ValueError(f"a config must be a mapping of key: value, got {type(values).__name__}")
    updates = {}
    for key, value in values.items():
        if key not in FIELDS:
            raise _unknown(str(key))
        updates[key] = _check_type(key, value)
    return dataclasses.replace(config, **updates)


def parse_overrides(items: list[str]) -> dict:
    """``["lr=0.05", "milestones=[0.5, 0.75]"]`` -> ``{"lr": 0.05, "milestones": [0.5, 0.75]}``."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            values[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            values[key.strip()] = text
    return values


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error on one line: 'line L, column C: problem (context)'."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(error, "context", None)
    return where + problem + (f" ({context})" if context else "")


def read_yaml(path: str | Path) -> dict:
    """The mapping in YAML file ``path`` (safe loader: data only, never objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({_yaml_problem(error)})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of key: value at the top level")
    return values


# A run's config.yaml may end with this key: the run's resumes and the settings each changed
# (see densenet.train.resume). It describes the run; as input (``--config``) it is ignored.
HISTORY_KEY = "history"


def load_config(
    path: str | Path | None = None, overrides: dict | None = None, check_data: bool = True
) -> TrainConfig:
    """Defaults, then YAML ``path``, then ``overrides``; validated (see :func:`validate`)."""
    values = read_yaml(path) if path is not None else {}
    values.pop(HISTORY_KEY, None)
    config = merge(merge(TrainConfig(), values), overrides or {})
    if "model" not in values and "model" not in (overrides or {}):
        config = adopt_checkpoint_architecture(config)
    if "val_split" not in values and "val_split" not in (overrides or {}):
        config = dataclasses.replace(config, val_split=default_val_split(config.dataset))
    validate(config, check_data=check_data)
    return config


def default_val_split(dataset: str) -> str:
    """The split a run validates on unless told: ``val`` for labels files (csv) and image
    folders, whose ``test`` stays unseen (a folder without ``val/`` validates on ``test/``, one
    without split sub-folders or with ``train/`` alone on its held-out part); ``test`` for the
    built-in datasets (the papers' protocol)."""
    return "val" if dataset.lower() in ("csv", "folder") else TrainConfig.val_split


def adopt_checkpoint_architecture(config: TrainConfig) -> TrainConfig:
    """``config`` with ``model``/``model_args`` set to what ``pretrained`` holds, when it is one
    of our own checkpoints (its metadata records the architecture) and no model was chosen.

    Fine-tuning from a run's checkpoint then rebuilds that run's network, as
    ``create_model(pretrained=FILE)`` does, instead of the default model (which would not fit).
    """
    from densenet import zoo
    from densenet.io import read_metadata

    if not config.pretrained:
        return config
    saved = read_metadata(str(config.pretrained))  # {} if not ours: the loader explains it
    arch = saved.get("model_config")
    if not isinstance(arch, dict):
        return config
    arch = {k: v for k, v in arch.items() if k not in _NOT_ARCHITECTURE}
    base = str(saved.get("model", "")).split(".", 1)[0]
    if base not in zoo.list_models():
        cifar = str(arch.get("stem", "")).startswith("cifar")
        base = "densenet_bc100_k12" if cifar else "densenet121"  # a base the arguments reshape
    published = _architecture(zoo.get_model_spec(base).kwargs)
    model_args = {k: v for k, v in _architecture(arch).items() if published.get(k) != v}
    print(
        f"model: {model_label(dataclasses.replace(config, model=base, model_args=model_args))}"
        f", the architecture of {config.pretrained} (--model NAME chooses another)",
        file=sys.stderr,
    )
    return dataclasses.replace(config, model=base, model_args=model_args)


def save_config(config: TrainConfig, path: str | Path, history: list | None = None) -> None:
    """Write ``config`` as YAML, with ``history`` (a run's resumes) under :data:`HISTORY_KEY`."""
    from densenet.io import atomic_write

    values = config.to_dict()
    if history:
        values[HISTORY_KEY] = history
    text = yaml.safe_dump(values, sort_keys=False)
    atomic_write(path, lambda f: f.write(text), mode="w")


def _choice(key: str, value: Any, choices: tuple) -> str | None:
    if value not in choices:
        return f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}"
    return None


def validate(config: TrainConfig, check_data: bool = True) -> None:
    """Reject impossible values, all at once, naming each key (``check_data``: data dir exists)."""
    from densenet import zoo
    from densenet.models import DenseNet

    problems = [*_value_problems(config), *_schedule_problems(config)]
    if config.amp == "fp16" and config.device == "cpu":
        problems.append("amp fp16 needs a CUDA device; use amp: bf16 on the CPU")
    if config.reset_classifier and not config.pretrained:
        problems.append("reset_classifier goes with pretrained (a new model's classifier is new)")
    problems += _model_problems(config, zoo, DenseNet)
    problems += _data_problems(config, check_data)
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


def _value_problems(c: TrainConfig) -> list[str | None]:
    """Choices and ranges of single keys (None where a choice is fine)."""
    from densenet import data

    problems = [
        _choice("schedule", c.schedule, SCHEDULES),
        _choice("amp", c.amp, AMP_MODES),
        _choice("nonfinite", c.nonfinite, NONFINITE),
        _choice("augment", c.augment, data.RECIPES),
        _choice("interpolation", c.interpolation, tuple(data.INTERPOLATIONS)),
        _choice("task", c.task, TASKS),
        _choice("pos_weight", c.pos_weight, POS_WEIGHTS),
        _choice("threshold_method", c.threshold_method, THRESHOLD_METHODS),
    ]
    if c.split_by is not None:
        problems.append(_choice("split_by", c.split_by, SPLIT_BY))
    positive = ("epochs", "batch_size", "step_size", "grad_accum_steps")
    problems += [f"{k} must be >= 1, got {getattr(c, k)}" for k in positive if getattr(c, k) < 1]
    optional = ("num_classes", "input_size", "train_subset", "val_subset", "threads")
    for key in (*optional, "schedule_epochs"):
        value = getattr(c, key)
        if value is not None and value < 1:
            problems.append(f"{key} must be >= 1 (or null for the default), got {value}")
    non_negative = ("weight_decay", "min_lr", "warmup_epochs", "grad_clip", "workers")
    problems += [
        f"{k} must be >= 0, got {getattr(c, k)}" for k in non_negative if getattr(c, k) < 0
    ]
    if c.grad_accum_steps >= 1 and c.batch_size % c.grad_accum_steps:
        problems.append(
            f"batch_size ({c.batch_size}) must be a multiple of grad_accum_steps "
            f"({c.grad_accum_steps})"
        )
    if c.lr <= 0:
        problems.append(f"lr must be > 0, got {c.lr}")
    if c.min_lr > c.lr:
        problems.append(f"min_lr ({c.min_lr}) must not exceed lr ({c.lr}): the lr would rise")
    fractions = {
        "gamma": c.gamma,
        "ema_decay": c.ema_decay,
        "label_smoothing": c.label_smoothing,
        "momentum": c.momentum,
    }
    problems += [f"{k} must be in [0, 1), got {v}" for k, v in fractions.items() if not 0 <= v < 1]
    if c.drop_rate is not None and not 0 <= c.drop_rate < 1:
        problems.append(f"drop_rate must be in [0, 1), got {c.drop_rate}")
    if not 0 < c.crop_pct <= 1:
        problems.append(f"crop_pct must be in (0, 1], got {c.crop_pct}")
    if not 0 <= c.backbone_lr_scale <= 1:
        problems.append(f"backbone_lr_scale must be in [0, 1], got {c.backbone_lr_scale}")
    if c.freeze_backbone and c.backbone_lr_scale != 1:
        problems.append(
            "freeze_backbone trains only the classifier: backbone_lr_scale (for a backbone that "
            "trains) would do nothing; choose one"
        )
    return problems


def _schedule_problems(c: TrainConfig) -> list[str]:
    """Warmup, schedule span and milestones that cannot make a schedule."""
    problems = []
    horizon = c.schedule_epochs or c.epochs
    if c.warmup_epochs >= horizon > 0:
        span = "schedule_epochs" if c.schedule_epochs else "epochs"
        problems.append(f"warmup_epochs ({c.warmup_epochs}) must be < {span} ({horizon})")
    if c.schedule_epochs and c.epochs > c.schedule_epochs and final_lr(c) == 0:
        problems.append(
            f"epochs ({c.epochs}) go past schedule_epochs ({c.schedule_epochs}), where the "
            f"{c.schedule} schedule has reached lr 0: those epochs would not train; re-plan it "
            f"over all of them with --set schedule_epochs={c.epochs}, or give the schedule a "
            "floor (--set min_lr=LR, or gamma for step schedules)"
        )
    if not all(isinstance(m, (int, float)) and 0 < m < 1 for m in c.milestones):
        problems.append(f"milestones must be epoch fractions in (0, 1), got {c.milestones}")
    return problems


def _data_problems(c: TrainConfig, check_data: bool) -> list[str]:
    """An unknown dataset, a missing data directory (``check_data``), or none where one is needed."""
    from densenet.catalog import check_dataset_name

    problems, name = [], c.dataset
    try:
        name = check_dataset_name(c.dataset)
    except ValueError as error:
        problems.append(str(error))
    if check_data and c.data_dir is not None and not c.download and not Path(c.data_dir).exists():
        problems.append(
            f"data_dir {c.data_dir} does not exist (--data-dir DIR: the folder that holds the "
            "data; or --download to fetch it)"
        )
    if c.task == "multilabel" and name != "csv":
        problems.append(
            "task multilabel needs a labels-file dataset (--dataset csv --data-dir DIR with "
            "train.csv, val.csv, test.csv)"
        )
    if c.split_by is not None and name != "csv":
        problems.append("split_by applies to labels-file datasets only (--dataset csv)")
    if c.data_dir is None and c.dataset != "fashion_mnist":  # the one with a system-wide copy
        problems.append(
            f"dataset {c.dataset} needs data_dir (--data-dir DIR; with --download the files "
            "are fetched into it)"
        )
    return problems


def final_lr(config: TrainConfig) -> float | None:
    """The lr where ``config``'s schedule ends (and stays past ``schedule_epochs``); None for
    ``step``, which has no end (it decays every ``step_size`` epochs)."""
    if config.schedule == "cosine":
        return config.min_lr
    if config.schedule == "multistep":
        return config.lr * config.gamma ** len(config.milestones)
    return None if config.schedule == "step" else config.lr


def _model_problems(c: TrainConfig, zoo, DenseNet) -> list[str]:
    try:
        spec = zoo.get_model_spec(c.model)
    except ValueError as error:
        return [str(error)]
    valid = set(inspect.signature(DenseNet).parameters) - {"num_classes", "in_chans"}
    valid |= {"depth"} if spec.family == "cifar" else set()
    unknown = sorted(set(c.model_args) - valid)
    if unknown:
        return [f"model_args has unknown keys {unknown}; valid: {', '.join(sorted(valid))}"]
    try:
        with torch.device("meta"):  # builds the architecture without allocating weights
            net = DenseNet(**model_kwargs(c))
    except (ValueError, TypeError) as error:
        return [f"model_args: {error}"]
    smallest = net.min_input_size()
    if c.input_size is not None and 1 <= c.input_size < smallest:
        return [
            f"input_size {c.input_size} is below the {smallest}x{smallest} pixels {c.model} "
            "takes; raise it (or null for the dataset's own size)"
        ]
    return []


def model_kwargs(config: TrainConfig) -> dict:
    """The registered model's DenseNet arguments with ``model_args`` (and ``depth``) applied."""
    from densenet import zoo

    spec = zoo.get_model_spec(config.model)
    args = dict(config.model_args)
    kwargs = dict(spec.kwargs)
    if "depth" in args:
        bottleneck = bool(args.get("bn_size", kwargs.get("bn_size")))
        growth = args.get("growth_rate", kwargs["growth_rate"])
        kwargs.update(
            zoo.cifar_densenet_kwargs(args.pop("depth"), growth, bottleneck, kwargs["compression"])
        )
    kwargs.update(args)
    if config.drop_rate is not None:
        kwargs["drop_rate"] = config.drop_rate
    return kwargs


# Constructor arguments that do not change the architecture's identity (its weights' shapes and
# wiring): the class count follows the dataset, dropout and recomputation are training options.
_NOT_ARCHITECTURE = ("num_classes", "in_chans", "drop_rate", "head_drop_rate", "memory_efficient")


def _architecture(kwargs: dict) -> dict:
    """``kwargs`` completed with DenseNet's defaults, sequences as lists, options dropped."""
    from densenet.models import DenseNet

    defaults = {
        name: p.default
        for name, p in inspect.signature(DenseNet).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    full = {**defaults, **kwargs}
    return {
        k: list(v) if isinstance(v, (tuple, list)) else v
        for k, v in full.items()
        if k not in _NOT_ARCHITECTURE
    }


def model_label(config: TrainConfig) -> str:
    """The name of the network ``config`` builds, for run names and checkpoint metadata.

    ``model`` itself when ``model_args`` leave it as published; else the registered model the
    result equals (``densenet_bc100_k12`` with ``depth: 16`` is ``densenet_bc16_k12``); else the
    paper's name of a CIFAR DenseNet of that depth and growth rate (``densenet_bc40_k12``); else
    ``<model>-custom`` (config.yaml's ``model_args`` say what it is).
    """
    from densenet import zoo

    built = _architecture(model_kwargs(config))
    if built == _architecture(zoo.get_model_spec(config.model).kwargs):
        return config.model
    for name in zoo.list_models():
        if built == _architecture(zoo.get_model_spec(name).kwargs):
            return name
    return _cifar_name(built) or f"{config.model}-custom"


def _cifar_name(built: dict) -> str | None:
    """``densenet_bc{L}_k{k}`` / ``densenet{L}_k{k}`` if ``built`` follows the paper's CIFAR rules."""
    from densenet import zoo

    blocks, k = built["block_config"], built["growth_rate"]
    if built["stem"] != "cifar" or len(blocks) != 3 or len(set(blocks)) != 1:
        return None
    bottleneck = bool(built["bn_size"])
    depth = blocks[0] * (6 if bottleneck else 3) + 4
    compression = 0.5 if bottleneck else 1.0
    try:
        paper = _architecture(zoo.cifar_densenet_kwargs(depth, k, bottleneck, compression))
    except ValueError:
        return None
    if built != paper:
        return None
    return f"densenet_bc{depth}_k{k}" if bottleneck else f"densenet{depth}_k{k}"
