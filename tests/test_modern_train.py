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
