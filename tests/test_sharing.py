"""Embedding sharing (model.embedding_sharing: tied | gdes | separate) and the generator's shape
(model.generator_layers, model.explicit_generator_*): gradients, export/import, FLOPs, ZeRO-3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from electra_fast.config import ConfigError
from electra_fast.flops import EncoderDims, electra_flops, layer_terms
from electra_fast.hf import from_hf, to_hf
from electra_fast.model import ElectraPretrainingModel

from helpers import random_batch, tiny_config

# Logits computed by two fp32 implementations of the same network (ours and transformers', or ours after a
# round trip) differ by round-off, which grows with their magnitude: trained discriminator logits reach
# ~125, where one summation order or matmul kernel against another gives 3e-5 (2.4e-7 relative). So the
# bound is relative, with an absolute floor for logits near zero; a wrong weight or layer is off by far
# more than either.
LOGITS_CLOSE = dict(rtol=2e-6, atol=1e-5)

NO_DROPOUT = ("model.dropout=0.0", "model.attention_dropout=0.0")
WORDS = "embeddings.word_embeddings.weight"
DELTA = "discriminator_word_embeddings_delta"


def _model(sharing: str, *sets: str, impl: str = "torch") -> ElectraPretrainingModel:
    torch.manual_seed(0)  # the same weights for every mode (what the modes add is registered last)
    return ElectraPretrainingModel(tiny_config(*NO_DROPOUT, f"model.embedding_sharing={sharing}", *sets, impl=impl))


def _grads(sharing: str, *weights: str, impl: str = "torch") -> dict[str, torch.Tensor]:
    """Every parameter's gradient after one backward of the loss with the given objective weights
    (e.g. "objective.disc_weight=0": the masked-LM loss alone). Same masks and samples in every call."""
    model = _model(sharing, *weights, impl=impl)
    model(*random_batch(tiny_config())).loss.backward()
    return {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in model.named_parameters()}


MLM_ONLY, RTD_ONLY = ("objective.disc_weight=0",), ("objective.gen_weight=0",)


def test_tied_is_one_table_updated_by_both_losses():
    names = [n for n, _ in _model("tied").named_parameters()]
    assert sum("word_embeddings" in n for n in names) == 1 and DELTA not in names
    assert _grads("tied", *MLM_ONLY)[WORDS].abs().sum() > 0 and _grads("tied", *RTD_ONLY)[WORDS].abs().sum() > 0


def test_gdes_gradients_flow_exactly_as_defined():
    """MLM alone updates E_gen only, RTD alone E_delta only; each is exactly the gradient the tied
    table gets from that loss (at initialisation E_delta = 0, so both modes compute the same forward)."""
    model = _model("gdes")
    assert torch.equal(getattr(model, DELTA), torch.zeros_like(getattr(model, DELTA)))
    tied_mlm, tied_rtd = _grads("tied", *MLM_ONLY), _grads("tied", *RTD_ONLY)
    mlm, rtd = _grads("gdes", *MLM_ONLY), _grads("gdes", *RTD_ONLY)
    assert torch.count_nonzero(mlm[DELTA]) == 0  # the masked-LM loss never reaches E_delta...
    assert torch.equal(mlm[WORDS], tied_mlm[WORDS])  # ...and gives E_gen the tied table's MLM gradient
    assert torch.count_nonzero(rtd[WORDS]) == 0  # the replaced-token loss never reaches E_gen...
    assert torch.equal(rtd[DELTA], tied_rtd[WORDS])  # ...and gives E_delta the tied table's RTD gradient
    assert torch.count_nonzero(rtd[DELTA]) > 0 and torch.count_nonzero(mlm[WORDS]) > 0
    # Position / segment tables and the embedding LayerNorm stay tied: both losses update them.
    for name in ("embeddings.position_embeddings.weight", "embeddings.LayerNorm.weight"):
        assert torch.count_nonzero(mlm[name]) > 0 and torch.count_nonzero(rtd[name]) > 0
    # Together: the sum of the two (the total loss is linear in the two losses).
    both, tied_both = _grads("gdes"), _grads("tied")
    torch.testing.assert_close(both[WORDS] + both[DELTA], tied_both[WORDS], rtol=1e-5, atol=1e-7)


def test_gdes_separation_holds_with_the_fused_kernels():
    """The Triton hot spots (Triton's interpreter here): the fused MLM head takes E_gen as its output
    layer, the packed layout gathers the embeddings' rows; neither may leak one loss into the other table."""
    mlm, rtd = _grads("gdes", *MLM_ONLY, impl="triton"), _grads("gdes", *RTD_ONLY, impl="triton")
    assert torch.count_nonzero(mlm[DELTA]) == 0 and torch.count_nonzero(rtd[WORDS]) == 0
    assert torch.count_nonzero(mlm[WORDS]) > 0 and torch.count_nonzero(rtd[DELTA]) > 0


def test_separate_shares_nothing():
    mlm, rtd = _grads("separate", *MLM_ONLY), _grads("separate", *RTD_ONLY)
    own = [n for n in mlm if n.startswith("discriminator_embeddings.")]
    assert len(own) == 5  # word, position, segment tables and the LayerNorm's two
    gen = [n for n in mlm if n.startswith("embeddings.")]
    assert all(torch.count_nonzero(mlm[n]) == 0 for n in own) and all(torch.count_nonzero(rtd[n]) == 0 for n in gen)
    assert torch.count_nonzero(mlm[WORDS]) > 0 and torch.count_nonzero(rtd["discriminator_" + WORDS]) > 0


def _trained(sharing: str, steps: int = 2, *sets: str) -> ElectraPretrainingModel:
    """A model after a few SGD steps, so that E_gen, E_delta and the separate tables all differ."""
    model = _model(sharing, *sets)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps):
        model(*random_batch(tiny_config(), seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("sharing", ["gdes", "separate"])
def test_export_writes_what_each_network_reads_and_import_recovers_it(tmp_path, sharing):
    model = _trained(sharing)
    to_hf(model, tmp_path / "export")
    disc = load_file(tmp_path / "export" / "discriminator" / "model.safetensors")
    gen = load_file(tmp_path / "export" / "generator" / "model.safetensors")
    e_gen = model.embeddings.word_embeddings.weight.detach()
    torch.testing.assert_close(gen["electra." + WORDS], e_gen, rtol=0, atol=0)
    torch.testing.assert_close(gen["generator_lm_head.weight"], e_gen, rtol=0, atol=0)  # MLM layer tied to E_gen
    if sharing == "gdes":
        effective = e_gen + getattr(model, DELTA)
    else:
        effective = model.discriminator_embeddings.word_embeddings.weight
    torch.testing.assert_close(disc["electra." + WORDS], effective.detach(), rtol=0, atol=0)
    assert not torch.equal(disc["electra." + WORDS], e_gen)

    back = from_hf(tmp_path / "export" / "discriminator", tmp_path / "export" / "generator", attention_impl="torch")
    assert back.config.embedding_sharing == sharing  # recorded in the export, the default when not asked
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:  # E_delta = E_disc - E_gen: equal to fp32 round-off
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=1e-6, msg=name)
    ids, mask, types = random_batch(tiny_config(), seed=5)
    with torch.no_grad():
        expected = model.discriminator_logits(ids, mask, types)
        torch.testing.assert_close(back.discriminator_logits(ids, mask, types), expected, **LOGITS_CLOSE)

    # The same folders read as tied: one table, the discriminator's (its logits are unchanged).
    tied = from_hf(tmp_path / "export" / "discriminator", tmp_path / "export" / "generator",
                   attention_impl="torch", embedding_sharing="tied").eval()
    with torch.no_grad():
        torch.testing.assert_close(tied.discriminator_logits(ids, mask, types), expected, **LOGITS_CLOSE)


@pytest.mark.parametrize("sharing", ["gdes", "separate"])
def test_fine_tuning_copies_the_discriminators_effective_embeddings(sharing):
    from electra_fast.task_models import load_encoder

    model = _trained(sharing)
    encoder, _ = load_encoder(model)
    effective = model.network_state_dict("discriminator")[WORDS]
    assert torch.equal(encoder.embeddings.word_embeddings.weight.detach(), effective)
    assert not torch.equal(effective, model.embeddings.word_embeddings.weight.detach())


def test_gdes_import_without_generator_shares_the_imported_table(tmp_path):
    to_hf(_trained("tied"), tmp_path / "export")
    model = from_hf(tmp_path / "export" / "discriminator", attention_impl="torch", embedding_sharing="gdes")
    disc = load_file(tmp_path / "export" / "discriminator" / "model.safetensors")
    assert torch.equal(model.embeddings.word_embeddings.weight.detach(), disc["electra." + WORDS])
    assert torch.count_nonzero(getattr(model, DELTA)) == 0


@pytest.mark.parametrize("sharing", ["gdes", "separate"])  # tied: tests/test_hf.py
def test_exports_of_every_mode_load_in_transformers(tmp_path, sharing):
    transformers = pytest.importorskip("transformers")
    model = _trained(sharing)
    to_hf(model, tmp_path / "export")
    ids, mask, types = random_batch(tiny_config(), seed=3)
    real = mask.bool()
    for network, cls in (("discriminator", transformers.ElectraForPreTraining),
                         ("generator", transformers.ElectraForMaskedLM)):
        hf, info = cls.from_pretrained(tmp_path / "export" / network, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        with torch.no_grad():
            got = hf.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
            logits = model.discriminator_logits if network == "discriminator" else model.generator_logits
            ours = logits(ids, mask, types)
        torch.testing.assert_close(got[real], ours[real], **LOGITS_CLOSE)


def test_flops_do_not_depend_on_the_sharing_mode():
    tied = electra_flops(tiny_config(), seq_len=64, batch=8)
    for sharing in ("gdes", "separate"):
        other = electra_flops(tiny_config(f"model.embedding_sharing={sharing}"), seq_len=64, batch=8)
        assert other.training_per_step == tied.training_per_step
        assert other.by_component() == tied.by_component()


# --------------------------------------------------------------------------------------------------
# Generator depth and explicit shape
# --------------------------------------------------------------------------------------------------
def test_generator_layers_fraction_and_explicit_shape():
    cfg = tiny_config("model.num_layers=4", "model.generator_layers=0.5")
    model = ElectraPretrainingModel(cfg)
    assert len(model.generator.encoder.layer) == 2 and len(model.discriminator.encoder.layer) == 4
    full_depth = electra_flops(tiny_config("model.num_layers=4"), seq_len=64, batch=8).by_component()
    half_depth = electra_flops(cfg, seq_len=64, batch=8).by_component()
    assert half_depth["generator.layers"] == pytest.approx(full_depth["generator.layers"] / 2)
    assert half_depth["discriminator.layers"] == full_depth["discriminator.layers"]
    cfg = tiny_config("model.explicit_generator_num_layers=1", "model.explicit_generator_num_heads=2",
                      "model.explicit_generator_intermediate_size=48")
    model = ElectraPretrainingModel(cfg)
    layer = model.generator.encoder.layer[0]
    assert len(model.generator.encoder.layer) == 1 and layer.attention.self.num_heads == 2
    assert layer.intermediate.dense.out_features == 48
    assert torch.isfinite(model(*random_batch(cfg)).loss)
    for bad, message in (("model.generator_layers=1.5", "generator_layers"),
                         ("model.explicit_generator_num_heads=3", "not divisible"),
                         ("model.embedding_sharing=shared", "embedding_sharing")):
        with pytest.raises(ConfigError, match=message):
            tiny_config(bad)


def _layer_flops(dims: EncoderDims, breakdown) -> float:
    """The generator layers' FLOPs of ``dims`` on ``breakdown``'s workload, as its convention counts them."""
    return sum(t.flops for t in layer_terms(dims, breakdown.workload, "generator.layers")
               if t.kind in breakdown.convention.counted_kinds)


def test_flops_follow_the_generators_real_shape():
    cfg = tiny_config("model.explicit_generator_num_layers=1", "model.explicit_generator_intermediate_size=48")
    flops = electra_flops(cfg, seq_len=64, batch=8)
    rule = electra_flops(tiny_config(), seq_len=64, batch=8)
    assert flops.training_per_step < rule.training_per_step
    m = cfg.model
    dims = EncoderDims(m.generator_hidden_size, 1, m.generator_num_heads, 48, m.embedding_size, m.vocab_size)
    assert (dims.layers, dims.intermediate) == (m.generator_num_layers, m.generator_intermediate_size)
    assert flops.by_component()["generator.layers"] == pytest.approx(_layer_flops(dims, flops))


def test_from_hf_accepts_a_generator_off_the_rule(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(*NO_DROPOUT)
    m = cfg.model
    common = dict(vocab_size=m.vocab_size, embedding_size=m.embedding_size,
                  max_position_embeddings=m.max_position_embeddings, type_vocab_size=m.type_vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  layer_norm_eps=m.layer_norm_eps, pad_token_id=m.pad_token_id)
    disc = transformers.ElectraForPreTraining(transformers.ElectraConfig(
        hidden_size=m.hidden_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        intermediate_size=m.intermediate_size, **common))
    # Not the rule (hidden 32 -> 1 head, FFN 128, the discriminator's 2 layers): 24 wide, 3 heads, FFN 40, 1 layer.
    gen = transformers.ElectraForMaskedLM(transformers.ElectraConfig(
        hidden_size=24, num_hidden_layers=1, num_attention_heads=3, intermediate_size=40, **common))
    for net in (disc, gen):
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.05)
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
    gen.tie_weights()
    disc.save_pretrained(tmp_path / "disc")
    gen.save_pretrained(tmp_path / "gen")
    ours = from_hf(tmp_path / "disc", tmp_path / "gen", attention_impl="torch").eval()
    c = ours.config
    assert (c.generator_hidden_size, c.generator_num_heads, c.generator_intermediate_size, c.generator_num_layers) == (
        24, 3, 40, 1)
    ids, mask, types = random_batch(cfg, batch=3, seq_len=20)
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ours.generator_logits(ids, mask, types)[real],
                                   gen.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits[real],
                                   **LOGITS_CLOSE)
    flops = electra_flops(c, seq_len=32, batch=2)
    dims = EncoderDims(24, 1, 3, 40, m.embedding_size, m.vocab_size, dropout=False, attention_dropout=False)
    assert flops.by_component()["generator.layers"] == pytest.approx(_layer_flops(dims, flops))
    # ... and goes back out with the same shape.
    to_hf(ours, tmp_path / "export")
    written = json.loads((tmp_path / "export" / "generator" / "config.json").read_text())
    assert (written["hidden_size"], written["num_attention_heads"], written["intermediate_size"],
            written["num_hidden_layers"]) == (24, 3, 40, 1)


# --------------------------------------------------------------------------------------------------
# ZeRO-3 on two ranks (the launcher harness of tests/test_train.py)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gdes_under_zero3_on_two_ranks_matches_zero0(tmp_path):
    from test_train import COMPARE, REPO, _deepspeed_launch, losses

    from electra_fast.checkpoints import consolidated_state_dict
    from electra_fast.prepare import prepare

    corpus = tmp_path / "corpus.txt"
    lines = [f"the {a} {v} the {o} ." for a in ("cat", "dog", "chef", "bird") for v in ("saw", "ate", "liked")
             for o in ("meal", "ball", "book", "fish", "chair")]
    corpus.write_text("\n\n".join("\n".join(lines[i:i + 6]) for i in range(0, len(lines), 6)) * 4)
    data = prepare([str(corpus)], str(tmp_path / "data"), vocab_size=120, seq_len=32, num_proc=1, verbose=False)
    steps = 2
    proc = _deepspeed_launch([str(REPO / "tests" / "_train_zero_stages.py"), "--data", str(data), "--out",
                              str(tmp_path / "out"), "--stages", "0", "3", "--set", *COMPARE,
                              "model.embedding_sharing=gdes", "data.seq_len=32", "train.global_batch_size=4",
                              f"train.max_steps={steps}", "train.log_every=1", f"train.save_every={steps}"])
    runs = {stage: Path(tmp_path / "out" / f"zero{stage}") for stage in (0, 3)}
    for stage, run in runs.items():
        assert (run / "checkpoints" / "latest").is_file(), (stage, (proc.stdout + proc.stderr)[-5000:])
    torch.testing.assert_close(torch.tensor(losses(runs[3])), torch.tensor(losses(runs[0])), rtol=2e-5, atol=0)
    states = {stage: consolidated_state_dict(run / "checkpoints" / f"step-{steps:08d}") for stage, run in runs.items()}
    assert states[3].keys() == states[0].keys() and DELTA in states[3]
    for key in states[0]:
        torch.testing.assert_close(states[3][key], states[0][key], rtol=1e-4, atol=1e-6, msg=key)
    assert torch.count_nonzero(states[3][DELTA]) > 0  # the replaced-token loss moved E_delta under ZeRO-3
    exported = load_file(runs[3] / "export" / "discriminator" / "model.safetensors")
    torch.testing.assert_close(exported["electra." + WORDS], states[3][WORDS] + states[3][DELTA], rtol=0, atol=0)
