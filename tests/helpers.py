"""Small builders shared by tests (tiny configs and batches)."""

from __future__ import annotations

import torch

from electra_fast.config import build_config


def tiny_config(*overrides: str, impl: str = "torch"):
    """The tiny size with the PyTorch reference for every hot spot (kernels have their own tests)."""
    base = [f"model.{hot_spot}_impl={impl}" for hot_spot in ("attention", "mlm_head", "disc_head", "elementwise")]
    return build_config("tiny", overrides=base + list(overrides))


def random_batch(cfg, batch: int = 4, seq_len: int = 32, min_len: int | None = None, seed: int = 0):
    """ELECTRA-shaped batch: [CLS] tokens [SEP] tokens [SEP] [PAD]... with random lengths."""
    gen = torch.Generator().manual_seed(seed)
    m = cfg.model
    first_regular = max(m.pad_token_id, m.unk_token_id, m.cls_token_id, m.sep_token_id, m.mask_token_id) + 1
    input_ids = torch.randint(first_regular, m.vocab_size, (batch, seq_len), generator=gen)
    token_type_ids = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    min_len = min_len or seq_len // 2
    for b in range(batch):
        length = int(torch.randint(min_len, seq_len + 1, (1,), generator=gen)) if b else seq_len
        split = length // 2
        input_ids[b, 0] = m.cls_token_id
        input_ids[b, split] = m.sep_token_id
        input_ids[b, length - 1] = m.sep_token_id
        input_ids[b, length:] = m.pad_token_id
        token_type_ids[b, split + 1:length] = 1
        attention_mask[b, :length] = 1
    return input_ids, attention_mask, token_type_ids


def motif_mlm_losses(cfg, steps: int, lr: float) -> list[float]:
    """The generator's masked-LM loss over ``steps`` AdamW steps of a fresh model on a learnable toy
    language: each of 8 sequences repeats a short random motif. A model that learns at all drops it fast."""
    from electra_fast.model import ElectraPretrainingModel

    torch.manual_seed(0)
    model = ElectraPretrainingModel(cfg)
    gen = torch.Generator().manual_seed(0)
    motifs = torch.randint(5, 40, (8, 4), generator=gen)
    input_ids = motifs.repeat(1, 5)
    input_ids[:, 0], input_ids[:, -1] = cfg.model.cls_token_id, cfg.model.sep_token_id
    attention_mask = torch.ones_like(input_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(input_ids, attention_mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.mlm_loss.item())
    return losses
