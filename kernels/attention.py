"""Bidirectional (non-causal) attention for encoders, padded and variable-length layouts.

Reading order: Triton kernels -> launchers -> autograd Function -> public functions -> references.
(The Triton kernels are added by the fused-attention issue; until then the public functions run the
reference on every device.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import use_triton  # noqa: F401  (used once the Triton path lands)


def attention(q, k, v, key_padding_mask=None, dropout_p: float = 0.0, softmax_scale=None):
    """softmax(Q·Kᵀ·scale + key padding) · V per head, no causal mask.

    q, k, v: (batch, seq, heads, head_dim), fp32/bf16/fp16. key_padding_mask: (batch, seq) bool,
    True = real token (the Hugging Face ``attention_mask`` meaning) or None. Returns (batch, seq,
    heads, head_dim) in q's dtype. Rows of padded queries are computed like any other row (their
    values are never used by a correct model).
    """
    return attention_ref(q, k, v, key_padding_mask, dropout_p, softmax_scale)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float = 0.0, softmax_scale=None):
    """Attention over packed sequences with no padding.

    q, k, v: (total_tokens, heads, head_dim); cu_seqlens: (batch + 1,) int32 prefix sums of the
    sequence lengths; max_seqlen: the longest length (python int). Returns (total_tokens, heads, head_dim).
    """
    return attention_varlen_ref(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)


def attention_ref(q, k, v, key_padding_mask=None, dropout_p: float = 0.0, softmax_scale=None,
                  return_lse: bool = False, dropout_mask=None):
    """Plain PyTorch attention in fp32 (or q's dtype when that is wider).

    dropout_mask: optional (batch, heads, seq, seq) bool, True = keep, used instead of sampling one
    (lets tests replay a kernel's own mask). return_lse adds the (batch, heads, seq) log-sum-exp of
    the scaled scores.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.to(compute_dtype).transpose(1, 2) for t in (q, k, v))  # (b, h, s, d)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :].bool(), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # fully padded rows -> zeros
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out


def attention_varlen_ref(q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float = 0.0, softmax_scale=None):
    """Reference for :func:`attention_varlen`: each sequence attended on its own."""
    bounds = cu_seqlens.tolist()
    outs = [
        attention_ref(q[s:e][None], k[s:e][None], v[s:e][None], None, dropout_p, softmax_scale)[0]
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)
