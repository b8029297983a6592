"""Hugging Face interop: our model <-> ElectraForPreTraining / ElectraForMaskedLM."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining  # noqa: E402

from electra_fast.hf import ExportError, from_hf, to_hf  # noqa: E402
from electra_fast.model import ElectraPretrainingModel  # noqa: E402

from helpers import random_batch, tiny_config  # noqa: E402


def _hf_pair(cfg):
    m = cfg.model
    common = dict(vocab_size=m.vocab_size, embedding_size=m.embedding_size, max_position_embeddings=m.max_position_embeddings,
                  type_vocab_size=m.type_vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  layer_norm_eps=m.layer_norm_eps, pad_token_id=m.pad_token_id)
    disc = ElectraForPreTraining(ElectraConfig(hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                                               num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size, **common))
    gen = ElectraForMaskedLM(ElectraConfig(hidden_size=m.generator_hidden_size, num_hidden_layers=m.generator_num_layers,
                                           num_attention_heads=m.generator_num_heads,
                                           intermediate_size=m.generator_intermediate_size, **common))
    for model in (disc, gen):  # non-trivial values everywhere, biases and LayerNorms included
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())  # shared, as ELECTRA trains
    gen.tie_weights()
    return disc.eval(), gen.eval()


@pytest.mark.parametrize("embedding_size", [32, 48])  # 48: the generator also has an embedding projection
def test_hf_to_ours_to_hf_same_logits(tmp_path, embedding_size):
    cfg = tiny_config("model.dropout=0.0", "model.attention_dropout=0.0", f"model.embedding_size={embedding_size}")
    disc, gen = _hf_pair(cfg)
    disc.save_pretrained(tmp_path / "disc")
    gen.save_pretrained(tmp_path / "gen")
    ours = from_hf(tmp_path / "disc", tmp_path / "gen", attention_impl="torch").eval()
    input_ids, attention_mask, token_type_ids = random_batch(cfg, batch=3, seq_len=20)
    real = attention_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ours.discriminator_logits(input_ids, attention_mask, token_type_ids)[real],
                                   disc(input_ids=input_ids, attention_mask=attention_mask,
                                        token_type_ids=token_type_ids).logits[real], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.generator_logits(input_ids, attention_mask, token_type_ids)[real],
                                   gen(input_ids=input_ids, attention_mask=attention_mask,
                                       token_type_ids=token_type_ids).logits[real], atol=1e-5, rtol=0)

    # ... and back: our export loads with no missing/unexpected keys and gives the same logits.
    to_hf(ours, tmp_path / "export")
    disc2, info = ElectraForPreTraining.from_pretrained(tmp_path / "export" / "discriminator", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    gen2, info = ElectraForMaskedLM.from_pretrained(tmp_path / "export" / "generator", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        for a, b in ((disc, disc2.eval()), (gen, gen2.eval())):
            torch.testing.assert_close(a(input_ids=input_ids, attention_mask=attention_mask).logits,
                                       b(input_ids=input_ids, attention_mask=attention_mask).logits, atol=1e-5, rtol=0)


def test_export_is_complete_and_replaces_atomically(tmp_path):
    cfg = tiny_config()
    model = ElectraPretrainingModel(cfg)
    vocab_dir = tmp_path / "tok"
    vocab_dir.mkdir()
    (vocab_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]))
    out = to_hf(model, tmp_path / "export", tokenizer_dir=vocab_dir, config=cfg)
    for network in ("discriminator", "generator"):
        assert {p.name for p in (out / network).iterdir()} >= {"config.json", "model.safetensors", "vocab.txt"}
    assert json.loads((out / "generator" / "config.json").read_text())["hidden_size"] == cfg.model.generator_hidden_size
    to_hf(model, tmp_path / "export")  # overwriting leaves no temporary folders behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tok"]


def test_fresh_generator_when_none_given(tmp_path):
    cfg = tiny_config()
    to_hf(ElectraPretrainingModel(cfg), tmp_path / "export")
    model = from_hf(tmp_path / "export" / "discriminator", attention_impl="torch")
    assert model.config.generator_fraction == cfg.model.generator_fraction
    assert torch.isfinite(model(*random_batch(cfg)).loss)


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(ExportError, match="no config.json"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ExportError, match="expected 'electra'"):
        from_hf(tmp_path)
    cfg = tiny_config()
    to_hf(ElectraPretrainingModel(cfg), tmp_path / "a")
    wrong = json.loads((tmp_path / "a" / "generator" / "config.json").read_text())
    wrong["num_attention_heads"] = 3  # a shape off the derived rule loads (test_sharing.py); one that cannot exist does not
    (tmp_path / "a" / "generator" / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(ExportError, match="generator shape"):
        from_hf(tmp_path / "a" / "discriminator", tmp_path / "a" / "generator")
