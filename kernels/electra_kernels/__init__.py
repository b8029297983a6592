"""electra_kernels: fused Triton kernels for encoder pretraining, each with a PyTorch reference.

Imports torch and triton only. Every public function runs its Triton kernel on CUDA tensors (or on
CPU tensors under ``TRITON_INTERPRET=1``) and its ``*_ref`` reference elsewhere.
"""

from .attention import (
    FusedAttention,
    attention,
    attention_dropout_mask,
    attention_ref,
    attention_varlen,
    attention_varlen_ref,
    rotary_cos_sin,
    rotary_ref,
)
# Registers the fused rotary-attention custom ops (attention.py reaches them lazily, by module path) at
# import, as every other kernel's, so torch.ops.electra_kernels lists them before the first call.
from . import attention_rotary as _attention_rotary  # noqa: F401
from .bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input
from .disc_head import (
    ReplacedTokenBCE,
    replaced_token_bce,
    replaced_token_bce_ref,
    replaced_token_bce_with_stats,
    replaced_token_bce_with_stats_ref,
)
from .mlm_head import IGNORE_INDEX, MLMHeadLoss, mlm_head_loss, mlm_head_loss_ref
from .bias_gelu import LinearGELU, bias_gelu, bias_gelu_ref
from .geglu import GeGLU, geglu, geglu_ref
from .layer_norm import DropoutAddLayerNorm, FusedLayerNorm, layer_norm, layer_norm_ref
from .hf_patch import patch_hf
from ._triton_utils import dropout_keep_probability

__all__ = [
    "DropoutAddLayerNorm",
    "FusedLayerNorm",
    "GeGLU",
    "geglu",
    "geglu_ref",
    "LinearGELU",
    "bias_gelu",
    "bias_gelu_ref",
    "dropout_keep_probability",
    "layer_norm",
    "layer_norm_ref",
    "patch_hf",
    "FusedAttention",
    "IGNORE_INDEX",
    "attention",
    "attention_dropout_mask",
    "attention_ref",
    "attention_varlen",
    "attention_varlen_ref",
    "rotary_cos_sin",
    "rotary_ref",
    "index_first_axis",
    "index_put_first_axis",
    "MLMHeadLoss",
    "mlm_head_loss",
    "mlm_head_loss_ref",
    "pad_input",
    "ReplacedTokenBCE",
    "replaced_token_bce",
    "replaced_token_bce_ref",
    "replaced_token_bce_with_stats",
    "replaced_token_bce_with_stats_ref",
    "unpad_input",
]
__version__ = "0.1.0"
