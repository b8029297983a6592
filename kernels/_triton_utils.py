"""Pieces every kernel file needs: two @triton.jit helpers that hide Triton-interpreter work-arounds,
and the launch plumbing (device guard, programs per launch).

Interpreter work-arounds. Triton's interpreter (3.9), which runs the kernels on the CPU for the tests,
differs from the GPU in two places:

* it converts fp32 -> bf16 by truncation, where the GPU rounds to nearest even (one more ulp of error
  at every bf16 store, double the CPU tests' errors);
* its ``tl.dot`` multiplies bf16 operands as their raw uint16 storage.

``cast_rne`` and ``mma`` correct both, guarded by ``INTERPRETER``: a ``tl.constexpr`` fixed at import,
when ``triton.jit`` also decides between interpreting and compiling. On the GPU it is False, so the
work-arounds are not even compiled and the helpers are a plain ``.to(DTYPE)`` and ``tl.dot``.
A @triton.jit function imported from this module is called from another module's kernel like a local one.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ._dispatch import HAS_TRITON, interpreter_enabled

if HAS_TRITON:
    import triton
    import triton.language as tl

    INTERPRETER = tl.constexpr(interpreter_enabled())

    @triton.jit
    def cast_rne(x, DTYPE: tl.constexpr):
        """x.to(DTYPE) with round-to-nearest-even, as the GPU converts. Under the interpreter a bf16
        target is rounded by hand on the fp32 bits first: add half a bf16 ulp (0x7FFF, plus 1 when
        the kept low bit is odd: ties to even), then drop the low 16 bits."""
        if INTERPRETER:
            if DTYPE == tl.bfloat16:
                bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        return x.to(DTYPE)

    @triton.jit
    def mma(a, b, acc, INPUT_PRECISION: tl.constexpr):
        """acc + a·b with fp32 accumulation (acc may be None). Under the interpreter the operands are
        widened to fp32 first: bf16/fp16 products are exact in fp32, so the result is the tensor-core
        result up to summation order (and the interpreter ignores input_precision anyway)."""
        if INTERPRETER:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


def device_guard(t: torch.Tensor):
    """Make t's GPU the current device for a launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def target_programs(device: torch.device, per_sm: int, interpreted: int = 4) -> int:
    """Programs to aim for in one launch: ``per_sm`` per streaming multiprocessor on a GPU; on the CPU
    ``interpreted`` (the interpreter runs programs one after another: few programs keep tests fast)."""
    if device.type == "cuda":
        return per_sm * _multiprocessor_count(device)
    return interpreted
