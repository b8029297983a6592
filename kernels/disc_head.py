"""The discriminator's per-token replaced/original logit fused with masked binary cross-entropy.

Reading order: Triton kernels -> launchers -> autograd Function -> public function -> reference.
(The Triton kernels are added by the fused-heads issue; until then the public function runs the
reference on every device.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton  # noqa: F401  (used once the Triton path lands)


def replaced_token_bce(hidden, weight, bias, labels, mask):
    """Replaced-token detection loss.

    hidden: (N, H) after the discriminator head's dense + GELU. weight: (1, H). bias: (1,) or None.
    labels: (N,) 0/1 (1 = replaced), any integer or float dtype. mask: (N,) bool, True = real token.
    Returns loss: () fp32 mean BCE-with-logits over masked-in tokens (0 when none),
    logits: (N,) fp32 = hidden·weightᵀ + bias.
    """
    return replaced_token_bce_ref(hidden, weight, bias, labels, mask)


def replaced_token_bce_ref(hidden, weight, bias, labels, mask):
    logits = F.linear(hidden, weight, bias).squeeze(-1).float()
    per_token = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    mask_f = mask.to(per_token.dtype)
    loss = (per_token * mask_f).sum() / mask_f.sum().clamp(min=1.0)
    return loss, logits
