"""Rotary position embeddings (half-split layout, transformers' ModernBERT) for the attention kernels.

    x_rot = x·cos + rotate_half(x)·sin,   rotate_half(x) = cat(-x2, x1)   (x1, x2: the two halves of d)
    cos, sin at angle position · inv_freq,  inv_freq = 1/θ^(arange(0, d, 2)/d)

One Triton kernel rotates a (tokens, heads, head_dim) tensor at a given position per token: the
token's index in its sequence (padded layout) or inside its packed document (varlen: positions
restart at every cu_seqlens boundary). The backward is the inverse rotation (sin -> -sin: the
rotation matrix is orthogonal), so gradients come back for the unrotated q and k.

Where it is used: the attention kernels rotate q and k inside their tile loads on Hopper+ for bf16/fp16
(electra_kernels/attention_rotary.py); on sm_80 that fused backward spills registers, and fp32 tiles spill
everywhere, so those take this kernel (one read and one write of q and k per pass, memory-bound, no matmul;
flash-attn's own ModernBERT path pays the same with ``apply_rotary_emb``). ``attention._rotary_mode``
decides; kernels/README.md has the register numbers. patch_hf also uses it for per-row position_ids.

cos/sin are a (positions, d/2) fp32 table computed with :func:`electra_kernels.attention.rotary_cos_sin`,
exactly transformers' fp32 values; the rotation is fp32 arithmetic, the output in x's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import HAS_TRITON
from ._outputs import new_empty
from ._triton_utils import device_guard

if HAS_TRITON:
    import triton
    import triton.language as tl

# One head per program, 2048 (x1, x2) pairs (16 per thread at 4 warps): 64 tokens at head dim 64. At
# 4096 pairs (64 tokens at head dim 128) ptxas needs ~200 registers (no spills, but half the occupancy);
# 2048 take 95 on sm_80 / sm_90 (bf16).
_PAIRS = 2048
_NUM_WARPS = 4


if HAS_TRITON:

    @triton.jit
    def _rotary_kernel(X, OUT, POS, COS, SIN, n_tokens, stride_xt, stride_xh, stride_ot, stride_oh,
                       HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, INVERSE: tl.constexpr):
        """Rotate (or with INVERSE un-rotate) BLOCK_T tokens of one head."""
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.program_id(1).to(tl.int64)
        j = tl.arange(0, BLOCK_H)
        t_ok = t < n_tokens
        ok = t_ok[:, None] & (j < HALF)[None, :]
        pos = tl.load(POS + t, mask=t_ok, other=0).to(tl.int64)
        table = pos[:, None] * HALF + j[None, :]
        c = tl.load(COS + table, mask=ok, other=0.0)
        s = tl.load(SIN + table, mask=ok, other=0.0)
        if INVERSE:
            s = -s
        t64 = t.to(tl.int64)
        x_ptrs = X + t64[:, None] * stride_xt + h * stride_xh + j[None, :]
        x1 = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + HALF, mask=ok, other=0.0).to(tl.float32)
        o_ptrs = OUT + t64[:, None] * stride_ot + h * stride_oh + j[None, :]
        tl.store(o_ptrs, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=ok)
        tl.store(o_ptrs + HALF, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=ok)


def _block_h(half: int) -> int:
    return max(16, triton.next_power_of_2(half))


def _block_t(half: int) -> int:
    return max(16, _PAIRS // _block_h(half))


def rotary_forward(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    """x (tokens, heads, head_dim), unit last stride; positions (tokens,) int32; cos/sin (P, head_dim/2) fp32."""
    tokens, heads, dim = x.shape
    out = new_empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    with device_guard(x):
        block_t = _block_t(dim // 2)
        _rotary_kernel[(triton.cdiv(tokens, block_t), heads)](
            x, out, positions, cos, sin, tokens, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            HALF=dim // 2, BLOCK_T=block_t, BLOCK_H=_block_h(dim // 2), INVERSE=inverse, num_warps=_NUM_WARPS)
    return out


def compile_variants():
    """The rotary kernel at ModernBERT's head dim 64 (and 32, 128), both directions: for
    ``benchmarks/compile_report.py`` and ``tests/kernels/test_gpu_compile.py``."""
    from ._gpu_compile import Variant, runtime_args

    def types(dtype):
        return {a: ("*" + dtype if a in ("X", "OUT") else "*i32" if a == "POS" else "*fp32" if a in ("COS", "SIN")
                    else "i32") for a in runtime_args(_rotary_kernel)}

    variants = []
    for dtype in ("bf16", "fp16", "fp32"):
        for head_dim in (32, 64, 128):
            for inverse in (False, True):
                variants.append(Variant(
                    "rotary " + ("bwd" if inverse else "fwd"), _rotary_kernel, types(dtype),
                    dict(HALF=head_dim // 2, BLOCK_T=_block_t(head_dim // 2), BLOCK_H=_block_h(head_dim // 2),
                         INVERSE=inverse),
                    _NUM_WARPS, tags=dict(dtype=dtype, head_dim=head_dim, rotary=True)))
    return variants


@torch.library.custom_op("electra_kernels::rotary_fwd", mutates_args=())
def _rotary_fwd_op(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    return rotary_forward(x, positions, cos, sin, inverse)


@_rotary_fwd_op.register_fake
def _(x, positions, cos, sin, inverse):
    return x.new_empty(x.shape)


@torch.library.custom_op("electra_kernels::rotary_bwd", mutates_args=())
def _rotary_bwd_op(dy: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    # The inverse rotation: the rotation is orthogonal, its transpose undoes it.
    return rotary_forward(dy, positions, cos, sin, not inverse)


@_rotary_bwd_op.register_fake
def _(dy, positions, cos, sin, inverse):
    return dy.new_empty(dy.shape)


def _setup_context(ctx, inputs, output):
    _, positions, cos, sin, inverse = inputs
    ctx.save_for_backward(positions, cos, sin)
    ctx.inverse = inverse


def _backward(ctx, dy):
    positions, cos, sin = ctx.saved_tensors
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    return torch.ops.electra_kernels.rotary_bwd(dy, positions, cos, sin, ctx.inverse), None, None, None, None


_rotary_fwd_op.register_autograd(_backward, setup_context=_setup_context)


_TABLES: dict = {}


def _cos_sin_table(n_positions: int, head_dim: int, base: float, device) -> tuple[Tensor, Tensor]:
    """(n_positions, head_dim/2) fp32 cos and sin, cached per (device, size, head dim, base): a model calls
    this once per layer per step with the same arguments."""
    from .attention import rotary_cos_sin

    key = (str(device), head_dim, float(base))
    cached = _TABLES.get(key)
    if cached is None or cached[0].shape[0] < n_positions:
        size = max(n_positions, 1)
        # Normal tensors even when first built under torch.inference_mode(): a later training step saves
        # them for its backward, which inference tensors refuse.
        with torch.inference_mode(False), torch.no_grad():
            cos, sin = rotary_cos_sin(torch.arange(size, device=device), head_dim, base)
            cached = (cos[:, : head_dim // 2].contiguous(), sin[:, : head_dim // 2].contiguous())
        _TABLES[key] = cached
    return cached


def rotate(x: Tensor, positions: Tensor, n_positions: int, base: float) -> Tensor:
    """x (tokens, heads, head_dim) rotated at ``positions`` (tokens,) int32 (each < n_positions), with
    autograd (the gradient is un-rotated). Triton only: callers check ``use_triton`` first."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = _cos_sin_table(n_positions, x.shape[-1], base, x.device)
    return torch.ops.electra_kernels.rotary_fwd(x, positions, cos, sin, False)


def padded_positions(batch: int, seqlen: int, device) -> Tensor:
    """Position of every token of a (batch, seqlen) padded layout, flattened: 0..seqlen-1 per row."""
    return torch.arange(seqlen, device=device, dtype=torch.int32).repeat(batch)


def varlen_positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """Position of every packed token inside its document (restarting at each cu_seqlens boundary)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=total)
    return (torch.arange(total, device=cu_seqlens.device) - starts).to(torch.int32)


def apply_rotary_cos_sin(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (batch, seq, heads, head_dim) rotated with cos/sin tables as transformers' rotary modules return
    them: (batch or 1, seq, head_dim), both halves equal (``cat(freqs, freqs)``), any rope type and
    position_ids. With autograd. Triton where the other kernels run, PyTorch (fp32 arithmetic, like
    transformers' ``apply_rotary_pos_emb``) elsewhere."""
    from ._dispatch import use_triton

    batch, seq, heads, dim = x.shape
    if cos.dim() != 3 or cos.shape[-2:] != (seq, dim) or cos.shape[0] not in (1, batch) or sin.shape != cos.shape:
        raise ValueError(f"rotary: cos/sin must be (batch or 1, seq, head_dim) = (., {seq}, {dim}), "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if not (HAS_TRITON and use_triton(x) and x.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        c, s = cos[:, :, None, :].float(), sin[:, :, None, :].float()
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)
    half = dim // 2
    cos_table = cos[..., :half].reshape(-1, half).float().contiguous()
    sin_table = sin[..., :half].reshape(-1, half).float().contiguous()
    if cos.shape[0] == 1:
        positions = padded_positions(batch, seq, x.device)
    else:  # one row of the table per token
        positions = torch.arange(batch * seq, device=x.device, dtype=torch.int32)
    rows = x.reshape(batch * seq, heads, dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return torch.ops.electra_kernels.rotary_fwd(rows, positions, cos_table, sin_table, False).view(x.shape)
