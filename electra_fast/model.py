"""ELECTRA generator + discriminator with shared embeddings (Clark et al. 2020).

Parameter names and math follow Hugging Face's ``ElectraModel`` so weights move both ways
(see ``electra_fast.hf``), except that each attention block's query/key/value projections are one
fused ``attention.self.qkv`` Linear (split back into HF's three on export): ``embeddings.*`` is the
generator's embedding module (and, unless ``model.embedding_sharing`` says otherwise, the discriminator's);
``generator.*`` / ``discriminator.*`` are ``ElectraModel`` minus its embeddings;
``generator_predictions`` / ``discriminator_predictions`` are HF's heads, and the generator's output
projection is the generator's word-embedding matrix (E_gen) plus ``generator_lm_head_bias``.
:meth:`ElectraPretrainingModel.network_state_dict` gives either network under ``ElectraModel``'s names
with the embeddings it really reads (what exports and fine-tuning copy).

Embedding sharing (``model.embedding_sharing``):

* ``tied`` (the paper): one ``embeddings`` module (word, position and segment tables, LayerNorm) for
  both networks; both losses update it.
* ``gdes`` (DeBERTaV3, He et al. 2021, arXiv 2111.09543): the discriminator's word table is
  ``E_gen.detach() + discriminator_word_embeddings_delta``, the delta starting at zero, so the
  masked-LM loss alone updates E_gen and the replaced-token loss alone the delta. Only the word table
  is disentangled, as in DeBERTaV3 (its conflict is between the MLM output layer, which is E_gen, and
  the discriminator's use of the same rows); the position and segment tables and the embedding
  LayerNorm stay tied as in ELECTRA, updated by both losses. No host work: the sum is one elementwise
  add of the table per forward (not counted in the FLOPs, like the other elementwise work on weights).
* ``separate`` (the paper's ablation): the discriminator has its own ``discriminator_embeddings``
  module; nothing is shared, the MLM output layer stays tied to the generator's table.

Layout: the encoders run on a flat (tokens, hidden) block. With ``model.unpad`` and the Triton
attention, that block holds only the real tokens (unpadded once per step, variable-length attention);
otherwise it is the padded batch flattened, with a key-padding mask in attention.

The three hot spots are calls into ``electra_kernels``: attention, ``mlm_head_loss`` (gathered masked
rows only: no (batch, seq, vocab) logits) and ``replaced_token_bce``. Which code runs is decided once,
here (:func:`resolve_impl`): the model calls a kernel or its ``*_ref`` reference explicitly. With
``model.last_layer_subset`` the generator's last layer computes only the masked rows the head reads.

No host-device synchronisation: the padded layout has static shapes throughout; the packed one needs
the batch's ``max_seqlen`` and ``total_tokens``, which the caller passes from the host
(:func:`packed_sizes`). For CUDA graphs the packed rows are rounded up to one of a few token buckets
(``model.token_buckets``, :mod:`electra_fast.buckets`; inert rows that nothing reads fill the gap), which
is host arithmetic too. See :mod:`electra_fast.compile` for ``torch.compile`` / CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import electra_kernels as ek
from electra_kernels._dispatch import HAS_TRITON, interpreter_enabled

from .buckets import bucket_rows, inert_documents
from .config import Config, ModelConfig, ObjectiveConfig, max_predictions
from .objective import ObjectiveRNG, mask_tokens, pretraining_metrics, replace_tokens


def resolve_impl(choice: str, device: torch.device) -> str:
    """The one implementation switch: "triton" or "torch" for a hot spot on ``device``.

    "auto" -> "triton" on CUDA (when triton imports), "torch" elsewhere. The model then calls the
    kernel or the ``*_ref`` reference itself and never leaves the choice to the library's own dispatch,
    so "triton" where the kernels cannot run (a CPU without ``TRITON_INTERPRET=1``) is an error rather
    than a silent fall-back to the reference.
    """
    if choice == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if choice == "triton" and not (HAS_TRITON and (device.type == "cuda" or interpreter_enabled())):
        raise ValueError(f"the Triton kernels cannot run on {device.type} (they need a CUDA device, or "
                         "TRITON_INTERPRET=1 for Triton's CPU interpreter); choose impl 'auto' or 'torch'")
    return choice


def init_weights(model: nn.Module, std: float) -> None:
    """As HF ElectraPreTrainedModel (same module order): N(0, std) Linear/Embedding weights (padding
    row zero), zero biases, unit LayerNorm. The fused (3·hidden, hidden) QKV weight is drawn in one
    call, which for hidden sizes that are multiples of 16 gives the same numbers as HF's three."""

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    model.apply(init)


# --------------------------------------------------------------------------------------------
# Token layout shared by both encoders of a step (they see the same attention mask)
# --------------------------------------------------------------------------------------------
def packed_sizes(attention_mask: torch.Tensor) -> dict[str, int]:
    """``max_seqlen`` and ``total_tokens`` of a batch, for the loader to compute on the host (a CPU
    mask, before the copy to the device) and pass to the model's forward: with both given, the packed
    layout is built with no host-device synchronisation.

        out = model(ids.cuda(), mask.cuda(), types.cuda(), **packed_sizes(mask))
    """
    if attention_mask.device.type != "cpu":
        raise ValueError(f"packed_sizes reads a host (CPU) mask; got one on {attention_mask.device} (that "
                         "would synchronise with the device, which is what it exists to avoid)")
    lengths = attention_mask.bool().sum(dim=1)
    return {"max_seqlen": int(lengths.max()) if lengths.numel() else 0, "total_tokens": int(lengths.sum())}


@dataclass
class TokenLayout:
    """How a step's tokens are laid out for the encoders, and which hot spots run on Triton.

    Padded: every (batch, seq) position is a row; static shapes, no host synchronisation.
    Packed: only the real tokens are rows (``indices`` into batch*seq, ``cu_seqlens``, ``max_seqlen``);
    built with electra_kernels' ``unpad_input`` unless the caller gives the sizes from the host.
    Bucketed (packed, ``buckets`` > 0): the real tokens, then inert rows up to the bucket
    (:func:`electra_fast.buckets.bucket_rows`), so that a captured graph sees a few fixed shapes. The
    inert rows hold token 0 at position 0, segment 0 (``indices`` = batch*seq, one past the last
    position), form ``inert_documents`` extra sequences of at most ``seq_len`` rows that attend only
    among themselves (``max_seqlen`` is ``seq_len``, a constant), are not real in :meth:`real_rows` (so
    no loss or statistic reads them: the BCE and its metrics mask them, the masked-LM rows are real
    tokens) and are dropped by :meth:`unflatten`. Their gradient is exactly zero.
    """

    batch: int
    seq_len: int
    attention_mask: torch.Tensor  # (B, S) bool
    indices: torch.Tensor | None = None  # (T,) positions of real tokens in B*S when packed
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    attention_kernel: bool = False  # attention runs ek.attention[_varlen] (else PyTorch's SDPA)
    elementwise_kernel: bool = False  # LayerNorm(dropout+add) and bias+GELU run their kernels
    # Packed rows rounded up to a token bucket (electra_fast.buckets): rows past the real tokens are inert.
    bucketed: bool = False

    @property
    def packed(self) -> bool:
        return self.indices is not None

    @classmethod
    def build(cls, attention_mask: torch.Tensor, packed: bool, max_seqlen: int | None = None,
              total_tokens: int | None = None, buckets: int = 0, **kernels: bool) -> "TokenLayout":
        """``max_seqlen`` / ``total_tokens`` (packed only): the batch's longest sequence and number of real
        tokens, computed by the caller on the host; when both are given nothing here waits for the device
        (``unpad_input`` needs a ``nonzero`` and a ``.item()``, i.e. two synchronisations). ``buckets``
        (packed only): round the rows up to one of that many token buckets (0: exactly the real tokens)."""
        mask = attention_mask.bool()
        batch, seq_len = mask.shape
        if not packed:
            return cls(batch, seq_len, mask, **kernels)
        if buckets:
            if total_tokens is None:
                total_tokens = int(mask.sum())  # one synchronisation; the loader's host sizes avoid it
            return cls._bucketed(mask, int(total_tokens), buckets, **kernels)
        if max_seqlen is None or total_tokens is None:
            _, indices, cu_seqlens, found_max = ek.unpad_input(mask.unsqueeze(-1), mask)
            return cls(batch, seq_len, mask, indices, cu_seqlens,
                       found_max if max_seqlen is None else int(max_seqlen), **kernels)
        # The sizes come from the host: nonzero_static needs no device round trip to size its output.
        indices = torch.nonzero_static(mask.flatten(), size=int(total_tokens)).flatten()
        cu_seqlens = F.pad(torch.cumsum(mask.sum(dim=1, dtype=torch.int32), dim=0, dtype=torch.int32), (1, 0))
        return cls(batch, seq_len, mask, indices, cu_seqlens, int(max_seqlen), **kernels)

    @classmethod
    def _bucketed(cls, mask: torch.Tensor, total_tokens: int, buckets: int, **kernels: bool) -> "TokenLayout":
        """The packed layout rounded up to a token bucket (see the class docstring); host ints only."""
        batch, seq_len = mask.shape
        rows = bucket_rows(total_tokens, batch, seq_len, buckets)
        # Real tokens first, in order; the inert rows point one past the last position (a zero row, see flatten).
        indices = torch.nonzero_static(mask.flatten(), size=rows, fill_value=batch * seq_len).flatten()
        cu_real = F.pad(torch.cumsum(mask.sum(dim=1, dtype=torch.int32), dim=0, dtype=torch.int32), (1, 0))
        # The inert rows [T, rows) as sequences of seq_len rows (the last ones possibly empty): computed on
        # the device from cu_real[-1] = T, so the shape depends on the bucket alone.
        steps = torch.arange(1, inert_documents(batch, seq_len, buckets) + 1, dtype=torch.int32, device=mask.device)
        cu_inert = (cu_real[-1:] + steps * seq_len).clamp(max=rows)
        return cls(batch, seq_len, mask, indices, torch.cat([cu_real, cu_inert]), seq_len, bucketed=True, **kernels)

    def flatten(self, per_token: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...) rows in this layout (bucketed: zeros in the inert rows)."""
        flat = per_token.reshape(self.batch * self.seq_len, *per_token.shape[2:])
        if self.bucketed:
            flat = torch.cat([flat, flat.new_zeros((1, *flat.shape[1:]))])
        return ek.index_first_axis(flat, self.indices) if self.packed else flat

    def unflatten(self, rows: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, S, ...) with zeros at padding (bucketed: the inert rows are dropped)."""
        if self.bucketed:
            slots = self.batch * self.seq_len
            spread = ek.pad_input(rows, self.indices, 1, slots + 1)  # the inert rows land in the extra slot
            return spread[0, :slots].view(self.batch, self.seq_len, *rows.shape[1:])
        if self.packed:
            return ek.pad_input(rows, self.indices, self.batch, self.seq_len)
        return rows.view(self.batch, self.seq_len, *rows.shape[1:])

    def row_of(self, flat_positions: torch.Tensor) -> torch.Tensor:
        """Row index in this layout of positions b*S+s (which must be real tokens)."""
        if not self.packed:
            return flat_positions
        row = torch.cumsum(self.attention_mask.flatten().long(), dim=0) - 1
        return row[flat_positions]

    def real_rows(self) -> torch.Tensor:
        """(T,) bool: which rows are real tokens."""
        if self.bucketed:
            return self.indices < self.batch * self.seq_len
        if self.packed:
            return torch.ones(self.indices.shape[0], dtype=torch.bool, device=self.indices.device)
        return self.attention_mask.flatten()


class ElectraEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.embedding_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.embedding_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.embedding_size)
        self.LayerNorm = nn.LayerNorm(cfg.embedding_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids, token_type_ids, position_ids, word_table: torch.Tensor | None = None):
        """Any matching shapes: (B, S) padded or (T,) packed ids -> (..., embedding_size). ``word_table``:
        a (vocab, embedding_size) table to read instead of ``word_embeddings.weight`` (gdes sharing)."""
        if word_table is None:
            words = self.word_embeddings(input_ids)
        else:
            words = F.embedding(input_ids, word_table, padding_idx=self.word_embeddings.padding_idx)
        embeddings = words + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


# The names Hugging Face (and checkpoints written before the fused QKV) give the three projections.
QKV_NAMES = ("query", "key", "value")


def split_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every fused ``*.qkv.{weight,bias}`` split into the three projections, in the
    layout Hugging Face and earlier checkpoints use (views, no copies); other keys keep their order."""
    out = {}
    for name, tensor in state.items():
        stem, _, kind = name.rpartition(".")
        if stem.endswith(".qkv") or stem == "qkv":
            base = stem[: -len("qkv")]
            for part, chunk in zip(QKV_NAMES, tensor.chunk(3, dim=0)):
                out[f"{base}{part}.{kind}"] = chunk
        else:
            out[name] = tensor
    return out


def has_unfused_qkv(state_keys) -> bool:
    """True for a state dict written before the fused QKV (separate ``attention.self.query`` etc.).
    Its weights load (the attention module fuses them), but optimizer state saved with it is laid out
    per old parameter, so a resume must not restore that optimizer state positionally."""
    return any(key.endswith(f"attention.self.{QKV_NAMES[0]}.weight") for key in state_keys)


class _QKVLinear(nn.Linear):
    """The fused (hidden -> 3·hidden) projection; ``part`` computes only the query ("q") or only the
    key/value ("kv") rows of it. Slicing inside the module's own forward (rather than reading its
    weight from outside) keeps ZeRO-3's gather-on-call hooks in charge of the parameters."""

    def forward(self, x: torch.Tensor, part: str | None = None) -> torch.Tensor:
        if part is None:
            return F.linear(x, self.weight, self.bias)
        rows = slice(0, self.in_features) if part == "q" else slice(self.in_features, None)
        return F.linear(x, self.weight[rows], self.bias[rows])


class _LinearGELU(nn.Linear):
    """``GELU(Linear(x))``; with ``fused_bias_gelu`` the bias joins inside the bias+GELU kernel. The
    weight is read inside the module's own forward (see :class:`_QKVLinear`)."""

    def forward(self, x: torch.Tensor, fused_bias_gelu: bool = False) -> torch.Tensor:
        if fused_bias_gelu:
            return ek.bias_gelu(F.linear(x, self.weight), self.bias)
        return F.gelu(F.linear(x, self.weight, self.bias))


class ElectraSelfAttention(nn.Module):
    """Multi-head self-attention with one fused (hidden -> 3·hidden) QKV projection: one GEMM reads
    the rows once. ``qkv.weight`` is HF's query, key and value weights stacked in that order; state
    dicts with the three separate projections (HF folders, checkpoints of earlier runs) are fused
    when they load (:meth:`_load_from_state_dict`), whichever loader reads them."""

    def __init__(self, hidden: int, heads: int, attention_dropout: float):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden, heads, hidden // heads
        self.qkv = _QKVLinear(hidden, 3 * hidden)
        self.attention_dropout = attention_dropout

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for kind in ("weight", "bias"):
            parts = [prefix + f"{name}.{kind}" for name in QKV_NAMES]
            if all(p in state_dict for p in parts) and prefix + f"qkv.{kind}" not in state_dict:
                state_dict[prefix + f"qkv.{kind}"] = torch.cat([state_dict.pop(p) for p in parts], dim=0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _dropout_p(self) -> float:
        return self.attention_dropout if self.training else 0.0

    def _heads(self, t: torch.Tensor, *lead: int) -> torch.Tensor:
        return t.reshape(*lead, self.num_heads, self.head_dim)

    def forward(self, rows: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        q, k, v = self.qkv(rows).split(self.hidden_size, dim=-1)
        if layout.packed:  # packed layouts only arise with the attention kernel (see token_layout)
            q, k, v = (self._heads(t, -1) for t in (q, k, v))
            out = ek.attention_varlen(q, k, v, layout.cu_seqlens, layout.max_seqlen, dropout_p=self._dropout_p())
            return out.reshape(rows.shape)
        q, k, v = (self._heads(t, layout.batch, layout.seq_len) for t in (q, k, v))
        return self._padded_attention(q, k, v, layout).reshape(rows.shape)

    def forward_subset(self, rows: torch.Tensor, query_rows: torch.Tensor, layout: TokenLayout,
                       queries_per_seq: int) -> torch.Tensor:
        """Attention output for ``query_rows`` only ((B·P, hidden), P = ``queries_per_seq`` per sequence),
        with keys and values at every real token of ``rows``. Returns (B·P, hidden).

        The queries form a padded (B, P) block against the padded (B, S) keys with the key mask: the
        padded attention kernel (and SDPA) take seq_q != seq_k, the varlen one does not, and P is static."""
        q = self.qkv(query_rows, part="q")
        kv = self.qkv(rows, part="kv")
        kv = layout.unflatten(kv) if layout.packed else kv  # (B, S, 2·hidden), zeros at padding
        k, v = (self._heads(t, layout.batch, layout.seq_len) for t in kv.split(self.hidden_size, dim=-1))
        q = self._heads(q, layout.batch, queries_per_seq)
        return self._padded_attention(q, k, v, layout).reshape(query_rows.shape)

    def _padded_attention(self, q, k, v, layout: TokenLayout) -> torch.Tensor:
        """q (B, Sq, h, d) against k, v (B, S, h, d) with the key-padding mask -> (B, Sq, h, d)."""
        if layout.attention_kernel:
            return ek.attention(q, k, v, key_padding_mask=layout.attention_mask, dropout_p=self._dropout_p())
        # PyTorch's fused SDPA: the reference path used on CPU and for baselines
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=layout.attention_mask[:, None, None, :], dropout_p=self._dropout_p(),
        ).transpose(1, 2)


class _DropoutAddLayerNorm(nn.Module):
    """``LayerNorm(dropout(dense(h)) + residual)``, the tail of both halves of a post-LN layer; one
    fused kernel (dropout, add, normalise) when the layout says the elementwise kernels run."""

    def __init__(self, in_features: int, hidden: int, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, hidden_states, input_tensor, layout: TokenLayout):
        if layout.elementwise_kernel:
            return ek.layer_norm(self.dense(hidden_states), self.LayerNorm.weight, self.LayerNorm.bias,
                                 self.LayerNorm.eps, residual=input_tensor,
                                 dropout_p=self.dropout.p if self.training else 0.0)
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class ElectraSelfOutput(_DropoutAddLayerNorm):
    def __init__(self, hidden: int, cfg: ModelConfig):
        super().__init__(hidden, hidden, cfg)


class ElectraAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, cfg: ModelConfig):
        super().__init__()
        self.self = ElectraSelfAttention(hidden, heads, cfg.attention_dropout)
        self.output = ElectraSelfOutput(hidden, cfg)

    def forward(self, rows, layout):
        return self.output(self.self(rows, layout), rows, layout)

    def forward_subset(self, rows, query_index, layout, queries_per_seq):
        query_rows = ek.index_first_axis(rows, query_index)
        return self.output(self.self.forward_subset(rows, query_rows, layout, queries_per_seq), query_rows, layout)


class ElectraIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int, cfg: ModelConfig):
        super().__init__()
        self.dense = _LinearGELU(hidden, intermediate)

    def forward(self, hidden_states, layout: TokenLayout):
        return self.dense(hidden_states, fused_bias_gelu=layout.elementwise_kernel)


class ElectraOutput(_DropoutAddLayerNorm):
    def __init__(self, hidden: int, intermediate: int, cfg: ModelConfig):
        super().__init__(intermediate, hidden, cfg)


class ElectraLayer(nn.Module):
    """Post-LN BERT layer: LN(x + Attn(x)), then LN(h + FFN(h))."""

    def __init__(self, hidden: int, heads: int, intermediate: int, cfg: ModelConfig):
        super().__init__()
        self.attention = ElectraAttention(hidden, heads, cfg)
        self.intermediate = ElectraIntermediate(hidden, intermediate, cfg)
        self.output = ElectraOutput(hidden, intermediate, cfg)

    def forward(self, rows, layout):
        return self._ffn(self.attention(rows, layout), layout)

    def forward_subset(self, rows, query_index, layout, queries_per_seq):
        """The layer's output at rows ``query_index`` only (B·P of them, P per sequence): their queries,
        attention output and FFN; keys and values still at every token. The masked-LM head reads
        nothing else of a last layer (flash-attention BERT's ``last_layer_subset``, MLPerf's
        ``dense_seq_output``)."""
        return self._ffn(self.attention.forward_subset(rows, query_index, layout, queries_per_seq), layout)

    def _ffn(self, attended, layout):
        return self.output(self.intermediate(attended, layout), attended, layout)


class ElectraEncoder(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, layers: int, cfg: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(ElectraLayer(hidden, heads, intermediate, cfg) for _ in range(layers))
        self.gradient_checkpointing = cfg.activation_checkpointing

    def forward(self, rows, layout, query_index=None, queries_per_seq: int = 0):
        """``query_index`` (B·P,) row indices: the last layer computes those rows only (in that order)."""
        for i, layer in enumerate(self.layer):
            call, args = layer, (rows, layout)
            if query_index is not None and i == len(self.layer) - 1:
                call, args = layer.forward_subset, (rows, query_index, layout, queries_per_seq)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                rows = checkpoint(call, *args, use_reentrant=False)
            else:
                rows = call(*args)
        return rows


class ElectraBody(nn.Module):
    """HF ``ElectraModel`` without its embeddings (which are shared): optional projection
    embedding_size -> hidden, then the encoder."""

    def __init__(self, hidden: int, heads: int, intermediate: int, layers: int, cfg: ModelConfig):
        super().__init__()
        self.hidden_size, self.num_heads, self.intermediate_size, self.num_layers = hidden, heads, intermediate, layers
        if cfg.embedding_size != hidden:
            self.embeddings_project = nn.Linear(cfg.embedding_size, hidden)
        self.encoder = ElectraEncoder(hidden, heads, intermediate, layers, cfg)

    def forward(self, embedded_rows, layout, query_index=None, queries_per_seq: int = 0):
        if hasattr(self, "embeddings_project"):
            embedded_rows = self.embeddings_project(embedded_rows)
        return self.encoder(embedded_rows, layout, query_index, queries_per_seq)


class ElectraGeneratorPredictions(nn.Module):
    """dense hidden -> embedding_size, GELU, LayerNorm (then the tied output projection)."""

    def __init__(self, hidden: int, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(hidden, cfg.embedding_size)
        self.LayerNorm = nn.LayerNorm(cfg.embedding_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(F.gelu(self.dense(hidden_states)))


class ElectraDiscriminatorPredictions(nn.Module):
    """dense hidden -> hidden, GELU, dense_prediction hidden -> 1."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dense_prediction = nn.Linear(hidden, 1)

    def features(self, hidden_states):
        return F.gelu(self.dense(hidden_states))

    def forward(self, hidden_states):
        return self.dense_prediction(self.features(hidden_states)).squeeze(-1)


class Backbone(NamedTuple):
    """The modules one encoder architecture (``model.architecture``) builds both networks from; every
    one takes (width, cfg) or, for the body, (hidden, heads, intermediate, layers, cfg)."""

    embeddings: Callable[[ModelConfig, int], nn.Module]  # (cfg, width) -> forward(ids, types, positions, table)
    body: Callable[..., nn.Module]  # forward(rows, layout, query_index=None, queries_per_seq=0) -> rows
    generator_head: Callable[[int, ModelConfig], nn.Module]  # rows -> the tied decoder's input
    discriminator_head: Callable[[int, ModelConfig], nn.Module]  # .features(rows), .dense_prediction
    init_weights: Callable[[nn.Module, ModelConfig], None]


ELECTRA_BACKBONE = Backbone(
    embeddings=lambda cfg, width: ElectraEmbeddings(cfg),  # one width (embedding_size); a projection follows
    body=ElectraBody,
    generator_head=ElectraGeneratorPredictions,
    discriminator_head=lambda hidden, cfg: ElectraDiscriminatorPredictions(hidden),
    init_weights=lambda model, cfg: init_weights(model, cfg.initializer_range),
)


def backbone_for(cfg: ModelConfig) -> Backbone:
    """The one place the architecture is chosen: ELECTRA's block (this file) or ModernBERT's
    (:mod:`electra_fast.modern`)."""
    if cfg.architecture == "modern":
        from . import modern  # loaded on first use: ELECTRA runs never import it

        return Backbone(embeddings=modern.ModernEmbeddings, body=modern.ModernBody,
                        generator_head=modern.ModernPredictionHead,
                        discriminator_head=modern.ModernDiscriminatorPredictions,
                        init_weights=modern.init_modern_weights)
    return ELECTRA_BACKBONE


class PretrainingOutput(NamedTuple):
    """A named tuple, not a dataclass: DeepSpeed ZeRO-3 attaches its backward hooks (which re-gather
    the top-level module's directly used parameters, such as the tied word embeddings) only to
    tensors it finds inside tuples, lists and dicts of a module's output."""

    loss: torch.Tensor
    mlm_loss: torch.Tensor
    disc_loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def resolve_pretraining_config(config: Config | ModelConfig, objective: ObjectiveConfig | None,
                               max_predictions_per_seq: int | None, seed: int):
    """(model config, objective config, max predictions per sequence (0 = derive from the batch's
    sequence length with config.max_predictions), seed) from a full Config or a ModelConfig (+ optional
    ObjectiveConfig); the model section is validated."""
    if isinstance(config, Config):
        model_cfg, objective = config.model, config.objective
        max_predictions_per_seq = max_predictions_per_seq or config.max_predictions_per_seq
        seed = seed or config.train.seed
    else:
        model_cfg, objective = config, objective or ObjectiveConfig()
    model_cfg.validate()
    return model_cfg, objective, max_predictions_per_seq or 0, seed


def token_layout(cfg: ModelConfig, attention_mask: torch.Tensor, max_seqlen: int | None = None,
                 total_tokens: int | None = None, buckets: int = 0) -> TokenLayout:
    """The step's layout: packed real tokens when the Triton attention runs with ``unpad``, else the
    flattened padded batch; with the attention / elementwise implementations resolved once here.
    ``buckets``: round the packed rows up to one of that many token buckets (what CUDA graphs need)."""
    device = attention_mask.device
    attention_kernel = resolve_impl(cfg.attention_impl, device) == "triton"
    elementwise_kernel = resolve_impl(cfg.elementwise_impl, device) == "triton"
    return TokenLayout.build(attention_mask, cfg.unpad and attention_kernel, max_seqlen, total_tokens, buckets,
                             attention_kernel=attention_kernel, elementwise_kernel=elementwise_kernel)


def check_encoder_inputs(cfg: ModelConfig, input_ids, attention_mask=None, token_type_ids=None):
    """Validate (batch, seq) ids against the position table; default the mask (all real) and the
    segment ids (all 0). Returns (attention_mask bool, token_type_ids)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    seq_len = input_ids.shape[1]
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(
            f"sequence length {seq_len} is longer than the position table "
            f"(max_position_embeddings={cfg.max_position_embeddings})"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    return attention_mask.bool(), token_type_ids


def encode_tokens(embeddings: ElectraEmbeddings, body: nn.Module, input_ids, token_type_ids,
                  layout: TokenLayout, word_table: torch.Tensor | None = None, **body_kwargs) -> torch.Tensor:
    """(B, S) ids -> embeddings -> ``body`` -> (T, hidden) rows in ``layout`` (``word_table``: see
    :class:`ElectraEmbeddings`; ``body_kwargs``, e.g. the last layer's ``query_index``, go to the body)."""
    positions = torch.arange(layout.seq_len, device=input_ids.device).expand(layout.batch, -1)
    ids, types, pos = (layout.flatten(t) for t in (input_ids, token_type_ids, positions))
    return body(embeddings(ids, types, pos, word_table), layout, **body_kwargs)


def masked_rows(layout: TokenLayout, positions: torch.Tensor) -> torch.Tensor:
    """(B, P) chosen positions -> (B·P,) row indices in ``layout``, sequence by sequence."""
    offsets = torch.arange(layout.batch, device=positions.device)[:, None] * layout.seq_len
    return layout.row_of((positions + offsets).reshape(-1))


def encode_masked_rows(model: nn.Module, body: ElectraBody, input_ids, token_type_ids, layout: TokenLayout,
                       positions: torch.Tensor) -> torch.Tensor:
    """The encoder's output at the (B, P) chosen positions, (B·P, hidden): with
    ``model.last_layer_subset`` the last layer computes only those rows, else every row is computed and
    the chosen ones gathered (same values to fp32 round-off)."""
    rows = masked_rows(layout, positions)
    if model.config.last_layer_subset:
        return encode_tokens(model.embeddings, body, input_ids, token_type_ids, layout,
                             query_index=rows, queries_per_seq=positions.shape[1])
    return ek.index_first_axis(encode_tokens(model.embeddings, body, input_ids, token_type_ids, layout), rows)


def mlm_head_fn(cfg: ModelConfig, device: torch.device):
    """The masked-LM head the model's switch chose: the kernel or its reference."""
    return ek.mlm_head_loss if resolve_impl(cfg.mlm_head_impl, device) == "triton" else ek.mlm_head_loss_ref


class ElectraPretrainingModel(nn.Module):
    """Generator and discriminator in one module, so a DeepSpeed engine sees every parameter use
    inside one forward.

        model = ElectraPretrainingModel(load_config("configs/electra-small.yaml"))
        out = model(input_ids, attention_mask, token_type_ids)   # out.loss, out.metrics
        out = model(input_ids, attention_mask, token_type_ids, **packed_sizes(host_mask))  # no host sync
    """

    def __init__(self, config: Config | ModelConfig, objective: ObjectiveConfig | None = None,
                 max_predictions_per_seq: int | None = None, seed: int = 0):
        super().__init__()
        model_cfg, objective, self.max_predictions_per_seq, seed = resolve_pretraining_config(
            config, objective, max_predictions_per_seq, seed)
        self.config, self.objective_config = model_cfg, objective

        parts = backbone_for(model_cfg)
        gen_hidden = model_cfg.generator_hidden_size
        self.embeddings = parts.embeddings(model_cfg, gen_hidden)
        self.generator = parts.body(gen_hidden, model_cfg.generator_num_heads, model_cfg.generator_intermediate_size,
                                    model_cfg.generator_num_layers, model_cfg)
        self.generator_predictions = parts.generator_head(gen_hidden, model_cfg)
        self.generator_lm_head_bias = nn.Parameter(torch.zeros(model_cfg.vocab_size))
        self.discriminator = parts.body(model_cfg.hidden_size, model_cfg.num_heads, model_cfg.intermediate_size,
                                        model_cfg.num_layers, model_cfg)
        self.discriminator_predictions = parts.discriminator_head(model_cfg.hidden_size, model_cfg)
        # Registered after everything else: for one seed, the parameters every mode has start equal.
        if model_cfg.embedding_sharing == "separate":
            self.discriminator_embeddings = parts.embeddings(model_cfg, model_cfg.hidden_size)
        elif model_cfg.embedding_sharing == "gdes":
            self.discriminator_word_embeddings_delta = nn.Parameter(
                torch.zeros(model_cfg.vocab_size, model_cfg.embedding_size))
        self.rng = ObjectiveRNG(seed)
        # Token buckets of the packed layout (0: exact rows). electra_fast.compile sets them when CUDA graphs
        # capture the packed layout; they change no parameter, loss or statistic.
        self.token_buckets = 0
        parts.init_weights(self, model_cfg)  # leaves the gdes delta at zero (not an Embedding)

    # ---------------------------------------------------------------- helpers
    def _impl(self, name: str, device: torch.device) -> str:
        return resolve_impl(getattr(self.config, name), device)

    def _layout(self, attention_mask: torch.Tensor, max_seqlen: int | None = None,
                total_tokens: int | None = None) -> TokenLayout:
        return token_layout(self.config, attention_mask, max_seqlen, total_tokens, self.token_buckets)

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        return check_encoder_inputs(self.config, input_ids, attention_mask, token_type_ids)

    def _encode(self, body: ElectraBody, input_ids, token_type_ids, layout: TokenLayout):
        """The generator or the discriminator (``body``) on the embeddings that network reads."""
        embeddings, table = self.embeddings, None
        if body is self.discriminator:
            embeddings, table = self.discriminator_embedding_parts()
        return encode_tokens(embeddings, body, input_ids, token_type_ids, layout, word_table=table)

    def discriminator_embedding_parts(self) -> tuple[ElectraEmbeddings, torch.Tensor | None]:
        """(the embedding module the discriminator runs, the word table it reads instead of that module's
        own or None): the one place the sharing mode is decided. gdes: ``E_gen.detach() + E_delta``."""
        sharing = self.config.embedding_sharing
        if sharing == "separate":
            return self.discriminator_embeddings, None
        if sharing == "gdes":
            # detach(): the replaced-token loss reaches E_delta only, never E_gen (the MLM head's output layer)
            table = self.embeddings.word_embeddings.weight.detach() + self.discriminator_word_embeddings_delta
            return self.embeddings, table
        return self.embeddings, None

    def network_state_dict(self, network: str) -> dict[str, torch.Tensor]:
        """One network ("generator" / "discriminator") under HF ``ElectraModel``'s names (``embeddings.*``,
        ``embeddings_project.*``, ``encoder.*``; QKV fused), with the embeddings it reads: the
        generator's ``embeddings``; the discriminator's effective ones (gdes: word table E_gen + E_delta;
        separate: ``discriminator_embeddings``). Detached tensors, as ``state_dict`` gives them."""
        if network not in ("generator", "discriminator"):
            raise ValueError(f"network must be 'generator' or 'discriminator', got {network!r}")
        embeddings, table = self.embeddings, None
        if network == "discriminator":
            embeddings, table = self.discriminator_embedding_parts()
        state = {f"embeddings.{k}": v for k, v in embeddings.state_dict().items()}
        if table is not None:
            state["embeddings.word_embeddings.weight"] = table.detach()
        state.update(getattr(self, network).state_dict())  # embeddings_project.*, encoder.*
        return state

    def max_predictions(self, seq_len: int) -> int:
        """Chosen positions per sequence: the configured bound, else derived from ``seq_len``."""
        return max_predictions(self.objective_config.mask_prob, seq_len, self.max_predictions_per_seq)

    # ---------------------------------------------------------------- training forward
    def forward(self, input_ids, attention_mask=None, token_type_ids=None, *, max_seqlen: int | None = None,
                total_tokens: int | None = None) -> PretrainingOutput:
        """One training forward. ``max_seqlen`` / ``total_tokens``: the batch's longest sequence and its
        number of real tokens, computed on the host (:func:`packed_sizes`); they matter only for the
        packed layout, which otherwise reads them from the device (a synchronisation each)."""
        attention_mask, token_type_ids = self._check_inputs(input_ids, attention_mask, token_type_ids)
        device = input_ids.device
        cfg, obj = self.config, self.objective_config
        layout = self._layout(attention_mask, max_seqlen, total_tokens)

        masked = mask_tokens(
            input_ids, attention_mask, mask_prob=obj.mask_prob, mask_token_ratio=obj.mask_token_ratio,
            max_predictions_per_seq=self.max_predictions(layout.seq_len),
            special_ids=(cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id),
            mask_token_id=cfg.mask_token_id, generator=self.rng.masking_generator(device),
        )

        # Generator: encode the masked input; its output only at the chosen positions.
        gathered = encode_masked_rows(self, self.generator, masked.generator_input_ids, token_type_ids, layout,
                                      masked.positions)
        head_hidden = self.generator_predictions(gathered)
        mlm_loss, sampled, correct = mlm_head_fn(cfg, device)(
            head_hidden, self.embeddings.word_embeddings.weight, self.generator_lm_head_bias, masked.targets,
            temperature=obj.temperature, seed=self.rng.next_sampling_seed(),
        )

        # Discriminator: original tokens with the (detached) samples at the chosen positions.
        disc_input_ids, is_replaced = replace_tokens(input_ids, masked, sampled.detach())
        disc_rows = self._encode(self.discriminator, disc_input_ids, token_type_ids, layout)
        features = self.discriminator_predictions.features(disc_rows)
        bce = ek.replaced_token_bce if self._impl("disc_head_impl", device) == "triton" else ek.replaced_token_bce_ref
        head = self.discriminator_predictions.dense_prediction
        real_rows = layout.real_rows()
        labels = layout.flatten(is_replaced)
        disc_loss, disc_logits = bce(features, head.weight, head.bias, labels, real_rows)

        loss = obj.gen_weight * mlm_loss + obj.disc_weight * disc_loss
        metrics = pretraining_metrics(correct=correct, valid=masked.valid, disc_logits=disc_logits,
                                      is_replaced=labels, real=real_rows)
        return PretrainingOutput(loss=loss, mlm_loss=mlm_loss.detach(), disc_loss=disc_loss.detach(), metrics=metrics)

    # ---------------------------------------------------------------- inspection
    def discriminator_logits(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """(batch, seq) replaced-token logits at every position (0 at padding when unpadded)."""
        attention_mask, token_type_ids = self._check_inputs(input_ids, attention_mask, token_type_ids)
        layout = self._layout(attention_mask)
        rows = self._encode(self.discriminator, input_ids, token_type_ids, layout)
        return layout.unflatten(self.discriminator_predictions(rows).float())

    def generator_logits(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """(batch, seq, vocab) masked-LM logits at every position."""
        attention_mask, token_type_ids = self._check_inputs(input_ids, attention_mask, token_type_ids)
        layout = self._layout(attention_mask)
        rows = self._encode(self.generator, input_ids, token_type_ids, layout)
        logits = F.linear(self.generator_predictions(rows), self.embeddings.word_embeddings.weight,
                          self.generator_lm_head_bias)
        return layout.unflatten(logits.float())

    def num_parameters(self, part: str = "all") -> int:
        prefixes = {"generator": ("generator",), "discriminator": ("discriminator",), "embeddings": ("embeddings",)}
        if part == "all":
            return sum(p.numel() for p in self.parameters())
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith(prefixes[part]))

