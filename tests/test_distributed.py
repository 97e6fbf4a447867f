"""DDP training launched by torchrun: two CPU processes (gloo) against one process.

``batch_size`` is the global batch; rank ``r`` of ``W`` takes the strided share ``[r::W]`` of it,
exactly the micro-batch ``[m::A]`` one process takes with ``grad_accum_steps: A``. So two ranks
and one process with two micro-batches normalize the same images together and average the same
gradients: their weights agree to float rounding (the all-reduce sums in another order).
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_data import make_image_folder

from densenet import data
from densenet.config import load_config
from densenet.evaluation import evaluate
from densenet.io import load_state
from densenet.models import DenseNet
from densenet.runtime import DistEnv
from densenet.train import train

TINY_MODEL = {"growth_rate": 4, "block_config": [2, 2], "num_init_features": 8}
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = make_image_folder(tmp_path_factory.mktemp("images"), size=8, per_class=16, classes=2)
    (root / "test" / "c1" / "0.png").unlink()  # 31 test images: uneven shares over two ranks
    return root


def settings(folder: Path, out: Path, **overrides) -> dict:
    values = {
        "dataset": "folder", "data_dir": str(folder), "model_args": TINY_MODEL,
        "batch_size": 8, "epochs": 2, "workers": 0, "device": "cpu", "out": str(out),
        "seed": 3, "deterministic": True, "drop_rate": 0.0, "augment": "none",
        "schedule": "cosine", "threads": 1,
        "amp": "none",  # float32: the checks compare to float32 rounding, and rank 0's own numbers
    }  # fmt: skip
    return {**values, **overrides}


def torchrun(values: dict, *extra: str, **popen) -> subprocess.Popen:
    """``torchrun --nproc-per-node 2 -m densenet train --set key=value ...``."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "densenet", "train", "--no-progress", *extra,
    ]  # fmt: skip
    for key, value in values.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def checkpoint(run: Path) -> tuple[dict, dict]:
    return load_state(run / "checkpoints" / "last.safetensors")


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def test_two_ranks_train_as_one_process_with_two_micro_batches(folder, tmp_path):
    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"
    output = finish(torchrun(settings(folder, ddp_run)))
    assert output.count("epoch 2/2") == 1  # rank 0 alone logs
    assert output.count("done:") == 1  # and prints the final line
    train(
        load_config(None, settings(folder, single_run, grad_accum_steps=2)),
        progress=False,
        log=lambda _: None,
    )

    (ddp, ddp_meta), (single, _) = checkpoint(ddp_run), checkpoint(single_run)
    assert (ddp["epoch"], ddp["step"]) == (single["epoch"], single["step"]) == (2, 8)
    assert len(ddp["rng_ranks"]) == 2 and "rng_ranks" not in single
    model = DenseNet(**ddp_meta["model_config"])
    names = {name for name, _ in model.named_parameters()}
    for name in names:
        torch.testing.assert_close(ddp["model"][name], single["model"][name], rtol=1e-4, atol=1e-6)
    moved = max(float((ddp["model"][n] - model.state_dict()[n]).abs().max()) for n in names)
    assert moved > 1e-3  # the comparison is between trained weights, not two fresh inits
    for a, b in zip(metrics(ddp_run), metrics(single_run), strict=True):
        # loss and accuracy summed over the ranks equal the one process's over the whole batch
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_top1"] == b["train_top1"]

    # The ranks scored uneven halves of the 31 test images with rank 0's model; the sums are
    # the metrics of that model on all of them.
    model.load_state_dict(ddp["model"])
    info = data.dataset_info("folder", folder)
    test = data.build_dataset("folder", folder, "test").to_memory(3)
    transform = data.BatchTransform("none", False, info.mean, info.std)
    result = evaluate(model, data.build_loader(test, 8, False), transform=transform)
    assert result.images == 31
    last = metrics(ddp_run)[-1]
    assert result.top1 == pytest.approx(last["val_top1"], rel=1e-5)  # CSV: 6 digits
    assert result.loss == pytest.approx(last["val_loss"], rel=1e-5)


def test_batch_must_split_over_the_ranks(folder, tmp_path):
    process = torchrun(settings(folder, tmp_path / "run", batch_size=9))
    output, _ = process.communicate(timeout=240)
    assert process.returncode != 0
    assert "batch_size 9 must be a multiple of processes x grad_accum_steps (2 x 1)" in output
    assert "densenet train: error: batch_size 9" in output  # each rank's message, not a traceback
    assert not re.search(r'File ".*/densenet/\w+\.py"', output), output


def test_sigterm_to_torchrun_stops_every_rank_and_resume_is_exact(folder, tmp_path):
    long = {"epochs": 40, "memory_efficient": True}
    reference = torchrun(settings(folder, tmp_path / "reference", **long))
    interrupted_run = tmp_path / "interrupted"
    process = torchrun(settings(folder, interrupted_run, **long), start_new_session=True)
    lines = []
    for line in process.stdout:  # wait until training is under way on both ranks
        lines.append(line)
        if line.startswith("epoch 2/40"):
            process.send_signal(signal.SIGTERM)  # what a scheduler does to the launcher
            break
    output = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode != 0
    assert output.count("SIGTERM received: saved a checkpoint") == 2, output  # both ranks
    state, _ = checkpoint(interrupted_run)
    assert 8 <= state["step"] < 160 and len(state["rng_ranks"]) == 2

    started = time.monotonic()
    finish(torchrun({"epochs": 40}, "--resume", str(interrupted_run)))
    finish(reference)
    assert time.monotonic() - started < 240
    resumed, expected = checkpoint(interrupted_run)[0], checkpoint(tmp_path / "reference")[0]
    assert resumed["step"] == expected["step"] == 160
    for name, value in expected["model"].items():
        assert torch.equal(resumed["model"][name], value), name


def _evaluate_on_rank(rank: int, store_file: str, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store_file}", rank=rank, world_size=2
    )
    try:
        torch.manual_seed(0)
        model = DenseNet(**TINY_MODEL, num_classes=3).eval()
        images = torch.randn(1, 3, 8, 8)
        # One image for two ranks: rank 1's share is empty; num_classes is not passed.
        share = [(images, torch.tensor([2]))] if rank == 0 else []
        result = evaluate(model, share, env=DistEnv(rank, 2))
        if rank == 0:
            torch.save({"result": result.to_dict(), "logits": model(images)}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_evaluate_with_an_empty_share_on_one_rank(tmp_path: Path) -> None:
    out = tmp_path / "result.pt"
    torch.multiprocessing.spawn(
        _evaluate_on_rank, args=(str(tmp_path / "store"), str(out)), nprocs=2
    )
    saved = torch.load(out)
    result = saved["result"]
    assert result["images"] == 1
    assert result["top1"] == (100.0 if int(saved["logits"].argmax()) == 2 else 0.0)
    assert torch.tensor(result["confusion"]).shape == (3, 3)
