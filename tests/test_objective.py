import math

import pytest
import torch
from scipy import stats

from electra_fast.config import max_predictions
from electra_fast.objective import mask_tokens, replace_tokens
from electra_kernels import IGNORE_INDEX, mlm_head_loss_ref

from helpers import random_batch, tiny_config


def _mask(cfg, input_ids, attention_mask, seed=0, mask_prob=0.15, max_pred=None, ratio=0.85):
    gen = torch.Generator().manual_seed(seed)
    m = cfg.model
    return mask_tokens(
        input_ids, attention_mask, mask_prob=mask_prob, mask_token_ratio=ratio,
        max_predictions_per_seq=max_pred or max_predictions(mask_prob, input_ids.shape[1]),
        special_ids=(m.cls_token_id, m.sep_token_id, m.pad_token_id), mask_token_id=m.mask_token_id, generator=gen,
    )


def test_counts_and_never_special_tokens():
    cfg = tiny_config()
    input_ids, attention_mask, _ = random_batch(cfg, batch=64, seq_len=64, min_len=5)
    masked = _mask(cfg, input_ids, attention_mask)
    real = attention_mask.sum(1)
    expected = torch.round(real.float() * 0.15).long().clamp(1, max_predictions(0.15, 64))
    assert torch.equal(masked.valid.sum(1), expected)
    chosen = input_ids.gather(1, masked.positions)[masked.valid]
    m = cfg.model
    assert not torch.isin(chosen, torch.tensor([m.cls_token_id, m.sep_token_id, m.pad_token_id])).any()
    # chosen positions within a sequence are distinct and are real tokens
    for b in range(input_ids.shape[0]):
        pos = masked.positions[b][masked.valid[b]]
        assert pos.unique().numel() == pos.numel()
        assert attention_mask[b, pos].all()
    # targets: the original ids at valid slots, IGNORE_INDEX elsewhere
    targets = masked.targets.view_as(masked.positions)
    assert torch.equal(targets[masked.valid], chosen)
    assert (targets[~masked.valid] == IGNORE_INDEX).all()


def test_mask_token_ratio_and_kept_tokens():
    cfg = tiny_config()
    input_ids, attention_mask, _ = random_batch(cfg, batch=256, seq_len=64)
    masked = _mask(cfg, input_ids, attention_mask)
    at_chosen = masked.generator_input_ids.gather(1, masked.positions)[masked.valid]
    originals = input_ids.gather(1, masked.positions)[masked.valid]
    is_mask = at_chosen == cfg.model.mask_token_id
    assert torch.equal(at_chosen[~is_mask], originals[~is_mask])  # the rest keep their token (no random token)
    n = is_mask.numel()
    assert abs(is_mask.float().mean().item() - 0.85) < 4 * math.sqrt(0.85 * 0.15 / n)
    # nothing outside the chosen positions changes
    untouched = torch.ones_like(input_ids, dtype=torch.bool)
    untouched.scatter_(1, masked.positions, masked.valid.logical_not() & untouched.gather(1, masked.positions))
    assert torch.equal(masked.generator_input_ids[untouched], input_ids[untouched])


def test_positions_are_uniform_over_candidates():
    cfg = tiny_config()
    input_ids, attention_mask, _ = random_batch(cfg, batch=1, seq_len=40)
    input_ids = input_ids.expand(4000, -1).contiguous()
    attention_mask = attention_mask.expand(4000, -1).contiguous()
    masked = _mask(cfg, input_ids, attention_mask)
    counts = torch.bincount(masked.positions[masked.valid], minlength=40).float()
    candidates = [p for p in range(40) if input_ids[0, p] not in (cfg.model.cls_token_id, cfg.model.sep_token_id)]
    assert counts[[p for p in range(40) if p not in candidates]].sum() == 0
    assert stats.chisquare(counts[candidates].numpy()).pvalue > 1e-4


def test_same_seed_same_masks():
    cfg = tiny_config()
    batch = random_batch(cfg)
    a, b, c = _mask(cfg, *batch[:2], seed=1), _mask(cfg, *batch[:2], seed=1), _mask(cfg, *batch[:2], seed=2)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.generator_input_ids, b.generator_input_ids)
    assert not torch.equal(a.positions, c.positions)


def test_replaced_label_only_where_sample_differs():
    cfg = tiny_config()
    input_ids, attention_mask, _ = random_batch(cfg, batch=8, seq_len=32)
    masked = _mask(cfg, input_ids, attention_mask)
    originals = input_ids.gather(1, masked.positions)
    sampled = originals.clone()
    sampled[:, 0] = (sampled[:, 0] + 1) % cfg.model.vocab_size  # first slot of each row changes
    disc_ids, is_replaced = replace_tokens(input_ids, masked, sampled.reshape(-1))
    assert is_replaced.sum() == masked.valid[:, 0].sum()  # the unchanged samples are labelled original
    rows = torch.arange(8)
    assert is_replaced[rows, masked.positions[:, 0]].all()
    assert torch.equal(disc_ids[~is_replaced], input_ids[~is_replaced])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_follows_softmax_and_is_detached(temperature):
    vocab, rows = 7, 20000
    weight = torch.randn(vocab, 4, requires_grad=True)
    hidden = torch.randn(1, 4).expand(rows, -1).contiguous().requires_grad_(True)
    targets = torch.zeros(rows, dtype=torch.long)
    loss, sampled, _ = mlm_head_loss_ref(hidden, weight, None, targets, temperature=temperature, seed=3)
    assert not sampled.requires_grad and sampled.dtype == torch.int64
    probs = torch.softmax((hidden[0] @ weight.T).detach().double() / temperature, -1)
    observed = torch.bincount(sampled, minlength=vocab).double().numpy()
    assert stats.chisquare(observed, (probs.double() * rows).numpy()).pvalue > 1e-4
    assert loss.requires_grad
