"""The run directory: ``config.yaml``, ``metrics.csv``, ``curves.png`` and
``checkpoints/{last,best}.safetensors`` (every file written atomically, by the main process only),
and the checks that decide whether a run may start in it."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import shutil
import time
from pathlib import Path

from densenet import runtime
from densenet.config import TrainConfig, model_label
from densenet.io import atomic_write
from densenet.runtime import DistEnv
from densenet.train.errors import TrainingError
from densenet.visualize import plot_curves

METRIC_FIELDS = (
    "epoch",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "val_mean_auroc",  # multilabel runs; their top-1/top-5 columns are empty
    "lr",
    "img_per_s",
    "time_s",
)


class RunDir:
    """Paths and files of one run; only the main process writes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.csv"
        self.curves = self.path / "curves.png"
        self.last = self.path / "checkpoints" / "last.safetensors"
        self.best = self.path / "checkpoints" / "best.safetensors"
        self.created = False  # did this run make the folder (make)?

    def holds_run(self) -> bool:
        return any(p.exists() for p in (self.config, self.metrics, self.last, self.best))

    def has_checkpoint(self) -> bool:
        return self.last.exists() or self.best.exists()

    def make(self) -> None:
        """Create the folder (and its parents), remembering whether it was new."""
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)

    def forget_failed_start(self) -> None:
        """After a new run failed before its first checkpoint: remove what it wrote (nothing
        trained to keep), and the folder if it made it and that leaves it empty, so the same
        command can run again without --overwrite."""
        if self.has_checkpoint():
            return
        self.clear()
        if self.created:
            with contextlib.suppress(OSError):  # not empty: other files are not ours to remove
                self.path.rmdir()

    def clear(self) -> None:
        """Remove a previous run's files (only those a run writes)."""
        for p in (self.config, self.metrics, self.curves):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.path / "checkpoints", ignore_errors=True)

    def read_metrics(self, up_to_epoch: int) -> list[dict]:
        if not self.metrics.exists():
            return []
        with open(self.metrics, newline="") as f:
            # An empty column is a metric the run's task lacks (or a row written before it).
            rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
        return [r for r in rows if r["epoch"] <= up_to_epoch]

    def write_metrics(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, METRIC_FIELDS)
        writer.writeheader()
        for row in rows:
            # A metric a row lacks (its task has none, or it predates the column) stays empty.
            writer.writerow({k: _fmt(row[k]) if k in row else "" for k in METRIC_FIELDS})
        atomic_write(self.metrics, lambda f: f.write(buffer.getvalue()), mode="w")
        # The plot draws every curve; a metric the task lacks is a gap (NaN).
        plot_curves([{k: row.get(k, math.nan) for k in METRIC_FIELDS} for row in rows], self.curves)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.6g}"


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{model_label(cfg)}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_run_dir(
    cfg: TrainConfig, env: DistEnv, resume: str | Path | None, overwrite: bool
) -> RunDir:
    """The run directory to train in: ``resume`` (which must hold a checkpoint), else ``cfg.out``
    (or a new name), never one holding a run unless ``overwrite`` (then it is cleared)."""
    run_dir = RunDir(runtime.broadcast_object(resume or cfg.out or default_run_dir(cfg), env))
    if resume is None and run_dir.holds_run() and not overwrite:
        if run_dir.has_checkpoint():
            held = f"a run; continue it with --resume {run_dir.path},"
        else:  # a recipe saved as config.yaml, or a run killed before it saved a checkpoint
            files = [p.name for p in (run_dir.config, run_dir.metrics) if p.exists()]
            held = f"{' and '.join(files)} but no checkpoint;"
        raise TrainingError(
            f"run directory {run_dir.path} already holds {held} replace it with --overwrite, or "
            "choose another --out"
        )
    if resume is None and run_dir.holds_run():
        runtime.barrier(env)  # every rank has looked before rank 0 clears
        if env.is_main:
            run_dir.clear()
    if resume is not None and not run_dir.last.exists():
        raise TrainingError(
            f"{run_dir.path}: no checkpoint to resume ({run_dir.last} is missing; the run stopped "
            f"before its first one); start it again with --out {run_dir.path} --overwrite"
        )
    return run_dir


def open_tensorboard(cfg: TrainConfig, run_dir: RunDir):
    """A ``SummaryWriter`` into ``RUN/tensorboard`` when ``cfg.tensorboard``, else None."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError("tensorboard: true needs pip install 'densenet[tensorboard]'") from None
    return SummaryWriter(str(run_dir.path / "tensorboard"))
