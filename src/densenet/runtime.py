"""Where code runs: the device, and the processes of a ``torchrun`` job (DDP).

Multi-process training uses PyTorch's own engine: ``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT, ``torch.distributed`` forms the group, and
``DistributedDataParallel`` averages the gradients. Nothing here re-implements either. One process
per GPU (nccl), or several CPU processes (gloo).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# Derived seeds are ``seed * SEED_STRIDE + n`` (n: an epoch or a step): a prime far above any n,
# so two (seed, n) pairs of a run never meet on the same derived seed.
SEED_STRIDE = 1_000_003


def is_main_process() -> bool:
    """True unless this is a ``torchrun`` worker of rank above 0 (the one that reports)."""
    return int(os.environ.get("RANK", "0")) == 0


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 in hardware, so that bf16 is faster than float32.

    x86 CPUs: AVX512_BF16 or AMX (without them oneDNN emulates bfloat16, slower than float32);
    other CPUs: oneDNN's own check (Arm with BF16); CUDA: compute capability 8.0 or above;
    anything else: False.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_device(name: str | None) -> torch.device:
    """``auto``/None: CUDA, else MPS, else the CPU; otherwise ``name``, checked to exist here."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} asked for but no CUDA GPU is available; use --device cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for but MPS is not available; use --device cpu")
    return device


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process group was created by :func:`setup`

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the job ``torchrun`` started; return this rank and the device it trains on.

    A single process (no torchrun) gets ``DistEnv()`` and ``device`` unchanged. Under torchrun the
    backend is nccl on CUDA (each rank on GPU ``LOCAL_RANK``) and gloo on the CPU. A process group
    the caller already initialized is used as it is.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        return DistEnv(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise ValueError("multi-process training runs on CUDA GPUs or CPUs, not on MPS")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    env = DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, owns)
    return env, device


def cleanup(env: DistEnv) -> None:
    """Leave the process group if :func:`setup` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv, device: torch.device, sync_bn: bool) -> nn.Module:
    """``model`` inside DistributedDataParallel (optionally with SyncBatchNorm) when distributed.

    Memory-efficient dense blocks recompute without reentrant autograd, so every parameter's
    gradient appears once per backward and DDP's gradient buckets work unchanged.
    """
    if not env.enabled:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ValueError(
                "sync_bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only); on CPUs each process "
                "normalizes its own share of the batch: set sync_bn: false"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """``values`` summed over all ranks (unchanged for one process)."""
    if env.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(module: nn.Module, env: DistEnv) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluating."""
    if env.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` (picklable) on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` for one process)."""
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
