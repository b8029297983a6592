"""The generator's masked-LM head at the gathered (masked) positions: vocabulary projection,
cross-entropy, arg-max accuracy and Gumbel-max sampling, without keeping (M, V) logits.

Reading order: Triton kernels -> launchers -> autograd Function -> public function -> reference.
(The Triton kernels are added by the fused-heads issue; until then the public function runs the
reference on every device.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton  # noqa: F401  (used once the Triton path lands)

IGNORE_INDEX = -100


def mlm_head_loss(hidden, weight, bias, targets, *, temperature: float = 1.0, seed: int = 0):
    """Masked-LM loss, accuracy and sampled replacements at M gathered rows.

    hidden: (M, E) fp32/bf16/fp16, the head's dense+GELU+LayerNorm output at the masked positions.
    weight: (V, E) the tied word-embedding matrix. bias: (V,) or None.
    targets: (M,) int64 original token ids; IGNORE_INDEX (-100) marks unused slots of a fixed-size gather.
    temperature: sampling temperature (> 0; tiny values approach the arg-max). seed: python int for the
    Gumbel noise (same seed, same inputs -> same samples).
    Returns loss: () fp32, mean cross-entropy over used slots (0 when none is used);
    sampled: (M,) int64 draws from softmax(logits / temperature), no gradient;
    correct: (M,) bool, arg-max == target (False on unused slots).
    """
    return mlm_head_loss_ref(hidden, weight, bias, targets, temperature=temperature, seed=seed)


def gumbel_noise_ref(shape, seed: int, device) -> torch.Tensor:
    """-log(-log(U)) with U uniform in (0, 1), from a generator seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    u = torch.rand(shape, generator=gen, device=device, dtype=torch.float32)
    u = u.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - torch.finfo(torch.float32).eps)
    return -torch.log(-torch.log(u))


def mlm_head_loss_ref(hidden, weight, bias, targets, *, temperature: float = 1.0, seed: int = 0):
    """Reference: materialises the (M, V) logits in fp32."""
    logits = F.linear(hidden, weight, bias).float()
    used = targets != IGNORE_INDEX
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = loss_sum / used.sum().clamp(min=1)
    with torch.no_grad():
        noise = gumbel_noise_ref(logits.shape, seed, logits.device)
        sampled = torch.argmax(logits.detach() / max(temperature, 1e-6) + noise, dim=-1)
        correct = (logits.detach().argmax(dim=-1) == targets) & used
    return loss, sampled, correct
