"""Progress of long operations (densenet.progress) and the command line's --no-progress/--json."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from densenet import progress as progress_module
from densenet.progress import Progress, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_out_of_a_terminal_a_line_every_interval_with_count_rate_and_eta():
    clock, stream = FakeClock(), io.StringIO()
    bar = Progress(total=100, desc="eval", unit="img", stream=stream, interval=10, clock=clock)
    for _ in range(10):  # 10 images every 4 s: lines at 12 s and 24 s (interval 10 s)
        clock.now += 4
        bar.update(10)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "eval: 30/100 img (30%), 2.5 img/s, ETA 0:28",
        "eval: 60/100 img (60%), 2.5 img/s, ETA 0:16",
        "eval: 90/100 img (90%), 2.5 img/s, ETA 0:04",
        "eval: 100 img in 0:40, 2.5 img/s",
    ]


def test_short_operations_print_nothing_and_iteration_counts_sizes():
    clock, stream = FakeClock(), io.StringIO()
    batches = [[0] * 3, [0] * 3, [0] * 2]
    tracked = Progress(batches, desc="x", size=len, stream=stream, interval=10, clock=clock)
    assert [len(b) for b in tracked] == [3, 3, 2]
    assert tracked.done == 8 and stream.getvalue() == ""


def test_in_a_terminal_a_tqdm_bar_on_the_stream():
    terminal = FakeTerminal()
    with Progress(total=4, desc="predict", stream=terminal) as bar:
        bar.update(4)
    drawn = terminal.getvalue()
    assert drawn.startswith("\rpredict:") and "%|" in drawn and "/4 [" in drawn  # tqdm's bar


def test_switched_off_and_other_ranks_print_nothing(monkeypatch):
    clock, stream = FakeClock(), io.StringIO()

    def run() -> str:
        with Progress(total=5, desc="d", stream=stream, interval=0, clock=clock) as bar:
            for _ in range(5):
                clock.now += 1
                bar.update()
        return stream.getvalue()

    monkeypatch.setattr(progress_module, "_enabled", False)
    assert run() == ""
    monkeypatch.setattr(progress_module, "_enabled", True)
    monkeypatch.setenv("RANK", "1")
    assert run() == ""
    monkeypatch.setenv("RANK", "0")
    assert "d: 5/5" in run()


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress_module.INTERVAL_ENV, "0.5")
    assert progress(total=1).interval == 0.5
    monkeypatch.setenv(progress_module.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="DENSENET_PROGRESS_INTERVAL='soon'"):
        progress(total=1)


# --- through the command line, stderr not a terminal -----------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(5):
        Image.new("RGB", (40, 36), (40 * i, 90, 200 - 30 * i)).save(folder / f"img{i}.png")
    return folder


def densenet(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, progress_module.INTERVAL_ENV: "0"}  # a line at every update
    return subprocess.run(
        [sys.executable, "-m", "densenet", *argv], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip


def test_predict_json_stays_pure_and_progress_goes_to_stderr(image_folder):
    done = densenet(
        "predict", str(image_folder), "--model", "densenet_bc16_k12", "--batch-size", "2",
        "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["predictions"]) == 5
    lines = [line for line in done.stderr.splitlines() if line.startswith("predict: ")]
    assert re.fullmatch(r"predict: 2/5 img \(40%\), [\d.e+]+ img/s, ETA \d+:\d\d", lines[0])
    assert lines[-1].startswith("predict: 5 img in ")


def test_no_progress_prints_no_progress_line(image_folder):
    done = densenet(
        "predict", str(image_folder), "--model", "densenet_bc16_k12", "--batch-size", "2",
        "--json", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    json.loads(done.stdout)
    assert "predict:" not in done.stderr and "img/s" not in done.stderr


def test_ten_crop_eval_reports_progress(tmp_path):
    data = tmp_path / "data"
    for cls in range(10):  # the model's 10 classes, one image each
        (data / "test" / f"c{cls}").mkdir(parents=True)
        Image.new("RGB", (40, 40), (20 * cls, 20, 9)).save(data / "test" / f"c{cls}" / "0.png")
    done = densenet(
        "eval", "--model", "densenet_bc16_k12", "--dataset", "folder", "--data-dir", str(data),
        "--ten-crop", "--batch-size", "4", "--workers", "0", "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"] == 10
    assert re.search(r"^eval: 4/10 img \(40%\)", done.stderr, re.M), done.stderr
    assert re.search(r"^eval: 10 img in ", done.stderr, re.M), done.stderr


# --- the other long operations, in-process (stderr is not a terminal under pytest) -------------
@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setenv(progress_module.INTERVAL_ENV, "0")


def test_training_reports_batches_loss_and_rate(tmp_path, every_update, capsys):
    from test_data import make_image_folder

    from densenet.config import load_config
    from densenet.train import train

    folder = make_image_folder(tmp_path / "images", size=8, per_class=16, classes=2)
    cfg = load_config(None, {
        "dataset": "folder", "data_dir": str(folder), "batch_size": 8, "epochs": 1,
        "workers": 0, "device": "cpu", "out": str(tmp_path / "run"),
        "model_args": {"growth_rate": 2, "block_config": [1, 1], "num_init_features": 4},
    })  # fmt: skip
    train(cfg, log=lambda _: None)  # progress=None: the command line's default
    err = capsys.readouterr().err
    assert re.search(r"^epoch 1/1: 1/4 batch \(25%\), .*, ETA .*, loss [\d.]+, acc ", err, re.M)
    assert re.search(r"^epoch 1/1: 4 batch in ", err, re.M)


def test_bench_rounds(every_update, capsys):
    import torch

    from densenet.benchmark import measure

    measure({"identity": lambda batch: batch}, torch.zeros(2, 3), iters=3, warmup=0)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("bench batch 2: 1/3 round (33%)")
    assert lines[-1].startswith("bench batch 2: 3 round in ")


def test_checking_a_folder_of_images(tmp_path, every_update, capsys):
    from test_data import make_image_folder

    from densenet.data import FolderImages

    folder = make_image_folder(tmp_path, size=8, per_class=2, classes=2)
    (folder / "train" / "c0" / "broken.png").write_bytes(b"not a png")
    images = FolderImages(folder, "train", skip_bad_images=True)
    assert images.skipped == 1
    err = capsys.readouterr().err
    assert re.search(rf"^checking images in {re.escape(str(folder))}: 1/5 img \(20%\)", err, re.M)
    images.to_memory()
    err = capsys.readouterr().err
    assert re.search(rf"^decoding {re.escape(str(folder))}: 4 img in ", err, re.M)


def test_no_progress_lasts_one_command_only(capsys):
    from densenet.cli import main

    assert main(["models", "densenet121", "--no-progress"]) == 0
    assert progress_module.is_enabled()
