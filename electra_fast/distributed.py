"""Joining the launcher's process group, and the few collectives the trainer uses outside DeepSpeed.

Every launcher (``deepspeed``, ``torchrun``, MPI) is read from its environment variables; a plain
``python -m electra_fast.train`` becomes a group of one on a free local port.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
from pathlib import Path

import torch

# DeepSpeed's CPU accelerator compiles this C++ op (shared-memory collectives) on first use.
CPU_OP_NAME = "deepspeed_shm_comm"


# DeepSpeed start-up warnings that tell the user nothing they can act on: a CPU run on a machine without a
# GPU is what was asked for.
QUIET_DEEPSPEED_WARNINGS = ("Setting accelerator to CPU", "we were unable to detect it")


class _DropStartupNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in QUIET_DEEPSPEED_WARNINGS)


def quiet_deepspeed_logger() -> None:
    """Keep DeepSpeed's own logger to warnings, minus the start-up ones above. Call before importing
    deepspeed: its logger is created on import and keeps a filter added to it beforehand."""
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.setLevel(logging.WARNING)  # its INFO lines would bury the progress bar
    if not any(isinstance(f, _DropStartupNoise) for f in ds_logger.filters):
        ds_logger.addFilter(_DropStartupNoise())


def use_environment_extension_cache() -> Path:
    """Keep DeepSpeed's and torch's compiled C++ ops inside the running virtualenv.

    torch builds them into ``~/.cache/torch_extensions`` by default, a folder every checkout's
    virtualenv shares: two environments with different torch builds then rebuild (or load) each
    other's ops. ``TORCH_EXTENSIONS_DIR`` set to ``sys.prefix/torch_extensions`` makes the build one per
    environment; a value the user set is kept. Returns the folder in use.
    """
    folder = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not folder:
        folder = str(Path(sys.prefix) / "torch_extensions")
        os.environ["TORCH_EXTENSIONS_DIR"] = folder
    return Path(folder)


def announce_cpu_op_build(cache: Path, is_cpu: bool) -> bool:
    """Say, before DeepSpeed compiles its CPU op for minutes without a word, what is happening and that
    it happens once per environment. True when the message was printed."""
    if not is_cpu or any(cache.glob(f"**/{CPU_OP_NAME}*.so")):
        return False
    print(f"[electra-fast] DeepSpeed is compiling its CPU communication op ({CPU_OP_NAME}) for this "
          f"environment: about 3 minutes on two cores, once (kept in {cache})", file=sys.stderr, flush=True)
    return True


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


def init_distributed(local_rank: int, timeout_minutes: float = 30.0) -> tuple[int, int, torch.device]:
    """Join the process group the launcher set up (or make a one-process group): (rank, world, device).

    ``timeout_minutes`` (train.dist_timeout_minutes) bounds every collective: when a rank dies, the
    launcher on its node ends that node's ranks at once, but the ranks of other nodes wait in their
    next collective; NCCL's watchdog then fails the collective after this long and ends the process
    (torch's default TORCH_NCCL_ASYNC_ERROR_HANDLING), and the job with it."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launched = any(k in os.environ for k in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
    if not launched:  # `python -m electra_fast.train`: a group of one, on a free local port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    if launcher_world()[0] == 0:
        announce_cpu_op_build(use_environment_extension_cache(), accelerator.device_name() == "cpu")
    else:
        use_environment_extension_cache()
    if local_rank < 0:
        local_rank = launcher_world()[1]
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    # DeepSpeed prints "... built successfully" each time it loads its CPU op, built or not; other lines pass.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(),
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    for line in printed.getvalue().splitlines():
        if not line.endswith("built successfully"):
            print(line, flush=True)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    return rank, world, device


def shutdown_distributed() -> None:
    """Leave the process group through DeepSpeed, which also drops the groups it cached (a later run in
    the same process, e.g. a second in-process ``main()``, would otherwise reuse a destroyed one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()

def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (a no-op without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum of ``tensor`` over the ranks, in place (a no-op without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return tensor

