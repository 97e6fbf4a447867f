"""The training loop: schedules, run directories, exact resume, signals, NaN, fine-tuning, CLI,
and real end-to-end training on Fashion-MNIST and the CIFAR-10 JPEGs."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_data import CIFAR_ZIP, SHARED, make_image_folder

from densenet import training
from densenet.config import TrainConfig, load_config
from densenet.io import load_state
from densenet.models import DenseNet
from densenet.training import (
    METRIC_FIELDS,
    Interrupted,
    TrainingError,
    lr_at,
    resume_config,
    rng_state,
    set_rng_state,
    train,
)

FMNIST_FLOOR, CIFAR_FLOOR = 80.0, 40.0  # measured values minus a margin: docs/results.md
TINY_MODEL = {"growth_rate": 2, "block_config": [1, 1], "num_init_features": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), size=8, per_class=16, classes=2)


def tiny(folder: Path, out: Path, **overrides) -> TrainConfig:
    """A 2-class 8x8 run of 4 steps per epoch on a ~100-parameter DenseNet-BC."""
    values = {
        "dataset": "folder", "data_dir": str(folder), "model_args": TINY_MODEL,
        "batch_size": 8, "epochs": 2, "workers": 0, "device": "cpu", "out": str(out),
        "seed": 1, "deterministic": True, "drop_rate": 0.2, "augment": "standard",
        "label_smoothing": 0.1, "ema_decay": 0.5, "warmup_epochs": 0.5,
    }  # fmt: skip
    return load_config(None, {**values, **overrides})


def quiet(_: str) -> None:
    pass


def weights(run: Path, which: str = "last") -> dict:
    return load_state(run / "checkpoints" / f"{which}.safetensors")[0]["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- schedules --------------------------------------------------------------------------------
def test_multistep_divides_by_ten_at_half_and_three_quarters():
    cfg = TrainConfig(epochs=300, lr=0.1, schedule="multistep")
    lrs = [lr_at(cfg, epoch * 10, 10) for epoch in (0, 149, 150, 224, 225, 299)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_step_cosine_and_warmup():
    step = TrainConfig(epochs=90, schedule="step", step_size=30, lr=0.1)
    assert [lr_at(step, e * 5, 5) for e in (29, 30, 60)] == pytest.approx([0.1, 0.01, 0.001])
    cosine = TrainConfig(epochs=10, schedule="cosine", lr=0.1, min_lr=0.001, warmup_epochs=1)
    assert lr_at(cosine, 0, 100) == pytest.approx(0.001)  # warmup: (step + 1) / 100
    assert lr_at(cosine, 99, 100) == pytest.approx(0.1)
    assert lr_at(cosine, 100, 100) == pytest.approx(0.1)
    assert lr_at(cosine, 550, 100) == pytest.approx(0.001 + 0.099 * 0.5)
    assert lr_at(cosine, 999, 100) == pytest.approx(0.001, abs=1e-5)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = rng_state()
    before = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    after = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all()
    assert before[2] == after[2]


# --- the run directory ------------------------------------------------------------------------
def test_run_directory_contents(folder, tmp_path):
    run = tmp_path / "run"
    result = train(tiny(folder, run), progress=False, log=quiet)
    assert result.run_dir == run and result.epochs == 2
    assert {p.name for p in run.iterdir()} == {
        "config.yaml",
        "metrics.csv",
        "curves.png",
        "checkpoints",
    }
    assert load_config(run / "config.yaml").ema_decay == 0.5
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) == {
        "epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
        "img_per_s", "time_s",
    }  # fmt: skip
    assert all(math.isfinite(float(v)) for r in rows for v in r.values())
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state, meta = load_state(run / "checkpoints" / "last.safetensors")
    assert {"model", "optimizer", "scheduler", "ema", "scaler", "rng", "epoch", "step"} <= set(
        state
    )
    assert (state["epoch"], state["step"]) == (2, 8)
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert meta["class_names"] == ["c0", "c1"] and meta["num_classes"] == 2
    assert meta["input_size"] == [3, 8, 8] and meta["dataset"] == "folder" and meta["epoch"] == 2
    assert len(meta["mean"]) == 3 and meta["densenet_version"]
    model = DenseNet(**meta["model_config"])  # the metadata rebuilds the architecture
    model.load_state_dict(weights(run, "best"))


def test_existing_run_is_never_overwritten_silently(folder, tmp_path):
    run = tmp_path / "run"
    train(tiny(folder, run, epochs=1), progress=False, log=quiet)
    before = (run / "checkpoints" / "last.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="already holds a run.*--resume.*--overwrite"):
        train(tiny(folder, run, epochs=1, seed=2), progress=False, log=quiet)
    assert (run / "checkpoints" / "last.safetensors").read_bytes() == before
    train(tiny(folder, run, epochs=1, seed=2), overwrite=True, progress=False, log=quiet)
    assert (run / "checkpoints" / "last.safetensors").read_bytes() != before


# --- exact resume -----------------------------------------------------------------------------
class _Crash(Exception):
    pass


def _crash_after_first_epoch(line: str) -> None:
    if line.startswith("epoch 1/"):
        raise _Crash  # as if killed right after epoch 1's checkpoint


def test_resume_after_epoch_one_is_bit_identical(folder, tmp_path):
    straight = train(tiny(folder, tmp_path / "a"), progress=False, log=quiet)
    with pytest.raises(_Crash):
        train(tiny(folder, tmp_path / "b"), progress=False, log=_crash_after_first_epoch)
    assert load_state(tmp_path / "b" / "checkpoints" / "last.safetensors")[0]["epoch"] == 1
    resumed = train(resume_config(tmp_path / "b"), resume=tmp_path / "b", progress=False, log=quiet)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    a_state = load_state(tmp_path / "a" / "checkpoints" / "last.safetensors")[0]
    b_state = load_state(tmp_path / "b" / "checkpoints" / "last.safetensors")[0]
    assert_same_weights(a_state["ema"], b_state["ema"])
    assert resumed.final["val_loss"] == straight.final["val_loss"]
    with open(tmp_path / "b" / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_sigterm_mid_epoch_saves_the_step_and_resumes_bit_identical(folder, tmp_path, monkeypatch):
    train(tiny(folder, tmp_path / "a", schedule="multistep"), progress=False, log=quiet)

    def lr_with_sigterm_at_step_5(cfg, step, steps_per_epoch):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # noticed once step 5 is done
        return lr_at(cfg, step, steps_per_epoch)

    monkeypatch.setattr(training, "lr_at", lr_with_sigterm_at_step_5)
    cfg = tiny(folder, tmp_path / "b", schedule="multistep")
    with pytest.raises(
        Interrupted, match=r"SIGTERM received.*step 6 \(epoch 2, batch 2\).*--resume"
    ):
        train(cfg, progress=False, log=quiet)
    monkeypatch.undo()
    state = load_state(tmp_path / "b" / "checkpoints" / "last.safetensors")[0]
    assert (state["epoch"], state["step"], state["epoch_step"]) == (1, 6, 2)
    train(resume_config(tmp_path / "b"), resume=tmp_path / "b", progress=False, log=quiet)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_signal_during_evaluation_stops_at_the_epoch_boundary(folder, tmp_path):
    def terminate_after_epoch_one(line: str) -> None:
        if line.startswith("epoch 1/"):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match=r"SIGINT received.*step 4 \(epoch 2, batch 0\)"):
        train(tiny(folder, tmp_path / "r"), progress=False, log=terminate_after_epoch_one)
    assert load_state(tmp_path / "r" / "checkpoints" / "last.safetensors")[0]["epoch"] == 1


def test_finished_run_asks_for_more_epochs(folder, tmp_path):
    train(tiny(folder, tmp_path / "r", epochs=1), progress=False, log=quiet)
    with pytest.raises(TrainingError, match="already finished 1 epochs; raise --epochs"):
        train(resume_config(tmp_path / "r"), resume=tmp_path / "r", progress=False, log=quiet)
    with pytest.raises(TrainingError, match="not a run directory"):
        resume_config(tmp_path / "nothing-here")


# --- faults -----------------------------------------------------------------------------------
def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(folder, tmp_path):
    run = tmp_path / "r"
    train(tiny(folder, run, epochs=1, ema_decay=0.0), progress=False, log=quiet)
    good = (run / "checkpoints" / "last.safetensors").read_bytes()
    exploding = resume_config(run, {"epochs": 2, "lr": 1e30, "warmup_epochs": 0.0})
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step \d+ \(epoch 2.*last good"):
        train(exploding, resume=run, progress=False, log=quiet)
    assert (run / "checkpoints" / "last.safetensors").read_bytes() == good


def test_nan_loss_skip_mode_finishes(folder, tmp_path):
    lines: list[str] = []
    cfg = tiny(folder, tmp_path / "r", lr=1e30, warmup_epochs=0.0, nonfinite="skip", ema_decay=0.0)
    train(cfg, progress=False, log=lines.append)
    assert any(line.startswith("skipping step") for line in lines)
    assert load_state(tmp_path / "r" / "checkpoints" / "last.safetensors")[0]["epoch"] == 2


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = "import sys; from densenet.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout
    )


def test_sigterm_to_a_cli_run_checkpoints_and_exits_cleanly(folder, tmp_path):
    run = tmp_path / "r"
    code = "import sys; from densenet.cli import main; sys.exit(main())"
    args = [
        "train", "--dataset", "folder", "--data-dir", str(folder), "--out", str(run),
        "--epochs", "100000", "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--set", f"model_args={TINY_MODEL}", "--no-progress",
    ]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.csv").exists():  # wait for a finished epoch
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no epoch finished within 120 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert "SIGTERM received: saved a checkpoint" in stderr and f"--resume {run}" in stderr
    assert "Traceback" not in stderr
    state = load_state(run / "checkpoints" / "last.safetensors")[0]
    done = _cli("train", "--resume", str(run), "--epochs", str(state["epoch"] + 1), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f"run directory: {run}" in done.stdout


def test_cli_rejects_bad_keys_before_any_work(tmp_path, capsys):
    from densenet.cli import main

    assert main(["train", "--set", "lrr=0.1", "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err
    assert "unknown config key 'lrr'; did you mean lr" in error and not (tmp_path / "r").exists()
    assert main(["train", "--batch-size", "0", "--data-dir", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert "batch_size must be >= 1" in error and "does not exist" in error


@pytest.mark.parametrize(
    "options",
    [
        {"amp": "bf16", "channels_last": True, "memory_efficient": True},
        {"grad_accum_steps": 2, "grad_clip": 1.0, "schedule": "step", "step_size": 1},
    ],
    ids=["bf16-channels_last-memory_efficient", "grad_accum-clip-step"],
)
def test_execution_options_train_and_resume_bit_identical(folder, tmp_path, options):
    straight = train(tiny(folder, tmp_path / "a", **options), progress=False, log=quiet)
    assert all(math.isfinite(v) for v in straight.final.values())
    with pytest.raises(_Crash):
        train(tiny(folder, tmp_path / "b", **options), progress=False, log=_crash_after_first_epoch)
    train(resume_config(tmp_path / "b"), resume=tmp_path / "b", progress=False, log=quiet)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_tensorboard_gets_every_metric_of_every_epoch(folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    train(tiny(folder, run, tensorboard=True), progress=False, log=quiet)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(METRIC_FIELDS[1:])
    assert [e.step for e in events.Scalars("val_top1")] == [1, 2]


def test_batch_must_split_into_the_micro_batches(folder, tmp_path):
    with pytest.raises(
        ValueError, match=r"batch_size \(8\) must be a multiple of grad_accum_steps \(3\)"
    ):
        tiny(folder, tmp_path / "r", grad_accum_steps=3)


# --- fine-tuning ------------------------------------------------------------------------------
def test_frozen_backbone_trains_only_the_classifier(folder, tmp_path):
    run = tmp_path / "r"
    train(
        tiny(folder, run, epochs=1, freeze_backbone=True, ema_decay=0.0), progress=False, log=quiet
    )
    torch.manual_seed(1)  # the run's initial weights: seed 1, same architecture
    cfg = tiny(folder, run, epochs=1)
    from densenet.training import build_model

    initial = build_model(cfg, 2, 3).state_dict()
    trained = weights(run)
    for key, value in initial.items():
        if key.startswith("classifier."):
            continue
        assert torch.equal(trained[key], value), key  # weights and BN statistics frozen
    assert not torch.equal(trained["classifier.weight"], initial["classifier.weight"])


def test_fine_tune_from_our_checkpoint_with_another_class_count(folder, tmp_path):
    base = tmp_path / "base"
    train(tiny(folder, base, epochs=1), progress=False, log=quiet)
    three = make_image_folder(tmp_path / "three", size=8, per_class=4, classes=3)
    best = base / "checkpoints" / "best.safetensors"
    cfg = tiny(three, tmp_path / "ft", epochs=1, pretrained=str(best), freeze_backbone=True)
    train(cfg, progress=False, log=quiet)
    tuned, pretrained = weights(tmp_path / "ft"), weights(base, "best")
    assert tuned["classifier.weight"].shape == (3, pretrained["classifier.weight"].shape[1])
    for key, value in pretrained.items():
        if not key.startswith("classifier."):
            assert torch.equal(tuned[key], value), key


def test_backbone_lr_scale_sets_the_group_lrs(folder, tmp_path):
    from densenet.training import build_model, build_optimizer, set_lr

    cfg = tiny(folder, tmp_path, backbone_lr_scale=0.1)
    optimizer = build_optimizer(cfg, build_model(cfg, 2, 3))
    set_lr(optimizer, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.05])
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in optimizer.param_groups)


# --- real data, end to end --------------------------------------------------------------------
def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (expected ../shared/data beside the checkout)")


# A DenseNet-BC (depth 16, k=12) with the ImageNet stem (7x7/2 conv, max-pool): 14x cheaper than
# the default's full-resolution stem; one thread, because two threads on a 2-core machine shared
# with other jobs ran 6-10x slower. Together they keep these real runs short.
FAST_MODEL = {"depth": 16, "growth_rate": 12, "stem": "imagenet"}


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # train(threads=1) must not slow the tests after these


def test_real_fashion_mnist_small_densenet_bc(tmp_path, restore_threads):
    """20,000 real Fashion-MNIST images for 2 epochs, evaluated on all 10,000 test images."""
    _need(SHARED / "fashion-mnist")
    cfg = load_config(
        None,
        {
            "data_dir": str(SHARED / "fashion-mnist"), "train_subset": 20000, "epochs": 2,
            "model_args": FAST_MODEL, "out": str(tmp_path / "r"), "device": "cpu", "threads": 1,
        },
    )  # fmt: skip
    result = train(cfg, progress=False, log=print)
    assert result.final["val_top1"] >= FMNIST_FLOOR  # chance is 10%


def test_real_cifar10_jpeg_small_densenet_bc(tmp_path, restore_threads):
    """20,000 real CIFAR-10 JPEGs (read from the zip) for 2 epochs, all 10,000 test images."""
    _need(CIFAR_ZIP)
    cfg = load_config(
        None,
        {
            "dataset": "folder", "data_dir": str(CIFAR_ZIP), "train_subset": 20000, "epochs": 2,
            "augment": "standard", "model_args": FAST_MODEL, "out": str(tmp_path / "r"),
            "device": "cpu", "threads": 1,
        },
    )  # fmt: skip
    result = train(cfg, progress=False, log=print)
    assert result.final["val_top1"] >= CIFAR_FLOOR  # chance is 10%
