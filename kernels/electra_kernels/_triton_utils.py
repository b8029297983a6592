"""Pieces every kernel file needs: two @triton.jit helpers that hide Triton-interpreter work-arounds,
the dropout keep-mask every dropping kernel draws, and the launch plumbing (device guard, programs per
launch).

Dropout randomness. One Philox-4x32-10 evaluation (``tl.randint4x``) gives four 32-bit words, i.e.
16 random bytes; ``dropout_keep16`` turns each byte into one keep decision (byte >= threshold), so a
kernel pays one Philox evaluation per 16 elements instead of one per element (``tl.rand``: ~100 integer
instructions per element, more than the attention's tensor-core work at ELECTRA's sizes). The price is
that the drop probability is quantised to 1/256: ``threshold = round(256·p)`` (clamped to 1..255 for
0 < p < 1, 256 for p = 1), the keep probability is exactly q = (256 - threshold)/256, and survivors are
scaled by 1/q (``dropout_keep_probability``), so E[dropout(x)] = x holds exactly (p = 0.1 drops with
probability 26/256 = 0.1016). Element (row r, column c) of a mask uses Philox counter
``base + r·cdiv(columns, 16) + c // 16`` and byte ``c % 16`` of its output: a map that depends only on
the element's position, never on block sizes or on which kernel (forward or backward, padded or packed
layout) asks, so every kernel regenerates the same mask. Chosen by compiled instruction counts: in the
attention forward's default config (bf16, d = 64, Triton 3.9) dropout adds 5,063 PTX instructions with
one ``tl.rand`` per element and 813 with ``dropout_keep16`` on sm_90 (5,035 and 865 on sm_80; static
counts over the kernel, whose key loop appears twice). ``tl.rand4x`` would give 4 decisions per
evaluation; a stored 1-bit mask would write and read S²/8 bytes per head (24 MiB per ELECTRA-Base
layer) and still need the random bits once.

Interpreter work-arounds. Triton's interpreter (3.9), which runs the kernels on the CPU for the tests,
differs from the GPU in two places:

* it converts fp32 -> bf16 by truncation, where the GPU rounds to nearest even (one more ulp of error
  at every bf16 store, double the CPU tests' errors);
* its ``tl.dot`` multiplies bf16 operands as their raw uint16 storage.

``cast_rne``, ``mma`` and ``dot`` correct both, guarded by ``INTERPRETER``: a ``tl.constexpr`` fixed at import,
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
    def dot(a, b, INPUT_PRECISION: tl.constexpr):
        """a·b in fp32: ``mma`` without an accumulator (a separate helper, because Triton < 3.4 turns a
        None passed through a jitted function into a constexpr that tl.dot rejects)."""
        if INTERPRETER:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision=INPUT_PRECISION)

    @triton.jit
    def mma(a, b, acc, INPUT_PRECISION: tl.constexpr):
        """acc + a·b with fp32 accumulation. Under the interpreter the operands are
        widened to fp32 first: bf16/fp16 products are exact in fp32, so the result is the tensor-core
        result up to summation order (and the interpreter ignores input_precision anyway)."""
        if INTERPRETER:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


    @triton.jit
    def dropout_keep16(seed, counters, threshold):
        """(R, 16·G) keep decisions from the (R, G) Philox counters, 16 per counter: column 16·g + b of
        the result is byte b of the four words ``tl.randint4x(seed, counters[:, g])`` (word b // 4,
        bits 8·(b % 4)..), kept when that byte is >= threshold (see the module docstring)."""
        r0, r1, r2, r3 = tl.randint4x(seed, counters)
        # join adds a trailing axis: words[..., i, j] = r[2·i + j] (word b // 4 of byte b after the
        # reshape); the byte axis goes last.
        words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
        shifts = (tl.arange(0, 4) * 8).to(tl.uint32)
        byte = (words[:, :, :, :, None] >> shifts[None, None, None, None, :]) & 0xFF
        keep = (byte >= threshold).to(tl.int8)
        return tl.reshape(keep, (counters.shape[0], counters.shape[1] * 16)) != 0


def dropout_threshold(p: float) -> int:
    """Bytes below this are dropped: round(256·p), at least 1 and at most 255 for 0 < p < 1."""
    if p <= 0.0:
        return 0
    if p >= 1.0:
        return 256
    return min(255, max(1, round(256 * p)))


def dropout_keep_probability(p: float) -> float:
    """The exact keep probability of the kernels' dropout at nominal drop probability p: survivors are
    scaled by its inverse, so E[dropout(x)] = x (see the module docstring)."""
    return (256 - dropout_threshold(p)) / 256


def dropout_scale(p: float) -> float:
    """1 / keep probability (0 when nothing is kept)."""
    keep = dropout_keep_probability(p)
    return 1.0 / keep if keep > 0.0 else 0.0


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
