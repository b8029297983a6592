"""Test-suite set-up: Triton kernels run on the CPU in Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection time.
Model tests choose the PyTorch reference explicitly (model.*_impl="torch") where they test the model
and not the kernels, because the interpreter is slow.
"""

import os
import warnings

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


def _math_state() -> dict:
    """torch's process-wide switches that change which kernel computes a float32 result (and so its
    last bits): a test that flips one and does not put it back changes the numbers of every later test.
    Seen: an exact export comparison that passed alone and failed after the rest of the suite."""
    backends = torch.backends
    state = {
        "num_threads": torch.get_num_threads(),
        "default_dtype": torch.get_default_dtype(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "grad_enabled": torch.is_grad_enabled(),
        "mkldnn_enabled": backends.mkldnn.enabled,
        "cuda_matmul_allow_tf32": backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": backends.cudnn.allow_tf32,
    }
    # torch >= 2.9 spells precision per backend (transformers' enable_tf32 sets the global one).
    for name, owner in (("fp32_precision", backends), ("mkldnn.fp32_precision", backends.mkldnn),
                        ("mkldnn.matmul.fp32_precision", getattr(backends.mkldnn, "matmul", None)),
                        ("cuda.matmul.fp32_precision", backends.cuda.matmul)):
        if owner is not None and hasattr(owner, "fp32_precision"):
            state[name] = owner.fp32_precision
    return state


def _restore_math_state(state: dict) -> None:
    backends = torch.backends
    torch.set_num_threads(state["num_threads"])
    torch.set_default_dtype(state["default_dtype"])
    torch.set_float32_matmul_precision(state["float32_matmul_precision"])
    torch.use_deterministic_algorithms(state["deterministic"])
    torch.set_grad_enabled(state["grad_enabled"])
    backends.mkldnn.enabled = state["mkldnn_enabled"]
    backends.cuda.matmul.allow_tf32 = state["cuda_matmul_allow_tf32"]
    backends.cudnn.allow_tf32 = state["cudnn_allow_tf32"]
    for name, value in state.items():
        if name.endswith("fp32_precision"):
            owner = backends
            for part in name.split(".")[:-1]:
                owner = getattr(owner, part)
            owner.fp32_precision = value


@pytest.fixture(autouse=True)
def _math_state_restored(request):
    """Every test starts from the same math switches; one that leaks a change is named, so the
    leak is fixed where it happens (a warning in the summary), and the next test is not computed on another path meanwhile."""
    before = _math_state()
    yield
    after = _math_state()
    if after != before:
        changed = {k: (before[k], after.get(k)) for k in before if before[k] != after.get(k)}
        warnings.warn(f"{request.node.nodeid} left torch's math state changed: {changed}", RuntimeWarning)
        _restore_math_state(before)


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_left_behind():
    """In-process DeepSpeed runs join a one-process group. Leave none behind after a test module, and no
    DeepSpeed group cached for it (deepspeed.comm's teardown drops both): a later module's run would
    otherwise find DeepSpeed's cached groups registered to a destroyed default group."""
    yield
    from electra_fast.distributed import shutdown_distributed

    shutdown_distributed()
