"""``patch_hf`` for transformers' ModernBERT (ModernBertModel, ...ForMaskedLM, ...ForSequenceClassification,
...ForTokenClassification and the other heads): attention, GeGLU MLP and norms on electra_kernels.

* ``ModernBertAttention`` becomes :class:`FusedModernBertAttention` (same children ``Wqkv``, ``Wo``,
  ``out_drop``): q and k are rotated with the cos/sin the model computed (so any rope type is honoured)
  inside the attention kernels' tile loads (electra_kernels/attention_rotary.py, on Hopper+ and in the
  interpreter; with per-row ``position_ids`` or on older GPUs, by the separate rotary kernel first),
  and the attention kernels run with the
  layer's sliding window (``window = config.sliding_window = local_attention // 2`` on
  ``sliding_attention`` layers, global elsewhere) and the key-padding mask; trailing padding keys cost
  no work. The model's ``_attn_implementation`` is set to ``"electra_kernels"`` so that its mask
  builders hand over the plain (batch, seq) padding mask instead of expanded 4-D masks.
* ``ModernBertMLP`` with exact GELU becomes :class:`FusedModernBertMLP`: ``Wo(drop(geglu(Wi(h))))``.
* Every ``nn.LayerNorm`` (bias-free with ``norm_bias=False``) becomes :class:`FusedLayerNorm` (done by
  :func:`electra_kernels.patch_hf` for all model types).
* ``ModernBertModel.forward`` runs the encoder on the real tokens only (hf_modernbert_unpadded.py): the
  attention module then gets one packed row, ``cu_seqlens`` / ``max_seqlen`` and, where in-row offsets are
  the positions, the rotary table for the fused kernels (:meth:`FusedModernBertAttention._packed`).

Refused, with a ValueError before anything changes: ``output_attentions=True``, head dims above 128 or
odd ones (rotary), a hidden activation other than exact GELU (unless ``geglu=False``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import attention, attention_varlen
from .geglu import geglu
from .rotary import apply_rotary_cos_sin


class FusedModernBertAttention(nn.Module):
    """``ModernBertAttention`` on the rotary and attention kernels; keeps ``Wqkv``, ``Wo``, ``out_drop``."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.config = original.config
        self.layer_idx = original.layer_idx
        self.Wqkv = original.Wqkv
        self.Wo = original.Wo
        self.out_drop = original.out_drop
        self.head_dim = original.head_dim
        self.attention_dropout = original.attention_dropout
        # transformers stores sliding_window + 1 (flash-attn's inclusive convention); the window proper
        # is |i - j| <= config.sliding_window, as its bidirectional sliding mask.
        self.sliding_window = original.sliding_window
        self.window = None if original.sliding_window is None else int(original.sliding_window) - 1
        self.is_causal = False
        self.replaces = type(original).__name__

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        if kwargs.get("output_attentions"):
            raise ValueError("electra_kernels attention never materialises attention probabilities: "
                             "output_attentions=True is not supported on a patched model")
        batch, seq = hidden_states.shape[:2]
        if kwargs.get("cu_seqlens") is not None:  # the unpadded model (hf_modernbert_unpadded): one packed row
            out = self._packed(hidden_states[0], position_embeddings, kwargs["cu_seqlens"], kwargs["max_seqlen"],
                               kwargs.get("rotary_table"))
        else:
            out = self._padded(hidden_states, position_embeddings, attention_mask)
        return self.out_drop(self.Wo(out.reshape(batch, seq, -1))), None

    def _scale_and_dropout(self) -> tuple[float, float]:
        return self.head_dim ** -0.5, float(self.attention_dropout if self.training else 0.0)

    def _padded(self, hidden_states, position_embeddings, attention_mask):
        """(batch, seq, heads, head_dim) attention output of padded rows, the key-padding mask applied.
        position_embeddings: transformers' (cos, sin), (batch or 1, seq, head_dim)."""
        from .hf_patch import _key_padding_from_mask

        batch, seq = hidden_states.shape[:2]
        q, k, v = self.Wqkv(hidden_states).view(batch, seq, 3, -1, self.head_dim).unbind(dim=2)
        key_padding_mask = _key_padding_from_mask(attention_mask, batch, seq)
        scale, dropout_p = self._scale_and_dropout()
        if position_embeddings is None:
            return attention(q, k, v, key_padding_mask, dropout_p=dropout_p, softmax_scale=scale, window=self.window)
        cos, sin = position_embeddings
        # One position row for the whole batch (the default position_ids): row r of the table is column r.
        shared_row = (cos.dim() == 3 and cos.shape[0] == 1 and tuple(cos.shape[1:]) == (seq, self.head_dim)
                      and sin.shape == cos.shape)
        if shared_row and _fused_rotary_applies(q, k, v):
            return _fused_rotary_attention(q, k, v, rotary_table(cos, sin, seq), key_padding_mask, None, seq,
                                           dropout_p, scale, self.window)
        # Per-row positions, or no fused kernels here: the rotary kernel, then attention.
        q, k = apply_rotary_cos_sin(q, cos, sin), apply_rotary_cos_sin(k, cos, sin)
        return attention(q, k, v, key_padding_mask, dropout_p=dropout_p, softmax_scale=scale, window=self.window)

    def _packed(self, hidden_states, position_embeddings, cu_seqlens, max_seqlen: int, table):
        """(total_tokens, heads, head_dim) attention output of packed rows (cu_seqlens delimits them).
        position_embeddings: each token's (cos, sin), (1, total_tokens, head_dim); table: the
        :func:`rotary_table` indexed by in-row offset, or None when offsets are not the positions."""
        total = hidden_states.shape[0]
        q, k, v = self.Wqkv(hidden_states).view(total, 3, -1, self.head_dim).unbind(dim=1)
        scale, dropout_p = self._scale_and_dropout()
        if table is not None and _fused_rotary_applies(q, k, v):
            return _fused_rotary_attention(q, k, v, table, None, cu_seqlens, max_seqlen, dropout_p, scale,
                                           self.window)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = (apply_rotary_cos_sin(t[None], cos, sin)[0] for t in (q, k))
        return attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, window=self.window)

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}, window={self.window}"


def rotary_table(cos, sin, rows: int):
    """transformers' cos/sin (1, >= rows, head_dim), both halves equal, as the fused kernels' table: the
    first ``rows`` positions' first halves, (rows, head_dim / 2) fp32 each."""
    half = cos.shape[-1] // 2
    return tuple(t[0, :rows, :half].float().contiguous() for t in (cos, sin))


def _fused_rotary_applies(q, k, v) -> bool:
    """Whether q and k can be rotated inside the attention kernels here: Triton runs these tensors and the
    fused rotary kernels serve this device and dtype (attention._rotary_mode; not the PyTorch reference
    path, nor GPUs where the separate rotary kernel is used)."""
    from ._dispatch import use_triton
    from .attention import _rotary_mode

    return (q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.dtype == k.dtype == v.dtype
            and use_triton(q, k, v) and _rotary_mode(q.device, q.dtype) == "fused")


def _fused_rotary_attention(q, k, v, table, key_padding_mask, cu_seqlens, max_seqlen: int, dropout_p: float,
                            scale: float, window):
    """Attention with q, k rotated inside the attention kernels, row r of ``table`` (:func:`rotary_table`)
    at in-row offset r; padded (key_padding_mask) or packed (cu_seqlens). Only where
    :func:`_fused_rotary_applies`."""
    from .attention import _draw_seed
    from .attention_rotary import attention_rotary

    rng_seed = _draw_seed() if dropout_p > 0.0 else None
    out, _ = attention_rotary(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, float(dropout_p), float(scale),
                              rng_seed, window, None, table=table)
    return out


class FusedModernBertMLP(nn.Module):
    """``ModernBertMLP`` with the GeGLU kernel between ``Wi`` and ``Wo``; keeps ``Wi``, ``act``, ``drop``, ``Wo``."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.Wi, self.act, self.drop, self.Wo = original.Wi, original.act, original.drop, original.Wo
        self.replaces = type(original).__name__

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.Wo(self.drop(geglu(self.Wi(hidden_states))))

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}"


def check_modernbert_config(config, geglu_enabled: bool, max_head_dim: int) -> None:
    """ValueError for what the kernels cannot run."""
    if getattr(config, "output_attentions", False):
        raise ValueError("patch_hf: output_attentions=True needs the attention probabilities, which the fused "
                         "kernel never materialises; set config.output_attentions=False")
    hidden, heads = config.hidden_size, config.num_attention_heads
    if hidden % heads:
        raise ValueError(f"patch_hf: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_dim = hidden // heads
    if head_dim > max_head_dim or head_dim % 2:
        raise ValueError(f"patch_hf: head dim {head_dim} is not supported (even, at most {max_head_dim}: the "
                         "rotary and attention kernels' limits)")
    if geglu_enabled and getattr(config, "hidden_activation", "gelu") != "gelu":
        raise ValueError(f"patch_hf: hidden_activation={config.hidden_activation!r}; the GeGLU kernel computes the "
                         "exact (erf) GELU only ('gelu'); pass geglu=False to keep transformers' MLP")


def modernbert_swaps(model: nn.Module, attention_enabled: bool, geglu_enabled: bool):
    """(path, old, new, description) for every ModernBERT attention / MLP module to replace."""
    swaps = []
    for path, module in model.named_modules():
        name = type(module).__name__
        if attention_enabled and name == "ModernBertAttention":
            new = FusedModernBertAttention(module)
            kind = f"sliding window {new.window}" if new.window is not None else "global"
            swaps.append((path, module, new, f"FusedModernBertAttention (rotary + {kind} attention kernels)"))
        elif geglu_enabled and name == "ModernBertMLP":
            swaps.append((path, module, FusedModernBertMLP(module), "FusedModernBertMLP (GeGLU kernel)"))
    return swaps
