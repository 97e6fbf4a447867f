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
import yaml
from test_data import CIFAR_ZIP, SHARED, make_image_folder

from densenet.config import TrainConfig, load_config
from densenet.io import load_state
from densenet.models import DenseNet
from densenet.train import Interrupted, TrainingError, resume_config, train
from densenet.train import epoch as train_epoch
from densenet.train.optim import lr_at
from densenet.train.rng import rng_state, set_rng_state
from densenet.train.run_dir import METRIC_FIELDS

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


def metrics(run: Path) -> list[dict]:
    """metrics.csv's rows as numbers; a column a row leaves empty (its task lacks it) is left out."""
    with open(run / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


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
        "epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "val_mean_auroc",
        "lr", "img_per_s", "time_s",
    }  # fmt: skip
    # A multiclass run has no mean AUROC: that column stays empty, every other one is a number.
    assert all(r.pop("val_mean_auroc") == "" for r in rows)
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
    assert meta["model"] == "densenet_bc16_k12-custom"  # TINY_MODEL: not the registered network
    model = DenseNet(**meta["model_config"])  # the metadata rebuilds the architecture
    model.load_state_dict(weights(run, "best"))


def test_existing_run_is_never_overwritten_silently(folder, tmp_path):
    run = tmp_path / "run"
    train(tiny(folder, run, epochs=1), progress=False, log=quiet)
    before = (run / "checkpoints" / "last.safetensors").read_bytes()
    with pytest.raises(
        TrainingError, match="already holds a run; continue it with --resume.*--overwrite"
    ):
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
    # Seed 2: epoch 1 validates better than epoch 2, so best_top1 must come from before the stop.
    train(tiny(folder, tmp_path / "a", schedule="multistep", seed=2), progress=False, log=quiet)

    def lr_with_sigterm_at_step_5(cfg, step, steps_per_epoch):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # noticed once step 5 is done
        return lr_at(cfg, step, steps_per_epoch)

    monkeypatch.setattr(train_epoch, "lr_at", lr_with_sigterm_at_step_5)
    cfg = tiny(folder, tmp_path / "b", schedule="multistep", seed=2)
    with pytest.raises(
        Interrupted, match=r"SIGTERM received.*step 6 \(epoch 2, batch 2\).*--resume"
    ):
        train(cfg, progress=False, log=quiet)
    monkeypatch.undo()
    state = load_state(tmp_path / "b" / "checkpoints" / "last.safetensors")[0]
    assert (state["epoch"], state["step"], state["epoch_step"]) == (1, 6, 2)
    train(resume_config(tmp_path / "b"), resume=tmp_path / "b", progress=False, log=quiet)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    # The resumed epoch's numbers count its batches from before and after the signal.
    timing = ("img_per_s", "time_s")
    straight, resumed = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [
        {k: v for k, v in r.items() if k not in timing} for r in straight
    ]
    assert straight[0]["val_top1"] > straight[1]["val_top1"]  # the case this test is for
    best = [load_state(tmp_path / r / "checkpoints" / "last.safetensors")[0] for r in "ab"]
    assert best[0]["best_top1"] == best[1]["best_top1"] == straight[0]["val_top1"]


def test_signal_during_evaluation_stops_at_the_epoch_boundary(folder, tmp_path):
    def terminate_after_epoch_one(line: str) -> None:
        if line.startswith("epoch 1/"):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match=r"SIGINT received.*step 4 \(epoch 2, batch 0\)"):
        train(tiny(folder, tmp_path / "r"), progress=False, log=terminate_after_epoch_one)
    assert load_state(tmp_path / "r" / "checkpoints" / "last.safetensors")[0]["epoch"] == 1


def test_ctrl_c_during_validation_answers_at_once_and_twice_stops_cleanly(
    folder, tmp_path, monkeypatch, capsys
):
    """The first Ctrl-C in validation says at once what happens; a second stops the CLI with one
    line and status 130, the last checkpoint (epoch 1's) left as it was."""
    from densenet.cli import main
    from densenet.train import loop

    evaluate_epoch = loop.evaluate_epoch
    run = tmp_path / "r"
    heard: list[str] = []

    def ctrl_c_twice_in_epoch_two(evaluated, run_):
        if (run / "checkpoints" / "last.safetensors").exists():
            os.kill(os.getpid(), signal.SIGINT)
            heard.append(capsys.readouterr().err)  # printed before validation goes on
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate_epoch(evaluated, run_)

    monkeypatch.setattr(loop, "evaluate_epoch", ctrl_c_twice_in_epoch_two)
    args = [
        "train", "--dataset", "folder", "--data-dir", str(folder), "--out", str(run),
        "--epochs", "3", "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--set", f"model_args={TINY_MODEL}", "--no-progress",
    ]  # fmt: skip
    assert main(args) == 128 + signal.SIGINT
    assert heard[0].strip().splitlines()[-1] == (
        "densenet train: SIGINT received: finishing this epoch's validation to save a "
        "checkpoint; press Ctrl-C again to stop now (the epoch's training is then lost)"
    )
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1] == (
        "densenet train: SIGINT received again: stopped without saving this epoch's training; "
        "the last checkpoint is unchanged"
    )
    assert "Traceback" not in error
    assert load_state(run / "checkpoints" / "last.safetensors")[0]["epoch"] == 1


def test_finished_run_asks_for_more_epochs(folder, tmp_path):
    train(tiny(folder, tmp_path / "r", epochs=1), progress=False, log=quiet)
    with pytest.raises(TrainingError, match="already finished 1 epoch; raise --epochs"):
        train(resume_config(tmp_path / "r"), resume=tmp_path / "r", progress=False, log=quiet)
    with pytest.raises(TrainingError, match="not a run directory"):
        resume_config(tmp_path / "nothing-here")


# --- faults -----------------------------------------------------------------------------------
def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(folder, tmp_path):
    run = tmp_path / "r"
    train(tiny(folder, run, epochs=1, ema_decay=0.0), progress=False, log=quiet)
    good = (run / "checkpoints" / "last.safetensors").read_bytes()
    exploding = resume_config(
        run, {"epochs": 2, "lr": 1e30, "warmup_epochs": 0.0, "schedule": "constant"}
    )
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
    for extra in (["--out", str(tmp_path / "elsewhere")], ["--overwrite"]):
        assert main(["train", "--resume", str(tmp_path / "r"), *extra]) == 2
        assert "continues the run in its own directory; drop --out/--overwrite" in (
            capsys.readouterr().err
        )


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
    # every metric a multiclass run has (mean AUROC is multilabel's)
    assert set(events.Tags()["scalars"]) == set(METRIC_FIELDS[1:]) - {"val_mean_auroc"}
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
    from densenet.train.model import build_model

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
    from densenet.train.model import build_model
    from densenet.train.optim import build_optimizer, set_lr

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


# --- the model a run builds and the name it gives it -----------------------------------------
def test_model_flag_builds_the_published_model(tmp_path, capsys):
    """--model NAME alone builds NAME as published, not the default run's model_args."""
    import densenet
    from densenet.cli import main
    from densenet.train.model import build_model

    cfg = load_config(None, {"model": "densenet_bc100_k12"})
    assert cfg.model_args == {}
    built = build_model(cfg, 10, 3)
    assert densenet.count_parameters(built) == 769_162  # the published 0.8M (README's table)
    assert built.config == densenet.create_model("densenet_bc100_k12").config
    # The same through the CLI: the run's checkpoint rebuilds the published architecture.
    run = tmp_path / "r"
    folder = make_image_folder(tmp_path / "images", size=8, per_class=4, classes=2)
    args = [
        "train", "--model", "densenet_bc100_k12", "--dataset", "folder", "--data-dir",
        str(folder), "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--out", str(run), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    two_classes = 769_162 - 8 * 342 - 8  # 342 features: 8 fewer classifier rows and biases
    assert (
        f"model densenet_bc100_k12: {two_classes:,} parameters, 3 input channels, 2 classes" in out
    )
    _, meta = load_state(run / "checkpoints" / "last.safetensors")
    assert meta["model"] == "densenet_bc100_k12"
    assert meta["model_config"]["block_config"] == [16, 16, 16]
    # With model_args the run says what it built instead, and the checkpoint rebuilds that.
    args += ["--set", "model_args={depth: 40}", "--out", str(tmp_path / "r40")]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "model densenet_bc40_k12 (densenet_bc100_k12 with model_args {depth: 40}):" in out
    best = tmp_path / "r40" / "checkpoints" / "best.safetensors"
    assert load_state(best)[1]["model"] == "densenet_bc40_k12"
    rebuilt = densenet.create_model(pretrained=best)
    assert rebuilt.model_name == "densenet_bc40_k12" and rebuilt.config["block_config"] == [6, 6, 6]


def test_default_run_trains_the_small_model_under_its_own_name():
    import densenet
    from densenet.train.model import build_model
    from densenet.train.run_dir import default_run_dir

    cfg = load_config()
    assert (cfg.model, cfg.model_args) == ("densenet_bc16_k12", {})
    built = build_model(cfg, 10, 1)
    small = densenet.cifar_densenet(16, 12, num_classes=10, in_chans=1)
    assert built.config == small.config and densenet.count_parameters(built) == 43_978
    assert default_run_dir(cfg).name.startswith("densenet_bc16_k12-fashion_mnist-")


@pytest.mark.parametrize(
    ("model", "model_args", "label"),
    [
        ("densenet_bc100_k12", {}, "densenet_bc100_k12"),
        ("densenet_bc100_k12", {"depth": 16}, "densenet_bc16_k12"),  # a registered model
        ("densenet_bc100_k12", {"depth": 40}, "densenet_bc40_k12"),  # the paper's naming
        ("densenet40_k12", {"depth": 70, "growth_rate": 6}, "densenet70_k6"),
        ("densenet121", {"block_config": [6, 12, 32, 32]}, "densenet169"),
        ("densenet121", {"growth_rate": 16}, "densenet121-custom"),
        ("densenet_bc100_k12", {"stem": "imagenet"}, "densenet_bc100_k12-custom"),
        ("densenet_bc100_k12", {"growth_rate": 12, "stem": "cifar"}, "densenet_bc100_k12"),
    ],
)
def test_labels_say_what_was_built(model, model_args, label):
    from densenet.config import model_label
    from densenet.train.run_dir import default_run_dir

    cfg = load_config(None, {"model": model, "model_args": model_args, "drop_rate": 0.1})
    assert model_label(cfg) == label
    assert default_run_dir(cfg).name.startswith(f"{label}-fashion_mnist-")


# --- resuming with more epochs or changed settings -------------------------------------------
def _first_epoch_of(cfg: TrainConfig) -> None:
    """Run ``cfg``'s first epoch, as if the run stopped right after its checkpoint."""
    with pytest.raises(_Crash):
        train(cfg, progress=False, log=_crash_after_first_epoch)


@pytest.mark.parametrize(
    "schedule", [{"schedule": "cosine", "min_lr": 0.01}, {"schedule": "multistep"}]
)
def test_more_epochs_on_resume_keep_the_runs_schedule(folder, tmp_path, schedule):
    """``--resume RUN --epochs 3`` of a 1-epoch run: the same schedule, then its final lr; the
    result is that of one uninterrupted run of the config.yaml it records."""
    run = tmp_path / "resumed"
    train(tiny(folder, run, epochs=1, **schedule), progress=False, log=quiet)
    lines: list[str] = []
    train(resume_config(run, {"epochs": 3}), resume=run, progress=False, log=lines.append)
    recorded = load_config(run / "config.yaml")
    assert (recorded.epochs, recorded.schedule_epochs) == (3, 1)
    final = schedule.get("min_lr", 0.1 * 0.1**2)
    assert [r["lr"] for r in metrics(run)[1:]] == pytest.approx([final, final])
    assert any("keeps its 1-epoch span (schedule_epochs: 1)" in line for line in lines), lines
    assert any(f"epochs 2-3 run at its final lr {final:.4g}" in line for line in lines), lines
    straight = tmp_path / "straight"
    train(
        tiny(folder, straight, epochs=3, schedule_epochs=1, **schedule), progress=False, log=quiet
    )
    assert_same_weights(weights(straight), weights(run))
    history = yaml.safe_load((run / "config.yaml").read_text())["history"]
    assert history == [
        {
            "from_epoch": 2,
            "from_step": 4,
            "changed": {"epochs": [1, 3], "schedule_epochs": [None, 1]},
        }
    ]


def test_more_epochs_past_a_schedule_at_lr_0_are_refused_naming_the_fix(folder, tmp_path, capsys):
    from densenet.cli import main

    run = tmp_path / "r"
    train(tiny(folder, run, epochs=1), progress=False, log=quiet)  # cosine to min_lr 0

    def untouched() -> tuple:  # not st_atime: reading the checkpoint may update it
        stat = (run / "checkpoints" / "last.safetensors").stat()
        return (run / "config.yaml").read_text(), stat.st_ino, stat.st_size, stat.st_mtime_ns

    before = untouched()
    capsys.readouterr()  # the new run's notices (it validates on test/: the folder has no val/)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    error = capsys.readouterr().err
    assert "reaches lr 0 at the end of epoch 1, so epoch 2 would not train" in error
    assert "--set schedule_epochs=2" in error and error.count("\n") == 1
    assert untouched() == before
    # The named fix: the schedule re-planned over 2 epochs, announced with the lr it gives.
    args = ["train", "--resume", str(run), "--epochs", "2", "--set", "schedule_epochs=2"]
    assert main([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "the cosine lr schedule is re-planned over 2 epochs (it was planned over 1)" in out
    expected = lr_at(load_config(run / "config.yaml"), 4, 4)
    assert f"the lr of step 4 is {expected:.4g}" in out and expected > 0.01
    assert metrics(run)[1]["lr"] > 0


def test_changed_settings_apply_with_a_notice_and_config_yaml_records_them(folder, tmp_path):
    run = tmp_path / "r"
    _first_epoch_of(tiny(folder, run, epochs=2, schedule="constant"))
    lines: list[str] = []
    changed = {"lr": 0.05, "weight_decay": 0.01, "momentum": 0.5}
    train(resume_config(run, changed), resume=run, progress=False, log=lines.append)
    notice = next(line for line in lines if line.startswith("changed settings"))
    for text in ("lr (0.1 -> 0.05)", "weight_decay (0.0001 -> 0.01)", "momentum (0.9 -> 0.5)"):
        assert text in notice
    assert any("the lr of step 4 is 0.05 (the run's settings gave 0.1)" in x for x in lines)
    # Applied, not overwritten by the checkpoint's optimizer state.
    groups = load_state(run / "checkpoints" / "last.safetensors")[0]["optimizer"]["param_groups"]
    assert all((g["weight_decay"], g["momentum"]) == (0.01, 0.5) for g in groups)
    assert metrics(run)[1]["lr"] == 0.05
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["lr"], saved["weight_decay"], saved["momentum"]) == (0.05, 0.01, 0.5)
    assert saved["history"] == [
        {
            "from_epoch": 2, "from_step": 4,
            "changed": {"lr": [0.1, 0.05], "weight_decay": [0.0001, 0.01], "momentum": [0.9, 0.5]},
        }
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ("batch_size=4", "batch_size (8 -> 4): it sets the steps of an epoch"),
        ("seed=2", "seed (1 -> 2): it chooses the training images and their order"),
        ("model_args={growth_rate: 4}", "model_args ("),
        ("val_subset=2", "val_subset (default -> 2): it chooses the validation images"),
    ],
)
def test_settings_a_resume_cannot_change_are_refused_with_the_reason(
    folder, tmp_path, capsys, setting, reason
):
    from densenet.cli import main

    run = tmp_path / "r"
    _first_epoch_of(tiny(folder, run))
    before = (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "--set", setting]) == 2
    error = capsys.readouterr().err
    assert f"cannot resume {run} with another {reason}" in error, error
    assert f"--pretrained {run / 'checkpoints' / 'last.safetensors'}" in error
    assert (run / "config.yaml").read_text() == before


def test_a_resume_that_stopped_before_its_first_checkpoint_is_one_part(
    folder, tmp_path, monkeypatch
):
    run = tmp_path / "r"
    _first_epoch_of(tiny(folder, run, epochs=3, schedule="constant"))

    def crash_at_step_5(cfg, step, steps_per_epoch):
        if step == 5:
            raise _Crash  # in the resumed epoch, before its checkpoint
        return lr_at(cfg, step, steps_per_epoch)

    monkeypatch.setattr(train_epoch, "lr_at", crash_at_step_5)
    with pytest.raises(_Crash):
        train(resume_config(run, {"lr": 0.05}), resume=run, progress=False, log=quiet)
    monkeypatch.undo()
    assert load_config(run / "config.yaml").lr == 0.05  # the part started, then stopped
    train(resume_config(run, {"momentum": 0.5}), resume=run, progress=False, log=quiet)
    history = yaml.safe_load((run / "config.yaml").read_text())["history"]
    assert history == [
        {"from_epoch": 2, "from_step": 4, "changed": {"lr": [0.1, 0.05], "momentum": [0.9, 0.5]}}
    ]


# --- what one step does: EMA, gradient clipping, label smoothing ------------------------------
def test_ema_update_is_decay_times_ema_plus_the_rest_times_the_weights():
    from densenet.train.model import ModelEma

    torch.manual_seed(0)
    model = DenseNet(**TINY_MODEL, num_classes=2)
    ema = ModelEma(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    model.train()(torch.randn(4, 3, 8, 8))  # moves the BN running statistics and counters
    ema.update(model)
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            expected = 0.9 * before[key] + 0.1 * value
            torch.testing.assert_close(ema.module.state_dict()[key], expected, rtol=0, atol=1e-6)
            assert not torch.allclose(expected, 0.1 * before[key] + 0.9 * value)
        else:
            assert torch.equal(ema.module.state_dict()[key], value), key  # num_batches_tracked


def test_grad_clip_scales_the_step_to_the_max_norm(folder, tmp_path):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    norms: list[float] = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    hook = register_optimizer_step_pre_hook(record_norm)
    try:
        clipped = train(tiny(folder, tmp_path / "c", epochs=1, grad_clip=0.01), log=quiet)
        clipped_norms, norms[:] = list(norms), []
        free = train(tiny(folder, tmp_path / "f", epochs=1), log=quiet)
    finally:
        hook.remove()
    assert len(clipped_norms) == 4 and clipped_norms == pytest.approx([0.01] * 4, rel=1e-5)
    assert all(n > 0.05 for n in norms)  # unclipped, the gradients are much larger
    assert clipped.final["train_loss"] != free.final["train_loss"]
    assert not torch.equal(weights(tmp_path / "c")["features.conv0.weight"],
                           weights(tmp_path / "f")["features.conv0.weight"])  # fmt: skip


def test_label_smoothing_is_the_formula():
    from densenet.train.optim import build_criterion

    torch.manual_seed(0)
    logits, target = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])
    eps, classes = 0.3, 5
    log_p = torch.log_softmax(logits, 1)
    smoothed = torch.full_like(log_p, eps / classes)
    smoothed[torch.arange(6), target] += 1 - eps  # 1 - eps + eps / K on the true class
    expected = -(smoothed * log_p).sum(1).mean()
    loss = build_criterion(TrainConfig(label_smoothing=eps))(logits, target)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    plain = build_criterion(TrainConfig())(logits, target)
    torch.testing.assert_close(plain, -log_p[torch.arange(6), target].mean(), rtol=1e-12, atol=0)


def test_readme_resume_to_more_epochs_is_one_run_of_that_length(folder, tmp_path, capsys):
    """The README's path: a run planned over 2 epochs stops after 1; ``--resume RUN --epochs 2``
    ends with the weights and metrics of one uninterrupted 2-epoch run."""
    from densenet.cli import main

    common = [
        "--dataset", "folder", "--data-dir", str(folder), "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--deterministic", "--no-progress", "--set", f"model_args={TINY_MODEL}",
    ]  # fmt: skip
    run, straight = tmp_path / "fm", tmp_path / "straight"
    assert (
        main(["train", *common, "--out", str(run), "--epochs", "1", "--set", "schedule_epochs=2"])
        == 0
    )
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "changed settings from here on (recorded in config.yaml): epochs (1 -> 2)" in out
    # The span was planned over 2 epochs from the start: nothing is re-planned, and it says so.
    assert "re-planned" not in out
    assert "the cosine lr schedule keeps its 2-epoch span, which the run now ends with" in out
    assert main(["train", *common, "--out", str(straight), "--epochs", "2"]) == 0
    assert_same_weights(weights(straight), weights(run))
    timing = ("img_per_s", "time_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in metrics(run)] == [
        {k: v for k, v in r.items() if k not in timing} for r in metrics(straight)
    ]


def test_fine_tuning_from_our_checkpoint_rebuilds_its_architecture(folder, tmp_path, capsys):
    """``--pretrained RUN/checkpoints/best.safetensors`` without ``--model`` fine-tunes the run's
    own network (before: the default model was built and the weights did not fit it)."""
    from densenet.cli import main

    common = ["--dataset", "folder", "--data-dir", str(folder), "--epochs", "1", "--batch-size",
              "8", "--workers", "0", "--device", "cpu", "--no-progress"]  # fmt: skip
    source = tmp_path / "source"
    args = ["train", *common, "--out", str(source), "--set", f"model_args={TINY_MODEL}"]
    assert main(args) == 0, capsys.readouterr().err
    best = source / "checkpoints" / "best.safetensors"
    tuned = tmp_path / "tuned"
    assert main(["train", *common, "--out", str(tuned), "--pretrained", str(best)]) == 0
    err = capsys.readouterr().err
    assert f"the architecture of {best} (--model NAME chooses another)" in err
    saved = yaml.safe_load((tuned / "config.yaml").read_text())
    assert saved["model_args"]["block_config"] == TINY_MODEL["block_config"]
    assert (
        load_state(best)[1]["model_config"]
        == load_state(tuned / "checkpoints" / "last.safetensors")[1]["model_config"]
    )
    # An explicit --model still wins (and then the weights must fit it: a clear error here).
    args = ["train", *common, "--out", str(tmp_path / "x"), "--pretrained", str(best)]
    assert main([*args, "--model", "densenet_bc100_k12"]) == 2
    assert "do not fit" in capsys.readouterr().err


def test_skip_bad_images_names_each_skipped_file_then_counts(tmp_path):
    """--skip-bad-images names the skipped files (the first 10, then a count), as eval does."""
    root = make_image_folder(tmp_path / "images", size=8, per_class=8, classes=2)
    broken = [root / "train" / "c1" / f"broken{n:02d}.png" for n in range(12)]
    for path in broken:
        path.write_bytes(b"not a png at all")
    lines: list[str] = []
    cfg = tiny(root, tmp_path / "r", epochs=1, skip_bad_images=True)
    train(cfg, progress=False, log=lines.append)
    unreadable = "is not a readable image (unknown or unsupported format)"
    skipped = [line for line in lines if "skipped" in line or line.startswith("...")]
    assert skipped == [
        *(f"skipped {path} {unreadable}" for path in broken[:10]),
        "... and 2 more unreadable images",
        "skipped 12 unreadable images (--skip-bad-images)",
    ]


def test_a_run_that_failed_in_its_first_epoch_can_start_again_without_overwrite(
    folder, tmp_path, monkeypatch
):
    import densenet.train.loop

    def out_of_memory(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(densenet.train.loop, "train_one_epoch", out_of_memory)
        with pytest.raises(RuntimeError, match="can't allocate"):
            train(tiny(folder, run, epochs=1), progress=False, log=quiet)
    assert not run.exists()  # its config.yaml removed: nothing was trained
    (run / "notes").mkdir(parents=True)
    with monkeypatch.context() as patch:
        patch.setattr(densenet.train.loop, "train_one_epoch", out_of_memory)
        with pytest.raises(RuntimeError, match="can't allocate"):
            train(tiny(folder, run, epochs=1), progress=False, log=quiet)
    assert (run / "notes").is_dir() and not (run / "config.yaml").exists()  # the user's stay
    train(tiny(folder, run, epochs=1), progress=False, log=quiet)
    assert (run / "checkpoints" / "last.safetensors").exists()


@pytest.mark.parametrize("text", ["learning_rate: 3\n", None])  # another tool's; --print-config's
def test_a_config_yaml_in_out_is_never_replaced_without_overwrite(folder, tmp_path, text):
    run = tmp_path / "project"
    run.mkdir()
    if text is None:
        from densenet.config import save_config

        save_config(tiny(folder, run, epochs=3), run / "config.yaml")  # a recipe kept there
    before = (run / "config.yaml").read_text() if text is None else text
    (run / "config.yaml").write_text(before)
    with pytest.raises(TrainingError, match="already holds config.yaml but no checkpoint; replace"):
        train(tiny(folder, run, epochs=1), progress=False, log=quiet)
    assert (run / "config.yaml").read_text() == before
