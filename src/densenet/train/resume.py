"""Continuing a run with changed settings: which are refused (and why), which apply from the
resumed step with a notice, and the ``history`` in ``config.yaml`` that records each part.

A resume continues the run's own schedule: more (or fewer) ``epochs`` pin ``schedule_epochs`` to
the epochs the multistep milestones and the cosine anneal were planned over, and epochs past it
run at the schedule's final lr (refused when that is 0: ``--set schedule_epochs=N`` re-plans).
Settings that define the run (model, data, seed, batch size: :data:`FIXED_ON_RESUME`) cannot
change; any other change applies from the resumed step with a printed notice. ``config.yaml``
holds the settings in force and a ``history`` of the resumes: where each continued and what it
changed (``key: [old, new]``), so one uninterrupted run of its settings repeats a resume that
only added epochs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from densenet import runtime
from densenet.config import (
    HISTORY_KEY,
    TrainConfig,
    final_lr,
    load_config,
    read_yaml,
    save_config,
    validate,
)
from densenet.messages import count
from densenet.train.errors import TrainingError
from densenet.train.optim import lr_at
from densenet.train.run_dir import RunDir

if TYPE_CHECKING:
    from densenet.train.inputs import RunData
    from densenet.train.state import Run

_MODEL = "the checkpoint holds this run's model, which does not fit another one"
_TRAIN_DATA = "it chooses the training images and their order"
_VAL_DATA = "it chooses the validation images that best_top1 compares"
# Settings a resumed run cannot change, and why; every other change applies with a notice.
FIXED_ON_RESUME = {
    "model": _MODEL,
    "model_args": _MODEL,
    "num_classes": _MODEL,
    "freeze_backbone": _MODEL,
    "reset_classifier": "it chose the starting weights, which the checkpoint has replaced",
    "pretrained": "it chose the starting weights, which the checkpoint has replaced",
    "dataset": _TRAIN_DATA,
    "train_split": _TRAIN_DATA,
    "train_subset": _TRAIN_DATA,
    "seed": _TRAIN_DATA,
    "val_split": _VAL_DATA,
    "val_subset": _VAL_DATA,
    "input_size": "the run trained and validated at its own input size",
    "batch_size": "it sets the steps of an epoch, by which the checkpoint counts its place",
}
SPANNING_SCHEDULES = ("multistep", "cosine")  # those whose shape depends on the epochs they span


def resume_config(run_dir: str | Path, overrides: dict | None = None) -> TrainConfig:
    """The config saved in ``run_dir`` with ``overrides`` (e.g. more ``epochs``) applied."""
    run = RunDir(run_dir)
    if not run.config.exists():
        raise TrainingError(f"{run.path} is not a run directory (no config.yaml); check --resume")
    saved = read_yaml(run.config)
    saved.pop(HISTORY_KEY, None)
    return load_config(None, {**saved, **(overrides or {})})


def continue_run(
    run: RunDir, cfg: TrainConfig, epoch: int, step: int
) -> tuple[TrainConfig, TrainConfig, list[dict]]:
    """Check ``cfg`` for continuing ``run`` from its checkpoint at ``epoch`` (done) and ``step``.

    Returns ``(config, previous, history)``: the config to continue with, the one the run used
    until now (its config.yaml), and the run's history with this part appended. A changed
    ``epochs`` keeps the run's schedule: ``schedule_epochs`` is pinned to the epochs it was
    planned over. A changed setting of :data:`FIXED_ON_RESUME` raises :class:`TrainingError`
    with the reason, as do more epochs past a schedule that has reached lr 0.
    """
    values = read_yaml(run.config)
    history = list(values.pop(HISTORY_KEY, None) or [])
    previous = load_config(None, values, check_data=False)
    if (
        cfg.epochs != previous.epochs
        and cfg.schedule in SPANNING_SCHEDULES
        and cfg.schedule_epochs is None
        and previous.schedule_epochs is None
    ):
        cfg = dataclasses.replace(cfg, schedule_epochs=previous.epochs)
    changed = _changed(previous, cfg)
    _refuse_what_cannot_continue(run, cfg, epoch, changed)
    validate(cfg)
    part = {"from_epoch": epoch + 1, "from_step": step, "changed": changed}
    if history and history[-1]["from_step"] == step:  # that part saved no checkpoint: one part
        merged = history.pop()["changed"]
        for key, (old, new) in changed.items():
            merged[key] = [merged.get(key, [old])[0], new]
        part["changed"] = {k: v for k, v in merged.items() if v[0] != v[1]}
    return cfg, previous, [*history, part]


def check_same_data(run: RunDir, saved: dict, data: RunData) -> None:
    """:class:`TrainingError` when the data a resume reads is not what the run trained on
    (checkpoint metadata ``saved``): other classes (another --data-dir, a changed folder), or
    another held-out validation part (files added to or removed from a folder without val/)."""
    trained, found = saved.get("class_names"), list(data.info.class_names)
    if trained is not None and list(trained) != found:
        changes = {
            "new": [c for c in found if c not in trained],
            "gone": [c for c in trained if c not in found],
        }
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in changes.items() if v)
        problem = (
            f"its data now has {len(found)} classes, the run trained on {len(trained)} "
            f"({detail or 'the same names in another order'})"
        )
    elif "holdout" not in saved or saved["holdout"] == data.holdout:
        return  # (checkpoints before the fingerprint was recorded are not checked)
    elif saved["holdout"] is None:
        problem = (
            "it validated on its folder's own val/ or test/, which is gone: it would now validate "
            "on a part of its training images"
        )
    elif data.holdout is None:
        problem = "its folder has a val/ or test/ now: it would validate on other images"
    else:
        problem = (
            "its folder's files changed since training began, so the part held out for "
            "validation is another one (and may hold images the run trained on)"
        )
    raise TrainingError(
        f"cannot resume {run.path}: {problem}. Resume on the run's own data, or start a new run "
        f"from its weights: densenet train --pretrained {run.last} --out NEW_DIR ..."
    )


def _refuse_what_cannot_continue(run: RunDir, cfg: TrainConfig, epoch: int, changed: dict) -> None:
    """:class:`TrainingError` for a change of :data:`FIXED_ON_RESUME`, a finished run, or epochs
    past a schedule that has reached lr 0, each naming the way out."""
    refused = [k for k in changed if k in FIXED_ON_RESUME]
    if refused:
        reasons = "; ".join(f"{_show_change(k, changed[k])}: {FIXED_ON_RESUME[k]}" for k in refused)
        raise TrainingError(
            f"cannot resume {run.path} with another {reasons}. Resume with the run's own "
            f"settings, or start a new run from its weights: densenet train --pretrained "
            f"{run.last} --out NEW_DIR ..."
        )
    if epoch >= cfg.epochs:
        raise TrainingError(
            f"{run.path} already finished {count(epoch, 'epoch')}; raise --epochs to train further"
        )
    horizon = cfg.schedule_epochs or cfg.epochs
    if cfg.epochs > horizon and final_lr(cfg) == 0:
        floor = "--set min_lr=LR" if cfg.schedule == "cosine" else "a gamma above 0"
        raise TrainingError(
            f"{run.path}: its {cfg.schedule} schedule reaches lr 0 at the end of epoch "
            f"{horizon}, so {_epochs(max(horizon, epoch) + 1, cfg.epochs)} would not train; "
            f"re-plan the schedule over all {cfg.epochs} epochs with --set "
            f"schedule_epochs={cfg.epochs} (the lr goes up again), or give it a floor with {floor}"
        )


def record_resume(
    run: Run, previous: TrainConfig, history: list[dict], epoch: int, step: int
) -> None:
    """Say where the run continues and what it changes; write config.yaml with ``history``."""
    run.log(f"resuming {run.dir.path} at epoch {epoch + 1}, step {step}")
    for line in change_notices(previous, run.cfg, epoch, step, run.steps_per_epoch):
        run.log(line)
    runtime.barrier(run.env)  # every rank has read config.yaml before rank 0 rewrites it
    if run.env.is_main:
        save_config(run.cfg, run.dir.config, history)


def _changed(previous: TrainConfig, cfg: TrainConfig) -> dict[str, list]:
    """``{key: [old, new]}`` of the settings ``cfg`` changes (``out`` is where, not how)."""
    before, after = previous.to_dict(), cfg.to_dict()
    return {k: [before[k], after[k]] for k in after if k != "out" and before[k] != after[k]}


def inline_yaml(value) -> str:
    """``value`` as YAML writes it on one line: null, true, [0.5, 0.75], {depth: 40}."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).split("\n")[0]


def _show_change(key: str, change: list) -> str:
    """``lr (0.1 -> 0.05)``; an unset value reads ``default``."""
    old, new = ("default" if v is None else inline_yaml(v) for v in change)
    return f"{key} ({old} -> {new})"


def _epochs(first: int, last: int) -> str:
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


def change_notices(
    previous: TrainConfig, cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int
) -> list[str]:
    """What a resume changes, in the user's keys, and the lr it gives the resumed step."""
    changed = _changed(previous, cfg)
    if not changed:
        return []
    lines = [
        "changed settings from here on (recorded in config.yaml): "
        + ", ".join(_show_change(k, v) for k, v in changed.items())
    ]
    if cfg.schedule in SPANNING_SCHEDULES and {"epochs", "schedule_epochs"} & set(changed):
        lines.append(_schedule_notice(previous, cfg, epoch))
    old_lr, new_lr = lr_at(previous, step, steps_per_epoch), lr_at(cfg, step, steps_per_epoch)
    if old_lr != new_lr:
        lines.append(
            f"the lr of step {step} is {new_lr:.4g} (the run's settings gave {old_lr:.4g})"
        )
    return lines


def _schedule_notice(previous: TrainConfig, cfg: TrainConfig, epoch: int) -> str:
    """What a change of ``epochs``/``schedule_epochs`` does to a schedule spanning the epochs."""
    horizon = cfg.schedule_epochs or cfg.epochs
    planned = previous.schedule_epochs or previous.epochs
    if horizon != planned:
        return (
            f"the {cfg.schedule} lr schedule is re-planned over {count(horizon, 'epoch')} "
            f"(it was planned over {planned})"
        )
    if cfg.epochs == horizon:
        return (
            f"the {cfg.schedule} lr schedule keeps its {horizon}-epoch span, which the run now "
            "ends with"
        )
    if cfg.epochs > horizon:
        extra = _epochs(max(horizon, epoch) + 1, cfg.epochs)
        rest = f"{extra} run at its final lr {final_lr(cfg):.4g}"
    else:
        rest = f"the run stops at epoch {cfg.epochs}"
    return (
        f"the {cfg.schedule} lr schedule keeps its {horizon}-epoch span (schedule_epochs: "
        f"{horizon}): {rest}; --set schedule_epochs={cfg.epochs} re-plans it over "
        f"{cfg.epochs} epochs instead"
    )
