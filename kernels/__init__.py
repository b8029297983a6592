"""electra_kernels: fused Triton kernels for encoder pretraining, each with a PyTorch reference.

Imports torch and triton only. Every public function runs its Triton kernel on CUDA tensors (or on
CPU tensors under ``TRITON_INTERPRET=1``) and its ``*_ref`` reference elsewhere.
"""

from .attention import attention, attention_ref, attention_varlen, attention_varlen_ref
from .bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input
from .disc_head import replaced_token_bce, replaced_token_bce_ref
from .mlm_head import IGNORE_INDEX, mlm_head_loss, mlm_head_loss_ref

__all__ = [
    "IGNORE_INDEX",
    "attention",
    "attention_ref",
    "attention_varlen",
    "attention_varlen_ref",
    "index_first_axis",
    "index_put_first_axis",
    "mlm_head_loss",
    "mlm_head_loss_ref",
    "pad_input",
    "replaced_token_bce",
    "replaced_token_bce_ref",
    "unpad_input",
]
__version__ = "0.1.0"
