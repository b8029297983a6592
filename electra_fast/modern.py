"""The ModernBERT encoder block (``model.architecture: modern``), exactly as transformers' ``ModernBertModel``.

    cfg = load_config(size="modern-small")            # model.architecture = "modern"
    model = ElectraPretrainingModel(cfg)               # generator and discriminator built from this file

The sibling of ELECTRA's block in :mod:`electra_fast.model`: the same interface to the objective, the heads,
the token layout and the trainer (:func:`electra_fast.model.backbone_for` picks one of the two from the
config, once). What differs from ELECTRA's post-LN BERT layer (Warner et al. 2024, arXiv 2412.13663):

* embeddings: the word table -> LayerNorm (no bias) -> dropout; no position or segment tables (rotary
  positions are applied to q and k inside attention);
* pre-norm layers, layer 0's attention norm the identity; no bias in any Linear or LayerNorm;
* attention: one ``Wqkv`` projection, rotary embeddings in the half-split layout (positions = index in the
  sequence), output ``Wo``; every ``global_attn_every_n_layers``-th layer (the first included) attends
  globally with rotary base ``global_rope_theta``, the others to keys ``|i - j| <= local_attention / 2``
  with base ``local_rope_theta``;
* MLP: ``Wi`` (hidden -> 2 x intermediate) split into input and gate, ``gelu(input) * gate`` (exact GELU,
  GeGLU), ``Wo``; a final LayerNorm after the last layer;
* heads: the generator's is ModernBERT's prediction head (dense -> GELU -> LayerNorm, no biases) with the
  decoder tied to the word table plus a bias; the discriminator's the same head and one logit per token
  (``ModernBertForTokenClassification`` with one label, see :mod:`electra_fast.hf_modern`).

Parameter names are ``ModernBertModel``'s without its embeddings (``layers.{i}.attn.Wqkv.weight``, ...,
``final_norm.weight``), so export and import are renames.

Dropout: ``model.dropout`` is ModernBERT's ``embedding_dropout`` and ``mlp_dropout``,
``model.attention_dropout`` its ``attention_dropout`` (attention probabilities and the ``Wo`` output).

Every ``layout`` argument is an :class:`electra_fast.model.TokenLayout` (not imported: model.py imports
this module when it builds a modern model).

Implementations, chosen by the token layout as for ELECTRA: with the attention kernel, attention (rotary
and window included) is ``electra_kernels.attention`` / ``attention_varlen`` with ``window`` and
``rotary_base``; otherwise PyTorch's SDPA after rotating q and k here. With the elementwise kernels the
bias-free LayerNorms and the GeGLU run ``electra_kernels.layer_norm`` / ``geglu``. The last layer's
subset (``model.last_layer_subset``) always rotates its queries here and runs SDPA: its P queries per
sequence sit at arbitrary positions, which the kernels' in-call rotary (positions = row index) cannot
express.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import electra_kernels as ek

from .config import ModelConfig


def layer_types(num_layers: int, every_n: int) -> list[str]:
    """ModernBERT's ``layer_types``: "full_attention" every ``every_n``-th layer (layer 0 included),
    "sliding_attention" elsewhere."""
    return ["sliding_attention" if i % every_n else "full_attention" for i in range(num_layers)]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., S, heads, d) rotated in the half-split layout (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin),
    in fp32 and back, as transformers' apply_rotary_pos_emb; cos / sin (..., S, d)."""
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return (xf * cos + rotated * sin).to(x.dtype)


def _norm(norm: nn.LayerNorm, x: torch.Tensor, layout) -> torch.Tensor:
    if layout.elementwise_kernel:
        return ek.layer_norm(x, norm.weight, None, norm.eps)
    return norm(x)


def _bias_free_norm(width: int, cfg: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=cfg.layer_norm_eps, bias=False)


class ModernEmbeddings(nn.Module):
    """Word table -> LayerNorm (no bias) -> dropout. ``forward`` takes ELECTRA's embedding arguments and
    ignores the segment and position ids (ModernBERT has neither table)."""

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, width, padding_idx=cfg.pad_token_id)
        self.norm = _bias_free_norm(width, cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids, token_type_ids=None, position_ids=None, word_table: torch.Tensor | None = None):
        if word_table is None:
            words = self.word_embeddings(input_ids)
        else:
            words = F.embedding(input_ids, word_table, padding_idx=self.word_embeddings.padding_idx)
        return self.dropout(self.norm(words))


class _Wqkv(nn.Linear):
    """The fused bias-free (hidden -> 3·hidden) projection; ``part`` computes the query rows ("q") or the
    key/value rows ("kv") only, slicing inside the module's forward (ZeRO-3 gathers on the call)."""

    def forward(self, x: torch.Tensor, part: str | None = None) -> torch.Tensor:
        if part is None:
            return F.linear(x, self.weight)
        rows = slice(0, self.in_features) if part == "q" else slice(self.in_features, None)
        return F.linear(x, self.weight[rows])


class ModernAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, cfg: ModelConfig, kind: str):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden, heads, hidden // heads
        self.Wqkv = _Wqkv(hidden, 3 * hidden, bias=False)
        self.Wo = nn.Linear(hidden, hidden, bias=False)
        self.attention_dropout = cfg.attention_dropout
        self.out_drop = nn.Dropout(cfg.attention_dropout)
        self.kind = kind
        # keys |i - j| <= window around query i; None = global
        self.window = cfg.local_attention // 2 if kind == "sliding_attention" else None
        self.rotary_base = cfg.local_rope_theta if kind == "sliding_attention" else cfg.global_rope_theta

    def _dropout_p(self) -> float:
        return self.attention_dropout if self.training else 0.0

    def _heads(self, t: torch.Tensor, *lead: int) -> torch.Tensor:
        return t.reshape(*lead, self.num_heads, self.head_dim)

    def forward(self, rows: torch.Tensor, layout, rotary) -> torch.Tensor:
        q, k, v = self.Wqkv(rows).split(self.hidden_size, dim=-1)
        if layout.attention_kernel:
            kw = dict(dropout_p=self._dropout_p(), window=self.window, rotary_base=self.rotary_base)
            if layout.packed:
                q, k, v = (self._heads(t, -1) for t in (q, k, v))
                out = ek.attention_varlen(q, k, v, layout.cu_seqlens, layout.max_seqlen, **kw)
            else:
                q, k, v = (self._heads(t, layout.batch, layout.seq_len) for t in (q, k, v))
                out = ek.attention(q, k, v, key_padding_mask=layout.attention_mask, **kw)
            return self.out_drop(self.Wo(out.reshape(rows.shape)))
        # Reference path: the padded (B, S) block (a packed layout is padded for it and packed back).
        q, k, v = (self._heads(layout.unflatten(t) if layout.packed else t, layout.batch, layout.seq_len)
                   for t in (q, k, v))
        cos, sin = rotary.full(self.rotary_base, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self._sdpa(q, k, v, rotary.mask(self.window)).reshape(layout.batch * layout.seq_len, self.hidden_size)
        return self.out_drop(self.Wo(layout.flatten(out.view(layout.batch, layout.seq_len, -1))
                                     if layout.packed else out))

    def forward_subset(self, rows, query_rows, layout, rotary, queries_per_seq: int):
        """Attention output at ``query_rows`` ((B·P, hidden), P per sequence at positions
        ``rotary.query_positions``) with keys and values at every real token. Returns (B·P, hidden)."""
        q = self._heads(self.Wqkv(query_rows, part="q"), layout.batch, queries_per_seq)
        kv = self.Wqkv(rows, part="kv")
        kv = layout.unflatten(kv) if layout.packed else kv
        k, v = (self._heads(t, layout.batch, layout.seq_len) for t in kv.split(self.hidden_size, dim=-1))
        cos, sin = rotary.full(self.rotary_base, q.dtype)
        k = apply_rotary(k, cos, sin)
        q = apply_rotary(q, *rotary.at_queries(self.rotary_base, q.dtype))
        out = self._sdpa(q, k, v, rotary.query_mask(self.window))
        return self.out_drop(self.Wo(out.reshape(query_rows.shape)))

    def _sdpa(self, q, k, v, mask) -> torch.Tensor:
        """q (B, Sq, h, d) against k, v (B, S, h, d) with a (B, 1, Sq, S) bool mask -> (B, Sq, h, d)."""
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask, dropout_p=self._dropout_p()).transpose(1, 2)


class RotaryTables:
    """Per forward of one encoder: the rotary cos/sin of each base and the attention masks of each window,
    built once and shared by the layers (the reference path and the last layer's subset)."""

    def __init__(self, layout, head_dim: int, query_positions: torch.Tensor | None = None):
        self.layout, self.head_dim, self.query_positions = layout, head_dim, query_positions
        self.positions = torch.arange(layout.seq_len, device=layout.attention_mask.device)
        self._cache: dict = {}

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def full(self, base: float, dtype: torch.dtype):
        return self._cached(("full", base, dtype),
                            lambda: ek.rotary_cos_sin(self.positions, self.head_dim, base, dtype))

    def at_queries(self, base: float, dtype: torch.dtype):
        return self._cached(("queries", base, dtype),
                            lambda: ek.rotary_cos_sin(self.query_positions, self.head_dim, base, dtype))

    def _mask(self, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """(B, 1, Sq, S): real keys within the window. A query also always sees its own position, so a padded
        query with no real key in reach still has one key: a fully masked row is NaN on some SDPA backends,
        and NaN padding rows would reach real ones through 0·NaN in later layers. Real rows are unaffected
        (their own key is real)."""
        keys = self.positions
        real = self.layout.attention_mask[:, None, None, :]  # (B, 1, 1, S)
        own = query_pos[..., :, None] == keys  # (B or 1, Sq, S)
        allowed = real | own.unsqueeze(-3)
        if window is not None:
            allowed = allowed & ((query_pos[..., :, None] - keys).abs() <= window).unsqueeze(-3)
        return allowed

    def mask(self, window: int | None) -> torch.Tensor:
        return self._cached(("mask", window), lambda: self._mask(self.positions[None], window))

    def query_mask(self, window: int | None) -> torch.Tensor:
        return self._cached(("query_mask", window), lambda: self._mask(self.query_positions, window))


class ModernMLP(nn.Module):
    """GeGLU: ``Wo(dropout(gelu(input) * gate))`` with ``input, gate = Wi(x).chunk(2)``."""

    def __init__(self, hidden: int, intermediate: int, cfg: ModelConfig):
        super().__init__()
        self.Wi = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.Wo = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        projected = self.Wi(x)
        if layout.elementwise_kernel:
            gated = ek.geglu(projected)
        else:
            inp, gate = projected.chunk(2, dim=-1)
            gated = F.gelu(inp) * gate
        return self.Wo(self.drop(gated))


class ModernLayer(nn.Module):
    """Pre-norm: h = x + Attn(norm(x)); out = h + MLP(norm(h)); layer 0's attention norm is the identity."""

    def __init__(self, index: int, hidden: int, heads: int, intermediate: int, cfg: ModelConfig, kind: str):
        super().__init__()
        self.attn_norm = nn.Identity() if index == 0 else _bias_free_norm(hidden, cfg)
        self.attn = ModernAttention(hidden, heads, cfg, kind)
        self.mlp_norm = _bias_free_norm(hidden, cfg)
        self.mlp = ModernMLP(hidden, intermediate, cfg)

    def _attn_input(self, rows, layout):
        return rows if isinstance(self.attn_norm, nn.Identity) else _norm(self.attn_norm, rows, layout)

    def forward(self, rows, layout, rotary):
        hidden = rows + self.attn(self._attn_input(rows, layout), layout, rotary)
        return hidden + self.mlp(_norm(self.mlp_norm, hidden, layout), layout)

    def forward_subset(self, rows, query_index, layout, rotary, queries_per_seq):
        """The layer's output at rows ``query_index`` only; keys and values still at every row."""
        normed = self._attn_input(rows, layout)
        query_rows = ek.index_first_axis(normed, query_index)
        hidden = ek.index_first_axis(rows, query_index) + self.attn.forward_subset(
            normed, query_rows, layout, rotary, queries_per_seq)
        return hidden + self.mlp(_norm(self.mlp_norm, hidden, layout), layout)


class ModernBody(nn.Module):
    """``ModernBertModel`` without its embeddings: the layers and the final norm, on (T, hidden) rows."""

    def __init__(self, hidden: int, heads: int, intermediate: int, layers: int, cfg: ModelConfig):
        super().__init__()
        self.hidden_size, self.num_heads, self.intermediate_size, self.num_layers = hidden, heads, intermediate, layers
        self.layer_types = layer_types(layers, cfg.global_attn_every_n_layers)
        self.layers = nn.ModuleList(ModernLayer(i, hidden, heads, intermediate, cfg, kind)
                                    for i, kind in enumerate(self.layer_types))
        self.final_norm = _bias_free_norm(hidden, cfg)
        self.gradient_checkpointing = cfg.activation_checkpointing

    def forward(self, rows, layout, query_index=None, queries_per_seq: int = 0):
        """``query_index`` (B·P,) row indices: the last layer computes those rows only (in that order)."""
        query_positions = None
        if query_index is not None:
            positions = torch.arange(layout.seq_len, device=rows.device).expand(layout.batch, -1)
            query_positions = layout.flatten(positions)[query_index].view(layout.batch, queries_per_seq)
        rotary = RotaryTables(layout, self.hidden_size // self.num_heads, query_positions)
        for i, layer in enumerate(self.layers):
            call, args = layer, (rows, layout, rotary)
            if query_index is not None and i == len(self.layers) - 1:
                call, args = layer.forward_subset, (rows, query_index, layout, rotary, queries_per_seq)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                rows = checkpoint(call, *args, use_reentrant=False)
            else:
                rows = call(*args)
        return _norm(self.final_norm, rows, layout)


class ModernPredictionHead(nn.Module):
    """ModernBERT's head: dense (no bias) -> exact GELU -> LayerNorm (no bias). The generator's MLM head
    (then the tied decoder) and the discriminator's features."""

    def __init__(self, hidden: int, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden, bias=False)
        self.norm = _bias_free_norm(hidden, cfg)

    def forward(self, hidden_states):
        return self.norm(F.gelu(self.dense(hidden_states)))


class ModernDiscriminatorPredictions(nn.Module):
    """ModernBERT's head, then one logit per token (``dense_prediction``, with a bias): what
    ``ModernBertForTokenClassification`` with one label computes (head -> dropout -> classifier)."""

    def __init__(self, hidden: int, cfg: ModelConfig):
        super().__init__()
        self.head = ModernPredictionHead(hidden, cfg)
        self.dense_prediction = nn.Linear(hidden, 1)

    def features(self, hidden_states):
        return self.head(hidden_states)

    def forward(self, hidden_states):
        return self.dense_prediction(self.features(hidden_states)).squeeze(-1)


def init_modern_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """As transformers' ModernBertPreTrainedModel: truncated normals (cut at 2 std); std
    ``initializer_range`` for the word table, Wqkv and Wi; ``initializer_range / sqrt(2 · layers)`` (the
    network's own depth) for each Wo and the heads' dense; ``hidden^-0.5`` for the replaced-token logit;
    LayerNorms one, biases zero, the padding row zero."""
    std = cfg.initializer_range

    def trunc(weight: torch.Tensor, s: float) -> None:
        nn.init.trunc_normal_(weight, mean=0.0, std=s, a=-2 * s, b=2 * s)

    for module in model.modules():
        if isinstance(module, ModernBody):
            out_std = std / math.sqrt(2.0 * module.num_layers)
            for layer in module.layers:
                trunc(layer.attn.Wqkv.weight, std)
                trunc(layer.attn.Wo.weight, out_std)
                trunc(layer.mlp.Wi.weight, std)
                trunc(layer.mlp.Wo.weight, out_std)
        elif isinstance(module, ModernEmbeddings):
            trunc(module.word_embeddings.weight, std)
            with torch.no_grad():
                module.word_embeddings.weight[module.word_embeddings.padding_idx].zero_()
        elif isinstance(module, ModernPredictionHead):
            trunc(module.dense.weight, std / math.sqrt(2.0 * cfg.num_layers))
        elif isinstance(module, ModernDiscriminatorPredictions):
            trunc(module.dense_prediction.weight, module.dense_prediction.in_features ** -0.5)
            nn.init.zeros_(module.dense_prediction.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
