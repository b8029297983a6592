"""ELECTRA generator + discriminator with shared embeddings (Clark et al. 2020).

Parameter names and math follow Hugging Face's ``ElectraModel`` so weights move both ways
(see ``electra_fast.hf``): ``embeddings.*`` is the one shared embedding module;
``generator.*`` / ``discriminator.*`` are ``ElectraModel`` minus its embeddings;
``generator_predictions`` / ``discriminator_predictions`` are HF's heads, and the generator's output
projection is the tied word-embedding matrix plus ``generator_lm_head_bias``.

Layout: the encoders run on a flat (tokens, hidden) block. With ``model.unpad`` and the Triton
attention, that block holds only the real tokens (unpadded once per step, variable-length attention);
otherwise it is the padded batch flattened, with a key-padding mask in attention.

The three hot spots are calls into ``electra_kernels``: attention, ``mlm_head_loss`` (gathered masked
rows only: no (batch, seq, vocab) logits) and ``replaced_token_bce``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import electra_kernels as ek
from electra_kernels._dispatch import HAS_TRITON

from .config import Config, ModelConfig, ObjectiveConfig, max_predictions
from .objective import ObjectiveRNG, mask_tokens, pretraining_metrics, replace_tokens


def resolve_impl(choice: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA (when triton imports), "torch" elsewhere."""
    if choice == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    return choice


# --------------------------------------------------------------------------------------------
# Token layout shared by both encoders of a step (they see the same attention mask)
# --------------------------------------------------------------------------------------------
def init_weights(model: nn.Module, std: float) -> None:
    """As HF ElectraPreTrainedModel (same module order): N(0, std) Linear/Embedding weights (padding
    row zero), zero biases, unit LayerNorm."""

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


@dataclass
class TokenLayout:
    batch: int
    seq_len: int
    attention_mask: torch.Tensor  # (B, S) bool
    indices: torch.Tensor | None = None  # (T,) positions of real tokens in B*S when packed
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    @property
    def packed(self) -> bool:
        return self.indices is not None

    @classmethod
    def build(cls, attention_mask: torch.Tensor, packed: bool) -> "TokenLayout":
        mask = attention_mask.bool()
        batch, seq_len = mask.shape
        if not packed:
            return cls(batch, seq_len, mask)
        seqlens = mask.sum(dim=1, dtype=torch.int32)
        indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
        cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
        return cls(batch, seq_len, mask, indices, cu_seqlens, int(seqlens.max().item()))

    def flatten(self, per_token: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...) rows in this layout."""
        flat = per_token.reshape(self.batch * self.seq_len, *per_token.shape[2:])
        return ek.index_first_axis(flat, self.indices) if self.packed else flat

    def unflatten(self, rows: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, S, ...) with zeros at padding."""
        if self.packed:
            rows = ek.index_put_first_axis(rows, self.indices, self.batch * self.seq_len)
        return rows.view(self.batch, self.seq_len, *rows.shape[1:])

    def row_of(self, flat_positions: torch.Tensor) -> torch.Tensor:
        """Row index in this layout of positions b*S+s (which must be real tokens)."""
        if not self.packed:
            return flat_positions
        row = torch.cumsum(self.attention_mask.flatten().long(), dim=0) - 1
        return row[flat_positions]

    def real_rows(self) -> torch.Tensor:
        """(T,) bool: which rows are real tokens."""
        if self.packed:
            return torch.ones(self.indices.shape[0], dtype=torch.bool, device=self.indices.device)
        return self.attention_mask.flatten()


# --------------------------------------------------------------------------------------------
# Modules (HF ElectraModel names)
# --------------------------------------------------------------------------------------------
class ElectraEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.embedding_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.embedding_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.embedding_size)
        self.LayerNorm = nn.LayerNorm(cfg.embedding_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids, token_type_ids, position_ids):
        """Any matching shapes: (B, S) padded or (T,) packed ids -> (..., embedding_size)."""
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class ElectraSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, attention_dropout: float, impl: str):
        super().__init__()
        self.num_heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attention_dropout = attention_dropout
        self.impl = impl

    def forward(self, rows: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        dropout_p = self.attention_dropout if self.training else 0.0
        q, k, v = (proj(rows).view(-1, self.num_heads, self.head_dim) for proj in (self.query, self.key, self.value))
        if layout.packed:
            out = ek.attention_varlen(q, k, v, layout.cu_seqlens, layout.max_seqlen, dropout_p=dropout_p)
            return out.reshape(rows.shape)
        shape = (layout.batch, layout.seq_len, self.num_heads, self.head_dim)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        if resolve_impl(self.impl, rows.device) == "triton":
            out = ek.attention(q, k, v, key_padding_mask=layout.attention_mask, dropout_p=dropout_p)
        else:  # PyTorch's fused SDPA: the reference path used on CPU and for baselines
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=layout.attention_mask[:, None, None, :], dropout_p=dropout_p,
            ).transpose(1, 2)
        return out.reshape(rows.shape)


class _DropoutAddLayerNorm(nn.Module):
    """``LayerNorm(dropout(dense(h)) + residual)``, the tail of both halves of a post-LN layer; one
    fused kernel (dropout, add, normalise) when ``elementwise_impl`` resolves to Triton."""

    def __init__(self, in_features: int, hidden: int, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.impl = cfg.elementwise_impl

    def forward(self, hidden_states, input_tensor):
        if resolve_impl(self.impl, hidden_states.device) == "triton":
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
        self.self = ElectraSelfAttention(hidden, heads, cfg.attention_dropout, cfg.attention_impl)
        self.output = ElectraSelfOutput(hidden, cfg)

    def forward(self, rows, layout):
        return self.output(self.self(rows, layout), rows)


class ElectraIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)
        self.impl = cfg.elementwise_impl

    def forward(self, hidden_states):
        if resolve_impl(self.impl, hidden_states.device) == "triton":  # bias joins inside the GELU kernel
            return ek.bias_gelu(F.linear(hidden_states, self.dense.weight), self.dense.bias)
        return F.gelu(self.dense(hidden_states))


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
        attended = self.attention(rows, layout)
        return self.output(self.intermediate(attended), attended)


class ElectraEncoder(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, layers: int, cfg: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(ElectraLayer(hidden, heads, intermediate, cfg) for _ in range(layers))
        self.gradient_checkpointing = cfg.activation_checkpointing

    def forward(self, rows, layout):
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                rows = checkpoint(layer, rows, layout, use_reentrant=False)
            else:
                rows = layer(rows, layout)
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

    def forward(self, embedded_rows, layout):
        if hasattr(self, "embeddings_project"):
            embedded_rows = self.embeddings_project(embedded_rows)
        return self.encoder(embedded_rows, layout)


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
    """(model config, objective config, max predictions per sequence (0 = derive per batch), seed) from
    a full Config or a ModelConfig (+ optional ObjectiveConfig); the model section is validated."""
    if isinstance(config, Config):
        model_cfg, objective = config.model, config.objective
        max_predictions_per_seq = max_predictions_per_seq or config.max_predictions_per_seq
        seed = seed or config.train.seed
    else:
        model_cfg, objective = config, objective or ObjectiveConfig()
    model_cfg.validate()
    return model_cfg, objective, max_predictions_per_seq or 0, seed


def token_layout(cfg: ModelConfig, attention_mask: torch.Tensor) -> TokenLayout:
    """Packed real tokens when the Triton attention runs with ``unpad``, else the flattened padded batch."""
    packed = cfg.unpad and resolve_impl(cfg.attention_impl, attention_mask.device) == "triton"
    return TokenLayout.build(attention_mask, packed)


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
                  layout: TokenLayout) -> torch.Tensor:
    """(B, S) ids -> embeddings -> ``body`` -> (T, hidden) rows in ``layout``."""
    positions = torch.arange(layout.seq_len, device=input_ids.device).expand(layout.batch, -1)
    ids, types, pos = (layout.flatten(t) for t in (input_ids, token_type_ids, positions))
    return body(embeddings(ids, types, pos), layout)


class ElectraPretrainingModel(nn.Module):
    """Generator and discriminator in one module, so a DeepSpeed engine sees every parameter use
    inside one forward.

        model = ElectraPretrainingModel(load_config("configs/electra-small.yaml"))
        out = model(input_ids, attention_mask, token_type_ids)   # out.loss, out.metrics
    """

    def __init__(self, config: Config | ModelConfig, objective: ObjectiveConfig | None = None,
                 max_predictions_per_seq: int | None = None, seed: int = 0):
        super().__init__()
        model_cfg, objective, self.max_predictions_per_seq, seed = resolve_pretraining_config(
            config, objective, max_predictions_per_seq, seed)
        self.config, self.objective_config = model_cfg, objective

        self.embeddings = ElectraEmbeddings(model_cfg)
        self.generator = ElectraBody(model_cfg.generator_hidden_size, model_cfg.generator_num_heads,
                                     model_cfg.generator_intermediate_size, model_cfg.generator_num_layers, model_cfg)
        self.generator_predictions = ElectraGeneratorPredictions(model_cfg.generator_hidden_size, model_cfg)
        self.generator_lm_head_bias = nn.Parameter(torch.zeros(model_cfg.vocab_size))
        self.discriminator = ElectraBody(model_cfg.hidden_size, model_cfg.num_heads, model_cfg.intermediate_size,
                                         model_cfg.num_layers, model_cfg)
        self.discriminator_predictions = ElectraDiscriminatorPredictions(model_cfg.hidden_size)
        self.rng = ObjectiveRNG(seed)
        init_weights(self, model_cfg.initializer_range)

    # ---------------------------------------------------------------- helpers
    def _impl(self, name: str, device: torch.device) -> str:
        return resolve_impl(getattr(self.config, name), device)

    def _layout(self, attention_mask: torch.Tensor) -> TokenLayout:
        return token_layout(self.config, attention_mask)

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        return check_encoder_inputs(self.config, input_ids, attention_mask, token_type_ids)

    def _encode(self, body: ElectraBody, input_ids, token_type_ids, layout: TokenLayout):
        return encode_tokens(self.embeddings, body, input_ids, token_type_ids, layout)

    # ---------------------------------------------------------------- training forward
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> PretrainingOutput:
        attention_mask, token_type_ids = self._check_inputs(input_ids, attention_mask, token_type_ids)
        device = input_ids.device
        cfg, obj = self.config, self.objective_config
        layout = self._layout(attention_mask)
        max_pred = max_predictions(obj.mask_prob, layout.seq_len, self.max_predictions_per_seq)

        masked = mask_tokens(
            input_ids, attention_mask, mask_prob=obj.mask_prob, mask_token_ratio=obj.mask_token_ratio,
            max_predictions_per_seq=max_pred, special_ids=(cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id),
            mask_token_id=cfg.mask_token_id, generator=self.rng.masking_generator(device),
        )

        # Generator: encode the masked input, then predict only at the chosen positions.
        generator_rows = self._encode(self.generator, masked.generator_input_ids, token_type_ids, layout)
        flat_positions = (masked.positions + torch.arange(layout.batch, device=device)[:, None] * layout.seq_len)
        gathered = ek.index_first_axis(generator_rows, layout.row_of(flat_positions.reshape(-1)))
        head_hidden = self.generator_predictions(gathered)
        mlm = ek.mlm_head_loss if self._impl("mlm_head_impl", device) == "triton" else ek.mlm_head_loss_ref
        mlm_loss, sampled, correct = mlm(
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

