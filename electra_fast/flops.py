"""Training FLOPs of ELECTRA and BERT masked-LM, by the ELECTRA paper's analytic method.

    from electra_fast.flops import electra_flops, training_flops_per_step, paper_training_flops
    fl = electra_flops(cfg, seq_len=128, batch=128)            # modern convention (MFU)
    fl.forward_per_step, fl.backward_per_step, fl.training_per_token
    training_flops_per_step(cfg)                                # what the trainer's MFU divides by
    paper_training_flops()["electra_small"]                     # ~1.4e18, the paper's Table 1

The method (Clark et al. 2020, Appendix D; the reference implementation is
google-research/electra ``flops_computation.py``) lists every operation of a forward pass as a *term*:

* a matrix multiply of an (m, k) by a (k, n) matrix is 2·m·k·n FLOPs (multiply + add);
* other elementwise ops are 1 FLOP per element, except LayerNorm 5, GELU 8, softmax 5, dropout 4;
* the embedding lookup is a dense one-hot matmul: 2·E·V per token for the word table and
  2·E·(S + types) for position + token type;
* the MLM softmax head runs only at the predicted positions (the paper: 15.625% = 20 of 128 tokens),
  the discriminator's binary head at every token; generator and discriminator share embeddings,
  but each encoder looks its own input up.

Every term carries a *kind* -- ``matmul`` (runs on tensor cores), ``lookup`` (the one-hot matmul, in
practice a gather) or ``elementwise`` -- and a *convention* says which kinds count and what the
backward pass costs:

================  ==================================  ======================================
convention        counts                              backward
================  ==================================  ======================================
``paper``         matmul + lookup + elementwise       = forward (training = 2 x forward)
``modern``        matmul only (a gather is free)      = 2 x forward (grad input + grad weight)
================  ==================================  ======================================

``paper`` reproduces the published totals; ``modern`` is the model-FLOPs convention of MFU figures
(PaLM, Megatron): only the matmul work the hardware's peak refers to, attention scores included.
It is also exactly what ``torch.utils.flop_counter.FlopCounterMode`` counts in a real step when
attention runs as matmuls (see benchmarks/flops.py --counted).

Workloads are described by token rows and attention pairs, so padded batches (every row computed)
and packed/unpadded ones (only real tokens; attention over sum(len^2) pairs) are both exact.

This module imports only the config: the trainer, benchmarks and tests use it without torch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from .config import Config, ModelConfig, ObjectiveConfig, max_predictions

# Cost per element of the non-matmul operations (the paper's constants).
DROPOUT_FLOPS = 4  # random number, compare, multiply by mask, multiply by 1/(1-p)
LAYER_NORM_FLOPS = 5  # mean (sum), variance (square + sum), scale, shift
GELU_FLOPS = 8  # 0.5·x·(1 + tanh(sqrt(2/pi)·(x + 0.044715·x^3)))
SOFTMAX_FLOPS = 5  # max, subtract, exp, sum, divide
ROTARY_FLOPS = 3  # per element of q and k: x·cos + rotate_half(x)·sin

MATMUL, LOOKUP, ELEMENTWISE = "matmul", "lookup", "elementwise"
KINDS = (MATMUL, LOOKUP, ELEMENTWISE)

# The paper's share of tokens that go through the MLM softmax head (20 of 128).
PAPER_OUTPUT_FRACTION = 0.15625


@dataclass(frozen=True)
class Convention:
    name: str
    counted_kinds: tuple[str, ...]
    backward_factor: float  # backward FLOPs = backward_factor x counted forward FLOPs
    description: str


CONVENTIONS: dict[str, Convention] = {
    "paper": Convention(
        "paper", KINDS, 1.0,
        "ELECTRA paper: all ops incl. dense one-hot embedding lookups and elementwise ops; backward = forward",
    ),
    "modern": Convention(
        "modern", (MATMUL,), 2.0,
        "model FLOPs (MFU): matmuls only, lookups are gathers; backward = 2 x forward",
    ),
}


def get_convention(convention: str | Convention) -> Convention:
    if isinstance(convention, Convention):
        return convention
    try:
        return CONVENTIONS[convention]
    except KeyError:
        raise ValueError(f"unknown FLOPs convention {convention!r} (known: {', '.join(CONVENTIONS)})") from None


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderDims:
    """One transformer encoder: hidden size, depth, heads, FFN width; plus the embedding it reads."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    embedding: int
    vocab: int
    type_vocab: int = 2
    dropout: bool = True  # hidden dropout present (p > 0)
    attention_dropout: bool = True
    # model.architecture: "electra" (post-LN BERT layers) or "modern" (ModernBERT's, see modern_layer_terms)
    architecture: str = "electra"
    window: int = 0  # modern: sliding layers attend keys |i - j| <= window (local_attention / 2)
    global_every: int = 1  # modern: every n-th layer (the first included) is global

    def __post_init__(self):
        for name in ("hidden", "layers", "heads", "intermediate", "embedding", "vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EncoderDims.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def discriminator(cls, cfg: ModelConfig) -> "EncoderDims":
        return cls(cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.embedding_size,
                   cfg.vocab_size, cfg.type_vocab_size, cfg.dropout > 0, cfg.attention_dropout > 0,
                   **_architecture(cfg))

    @classmethod
    def generator(cls, cfg: ModelConfig) -> "EncoderDims":
        # modern: no projection, each network's table as wide as the network
        embedding = cfg.generator_hidden_size if cfg.architecture == "modern" else cfg.embedding_size
        return cls(cfg.generator_hidden_size, cfg.generator_num_layers, cfg.generator_num_heads,
                   cfg.generator_intermediate_size, embedding, cfg.vocab_size, cfg.type_vocab_size,
                   cfg.dropout > 0, cfg.attention_dropout > 0, **_architecture(cfg))

    @property
    def global_layers(self) -> int:
        """Layers with global attention (all of them for ELECTRA)."""
        return -(-self.layers // self.global_every) if self.architecture == "modern" else self.layers


def _architecture(cfg: ModelConfig) -> dict:
    if cfg.architecture != "modern":
        return {}
    return dict(architecture="modern", window=cfg.local_attention // 2, global_every=cfg.global_attn_every_n_layers)


def window_pairs(length: int, window: int) -> int:
    """Query-key pairs (i, j) in one sequence of ``length`` tokens with |i - j| <= window: each query
    attends at most 2·window + 1 (= local_attention + 1) keys, fewer near the ends."""
    m = min(window, length - 1)
    return length + 2 * (m * length - m * (m + 1) // 2) if length > 0 else 0


@dataclass(frozen=True)
class Workload:
    """What one step processes.

    sequences x seq_len is the padded batch. ``tokens`` are the rows the encoders compute (all
    sequences x seq_len when padded, the real tokens when packed); ``attention_pairs`` the query-key
    pairs per head (sequences x seq_len^2 padded, sum(len^2) packed); ``mlm_rows`` the rows that go
    through the MLM softmax head.
    """

    sequences: int
    seq_len: int
    tokens: float
    attention_pairs: float
    mlm_rows: float
    lengths: tuple[int, ...] = ()  # packed: each sequence's length (sliding-window pairs are counted from them)

    def pairs_within(self, window: int) -> float:
        """Attention pairs per head of a sliding-window layer (|i - j| <= window), in this workload."""
        if self.lengths:
            return float(sum(window_pairs(n, window) for n in self.lengths))
        return float(self.sequences * window_pairs(self.seq_len, window))

    @classmethod
    def padded(cls, batch: int, seq_len: int, mlm_rows_per_seq: float) -> "Workload":
        _check_batch(batch, seq_len)
        return cls(batch, seq_len, float(batch * seq_len), float(batch * seq_len * seq_len),
                   float(batch * mlm_rows_per_seq))

    @classmethod
    def packed(cls, lengths: Sequence[int], seq_len: int, mlm_rows_per_seq: float) -> "Workload":
        lengths = [int(n) for n in lengths]
        _check_batch(len(lengths), seq_len)
        if any(not 0 < n <= seq_len for n in lengths):
            raise ValueError(f"every sequence length must be in [1, seq_len={seq_len}], got {lengths}")
        return cls(len(lengths), seq_len, float(sum(lengths)), float(sum(n * n for n in lengths)),
                   float(len(lengths) * mlm_rows_per_seq), tuple(lengths))


def _check_batch(batch: int, seq_len: int) -> None:
    if batch <= 0 or seq_len <= 0:
        raise ValueError(f"batch and seq_len must be positive, got batch={batch}, seq_len={seq_len}")


@dataclass(frozen=True)
class Term:
    """One operation's forward FLOPs for a whole step."""

    component: str  # e.g. "generator.embeddings", "discriminator.layers", "mlm_head", "disc_head"
    name: str
    kind: str
    flops: float


# ----------------------------------------------------------------------------------------------
# Terms, forward pass, per step
# ----------------------------------------------------------------------------------------------
def embedding_terms(dims: EncoderDims, work: Workload, component: str) -> list[Term]:
    """Input embeddings of one encoder: one-hot lookups, sum, LayerNorm, dropout, projection E -> H."""
    e, n = dims.embedding, work.tokens
    terms = [
        Term(component, "word_lookup", LOOKUP, 2 * e * dims.vocab * n),
        # Position and token-type tables as one-hot matmuls over seq_len positions and the types.
        Term(component, "position_type_lookup", LOOKUP, 2 * e * (work.seq_len + dims.type_vocab) * n),
        Term(component, "position_type_add", ELEMENTWISE, 2 * e * n),
        Term(component, "layer_norm", ELEMENTWISE, LAYER_NORM_FLOPS * e * n),
    ]
    if dims.dropout:
        terms.append(Term(component, "dropout", ELEMENTWISE, DROPOUT_FLOPS * e * n))
    if dims.embedding != dims.hidden:
        terms += [
            Term(component, "projection", MATMUL, 2 * e * dims.hidden * n),
            Term(component, "projection_bias", ELEMENTWISE, dims.hidden * n),
        ]
    return terms


def layer_terms(dims: EncoderDims, work: Workload, component: str) -> list[Term]:
    """All ``dims.layers`` post-LN transformer layers of one encoder."""
    h, i, heads, n, pairs = dims.hidden, dims.intermediate, dims.heads, work.tokens, work.attention_pairs
    per_layer = [
        Term(component, "qkv", MATMUL, 3 * 2 * h * h * n),
        Term(component, "qkv_bias", ELEMENTWISE, 3 * h * n),
        # Scores Q·K^T and the weighted sum P·V: each 2·head_dim per pair and head = 2·h per pair.
        Term(component, "attention_scores", MATMUL, 2 * h * pairs),
        Term(component, "attention_scale", ELEMENTWISE, heads * pairs),
        Term(component, "attention_softmax", ELEMENTWISE, SOFTMAX_FLOPS * heads * pairs),
        Term(component, "attention_values", MATMUL, 2 * h * pairs),
        Term(component, "attention_output", MATMUL, 2 * h * h * n),
        Term(component, "attention_output_bias", ELEMENTWISE, h * n),
        Term(component, "attention_output_residual", ELEMENTWISE, h * n),
        Term(component, "attention_output_layer_norm", ELEMENTWISE, LAYER_NORM_FLOPS * h * n),
        Term(component, "intermediate", MATMUL, 2 * h * i * n),
        Term(component, "intermediate_bias", ELEMENTWISE, i * n),
        Term(component, "intermediate_gelu", ELEMENTWISE, GELU_FLOPS * i * n),
        Term(component, "output", MATMUL, 2 * i * h * n),
        Term(component, "output_bias", ELEMENTWISE, h * n),
        Term(component, "output_residual", ELEMENTWISE, h * n),
        Term(component, "output_layer_norm", ELEMENTWISE, LAYER_NORM_FLOPS * h * n),
    ]
    if dims.attention_dropout:
        per_layer.append(Term(component, "attention_dropout", ELEMENTWISE, DROPOUT_FLOPS * heads * pairs))
    if dims.dropout:
        per_layer += [
            Term(component, "attention_output_dropout", ELEMENTWISE, DROPOUT_FLOPS * h * n),
            Term(component, "output_dropout", ELEMENTWISE, DROPOUT_FLOPS * h * n),
        ]
    return [Term(t.component, t.name, t.kind, t.flops * dims.layers) for t in per_layer]


def mlm_head_terms(hidden: int, embedding: int, vocab: int, rows: float, component: str = "mlm_head") -> list[Term]:
    """dense H -> E, GELU, LayerNorm, tied projection E -> V, softmax cross-entropy, at ``rows`` rows."""
    return [
        Term(component, "transform", MATMUL, 2 * hidden * embedding * rows),
        Term(component, "transform_bias", ELEMENTWISE, embedding * rows),
        Term(component, "transform_gelu", ELEMENTWISE, GELU_FLOPS * embedding * rows),
        Term(component, "transform_layer_norm", ELEMENTWISE, LAYER_NORM_FLOPS * embedding * rows),
        Term(component, "vocab_projection", MATMUL, 2 * embedding * vocab * rows),
        Term(component, "softmax", ELEMENTWISE, SOFTMAX_FLOPS * vocab * rows),
        Term(component, "target_word", ELEMENTWISE, 2 * vocab * rows),  # one-hot target · log-probs
    ]


def disc_head_terms(hidden: int, work: Workload, component: str = "disc_head") -> list[Term]:
    """dense H -> H, GELU, dense H -> 1 at every token row."""
    n = work.tokens
    return [
        Term(component, "dense", MATMUL, 2 * hidden * hidden * n),
        Term(component, "dense_bias", ELEMENTWISE, hidden * n),
        Term(component, "dense_gelu", ELEMENTWISE, GELU_FLOPS * hidden * n),
        Term(component, "logits", MATMUL, 2 * hidden * n),
    ]


def modern_embedding_terms(dims: EncoderDims, work: Workload, component: str) -> list[Term]:
    """ModernBERT's embeddings: the word lookup, LayerNorm, dropout (no position or segment tables)."""
    h, n = dims.hidden, work.tokens
    terms = [Term(component, "word_lookup", LOOKUP, 2 * h * dims.vocab * n),
             Term(component, "layer_norm", ELEMENTWISE, LAYER_NORM_FLOPS * h * n)]
    if dims.dropout:
        terms.append(Term(component, "dropout", ELEMENTWISE, DROPOUT_FLOPS * h * n))
    return terms


def modern_layer_terms(dims: EncoderDims, work: Workload, component: str) -> list[Term]:
    """ModernBERT's pre-norm layers and final norm: Wqkv, rotary on q and k, attention over every pair
    (global layers) or pairs with |i - j| <= window (sliding layers), Wo; GeGLU's Wi (h -> 2i),
    gelu(input)·gate, Wo (i -> h). Bias-free LayerNorms count as today's (5 per element); layer 0 has none
    before its attention."""
    h, i, heads, n, layers = dims.hidden, dims.intermediate, dims.heads, work.tokens, dims.layers
    global_layers = dims.global_layers
    sliding_layers = layers - global_layers
    pairs = global_layers * work.attention_pairs + sliding_layers * work.pairs_within(dims.window)
    terms = [
        Term(component, "attention_layer_norm", ELEMENTWISE, LAYER_NORM_FLOPS * h * n * (layers - 1)),
        Term(component, "qkv", MATMUL, 3 * 2 * h * h * n * layers),
        Term(component, "rotary", ELEMENTWISE, ROTARY_FLOPS * 2 * h * n * layers),
        Term(component, "attention_scores", MATMUL, 2 * h * pairs),
        Term(component, "attention_scale", ELEMENTWISE, heads * pairs),
        Term(component, "attention_softmax", ELEMENTWISE, SOFTMAX_FLOPS * heads * pairs),
        Term(component, "attention_values", MATMUL, 2 * h * pairs),
        Term(component, "attention_output", MATMUL, 2 * h * h * n * layers),
        Term(component, "attention_residual", ELEMENTWISE, h * n * layers),
        Term(component, "mlp_layer_norm", ELEMENTWISE, LAYER_NORM_FLOPS * h * n * layers),
        Term(component, "mlp_in", MATMUL, 2 * h * 2 * i * n * layers),
        Term(component, "mlp_gelu", ELEMENTWISE, GELU_FLOPS * i * n * layers),
        Term(component, "mlp_gate", ELEMENTWISE, i * n * layers),
        Term(component, "mlp_out", MATMUL, 2 * i * h * n * layers),
        Term(component, "mlp_residual", ELEMENTWISE, h * n * layers),
        Term(component, "final_layer_norm", ELEMENTWISE, LAYER_NORM_FLOPS * h * n),
    ]
    if dims.attention_dropout:
        terms += [Term(component, "attention_dropout", ELEMENTWISE, DROPOUT_FLOPS * heads * pairs),
                  Term(component, "attention_output_dropout", ELEMENTWISE, DROPOUT_FLOPS * h * n * layers)]
    if dims.dropout:
        terms.append(Term(component, "mlp_dropout", ELEMENTWISE, DROPOUT_FLOPS * i * n * layers))
    return terms


def modern_electra_terms(discriminator: EncoderDims, generator: EncoderDims, work: Workload) -> list[Term]:
    """ELECTRA on the modern backbone: ModernBERT's prediction head (no bias) on both networks."""
    if discriminator.vocab != generator.vocab:
        raise ValueError("generator and discriminator share a vocabulary: vocab must match")
    mlm_head = [t for t in mlm_head_terms(generator.hidden, generator.hidden, generator.vocab, work.mlm_rows)
                if t.name != "transform_bias"]
    disc_head = [t for t in disc_head_terms(discriminator.hidden, work) if t.name != "dense_bias"]
    disc_head.insert(2, Term("disc_head", "dense_layer_norm", ELEMENTWISE,
                             LAYER_NORM_FLOPS * discriminator.hidden * work.tokens))
    disc_head.append(Term("disc_head", "logits_bias", ELEMENTWISE, work.tokens))
    return (
        modern_embedding_terms(generator, work, "generator.embeddings")
        + modern_layer_terms(generator, work, "generator.layers")
        + mlm_head
        + modern_embedding_terms(discriminator, work, "discriminator.embeddings")
        + modern_layer_terms(discriminator, work, "discriminator.layers")
        + disc_head
    )


def electra_terms(discriminator: EncoderDims, generator: EncoderDims, work: Workload) -> list[Term]:
    if discriminator.architecture == "modern":
        return modern_electra_terms(discriminator, generator, work)
    if discriminator.embedding != generator.embedding or discriminator.vocab != generator.vocab:
        raise ValueError("generator and discriminator share embeddings: embedding size and vocab must match")
    return (
        embedding_terms(generator, work, "generator.embeddings")
        + layer_terms(generator, work, "generator.layers")
        + mlm_head_terms(generator.hidden, generator.embedding, generator.vocab, work.mlm_rows)
        + embedding_terms(discriminator, work, "discriminator.embeddings")
        + layer_terms(discriminator, work, "discriminator.layers")
        + disc_head_terms(discriminator.hidden, work)
    )


def bert_mlm_terms(encoder: EncoderDims, work: Workload) -> list[Term]:
    if encoder.architecture == "modern":  # ModernBERT's masked-LM (ModernBertForMaskedLM's head)
        return (modern_embedding_terms(encoder, work, "encoder.embeddings")
                + modern_layer_terms(encoder, work, "encoder.layers")
                + [t for t in mlm_head_terms(encoder.hidden, encoder.hidden, encoder.vocab, work.mlm_rows)
                   if t.name != "transform_bias"])
    return (
        embedding_terms(encoder, work, "encoder.embeddings")
        + layer_terms(encoder, work, "encoder.layers")
        + mlm_head_terms(encoder.hidden, encoder.embedding, encoder.vocab, work.mlm_rows)
    )


# ----------------------------------------------------------------------------------------------
# Totals
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward/backward FLOPs of one training step under one convention, with every term kept.

    ``terms`` always hold all kinds (forward, whole step), whatever the convention counts, so one
    breakdown answers both "what does the paper count" (:meth:`forward_of`) and "what is the MFU
    numerator" (:attr:`forward_per_step`).
    """

    model: str  # "electra" or "bert_mlm"
    convention: Convention
    workload: Workload
    terms: tuple[Term, ...]

    @property
    def batch(self) -> int:
        return self.workload.sequences

    @property
    def seq_len(self) -> int:
        return self.workload.seq_len

    @property
    def tokens(self) -> float:
        """Token rows per step: the per-token figures divide by this."""
        return self.workload.tokens

    def forward_of(self, kinds: Iterable[str] = KINDS, component_prefix: str = "") -> float:
        kinds = tuple(kinds)
        return float(sum(t.flops for t in self.terms
                         if t.kind in kinds and t.component.startswith(component_prefix)))

    @property
    def forward_per_step(self) -> float:
        return self.forward_of(self.convention.counted_kinds)

    @property
    def backward_per_step(self) -> float:
        return self.convention.backward_factor * self.forward_per_step

    @property
    def training_per_step(self) -> float:
        return self.forward_per_step + self.backward_per_step

    @property
    def forward_per_token(self) -> float:
        return self.forward_per_step / self.tokens

    @property
    def backward_per_token(self) -> float:
        return self.backward_per_step / self.tokens

    @property
    def training_per_token(self) -> float:
        return self.training_per_step / self.tokens

    @property
    def matmul_forward_per_step(self) -> float:
        return self.forward_of((MATMUL,))

    def training_flops(self, steps: float) -> float:
        return self.training_per_step * steps

    def by_kind(self) -> dict[str, float]:
        out = {kind: 0.0 for kind in KINDS}
        for t in self.terms:
            out[t.kind] += t.flops
        return out

    def by_component(self, kinds: Iterable[str] | None = None) -> dict[str, float]:
        kinds = tuple(kinds or self.convention.counted_kinds)
        out: dict[str, float] = defaultdict(float)
        for t in self.terms:
            if t.kind in kinds:
                out[t.component] += t.flops
        return dict(out)

    def as_dict(self) -> dict:
        return {
            "model": self.model, "convention": self.convention.name, "batch": self.batch, "seq_len": self.seq_len,
            "tokens": self.tokens, "forward_per_step": self.forward_per_step,
            "backward_per_step": self.backward_per_step, "training_per_step": self.training_per_step,
            "forward_per_token": self.forward_per_token, "backward_per_token": self.backward_per_token,
            "training_per_token": self.training_per_token, "forward_by_kind": self.by_kind(),
        }


def _workload(cfg: Config | ModelConfig, seq_len: int | None, batch: int | None,
              lengths: Sequence[int] | None, mlm_rows_per_seq: float | None) -> tuple[ModelConfig, Workload]:
    if isinstance(cfg, Config):
        model_cfg = cfg.model
        seq_len = seq_len or cfg.data.seq_len
        batch = batch or (len(lengths) if lengths is not None else cfg.train.global_batch_size)
        if mlm_rows_per_seq is None:
            # What the model computes: a fixed (batch, max_predictions_per_seq) gather per step.
            mlm_rows_per_seq = max_predictions(cfg.objective.mask_prob, seq_len, cfg.objective.max_predictions_per_seq)
    elif isinstance(cfg, ModelConfig):
        model_cfg = cfg
        if seq_len is None or (batch is None and lengths is None):
            raise ValueError("with a ModelConfig, seq_len and batch (or lengths) must be given")
        batch = batch or len(lengths)
        if mlm_rows_per_seq is None:  # a bare ModelConfig has no objective: the objective's defaults
            objective = ObjectiveConfig()
            mlm_rows_per_seq = max_predictions(objective.mask_prob, seq_len, objective.max_predictions_per_seq)
    else:
        raise TypeError(f"expected a Config or ModelConfig, got {type(cfg).__name__}")
    if seq_len > model_cfg.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} is longer than max_position_embeddings="
                         f"{model_cfg.max_position_embeddings}")
    if not 0 <= mlm_rows_per_seq <= seq_len:
        raise ValueError(f"mlm_rows_per_seq must be in [0, seq_len={seq_len}], got {mlm_rows_per_seq}")
    if lengths is not None:
        if len(lengths) != batch:
            raise ValueError(f"got {len(lengths)} lengths for batch={batch}")
        return model_cfg, Workload.packed(lengths, seq_len, mlm_rows_per_seq)
    return model_cfg, Workload.padded(batch, seq_len, mlm_rows_per_seq)


def electra_flops(cfg: Config | ModelConfig, *, seq_len: int | None = None, batch: int | None = None,
                  convention: str | Convention = "modern", lengths: Sequence[int] | None = None,
                  mlm_rows_per_seq: float | None = None) -> FlopsBreakdown:
    """FLOPs of one ELECTRA training step (generator + discriminator, shared embeddings).

    seq_len / batch default to ``cfg.data.seq_len`` / ``cfg.train.global_batch_size`` (pass the micro
    batch for per-rank figures). ``lengths`` (one per sequence) describes a packed step where only
    real tokens are computed. ``mlm_rows_per_seq`` defaults to the model's fixed gather,
    ``max_predictions_per_seq`` (20 of 128 = the paper's 15.625%); pass ``seq_len`` for a head at every
    position, as Hugging Face's ``ElectraForMaskedLM`` computes.
    """
    model_cfg, work = _workload(cfg, seq_len, batch, lengths, mlm_rows_per_seq)
    terms = electra_terms(EncoderDims.discriminator(model_cfg), EncoderDims.generator(model_cfg), work)
    return FlopsBreakdown("electra", get_convention(convention), work, tuple(terms))


def bert_mlm_flops(cfg: Config | ModelConfig, *, seq_len: int | None = None, batch: int | None = None,
                   convention: str | Convention = "modern", lengths: Sequence[int] | None = None,
                   mlm_rows_per_seq: float | None = None) -> FlopsBreakdown:
    """FLOPs of one BERT masked-LM step at the discriminator's size (same arguments as electra_flops)."""
    model_cfg, work = _workload(cfg, seq_len, batch, lengths, mlm_rows_per_seq)
    terms = bert_mlm_terms(EncoderDims.discriminator(model_cfg), work)
    return FlopsBreakdown("bert_mlm", get_convention(convention), work, tuple(terms))


def training_flops_per_step(cfg: Config | ModelConfig, convention: str | Convention = "modern", *,
                            seq_len: int | None = None, batch: int | None = None,
                            lengths: Sequence[int] | None = None, model: str = "electra") -> float:
    """Forward + backward FLOPs of one optimizer step; the numerator of the trainer's MFU.

    MFU = training_flops_per_step(cfg) x steps/s / peak FLOP/s (modern convention: matmul FLOPs,
    backward 2 x forward; with ``lengths`` only real tokens count, which is what a packed step runs).
    """
    fn = {"electra": electra_flops, "bert_mlm": bert_mlm_flops}.get(model)
    if fn is None:
        raise ValueError(f"model must be 'electra' or 'bert_mlm', got {model!r}")
    return fn(cfg, seq_len=seq_len, batch=batch, convention=convention, lengths=lengths).training_per_step


# ----------------------------------------------------------------------------------------------
# The paper's models (Table 1 and 2) and device peaks
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaperModel:
    kind: str  # "electra" or "bert_mlm"
    hidden: int
    layers: int
    embedding: int
    seq_len: int
    batch: int
    steps: float
    generator_hidden: int = 0  # ELECTRA only; the generator has the discriminator's depth

    def dims(self) -> tuple[EncoderDims, EncoderDims | None]:
        # FFN 4h and h/64 heads, vocab 30522, two token types, dropout everywhere (paper settings).
        def encoder(h: int) -> EncoderDims:
            return EncoderDims(h, self.layers, max(1, h // 64), 4 * h, self.embedding, 30522)

        return encoder(self.hidden), (encoder(self.generator_hidden) if self.kind == "electra" else None)

    def breakdown(self, convention: str | Convention = "paper") -> FlopsBreakdown:
        work = Workload.padded(self.batch, self.seq_len, PAPER_OUTPUT_FRACTION * self.seq_len)
        disc, gen = self.dims()
        terms = electra_terms(disc, gen, work) if self.kind == "electra" else bert_mlm_terms(disc, work)
        return FlopsBreakdown(self.kind, get_convention(convention), work, tuple(terms))

    def training_flops(self, convention: str | Convention = "paper") -> float:
        return self.breakdown(convention).training_flops(self.steps)


PAPER_MODELS: dict[str, PaperModel] = {
    "bert_small": PaperModel("bert_mlm", 256, 12, 128, 128, 128, 1.45e6),
    "electra_small": PaperModel("electra", 256, 12, 128, 128, 128, 1.0e6, generator_hidden=64),
    "bert_base": PaperModel("bert_mlm", 768, 12, 768, 512, 256, 1.0e6),
    "electra_base": PaperModel("electra", 768, 12, 768, 512, 256, 766e3, generator_hidden=256),
    "bert_large": PaperModel("bert_mlm", 1024, 24, 1024, 512, 256, 1.0e6),
    "electra_400k": PaperModel("electra", 1024, 24, 1024, 512, 2048, 400e3, generator_hidden=256),
    "electra_1.75M": PaperModel("electra", 1024, 24, 1024, 512, 2048, 1.75e6, generator_hidden=256),
}

# Train FLOPs as printed in the paper (Table 1: small and base; Table 2: large).
PAPER_REPORTED: dict[str, float] = {
    "bert_small": 1.4e18, "electra_small": 1.4e18, "bert_base": 6.4e19, "electra_base": 6.4e19,
    "bert_large": 1.9e20, "electra_400k": 7.1e20, "electra_1.75M": 3.1e21,
}


def paper_training_flops(convention: str | Convention = "paper") -> dict[str, float]:
    """Total pre-training FLOPs of the paper's seven models, by the paper's method."""
    return {name: m.training_flops(convention) for name, m in PAPER_MODELS.items()}


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name().
# Most specific names first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("A6000", 154.8), ("V100", 125.0),  # V100: fp16 tensor cores (no bf16)
    ("T4", 65.0),  # fp16
)


def peak_tflops_for_device(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None when the name is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def mfu(flops_per_step: float, step_seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s over the device peak (a fraction, not a percent)."""
    if step_seconds <= 0 or peak_tflops <= 0:
        raise ValueError(f"step_seconds and peak_tflops must be positive, got {step_seconds}, {peak_tflops}")
    return flops_per_step / step_seconds / (peak_tflops * 1e12)
