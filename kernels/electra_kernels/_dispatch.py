"""When to run a Triton kernel and when to fall back to the PyTorch reference.

Triton compiles for CUDA devices only; on the CPU the same kernels run in Triton's interpreter when
``TRITON_INTERPRET=1`` is set before triton is imported (that is how the test-suite checks them).
Everywhere else (CPU tensors without the interpreter, or triton missing) the public functions call
their ``*_ref`` implementation, so a model written against ``electra_kernels`` runs anywhere.
"""

from __future__ import annotations

import os

import torch

try:  # triton is a Linux-only dependency
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the given tensors should go through the Triton kernels."""
    if not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors if t is not None):
        return True
    return interpreter_enabled()
