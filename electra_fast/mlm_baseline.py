"""BERT masked-LM at the discriminator's size: the baseline ELECTRA is compared with.

    model = BertMLMModel(load_config("configs/electra-small.yaml"))   # BERT-Small
    out = model(input_ids, attention_mask, token_type_ids)            # out.loss, out.metrics

Built from the same blocks as :class:`~electra_fast.model.ElectraPretrainingModel`, so the two differ
only in the objective: shared-style embeddings (``embedding_size``, projected to ``hidden_size`` when
they differ), an :class:`ElectraBody` at the discriminator's size, the generator-style MLM head
(dense H -> E, GELU, LayerNorm, tied output projection + bias) and the same gathered
``mlm_head_loss`` (no (batch, seq, vocab) logits). Masking is BERT's: the same position choice as
ELECTRA (``objective.mask_prob`` of the real tokens, never [CLS]/[SEP]/[PAD]), then of those 80%
become [MASK], 10% a uniformly random token, 10% stay. This is the "BERT-Small/Base" of the
ELECTRA paper's comparison, and what benchmarks/equal_compute.py pretrains.

Parameter names follow Hugging Face's ``ElectraForMaskedLM`` with ``electra.`` hoisted:
``embeddings.*`` = ``electra.embeddings.*``, ``electra.*`` = ``electra.*`` (projection + encoder),
``generator_predictions.*`` as HF, ``generator_lm_head_bias`` = ``generator_lm_head.bias``
(see :meth:`BertMLMModel.hf_state_dict`).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Config, ModelConfig, ObjectiveConfig, max_predictions
from .model import (
    ElectraBody,
    PretrainingOutput,
    TokenLayout,
    check_encoder_inputs,
    encode_masked_rows,
    backbone_for,
    encode_tokens,
    mlm_head_fn,
    resolve_pretraining_config,
    split_qkv,
    token_layout,
)
from .objective import ObjectiveRNG, mask_tokens

# BERT's split of the chosen positions (Devlin et al. 2019, Section 3.1).
BERT_MASK_TOKEN_SHARE = 0.8
BERT_RANDOM_TOKEN_SHARE = 0.1


def bert_mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, cfg: ModelConfig,
                     mask_prob: float, max_predictions_per_seq: int, generator: torch.Generator):
    """Choose positions as ELECTRA does, then corrupt them 80% [MASK] / 10% random / 10% kept.

    Returns (masked input_ids (B, S), MaskedBatch with positions/valid/targets).
    """
    # mask_token_ratio=0 keeps the input untouched: only the position choice is reused.
    chosen = mask_tokens(
        input_ids, attention_mask, mask_prob=mask_prob, mask_token_ratio=0.0,
        max_predictions_per_seq=max_predictions_per_seq,
        special_ids=(cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id),
        mask_token_id=cfg.mask_token_id, generator=generator,
    )
    originals = input_ids.gather(1, chosen.positions)
    draw = torch.rand(chosen.positions.shape, generator=generator, device=input_ids.device)
    random_ids = torch.randint(0, cfg.vocab_size, chosen.positions.shape, generator=generator,
                               device=input_ids.device, dtype=input_ids.dtype)
    corrupted = torch.where(draw < BERT_MASK_TOKEN_SHARE, torch.full_like(originals, cfg.mask_token_id),
                            torch.where(draw < BERT_MASK_TOKEN_SHARE + BERT_RANDOM_TOKEN_SHARE, random_ids, originals))
    # Invalid slots write their original token back, so they change nothing.
    corrupted = torch.where(chosen.valid, corrupted, originals)
    masked_ids = input_ids.clone()
    masked_ids.scatter_(1, chosen.positions, corrupted)
    return masked_ids, chosen


class BertMLMModel(nn.Module):
    """BERT masked-LM with ELECTRA's discriminator dimensions; forward as ElectraPretrainingModel's.

    ``PretrainingOutput.disc_loss`` is a zero (there is no discriminator) and ``loss == mlm_loss``.
    """

    def __init__(self, config: Config | ModelConfig, objective: ObjectiveConfig | None = None,
                 max_predictions_per_seq: int | None = None, seed: int = 0):
        super().__init__()
        model_cfg, objective, self.max_predictions_per_seq, seed = resolve_pretraining_config(
            config, objective, max_predictions_per_seq, seed)
        self.config, self.objective_config = model_cfg, objective

        parts = backbone_for(model_cfg)  # ELECTRA's block, or ModernBERT's (model.architecture=modern)
        self.embeddings = parts.embeddings(model_cfg, model_cfg.hidden_size)
        self.electra = parts.body(model_cfg.hidden_size, model_cfg.num_heads, model_cfg.intermediate_size,
                                  model_cfg.num_layers, model_cfg)
        self.generator_predictions = parts.generator_head(model_cfg.hidden_size, model_cfg)
        self.generator_lm_head_bias = nn.Parameter(torch.zeros(model_cfg.vocab_size))
        self.rng = ObjectiveRNG(seed)
        self.token_buckets = 0  # as ElectraPretrainingModel's: set by electra_fast.compile for CUDA graphs
        parts.init_weights(self, model_cfg)

    # The encoder a downstream task fine-tunes (same role as ElectraPretrainingModel.discriminator).
    @property
    def body(self) -> ElectraBody:
        return self.electra

    def max_predictions(self, seq_len: int) -> int:
        """Chosen positions per sequence: the configured bound, else derived from ``seq_len``."""
        return max_predictions(self.objective_config.mask_prob, seq_len, self.max_predictions_per_seq)

    def encode(self, input_ids, token_type_ids, layout: TokenLayout) -> torch.Tensor:
        """(B, S) ids -> (T, hidden) rows in ``layout``."""
        return encode_tokens(self.embeddings, self.electra, input_ids, token_type_ids, layout)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, *, max_seqlen: int | None = None,
                total_tokens: int | None = None) -> PretrainingOutput:
        """As :meth:`ElectraPretrainingModel.forward` (same optional host-side sizes)."""
        attention_mask, token_type_ids = check_encoder_inputs(self.config, input_ids, attention_mask, token_type_ids)
        device = input_ids.device
        obj = self.objective_config
        layout = token_layout(self.config, attention_mask, max_seqlen, total_tokens, self.token_buckets)
        masked_ids, chosen = bert_mask_tokens(
            input_ids, attention_mask, cfg=self.config, mask_prob=obj.mask_prob,
            max_predictions_per_seq=self.max_predictions(layout.seq_len),
            generator=self.rng.masking_generator(device),
        )
        gathered = encode_masked_rows(self, self.electra, masked_ids, token_type_ids, layout, chosen.positions)
        head_hidden = self.generator_predictions(gathered)
        mlm_loss, _sampled, correct = mlm_head_fn(self.config, device)(
            head_hidden, self.embeddings.word_embeddings.weight, self.generator_lm_head_bias, chosen.targets,
            temperature=1.0, seed=self.rng.next_sampling_seed(),
        )
        with torch.no_grad():
            num_valid = chosen.valid.sum()
            metrics = {
                "mlm_accuracy": (correct & chosen.valid.reshape(-1)).sum() / num_valid.clamp(min=1),
                "num_predictions": num_valid,
            }
        zero = torch.zeros((), device=device, dtype=torch.float32)
        return PretrainingOutput(loss=mlm_loss, mlm_loss=mlm_loss.detach(), disc_loss=zero, metrics=metrics)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under Hugging Face ``ElectraForMaskedLM`` names (load with strict=False: HF's
        ``generator_lm_head.weight`` is tied to the word embeddings)."""
        out = {}
        for name, tensor in split_qkv(self.state_dict()).items():
            if name.startswith("embeddings."):
                out["electra." + name] = tensor
            elif name == "generator_lm_head_bias":
                out["generator_lm_head.bias"] = tensor
            else:
                out[name] = tensor
        out["generator_lm_head.weight"] = self.embeddings.word_embeddings.weight
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
