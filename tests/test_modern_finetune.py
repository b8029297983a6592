"""Fine-tuning the exported modern discriminator (a ModernBertForTokenClassification folder): the saved
task model loads in transformers as ModernBertFor{Sequence,Token}Classification with the same outputs."""

import random

import pytest
import torch

from electra_fast.config import build_config
from electra_fast.finetune import finetune_classifier, layerwise_param_groups
from electra_fast.finetune_config import ModelOptions
from electra_fast.hf import to_hf
from electra_fast.model import ElectraPretrainingModel
from electra_fast.task_models import load_encoder
from electra_fast.task_models_modern import ModernEncoder, ModernForTokenClassification

from test_finetune import VOCAB, _one_thread, _quick, _sentence  # noqa: F401


@pytest.fixture(scope="module")
def modern_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("modern_run")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    cfg = build_config("modern-tiny", overrides=["model.vocab_size=64", "model.num_layers=2",
                                                 "model.attention_impl=torch", "model.initializer_range=0.2"])
    torch.manual_seed(0)
    to_hf(ElectraPretrainingModel(cfg), root / "export", tokenizer_dir=root / "tokenizer")
    return root


def test_finetune_the_exported_modern_discriminator(modern_export, tmp_path):
    transformers = pytest.importorskip("transformers")
    encoder, base = load_encoder(modern_export, ModelOptions(attention_impl="torch"))
    assert isinstance(encoder, ModernEncoder) and base["model_type"] == "modernbert"
    rng = random.Random(0)
    train, dev = [], []
    for _ in range(160):
        text, label = _sentence(rng)
        train.append((text, None, label))
    for _ in range(40):
        text, label = _sentence(rng)
        dev.append((text, None, label))
    result = finetune_classifier(modern_export, train, dev, num_labels=2, config=_quick("model.attention_impl=torch"),
                                 out_dir=tmp_path / "cls")
    assert result["median"]["accuracy"] > 0.8, result["median"]
    saved = tmp_path / "cls" / "model"
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(saved, output_loading_info=True)
    assert type(hf).__name__ == "ModernBertForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[VOCAB.index(w) for w in "[CLS] the movie was good [SEP]".split()],
                        [VOCAB.index(w) for w in "[CLS] a bad plot [SEP] [PAD]".split()]])
    mask = ids != 0
    with torch.no_grad():
        logits = hf.eval()(input_ids=ids, attention_mask=mask).logits
    assert (logits.argmax(-1) == torch.tensor([1, 0])).all()


def test_modern_token_classifier_matches_transformers_and_layer_lrs(modern_export):
    transformers = pytest.importorskip("transformers")
    encoder, _ = load_encoder(modern_export, ModelOptions(attention_impl="torch"))
    model = ModernForTokenClassification(encoder.config, 3).eval()
    model.electra.load_state_dict(encoder.state_dict())
    hf = transformers.ModernBertForTokenClassification.from_pretrained(modern_export / "export" / "discriminator",
                                                                       num_labels=3, ignore_mismatched_sizes=True)
    from electra_fast.task_models_modern import hf_state

    hf.load_state_dict(hf_state(model.state_dict()))
    ids = torch.tensor([[2, 5, 6, 7, 3, 8, 9, 3], [2, 10, 11, 3, 0, 0, 0, 0]])
    mask = ids != 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask)[mask], hf.eval()(input_ids=ids, attention_mask=mask).logits[mask],
                                   atol=1e-5, rtol=0)
    groups = layerwise_param_groups(model, 1e-3, 0.8, 0.01)
    depth = {name: g["depth"] for g in groups for name in g["names"]}
    assert depth["electra.embeddings.word_embeddings.weight"] == 0
    assert depth["electra.layers.1.attn.Wqkv.weight"] == 2 and depth["electra.final_norm.weight"] == 2
    assert depth["classifier.weight"] == 4
    no_decay = {name for g in groups if g["weight_decay"] == 0.0 for name in g["names"]}
    assert "electra.layers.1.attn_norm.weight" in no_decay and "head.norm.weight" in no_decay
