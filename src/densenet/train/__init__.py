"""Training: :func:`train` runs a :class:`~densenet.config.TrainConfig` into a run directory.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per epoch),
``curves.png`` and ``checkpoints/{last,best}.safetensors`` (atomic safetensors files: model,
optimizer, schedule, EMA, grad scaler, RNG states, epoch and step). With weight EMA the validation
numbers are the EMA weights', and ``best``'s ``model`` holds those EMA weights. ``train(config,
resume=RUN_DIR)`` continues a run exactly where its last checkpoint left it: the data order comes
from ``seed + epoch`` and every RNG is restored, so on the CPU in deterministic mode a resumed run
ends with the same weights, bit for bit, as an uninterrupted one. A resume may change settings
that do not define the run (see :mod:`~densenet.train.resume`).

SIGINT/SIGTERM save a checkpoint of the current step and raise :class:`Interrupted`; a NaN/Inf
loss stops the run naming the step (:class:`TrainingError`) and leaves the last good checkpoint.
Under ``torchrun`` each process trains on its share of every batch (see
:mod:`~densenet.train.epoch`); rank 0 alone logs and writes; every rank's RNG state goes into the
checkpoint.

The modules, in the order a run uses them: :mod:`~densenet.train.loop` (the loop),
:mod:`~densenet.train.run_dir` (files), :mod:`~densenet.train.resume` (continuing with changed
settings), :mod:`~densenet.train.rng` (seeds and RNG states), :mod:`~densenet.train.inputs`
(datasets and loaders), :mod:`~densenet.train.model` (network and EMA),
:mod:`~densenet.train.optim` (optimizer, lr schedule, loss), :mod:`~densenet.train.state` (the
state and its checkpoint), :mod:`~densenet.train.epoch` (one epoch's steps and validation),
:mod:`~densenet.train.signals` and :mod:`~densenet.train.errors` (how a run stops early).
"""

from densenet.train.errors import Interrupted, TrainingError
from densenet.train.loop import RunResult, train
from densenet.train.resume import resume_config

__all__ = ["Interrupted", "RunResult", "TrainingError", "resume_config", "train"]
