"""Move between the padded (batch, seq, ...) layout and the packed (total_tokens, ...) layout.

Integer-index gather/scatter as autograd functions (the flash-attn ``bert_padding`` approach): an encoder
unpads once after the embeddings and pads once at the end, so every layer in between does no work on
padding tokens.
"""

from __future__ import annotations

import torch


class _IndexFirstAxis(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices):
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = values.shape[0]
        return values.index_select(0, indices)

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        grad = grad_output.new_zeros((ctx.first_axis_dim, *grad_output.shape[1:]))
        grad.index_copy_(0, indices, grad_output)
        return grad, None


class _IndexPutFirstAxis(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, first_axis_dim: int):
        ctx.save_for_backward(indices)
        out = values.new_zeros((first_axis_dim, *values.shape[1:]))
        out.index_copy_(0, indices, values)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        return grad_output.index_select(0, indices), None, None


def index_first_axis(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """values[indices] along dim 0 with a gradient that scatters back (no dense mask multiply)."""
    return _IndexFirstAxis.apply(values, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """Zeros of length first_axis_dim with values placed at indices along dim 0."""
    return _IndexPutFirstAxis.apply(values, indices, first_axis_dim)


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Pack the real tokens of a padded batch.

    hidden: (batch, seq, ...); attention_mask: (batch, seq) bool/int, nonzero = real token.
    Returns (packed (total_tokens, ...), indices (total_tokens,) int64 into batch*seq,
    cu_seqlens (batch + 1,) int32, max_seqlen python int).
    """
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"unpad_input: attention_mask {tuple(attention_mask.shape)} must be (batch, seq) = "
                         f"{tuple(hidden.shape[:2])}")
    # One host sync (nonzero, max) per encoder pass; every layer after it works on real tokens only.
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden.reshape(-1, *hidden.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: (total_tokens, ...) -> (batch, seq, ...) with zeros at padding."""
    if packed.shape[0] != indices.shape[0]:
        raise ValueError(f"pad_input: {packed.shape[0]} packed rows but {indices.shape[0]} indices")
    out = index_put_first_axis(packed, indices, batch * seqlen)
    return out.view(batch, seqlen, *packed.shape[1:])
