"""Test-suite set-up: Triton kernels run on the CPU in Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection time.
Model tests choose the PyTorch reference explicitly (model.*_impl="torch") where they test the model
and not the kernels, because the interpreter is slow.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Test tensors are tiny: one intra-op thread is faster than two spinning OpenMP threads, and much
# faster when several processes (DeepSpeed ranks, dataset workers) share the two CI cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_left_behind():
    """In-process DeepSpeed runs join a one-process group. Leave none behind after a test module, and no
    DeepSpeed group cached for it (deepspeed.comm's teardown drops both): a later module's run would
    otherwise find DeepSpeed's cached groups registered to a destroyed default group."""
    yield
    from electra_fast.distributed import shutdown_distributed

    shutdown_distributed()
