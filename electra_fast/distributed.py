"""Joining the launcher's process group, and the two collectives the trainer uses outside DeepSpeed.

Every launcher (``deepspeed``, ``torchrun``, MPI) is read from its environment variables; a plain
``python -m electra_fast.train`` becomes a group of one on a free local port.
"""

from __future__ import annotations

import os
import socket

import torch


def launcher_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the launcher's environment, before or after init."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", 1))))
    rank = int(env.get("RANK", env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", 0))))
    local = int(env.get("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    return rank, local, world


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(local_rank: int) -> tuple[int, int, torch.device]:
    """Join the process group the launcher set up (or make a one-process group): (rank, world, device)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launched = any(k in os.environ for k in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
    if not launched:  # `python -m electra_fast.train`: a group of one, on a free local port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    if local_rank < 0:
        local_rank = launcher_world()[1]
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    return rank, world, device


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()

def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (a no-op without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor

