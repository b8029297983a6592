"""Fine-tuning models on the modern backbone: a ModernBERT encoder (an exported modern discriminator, or any
ModernBERT folder) with transformers' ModernBERT task heads, so a saved folder loads as
``ModernBertForSequenceClassification`` / ``ModernBertForTokenClassification``.

The task models keep the ELECTRA ones' interface (:mod:`electra_fast.task_models`): the encoder is their
``electra`` attribute (fine-tuning's layer-wise learning rates and reloads go through it), ``reset_head()``
draws a fresh head, ``forward`` takes the same arguments. Heads are transformers': the prediction head
(dense -> GELU -> LayerNorm, no biases), dropout, then ``classifier`` (with a bias), on the first token
(``classifier_pooling="cls"``) or on every token. Names map to transformers' on save (``electra.`` ->
``model.``, ``word_embeddings`` -> ``tok_embeddings``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .model import TokenLayout, check_encoder_inputs, encode_tokens, token_layout
from .modern import ModernBody, ModernEmbeddings, ModernPredictionHead, init_modern_weights


class ModernEncoder(ModernBody):
    """``ModernBertModel``: embeddings, layers, final norm. Returns rows in a :class:`TokenLayout`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.num_layers, cfg)
        self.config = cfg
        self.embeddings = ModernEmbeddings(cfg, cfg.hidden_size)
        init_modern_weights(self, cfg)

    def layout(self, attention_mask: torch.Tensor) -> TokenLayout:
        return token_layout(self.config, attention_mask)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):  # noqa: D401 - see class doc
        """(B, S) ids -> (rows (T, hidden), layout)."""
        attention_mask, token_type_ids = check_encoder_inputs(self.config, input_ids, attention_mask, token_type_ids)
        layout = self.layout(attention_mask)
        return encode_tokens(self.embeddings, super().forward, input_ids, token_type_ids, layout), layout


class _ModernTaskModel(nn.Module):
    def __init__(self, cfg: ModelConfig, num_labels: int):
        super().__init__()
        self.num_labels = num_labels
        self.electra = ModernEncoder(cfg)
        self.head = ModernPredictionHead(cfg.hidden_size, cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        self.reset_head()

    def reset_head(self) -> None:
        """As transformers' ModernBertPreTrainedModel: truncated normals; the head's dense with the "out"
        std, the classifier with hidden^-0.5; LayerNorm one, bias zero."""
        cfg = self.electra.config
        for weight, std in ((self.head.dense.weight, cfg.initializer_range / math.sqrt(2.0 * cfg.num_layers)),
                            (self.classifier.weight, cfg.hidden_size ** -0.5)):
            nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
        nn.init.ones_(self.head.norm.weight)
        nn.init.zeros_(self.classifier.bias)

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.head(rows))).float()


class ModernForSequenceClassification(_ModernTaskModel):
    """Sentence(-pair) classification or regression on the first token (ModernBERT's "cls" pooling)."""

    kind = "sequence"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        rows, layout = self.electra(input_ids, attention_mask, token_type_ids)
        first = torch.arange(layout.batch, device=input_ids.device) * layout.seq_len
        return self._logits(rows.index_select(0, layout.row_of(first)))


class ModernForTokenClassification(_ModernTaskModel):
    """Head at every token (positions as :class:`electra_fast.task_models.ElectraForTokenClassification`)."""

    kind = "token"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, positions=None) -> torch.Tensor:
        rows, layout = self.electra(input_ids, attention_mask, token_type_ids)
        if positions is not None:
            return self._logits(rows.index_select(0, layout.row_of(positions)))
        return layout.unflatten(self._logits(rows))


def task_model_class(token: bool):
    return ModernForTokenClassification if token else ModernForSequenceClassification


def encoder_state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ModernBERT folder's weights (with or without ``model.``) -> :class:`ModernEncoder`'s names."""
    from .hf_modern import _encoder_state

    body, embeddings = _encoder_state(state)
    return {**{"embeddings." + k: v for k, v in embeddings.items()}, **body}


def hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task model's state dict under transformers' names."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("electra."):
            name = "model." + name[len("electra."):].replace("embeddings.word_embeddings.",
                                                             "embeddings.tok_embeddings.")
        out[name] = tensor
    return out


def hf_task_config(config: dict, token: bool, dropout: float) -> dict:
    head = "ModernBertForTokenClassification" if token else "ModernBertForSequenceClassification"
    return dict(config, model_type="modernbert", classifier_pooling="cls", classifier_dropout=dropout,
                architectures=[head])
