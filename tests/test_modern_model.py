"""The modern backbone inside the ELECTRA model: kernel and reference paths, the last-layer subset, the layout."""

import pytest
import torch

from electra_fast.config import build_config
from electra_fast.model import ElectraPretrainingModel, backbone_for
from electra_fast.modern import ModernBody

from helpers import motif_mlm_losses, random_batch

NO_DROPOUT = ("model.dropout=0.0", "model.attention_dropout=0.0")


def modern_config(*overrides: str, impl: str = "torch"):
    base = [f"model.{hot}_impl={impl}" for hot in ("attention", "mlm_head", "disc_head", "elementwise")]
    return build_config("modern-tiny", overrides=base + list(NO_DROPOUT) + list(overrides))


def _step(model, batch):
    out = model(*batch)
    model.zero_grad()
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_architecture_is_chosen_in_one_place():
    model = ElectraPretrainingModel(modern_config())
    assert isinstance(model.generator, ModernBody) and isinstance(model.discriminator, ModernBody)
    assert backbone_for(model.config).body is ModernBody
    assert model.config.generator_num_layers == 2 and model.config.generator_hidden_size == 64
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters()
                   if n.startswith(("generator.", "discriminator.", "embeddings.")))


@pytest.mark.parametrize("unpad", [True, False])
def test_kernel_path_matches_reference(unpad):
    """Attention (rotary + window, Triton interpreter) and the elementwise kernels (bias-free LayerNorm,
    GeGLU) against the reference path; the heads stay on the reference in both, so the samples are the
    same and every loss and every gradient is compared (tolerances of the existing kernel-path rule)."""
    reference = ElectraPretrainingModel(modern_config(f"model.unpad={unpad}"))
    fused = ElectraPretrainingModel(modern_config(f"model.unpad={unpad}", "model.attention_impl=triton",
                                                  "model.elementwise_impl=triton"))
    fused.load_state_dict(reference.state_dict())
    batch = random_batch(modern_config(), batch=3, seq_len=24, min_len=6)
    assert fused._layout(batch[1]).packed == unpad and fused._layout(batch[1]).attention_kernel
    (a, grads_a), (b, grads_b) = _step(reference, batch), _step(fused, batch)
    for name in ("mlm_loss", "disc_loss", "loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-4, rtol=1e-4, msg=name)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-4, rtol=1e-3, msg=name)


def test_all_kernels_generator_matches_reference():
    """Every hot spot on Triton, heads included (the existing rule: the discriminator sees other samples)."""
    reference = ElectraPretrainingModel(modern_config())
    fused = ElectraPretrainingModel(modern_config(impl="triton"))
    fused.load_state_dict(reference.state_dict())
    batch = random_batch(modern_config(), batch=2, seq_len=20)
    (a, grads_a), (b, grads_b) = _step(reference, batch), _step(fused, batch)
    torch.testing.assert_close(a.mlm_loss, b.mlm_loss, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(b.disc_loss)
    for name in grads_a:
        if name.startswith("generator"):
            torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-4, rtol=1e-3, msg=name)


# generator depth 2 (last layer sliding) and 1 (last layer global)
@pytest.mark.parametrize("layers", [4, 2])
def test_last_layer_subset_matches_the_full_layer(layers):
    full = ElectraPretrainingModel(modern_config(f"model.num_layers={layers}", "model.last_layer_subset=false"))
    subset = ElectraPretrainingModel(modern_config(f"model.num_layers={layers}"))
    subset.load_state_dict(full.state_dict())
    batch = random_batch(modern_config(), batch=3, seq_len=32, min_len=10)
    (a, grads_a), (b, grads_b) = _step(full, batch), _step(subset, batch)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_never_reaches_real_tokens():
    """Real tokens' outputs do not depend on what the padding holds (windows that see only padding
    included), and nothing is NaN."""
    model = ElectraPretrainingModel(modern_config()).eval()
    ids, mask, types = random_batch(modern_config(), batch=2, seq_len=48, min_len=4)
    mask[1, 3:] = 0
    other = ids.clone()
    other[~mask.bool()] = 7
    with torch.no_grad():
        a, b = model.discriminator_logits(ids, mask), model.discriminator_logits(other, mask)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-6, rtol=0)


def test_tiny_modern_model_learns():
    losses = motif_mlm_losses(modern_config("model.num_layers=2"), steps=60, lr=3e-3)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10


def test_activation_checkpointing_gives_the_same_gradients():
    plain = ElectraPretrainingModel(modern_config())
    recomputed = ElectraPretrainingModel(modern_config("model.activation_checkpointing=true"))
    recomputed.load_state_dict(plain.state_dict())
    batch = random_batch(modern_config(), batch=2, seq_len=24)
    (a, grads_a), (b, grads_b) = _step(plain, batch), _step(recomputed, batch)
    torch.testing.assert_close(a.loss, b.loss, atol=0, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("size", ["modern-tiny", "modern-small", "modern-base", "modern-large"])
def test_shipped_modern_configs_are_their_named_sizes(size):
    from pathlib import Path

    from electra_fast.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"modern-electra-{size.split('-')[1]}.yaml"
    shipped, named = load_config(path), build_config(size)
    assert shipped.model.architecture == "modern"
    for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "generator_num_layers",
                "generator_hidden_size", "local_attention", "global_attn_every_n_layers", "max_position_embeddings"):
        assert getattr(shipped.model, key) == getattr(named.model, key), key
    assert shipped.data.seq_len == named.data.seq_len
