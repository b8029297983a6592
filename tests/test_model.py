import pytest
import torch

from electra_fast.model import ElectraPretrainingModel

from helpers import motif_mlm_losses, random_batch, tiny_config


def test_shapes_and_outputs():
    cfg = tiny_config()
    model = ElectraPretrainingModel(cfg)
    input_ids, attention_mask, token_type_ids = random_batch(cfg, batch=3, seq_len=24)
    out = model(input_ids, attention_mask, token_type_ids)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    expected = cfg.objective.gen_weight * out.mlm_loss + cfg.objective.disc_weight * out.disc_loss
    assert torch.allclose(out.loss.detach(), expected)
    for key in ("gen_accuracy", "disc_accuracy", "disc_precision", "disc_recall"):
        assert 0.0 <= out.metrics[key].item() <= 1.0
    assert model.discriminator_logits(input_ids, attention_mask).shape == (3, 24)
    assert model.generator_logits(input_ids, attention_mask).shape == (3, 24, cfg.model.vocab_size)


def test_embeddings_are_shared_once():
    cfg = tiny_config()
    model = ElectraPretrainingModel(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert sum("word_embeddings" in n for n in names) == 1
    assert not any(n.startswith(("generator.embeddings.", "discriminator.embeddings.")) for n in names)
    # both networks project from the shared embedding width
    assert not hasattr(model.generator, "embeddings_project")  # tiny: generator width == embedding width
    assert model.discriminator.embeddings_project.out_features == cfg.model.hidden_size
    # the shared matrix gets gradient from the generator's MLM head and from both encoders
    out = model(*random_batch(cfg))
    grads = torch.autograd.grad(out.loss, [
        model.embeddings.word_embeddings.weight, model.generator_lm_head_bias])
    assert all(g.abs().sum() > 0 for g in grads)


def test_generator_and_discriminator_sizes():
    cfg = tiny_config()
    model = ElectraPretrainingModel(cfg)
    assert model.generator.hidden_size == cfg.model.generator_hidden_size == 32
    assert len(model.generator.encoder.layer) == len(model.discriminator.encoder.layer) == cfg.model.num_layers
    assert model.generator.encoder.layer[0].intermediate.dense.out_features == 4 * 32


def test_sequence_longer_than_position_table_is_a_clear_error():
    cfg = tiny_config()
    model = ElectraPretrainingModel(cfg)
    too_long = torch.full((1, cfg.model.max_position_embeddings + 1), 7)
    with pytest.raises(ValueError, match="longer than the position table"):
        model(too_long)


def test_seeded_forward_is_reproducible():
    cfg = tiny_config()
    batch = random_batch(cfg)
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = ElectraPretrainingModel(cfg)
        losses.append(model(*batch).loss)
    assert torch.equal(losses[0], losses[1])


def test_padding_does_not_change_real_tokens():
    cfg = tiny_config("model.dropout=0.0", "model.attention_dropout=0.0")
    model = ElectraPretrainingModel(cfg).eval()
    input_ids, attention_mask, token_type_ids = random_batch(cfg, batch=2, seq_len=20, min_len=10)
    length = int(attention_mask[1].sum())
    alone = model.discriminator_logits(input_ids[1:, :length], attention_mask[1:, :length], token_type_ids[1:, :length])
    padded = model.discriminator_logits(input_ids, attention_mask, token_type_ids)[1:, :length]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_matches():
    cfg = tiny_config("model.dropout=0.0", "model.attention_dropout=0.0")
    batch = random_batch(cfg)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg.model.activation_checkpointing = checkpointing
        model = ElectraPretrainingModel(cfg)
        loss = model(*batch).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_packed_layout_matches_padded():
    """The unpadded (varlen) encoder path gives the padded path's logits and loss."""
    padded_cfg = tiny_config("model.dropout=0.0", "model.attention_dropout=0.0")
    # Triton attention (interpreter on CPU) switches the encoders to the packed layout; the heads stay on
    # the reference so both models draw the same samples.
    packed_cfg = tiny_config("model.dropout=0.0", "model.attention_dropout=0.0", "model.attention_impl=triton",
                             "model.elementwise_impl=triton")
    torch.manual_seed(0)
    padded = ElectraPretrainingModel(padded_cfg)
    packed = ElectraPretrainingModel(packed_cfg)
    packed.load_state_dict(padded.state_dict())
    batch = random_batch(padded_cfg, batch=3, seq_len=16)
    assert packed._layout(batch[1]).packed and not padded._layout(batch[1]).packed
    a = padded.discriminator_logits(*batch)
    b = packed.discriminator_logits(*batch)
    mask = batch[1].bool()
    torch.testing.assert_close(a[mask], b[mask], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(padded(*batch).disc_loss, packed(*batch).disc_loss, atol=2e-4, rtol=2e-4)


def test_tiny_model_learns_within_100_steps():
    losses = motif_mlm_losses(tiny_config("model.dropout=0.0", "model.attention_dropout=0.0"), steps=100, lr=2e-3)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10


def test_all_triton_hot_spots_match_reference(monkeypatch):
    """Every hot spot on its Triton kernel (interpreter on CPU) against the all-reference model: both
    losses and every gradient, generator and discriminator.

    Kernel and reference draw their Gumbel noise differently, so both MLM heads are wrapped to hand the
    discriminator the same replacement ids (a fixed function of the targets): its input, loss and
    gradients must then agree too."""
    import electra_kernels

    def same_samples(head):
        def wrapped(hidden, weight, bias, targets, **kwargs):
            loss, _, correct = head(hidden, weight, bias, targets, **kwargs)
            return loss, (targets.clamp(min=0) * 7 + 3) % weight.shape[0], correct
        return wrapped

    monkeypatch.setattr(electra_kernels, "mlm_head_loss", same_samples(electra_kernels.mlm_head_loss))
    monkeypatch.setattr(electra_kernels, "mlm_head_loss_ref", same_samples(electra_kernels.mlm_head_loss_ref))
    torch_cfg = tiny_config("model.dropout=0.0", "model.attention_dropout=0.0")
    triton_cfg = tiny_config("model.dropout=0.0", "model.attention_dropout=0.0", impl="triton")
    torch.manual_seed(0)
    reference = ElectraPretrainingModel(torch_cfg)
    fused = ElectraPretrainingModel(triton_cfg)
    fused.load_state_dict(reference.state_dict())
    batch = random_batch(torch_cfg, batch=2, seq_len=16)
    outs = []
    for model in (reference, fused):
        out = model(*batch)
        model.zero_grad()
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].mlm_loss, outs[1].mlm_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0].disc_loss, outs[1].disc_loss, atol=1e-4, rtol=1e-4)
    fused_params = dict(fused.named_parameters())
    compared = 0
    for name, param in reference.named_parameters():
        if param.grad is None:
            assert fused_params[name].grad is None, name
            continue
        torch.testing.assert_close(param.grad, fused_params[name].grad, atol=1e-4, rtol=1e-3, msg=name)
        compared += name.startswith("discriminator")
    assert compared > 10  # the discriminator's gradients were compared, not skipped


# ----------------------------------------------------------------------------------------------
# Fused QKV, last-layer subset, the implementation switch
# ----------------------------------------------------------------------------------------------
def test_fused_qkv_is_one_linear_and_old_checkpoints_load():
    from electra_fast.model import has_unfused_qkv, split_qkv

    cfg = tiny_config()
    torch.manual_seed(0)
    model = ElectraPretrainingModel(cfg)
    attention = model.discriminator.encoder.layer[0].attention.self
    assert attention.qkv.weight.shape == (3 * cfg.model.hidden_size, cfg.model.hidden_size)
    assert not any(n.endswith((".query.weight", ".key.weight", ".value.weight")) for n, _ in model.named_parameters())

    # A state dict in the layout of earlier runs (and of HF): separate query/key/value projections.
    old = {k: v.clone() for k, v in split_qkv(model.state_dict()).items()}
    assert "discriminator.encoder.layer.0.attention.self.query.weight" in old
    assert not any(".qkv." in k for k in old)
    assert has_unfused_qkv(old) and not has_unfused_qkv(model.state_dict())
    fresh = ElectraPretrainingModel(cfg)
    fresh.load_state_dict(old)  # strict: every old key fused, none left over
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    # The order is HF's: rows [0, H) are the query, [H, 2H) the key, [2H, 3H) the value.
    hidden = cfg.model.hidden_size
    assert torch.equal(attention.qkv.weight[hidden:2 * hidden],
                       old["discriminator.encoder.layer.0.attention.self.key.weight"])
    # A half-old state dict (one projection missing) is an error, not a silent partial load.
    del old["generator.encoder.layer.0.attention.self.value.bias"]
    with pytest.raises(RuntimeError, match="qkv.bias"):
        ElectraPretrainingModel(cfg).load_state_dict(old)


def _losses_and_grads(model, batch):
    model.zero_grad()
    out = model(*batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl,batch_size", [("torch", 3), ("triton", 2)])
def test_last_layer_subset_matches_the_full_layer(impl, batch_size):
    """The generator's last layer at the masked rows only gives the full layer's loss and gradients
    (padded reference path; the kernels' packed path, where keys/values are re-padded for the subset)."""
    cfg = tiny_config("model.dropout=0.0", "model.attention_dropout=0.0", impl=impl)
    torch.manual_seed(0)
    subset = ElectraPretrainingModel(cfg)
    full_cfg = tiny_config("model.dropout=0.0", "model.attention_dropout=0.0", "model.last_layer_subset=false",
                           impl=impl)
    full = ElectraPretrainingModel(full_cfg)
    full.load_state_dict(subset.state_dict())
    batch = random_batch(cfg, batch=batch_size, seq_len=16)
    if impl == "triton":
        assert subset._layout(batch[1]).packed
    out_s, grads_s = _losses_and_grads(subset, batch)
    out_f, grads_f = _losses_and_grads(full, batch)
    torch.testing.assert_close(out_s.mlm_loss, out_f.mlm_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_s.disc_loss, out_f.disc_loss, atol=1e-5, rtol=1e-5)
    assert set(grads_s) == set(grads_f)
    for name, grad in grads_f.items():
        torch.testing.assert_close(grads_s[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # The subset path is what ran: the last layer's FFN saw B*P rows, not every token.
    seen = []
    last_ffn = subset.generator.encoder.layer[-1].intermediate
    handle = last_ffn.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    subset(*batch)
    handle.remove()
    assert seen == [batch_size * subset.max_predictions(16)]


def test_padded_subset_with_the_attention_kernel_matches():
    """Padded layout (unpad off) with the attention kernel: q block (B, P) against keys (B, S)."""
    base = ("model.dropout=0.0", "model.attention_dropout=0.0", "model.unpad=false", "model.num_layers=1")
    torch.manual_seed(0)
    subset = ElectraPretrainingModel(tiny_config(*base, impl="triton"))
    full = ElectraPretrainingModel(tiny_config(*base, "model.last_layer_subset=false", impl="triton"))
    full.load_state_dict(subset.state_dict())
    batch = random_batch(subset_cfg := tiny_config(*base), batch=2, seq_len=16)
    assert not subset._layout(batch[1]).packed and subset_cfg.model.unpad is False
    out_s, grads_s = _losses_and_grads(subset, batch)
    out_f, grads_f = _losses_and_grads(full, batch)
    torch.testing.assert_close(out_s.loss, out_f.loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads_f.items():
        torch.testing.assert_close(grads_s[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_triton_where_kernels_cannot_run_is_a_clear_error(monkeypatch):
    from electra_fast.model import resolve_impl

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="cannot run on cpu"):
        resolve_impl("triton", torch.device("cpu"))
    model = ElectraPretrainingModel(tiny_config(impl="triton"))
    with pytest.raises(ValueError, match="cannot run on cpu"):
        model(*random_batch(model_cfg := tiny_config()))
    assert model_cfg.model.attention_impl == "torch"
