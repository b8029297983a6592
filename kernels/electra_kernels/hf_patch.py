"""Run an existing Hugging Face BERT / RoBERTa / ELECTRA model on electra_kernels, weights untouched.

    from transformers import BertForMaskedLM
    import electra_kernels

    model = BertForMaskedLM.from_pretrained("bert-base-uncased").cuda()
    model, replaced = electra_kernels.patch_hf(model)
    print("\\n".join(replaced))          # what became what

How it hooks in (transformers >= 5: the BERT family dispatches attention through
``AttentionInterface`` and builds masks through ``AttentionMaskInterface``, both keyed by
``config._attn_implementation``):

* Attention. An ``"electra_kernels"`` entry is registered in both interfaces and the model's
  ``_attn_implementation`` is set to it. The mask entry hands attention the plain (batch, kv) boolean
  padding mask, skipping the (batch, 1, q, kv) expansion; the attention entry calls
  :func:`electra_kernels.attention` with it. A 4-D mask a caller builds itself is accepted when it is pure
  key padding (checked on its values) and refused otherwise, as is any mask function other than plain
  bidirectional padding (e.g. the causal mask of a decoder).
* ``*SelfOutput`` / ``*Output`` (dense -> dropout -> + residual -> LayerNorm) become one module with the
  same children (``dense``, ``dropout``, ``LayerNorm``) whose last three steps are one
  :func:`electra_kernels.layer_norm` call (dropout mask drawn in-kernel).
* ``*Intermediate`` with exact GELU (dense -> gelu) adds the bias inside :func:`electra_kernels.bias_gelu`.
* Every other ``nn.LayerNorm`` (embeddings, MLM-head transform) becomes :class:`FusedLayerNorm`.

Parameters are the same ``nn.Parameter`` objects (optimizer state and tied weights stay valid), and module
and parameter names do not change, so state dicts load either way. ``model.config`` is modified in
place (``_attn_implementation``; it is not written to config.json).

What it refuses, with a ValueError: model types other than bert/roberta/electra; relative position
embeddings; ``output_attentions=True`` in the config (and, at call time, a forward asked for attentions:
the kernels never materialise attention probabilities);
decoders and cross-attention; head dims above 128. The head-dim limit is the Triton kernel's (any head
dim up to 128 runs; 32, 64 and 128 are the fast, register-exact ones) and is applied on every device, CPU
included (where the PyTorch reference would cope), so that a model patched on a CPU box does not fail
later on the GPU.

Under autocast, the fused LayerNorm writes the dtype of its inputs (fp32 when the residual stream is fp32,
as in HF's post-LN blocks) rather than always fp32 as ``nn.LayerNorm`` does; the numerics are fp32 either way.

This file imports transformers only inside :func:`patch_hf`.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, attention_varlen
from .bias_gelu import bias_gelu
from . import hf_bert_unpadded, hf_modernbert_unpadded, hf_unpadding
from .hf_patch_modernbert import FusedModernBertAttention, check_modernbert_config, modernbert_swaps
from .layer_norm import FusedLayerNorm, layer_norm

try:  # the attention kernel's own limit (it pads other head dims up to a power of two in registers)
    from .attention import MAX_HEAD_DIM
except ImportError:  # pragma: no cover - older attention.py
    MAX_HEAD_DIM = 128

IMPLEMENTATION_NAME = "electra_kernels"
# The base models whose forward patch_hf replaces with an unpadded one (exact classes: a subclass may have
# changed forward).
_UNPADDED_BERT_MODELS = ("BertModel", "RobertaModel", "ElectraModel")
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "electra", "modernbert")
# Additive masks hold 0 where attending and a large negative number where not (finfo.min in
# transformers 5, -10000 in old BERT code); anything in between is an attention bias we cannot honour.
_BLOCKED_BELOW = -1.0e4 + 1.0


# --------------------------------------------------------------------------------------------------
# Replacement modules (same children, same parameter names)
# --------------------------------------------------------------------------------------------------
class FusedDenseDropoutAddLayerNorm(nn.Module):
    """``LayerNorm(dropout(dense(h)) + residual)`` with dropout, add and LayerNorm in one kernel.

    Replaces ``BertSelfOutput`` / ``BertOutput`` (and the RoBERTa / ELECTRA copies); keeps their children
    ``dense``, ``dropout`` (its ``p`` is read at every call) and ``LayerNorm``.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.dense = original.dense
        self.dropout = original.dropout
        self.LayerNorm = to_fused_layer_norm(original.LayerNorm)
        self.replaces = type(original).__name__

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        norm = self.LayerNorm
        dropout_p = self.dropout.p if self.training else 0.0
        return layer_norm(self.dense(hidden_states), norm.weight, norm.bias, norm.eps, residual=input_tensor,
                          dropout_p=dropout_p)

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}"


class FusedDenseBiasGELU(nn.Module):
    """``gelu(dense(h))`` with the dense layer's bias added inside the GELU kernel.

    Replaces ``BertIntermediate`` (exact-GELU configurations only); keeps ``dense`` and
    ``intermediate_act_fn``.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.dense = original.dense
        self.intermediate_act_fn = original.intermediate_act_fn
        self.replaces = type(original).__name__

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return bias_gelu(F.linear(hidden_states, self.dense.weight), self.dense.bias)

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}"


def to_fused_layer_norm(norm: nn.LayerNorm) -> FusedLayerNorm:
    """A :class:`FusedLayerNorm` holding ``norm``'s own parameter objects."""
    fused = FusedLayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                           bias=norm.bias is not None, device="meta")
    fused.weight = norm.weight
    fused.bias = norm.bias
    fused.train(norm.training)
    return fused


# --------------------------------------------------------------------------------------------------
# The functions registered with transformers
# --------------------------------------------------------------------------------------------------
def _key_padding_from_mask(attention_mask: Optional[torch.Tensor], batch: int, kv_length: int):
    """The (batch, kv) bool key-padding mask (True = attend) behind whatever mask the model built."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, kv_length):
            raise ValueError(f"electra_kernels attention: padding mask of shape {tuple(attention_mask.shape)}, "
                             f"expected ({batch}, {kv_length})")
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    if attention_mask.dim() != 4:
        raise ValueError(f"electra_kernels attention: cannot use a {attention_mask.dim()}-D attention mask")
    # A caller-built 4-D mask (batch|1, heads|1, q|1, kv): usable only when it is key padding.
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        blocked = attention_mask <= _BLOCKED_BELOW
        if not torch.all((attention_mask == 0) | blocked):
            raise ValueError("electra_kernels attention: the 4-D attention mask holds values other than 0 and a "
                             "large negative number, i.e. an attention bias; only key-padding masks are supported")
        allowed = ~blocked
    key_mask = allowed[:, 0, 0, :]
    if not torch.equal(allowed, key_mask[:, None, None, :].expand_as(allowed)):
        raise ValueError("electra_kernels attention: the 4-D attention mask differs between queries or heads; "
                         "only key-padding masks (the same row for every query) are supported")
    return key_mask.expand(batch, kv_length)


def electra_kernels_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An ``AttentionInterface`` function: query/key/value (batch, heads, seq, head_dim), returns
    ((batch, seq, heads, head_dim) output, None) like transformers' own implementations."""
    if kwargs.get("output_attentions"):
        raise ValueError("electra_kernels attention never materialises attention probabilities: "
                         "output_attentions=True is not supported on a patched model")
    if getattr(module, "is_causal", False):
        raise ValueError("electra_kernels attention is bidirectional only; this module is causal")
    if kwargs.get("sliding_window") is not None:  # patch_hf replaces the modules that window (ModernBERT)
        raise ValueError("electra_kernels attention function: sliding_window is only supported through "
                         "patch_hf's own modules")
    if key.shape[2] != query.shape[2]:
        raise ValueError("electra_kernels attention: query and key lengths differ (cross-attention or a cache)")
    if kwargs.get("cu_seqlens") is not None:  # one packed row from an unpadded forward (hf_unpadding.py)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total_tokens, heads, head_dim)
        out = attention_varlen(q, k, v, kwargs["cu_seqlens"], kwargs["max_seqlen"], dropout_p=dropout,
                               softmax_scale=scaling)
        return out[None], None
    key_padding_mask = _key_padding_from_mask(attention_mask, query.shape[0], key.shape[2])
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), key_padding_mask,
                    dropout_p=dropout, softmax_scale=scaling)
    return out, None


def electra_kernels_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                         attention_mask=None, **kwargs):
    """An ``AttentionMaskInterface`` function: the 2-D padding mask itself (None without padding input)."""
    # By name, not identity: no import here, so torch.compile traces this function without a break.
    # A bidirectional sliding-window mask (ModernBERT's local layers: and_mask of the window overlay and the
    # bidirectional mask, local_size set, no extra overlay) also reduces to the padding mask: the patched
    # attention module applies its window in the kernel.
    sliding = (getattr(mask_function, "__name__", None) == "and_mask" and kwargs.get("local_size") is not None
               and not kwargs.get("use_vmap", False))
    if (mask_function is not None and not sliding
            and getattr(mask_function, "__name__", None) != "bidirectional_mask_function"):
        raise ValueError("electra_kernels attention supports plain bidirectional padding masks only, not "
                         f"{getattr(mask_function, '__name__', mask_function)!r} (causal, sliding or custom masks)")
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


# --------------------------------------------------------------------------------------------------
# patch_hf
# --------------------------------------------------------------------------------------------------
def _check_config(config, geglu: bool = True) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"patch_hf supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    if model_type == "modernbert":
        check_modernbert_config(config, geglu, MAX_HEAD_DIM)
        return
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        raise ValueError(f"patch_hf: position_embedding_type={position_type!r} adds relative-position scores "
                         "inside attention, which the kernel does not compute; only 'absolute' is supported")
    if getattr(config, "output_attentions", False):
        raise ValueError("patch_hf: output_attentions=True needs the attention probabilities, which the fused "
                         "kernel never materialises; set config.output_attentions=False")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("patch_hf: decoder / cross-attention configurations (is_decoder, add_cross_attention) "
                         "are not supported; the kernels are bidirectional self-attention only")
    hidden, heads = config.hidden_size, config.num_attention_heads
    if hidden % heads:
        raise ValueError(f"patch_hf: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if hidden // heads > MAX_HEAD_DIM:
        raise ValueError(f"patch_hf: head dim {hidden // heads} (hidden_size {hidden} / {heads} heads) is larger "
                         f"than the Triton attention kernel supports ({MAX_HEAD_DIM})")


def _import_transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("patch_hf needs transformers (pip install 'electra-fast[hf]')") from err
    try:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError as err:
        raise ValueError(f"patch_hf needs a transformers whose BERT models dispatch attention through "
                         f"AttentionInterface / AttentionMaskInterface (5.x); found {transformers.__version__}"
                         ) from err
    return transformers, AttentionInterface, AttentionMaskInterface


def _select_electra_kernels_attention(model: nn.Module, attention_interface, mask_interface) -> None:
    """Register the "electra_kernels" attention and mask functions and make them the model's."""
    attention_interface.register(IMPLEMENTATION_NAME, electra_kernels_attention)
    mask_interface.register(IMPLEMENTATION_NAME, electra_kernels_mask)
    config = model.config
    if hasattr(model, "set_attn_implementation"):  # the public way: validates, updates sub-models
        model.set_attn_implementation(IMPLEMENTATION_NAME)
    else:
        config._attn_implementation = IMPLEMENTATION_NAME
    if config._attn_implementation != IMPLEMENTATION_NAME:
        raise ValueError(f"patch_hf: {type(model).__name__} did not accept attention implementation "
                         f"{IMPLEMENTATION_NAME!r} (it kept {config._attn_implementation!r})")


def _is_self_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("SelfAttention") and all(hasattr(module, a) for a in ("query", "key", "value"))


def _is_dense_dropout_add_norm(module: nn.Module) -> bool:
    # Only the exact HF classes: a user subclass may have changed forward.
    names = {f"{prefix}{suffix}" for prefix in ("Bert", "Roberta", "Electra") for suffix in ("SelfOutput", "Output")}
    return (type(module).__name__ in names
            and isinstance(getattr(module, "dense", None), nn.Linear)
            and isinstance(getattr(module, "dropout", None), nn.Dropout)
            and type(getattr(module, "LayerNorm", None)) is nn.LayerNorm
            and len(module.LayerNorm.normalized_shape) == 1)


def _is_exact_gelu(act) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    if type(act).__name__ == "GELUActivation":  # transformers.activations, ACT2FN["gelu"]
        return getattr(act, "act", None) is F.gelu
    return act is F.gelu


def _is_dense_gelu(module: nn.Module) -> bool:
    return (type(module).__name__ in {"BertIntermediate", "RobertaIntermediate", "ElectraIntermediate"}
            and isinstance(getattr(module, "dense", None), nn.Linear)
            and _is_exact_gelu(getattr(module, "intermediate_act_fn", None)))


def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def _bert_swaps(model: nn.Module, layer_norm: bool, bias_gelu: bool) -> list:
    """(path, old, new, description) for the BERT family's output and intermediate blocks."""
    swaps = []
    for path, module in model.named_modules():
        if layer_norm and _is_dense_dropout_add_norm(module):
            swaps.append((path, module, FusedDenseDropoutAddLayerNorm(module),
                          "FusedDenseDropoutAddLayerNorm (dropout + residual + LayerNorm in one layer_norm kernel)"))
        elif bias_gelu and _is_dense_gelu(module):
            swaps.append((path, module, FusedDenseBiasGELU(module),
                          "FusedDenseBiasGELU (bias + GELU in one bias_gelu kernel)"))
    return swaps


def patch_hf(model: nn.Module, *, attention: bool = True, layer_norm: bool = True, bias_gelu: bool = True,
             geglu: bool = True, unpad: bool = True):
    """Make a Hugging Face BERT / RoBERTa / ELECTRA / ModernBERT model run on electra_kernels, in place.

    model: a transformers ``PreTrainedModel`` of model_type bert, roberta, electra or modernbert (any head).
    attention / layer_norm / bias_gelu / geglu: which replacements to make (all by default; bias_gelu
    applies to the BERT family, geglu to ModernBERT's MLP; see electra_kernels/hf_patch_modernbert.py).
    unpad (with attention): the base model (BertModel, RobertaModel, ElectraModel, ModernBertModel) runs its
    layers on the real tokens only, packed, through the varlen attention kernels, and returns padded
    outputs with zeros at padding positions (electra_kernels/hf_unpadding.py); False keeps the padded
    layout (padding positions then hold whatever the layers computed for them).
    Returns ``(model, replaced)``: the same model object, and one line per replaced module
    (``"<module path>: <old> -> <new>"``). Raises ValueError for configurations it cannot honour (see the
    module docstring) before changing anything.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"patch_hf expects a Hugging Face PreTrainedModel, got {type(model).__name__}")
    _check_config(config, geglu)
    replaced: list[str] = []
    modernbert = config.model_type == "modernbert"

    if modernbert:
        swaps = modernbert_swaps(model, attention, geglu)
        if attention:
            if not any(isinstance(new, FusedModernBertAttention) for _, _, new, _ in swaps):
                raise ValueError(f"patch_hf: found no ModernBertAttention module in {type(model).__name__}")
            _select_electra_kernels_attention(model, *_import_transformers()[1:])
    elif attention:
        transformers, attention_interface, mask_interface = _import_transformers()
        self_attention = [(path, m) for path, m in model.named_modules() if _is_self_attention(m)]
        if not self_attention:
            raise ValueError(f"patch_hf: found no self-attention module in {type(model).__name__}")
        for path, module in self_attention:
            namespace = sys.modules[type(module).__module__].__dict__
            if "ALL_ATTENTION_FUNCTIONS" not in namespace:
                raise ValueError(f"patch_hf: {type(module).__name__} (transformers {transformers.__version__}) does "
                                 "not dispatch through AttentionInterface; transformers 5.x is needed")
            if getattr(module, "is_causal", False):
                raise ValueError(f"patch_hf: {path} is causal; only bidirectional encoders are supported")
        previous = config._attn_implementation
        _select_electra_kernels_attention(model, attention_interface, mask_interface)
        for path, module in self_attention:
            replaced.append(f"{path}: {type(module).__name__} attention function {previous!r} -> "
                            "electra_kernels.attention")

    if not modernbert:
        swaps = _bert_swaps(model, layer_norm, bias_gelu)
    handled = {id(m) for _, m, _, _ in swaps}
    if layer_norm:
        inside_handled = {id(m.LayerNorm) for _, m, _, _ in swaps if hasattr(m, "LayerNorm")}
        for path, module in model.named_modules():
            if type(module) is nn.LayerNorm and id(module) not in inside_handled and id(module) not in handled:
                swaps.append((path, module, to_fused_layer_norm(module), "FusedLayerNorm"))
    for path, old, new, what in swaps:
        new.train(old.training)
        _set_child(model, path, new)
        replaced.append(f"{path}: {type(old).__name__} -> {what}")
    if attention and unpad:
        for path, module in model.named_modules():
            name = type(module).__name__
            forward = (hf_modernbert_unpadded.unpadded_forward if name == "ModernBertModel"
                       else hf_bert_unpadded.unpadded_forward if name in _UNPADDED_BERT_MODELS else None)
            if forward is not None and hf_unpadding.install(module, forward):
                replaced.append(f"{path or '(model)'}: {name}.forward -> unpadded (real tokens only, packed; "
                                "varlen attention kernels)")
    return model, replaced
