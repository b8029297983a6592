"""A tiny modern ELECTRA (model.architecture=modern) through the trainer: ZeRO-0 and ZeRO-3 on two CPU ranks,
export, and both exported folders loaded by transformers matching the checkpoint's model. (Its kill -9
resume is test_train.py's test, parametrised over both architectures.)"""

import pytest
import torch

from electra_fast.checkpoints import consolidated_state_dict
from electra_fast.config import load_config
from electra_fast.model import ElectraPretrainingModel

from helpers import random_batch
from test_train import (MODERN_TINY, REPO, STAGE_SETS, STAGE_STEPS, _deepspeed_launch, clean_env,  # noqa: F401
                        corpus_dir, losses)


@pytest.fixture(scope="module")
def modern_two_ranks(corpus_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("modern_two_ranks")
    proc = _deepspeed_launch([str(REPO / "tests" / "_train_zero_stages.py"), "--data", corpus_dir,
                              "--out", str(out), "--config", MODERN_TINY, "--stages", "0", "3",
                              "--checkpointing-stages", "3",  # ZeRO-3 with activation checkpointing
                              "--set", *STAGE_SETS])
    return proc, out


@pytest.mark.slow
def test_modern_zero0_and_zero3_on_two_ranks_then_export_loads_in_transformers(modern_two_ranks, clean_env):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    proc, out = modern_two_ranks
    runs = {stage: out / f"zero{stage}" for stage in (0, 3)}
    for stage, run in runs.items():
        assert (run / "checkpoints" / "latest").is_file(), (stage, (proc.stdout + proc.stderr)[-5000:])
    reference = losses(runs[0])
    assert len(reference) == STAGE_STEPS and all(torch.isfinite(torch.tensor(reference)))
    torch.testing.assert_close(torch.tensor(losses(runs[3])), torch.tensor(reference), rtol=2e-5, atol=0)
    tag = f"step-{STAGE_STEPS:08d}"
    ref_state = consolidated_state_dict(runs[0] / "checkpoints" / tag)
    state = consolidated_state_dict(runs[3] / "checkpoints" / tag)
    assert state.keys() == ref_state.keys() and any(".layers.1.attn.Wqkv." in k for k in state)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-6, msg=key)

    # The ZeRO-3 run's export, in transformers, is the checkpoint's model.
    cfg = load_config(runs[3] / "config.yaml")
    ours = ElectraPretrainingModel(cfg)
    ours.load_state_dict(state)
    ours.eval()
    export = runs[3] / "export"
    rtd = transformers.AutoModelForTokenClassification.from_pretrained(export / "discriminator").eval()
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(export / "generator").eval()
    assert type(mlm).__name__ == "ModernBertForMaskedLM" and type(rtd).__name__ == "ModernBertForTokenClassification"
    ids, mask, _ = random_batch(cfg, batch=2, seq_len=64, min_len=20)
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ours.discriminator_logits(ids, mask)[real],
                                   rtd(input_ids=ids, attention_mask=mask).logits[..., 0][real], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.generator_logits(ids, mask)[real],
                                   mlm(input_ids=ids, attention_mask=mask).logits[real], atol=1e-5, rtol=0)


def test_init_from_a_modernbert_masked_lm_folder(corpus_dir, tmp_path, clean_env):  # noqa: F811
    """Continued pretraining of a ModernBERT-shaped masked LM with RTD: --init-from a ModernBertForMaskedLM
    folder (made by transformers) takes its shape, and both networks start from its weights."""
    import argparse
    import shutil

    transformers = pytest.importorskip("transformers")
    from electra_fast import train as trainer
    from electra_fast.manifest import read_manifest

    from test_init_from import FAST, FirstForward

    manifest = read_manifest(corpus_dir)
    ids = manifest["special_token_ids"]
    hf_cfg = transformers.ModernBertConfig(
        vocab_size=manifest["vocab_size"], hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=2, local_attention=16, max_position_embeddings=512, pad_token_id=ids["pad"],
        cls_token_id=ids["cls"], sep_token_id=ids["sep"], bos_token_id=ids["cls"], eos_token_id=ids["sep"])
    torch.manual_seed(0)
    folder = tmp_path / "released"
    transformers.ModernBertForMaskedLM(hf_cfg).save_pretrained(folder)
    shutil.copyfile(f"{corpus_dir}/vocab.txt", folder / "vocab.txt")

    first = FirstForward()
    parser = argparse.ArgumentParser()
    trainer.add_train_arguments(parser)
    args = parser.parse_args(["--config", MODERN_TINY, "--run-dir", str(tmp_path / "run"), "--init-from",
                              str(folder), "--init-generator", str(folder), "--set", f"data.path={corpus_dir}",
                              *FAST])
    assert trainer.run_train(args, [first]) == 0
    from safetensors.torch import load_file

    theirs = load_file(folder / "model.safetensors")
    for network in ("discriminator", "generator"):
        state = first.state[network]
        assert state["embeddings.word_embeddings.weight"].shape == (manifest["vocab_size"], 32)
        assert torch.equal(state["embeddings.word_embeddings.weight"], theirs["model.embeddings.tok_embeddings.weight"])
        assert torch.equal(state["layers.2.mlp.Wi.weight"], theirs["model.layers.2.mlp.Wi.weight"])
        assert torch.equal(state["final_norm.weight"], theirs["model.final_norm.weight"])
