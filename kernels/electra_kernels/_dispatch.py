"""When to run a Triton kernel and when to fall back to the PyTorch reference.

Triton compiles for CUDA devices only; on the CPU the same kernels run in Triton's interpreter when
``TRITON_INTERPRET=1`` is set before triton is imported (that is how the test-suite checks them).
Everywhere else (CPU tensors without the interpreter, or triton missing) the public functions call
their ``*_ref`` implementation, so a model written against ``electra_kernels`` runs anywhere.

On the GPU some kernels run only some dtypes (``gpu_dtypes``): attention and the MLM head send fp32 to
their PyTorch path there, because their fp32 tiles do not fit the registers and shared memory of
sm_80 / sm_90 (kernels/README.md, "Which dtype runs where"). The interpreter still runs fp32 through
the kernels, where the tests check their algorithm at fp32 precision.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

try:  # triton is a Linux-only dependency
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor, dtype: Optional[torch.dtype] = None, gpu_dtypes=None) -> bool:
    """True when the given tensors should go through the Triton kernels. ``gpu_dtypes``: the compute
    dtypes the kernel runs on a GPU (None: all it accepts); ``dtype`` the compute dtype of this call."""
    if not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors if t is not None):
        return gpu_dtypes is None or dtype in gpu_dtypes
    return interpreter_enabled()
