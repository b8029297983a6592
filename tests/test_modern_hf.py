"""The modern backbone against transformers' ModernBERT: export, import, exact outputs (fp32, CPU)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModel, AutoModelForMaskedLM, AutoModelForTokenClassification,  # noqa: E402
                          ModernBertConfig, ModernBertForMaskedLM)

from electra_fast.config import ConfigError, build_config  # noqa: E402
from electra_fast.hf import ExportError, from_hf, to_hf  # noqa: E402
from electra_fast.model import ElectraPretrainingModel, TokenLayout, encode_tokens  # noqa: E402

from helpers import random_batch  # noqa: E402

ATOL = 1e-5


def modern_config(*overrides: str):
    base = [f"model.{hot}_impl=torch" for hot in ("attention", "mlm_head", "disc_head", "elementwise")]
    return build_config("modern-tiny", overrides=base + list(overrides))


def _perturbed(model):
    """Non-trivial values everywhere (LayerNorm weights, the biases, the padding row included)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _encode(model, network, ids, mask, types, packed: bool):
    """(B, S, hidden) encoder output of one network, zero at padding when packed."""
    layout = TokenLayout.build(mask.bool(), packed)
    embeddings, table = model.embeddings, None
    if network == "discriminator":
        embeddings, table = model.discriminator_embedding_parts()
    rows = encode_tokens(embeddings, getattr(model, network), ids, types, layout, word_table=table)
    return rows, layout


@pytest.mark.parametrize("sharing", ["tied", "gdes"])
def test_export_loads_in_transformers_and_matches(tmp_path, sharing):
    cfg = modern_config(f"model.embedding_sharing={sharing}")
    ours = _perturbed(ElectraPretrainingModel(cfg))
    to_hf(ours, tmp_path / "export")
    folder = tmp_path / "export"
    encoder, info = AutoModel.from_pretrained(folder / "discriminator", output_loading_info=True)
    assert type(encoder).__name__ == "ModernBertModel"
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert not [k for k in info["unexpected_keys"] if not k.startswith(("head.", "classifier."))], info
    rtd, info = AutoModelForTokenClassification.from_pretrained(folder / "discriminator", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and rtd.config.num_labels == 1
    mlm, info = AutoModelForMaskedLM.from_pretrained(folder / "generator", output_loading_info=True)
    assert type(mlm).__name__ == "ModernBertForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for hf in (encoder, rtd, mlm):
        hf.eval()
        assert hf.config._attn_implementation == "sdpa"

    # 64 tokens, windows of +-8: sliding layers really cut; lengths 64, 37, 9 (mostly padding)
    ids, mask, types = random_batch(cfg, batch=3, seq_len=64, min_len=8)
    real = mask.bool()
    with torch.no_grad():
        hf_hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        hf_logits = rtd(input_ids=ids, attention_mask=mask).logits[..., 0]
        hf_mlm = mlm(input_ids=ids, attention_mask=mask).logits
        for packed in (False, True):
            rows, layout = _encode(ours, "discriminator", ids, mask, types, packed)
            torch.testing.assert_close(layout.unflatten(rows)[real], hf_hidden[real], atol=ATOL, rtol=0)
            logits = layout.unflatten(ours.discriminator_predictions(rows))
            torch.testing.assert_close(logits[real], hf_logits[real], atol=ATOL, rtol=0)
            gen_rows, layout = _encode(ours, "generator", ids, mask, types, packed)
            gen_logits = torch.nn.functional.linear(ours.generator_predictions(gen_rows),
                                                    ours.embeddings.word_embeddings.weight, ours.generator_lm_head_bias)
            torch.testing.assert_close(layout.unflatten(gen_logits)[real], hf_mlm[real], atol=ATOL, rtol=0)
        # the model's own inspection entry points (padded layout) agree too
        torch.testing.assert_close(ours.discriminator_logits(ids, mask)[real], hf_logits[real], atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.generator_logits(ids, mask)[real], hf_mlm[real], atol=ATOL, rtol=0)

    # Back in: the same model, exactly (the gdes delta recovered from the two tables).
    again = from_hf(folder / "discriminator", folder / "generator", attention_impl="torch", mlm_head_impl="torch",
                    disc_head_impl="torch", elementwise_impl="torch")
    assert again.config.embedding_sharing == sharing
    mine, theirs = ours.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        if name == "discriminator_word_embeddings_delta":  # E_disc - E_gen re-derived: fp32 round-off
            torch.testing.assert_close(mine[name], theirs[name], atol=1e-6, rtol=0)
        else:
            assert torch.equal(mine[name], theirs[name]), name


def test_import_a_modernbert_masked_lm_folder(tmp_path):
    """A ModernBertForMaskedLM made by transformers (a released model's layout): continued pretraining with
    RTD reads it as the discriminator's encoder (fresh RTD head) and, given again, as the generator."""
    hf_cfg = ModernBertConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                              num_attention_heads=2, local_attention=16, max_position_embeddings=256,
                              pad_token_id=0, cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3)
    hf = ModernBertForMaskedLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "mlm")

    ours = from_hf(tmp_path / "mlm", tmp_path / "mlm", attention_impl="torch", mlm_head_impl="torch").eval()
    assert ours.config.architecture == "modern" and ours.config.generator_num_layers == 4
    cfg = build_config("modern-tiny", overrides=["model.vocab_size=512"])
    ids, mask, _ = random_batch(cfg, batch=2, seq_len=40)
    real = mask.bool()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours.generator_logits(ids, mask)[real], expected[real], atol=ATOL, rtol=0)
    # The generator's export is the folder it came from, weight for weight.
    to_hf(ours, tmp_path / "export")
    exported, info = ModernBertForMaskedLM.from_pretrained(tmp_path / "export" / "generator",
                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    theirs = hf.state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name

    # Without a generator folder: the default generator (half the depth, same width) shares the table.
    alone = from_hf(tmp_path / "mlm", attention_impl="torch")
    assert alone.config.generator_num_layers == 2 and alone.config.generator_hidden_size == 64
    assert torch.equal(alone.embeddings.word_embeddings.weight, hf.model.embeddings.tok_embeddings.weight)


def test_unsupported_modernbert_options_are_named(tmp_path):
    hf_cfg = ModernBertConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, norm_bias=True, pad_token_id=0, cls_token_id=1,
                              sep_token_id=2, bos_token_id=1, eos_token_id=2)
    ModernBertForMaskedLM(hf_cfg).save_pretrained(tmp_path / "biased")
    with pytest.raises(ExportError, match="norm_bias"):
        from_hf(tmp_path / "biased")


def test_shared_tables_need_equal_widths():
    with pytest.raises(ConfigError, match="embedding_sharing=separate"):
        modern_config("model.generator_fraction=0.5")
    with pytest.raises(ConfigError, match="embedding_size"):
        modern_config("model.embedding_size=32")
    # A narrower generator with its own table is allowed, and trains.
    cfg = modern_config("model.generator_fraction=0.5", "model.embedding_sharing=separate")
    model = ElectraPretrainingModel(cfg)
    assert model.embeddings.word_embeddings.weight.shape[1] == 32
    assert model.discriminator_embeddings.word_embeddings.weight.shape[1] == 64
    ids, mask, types = random_batch(cfg, batch=2, seq_len=32)
    model(ids, mask, types).loss.backward()


def test_exported_config_is_modernbert(tmp_path):
    cfg = modern_config()
    to_hf(ElectraPretrainingModel(cfg), tmp_path / "e")
    disc = json.loads((tmp_path / "e" / "discriminator" / "config.json").read_text())
    assert disc["architectures"] == ["ModernBertForTokenClassification"] and disc["num_labels"] == 1
    assert disc["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]


def test_a_released_modernbert_folder_gets_its_tokenizers_special_ids(tmp_path):
    """config.json names pad/cls/sep only; [MASK] and [UNK] come from the folder's tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a b c d e f g"] * 10, trainers.BpeTrainer(
        vocab_size=300, show_progress=False, special_tokens=["[MASK]", "[CLS]", "[SEP]", "[PAD]", "[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_cfg = ModernBertConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, pad_token_id=3, cls_token_id=1, sep_token_id=2,
                              bos_token_id=1, eos_token_id=2)
    ModernBertForMaskedLM(hf_cfg).save_pretrained(tmp_path / "released")
    tok.save(str(tmp_path / "released" / "tokenizer.json"))
    cfg = from_hf(tmp_path / "released").config
    ids = (cfg.unk_token_id, cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id, cfg.mask_token_id)
    assert ids == (4, 1, 2, 3, 0)
