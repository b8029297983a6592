"""The benchmark scripts run (CPU smoke, tiny sizes), and the BERT-MLM baseline they compare with is right.

* benchmarks/throughput.py --cpu-smoke and benchmarks/equal_compute.py at a tiny size, as subprocesses,
  writing their JSONL rows and PNG into a temporary folder;
* BertMLMModel: BERT's 80/10/10 corruption, the loss and gradients, and its weights under Hugging Face
  names giving HF ElectraForMaskedLM's logits.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from electra_fast.config import build_config
from electra_fast.mlm_baseline import BertMLMModel, bert_mask_tokens

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The smoke runs check the scripts, not the kernels: no Triton interpreter (slow), one thread each.
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT, env=env)
    assert out.returncode == 0, f"{script} failed:\nSTDOUT\n{out.stdout[-4000:]}\nSTDERR\n{out.stderr[-4000:]}"
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # four variants in a subprocess, DeepSpeed's among them: minutes on a 2-core CPU
def test_throughput_cpu_smoke(tmp_path):
    out = _run("throughput.py", "--cpu-smoke", "--variants", "ours-torch,ours-fast,ours-deepspeed,hf-eager,hf-bert-mlm",
               "--warmup", "1", "--iters", "1", "--results-dir", str(tmp_path))
    rows = _rows(tmp_path / "throughput.jsonl")
    measured = {r["variant"] for r in rows}
    assert {"ours-torch", "ours-fast"} <= measured
    assert "CPU smoke run of the PyTorch reference path" in out.stdout
    for row in rows:
        assert row["seq_per_s"] > 0 and row["model_tflops"] > 0 and row["flops_per_step"] > 0
        assert row["size"] == "tiny" and row["device"] == "cpu" and row["torch"] == torch.__version__
        assert "date" in row and "commit" in row
    # ELECTRA and BERT-MLM rows carry their own FLOPs (the same algorithm count for ours and HF's).
    electra = {r["flops_per_step"] for r in rows if "bert" not in r["variant"]}
    assert len(electra) == 1
    assert (tmp_path / "throughput.png").is_file()
    try:
        import deepspeed  # noqa: F401
        assert "ours-deepspeed" in measured, out.stdout  # on the CPU accelerator under --cpu-smoke
    except ImportError:
        assert "deepspeed is not installed" in out.stdout
    pytest.importorskip("transformers")
    assert {"hf-eager", "hf-bert-mlm"} <= measured
    hf_bert = next(r for r in rows if r["variant"] == "hf-bert-mlm")
    assert hf_bert["flops_per_step"] < next(iter(electra))


def _tiny_corpus(path: Path) -> Path:
    rng = random.Random(0)
    words = ("the model reads each sentence and guesses which word the small generator replaced while "
             "training runs over many examples drawn from a corpus of plain english prose").split()
    with path.open("w") as f:
        for _ in range(40):
            for _ in range(12):
                f.write(" ".join(rng.choice(words) for _ in range(rng.randint(6, 12))).capitalize() + ".\n")
            f.write("\n")
    return path


def test_equal_compute_tiny_smoke(tmp_path):
    corpus = _tiny_corpus(tmp_path / "corpus.txt")
    _run("equal_compute.py", "--corpus", str(corpus), "--vocab-size", "200", "--electra-steps", "2", "--batch", "4",
         "--set", "data.seq_len=32", "--probe-train", "32", "--probe-dev", "16", "--probe-epochs", "1",
         "--seeds", "1", "--checkpoints", "1.0", "--results-dir", str(tmp_path), "--device", "cpu",
         "--sharing", "tied,gdes,separate")
    rows = _rows(tmp_path / "equal_compute.jsonl")
    assert [r["model"] for r in rows] == ["random_init", "electra", "electra_gdes", "electra_separate", "bert_mlm"]
    assert [r["sharing"] for r in rows[1:]] == ["tied", "gdes", "separate", None]
    electra, bert = rows[1], rows[-1]
    # Equal budgets: every sharing mode costs the same; BERT-MLM's steps the same FLOPs (to within one step).
    assert all(r["steps"] == 2 and r["flops"] == electra["flops"] for r in rows[1:-1]) and bert["steps"] >= 2
    assert abs(bert["flops"] - electra["flops"]) <= bert["flops"] / bert["steps"]
    for row in rows:
        assert 0.0 <= row["accuracy_median"] <= 1.0 and row["seq_len"] == 32
    assert (tmp_path / "equal_compute.png").is_file()


# ----------------------------------------------------------------------------------------------
# BertMLMModel
# ----------------------------------------------------------------------------------------------
def _tiny_cfg():
    return build_config("tiny", overrides=["model.attention_impl=torch", "model.mlm_head_impl=torch",
                                           "model.disc_head_impl=torch", "data.seq_len=32"])


def test_bert_masking_is_80_10_10():
    cfg = _tiny_cfg()
    mc = cfg.model
    input_ids = torch.randint(5, mc.vocab_size, (64, 128))
    input_ids[:, 0] = mc.cls_token_id
    input_ids[:, -1] = mc.sep_token_id
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    masked, chosen = bert_mask_tokens(input_ids, mask, cfg=mc, mask_prob=0.15, max_predictions_per_seq=20,
                                      generator=gen)
    valid = chosen.valid
    assert valid.sum(dim=1).eq(round(128 * 0.15)).all()
    originals = input_ids.gather(1, chosen.positions)[valid]
    now = masked.gather(1, chosen.positions)[valid]
    is_mask = now == mc.mask_token_id
    kept = now == originals
    n = valid.sum().item()
    assert abs(is_mask.float().mean().item() - 0.8) < 0.03, n
    assert abs(kept.float().mean().item() - (0.1 + 0.1 / mc.vocab_size)) < 0.03
    # Outside the chosen positions nothing changes; [CLS]/[SEP] are never chosen.
    untouched = torch.ones_like(mask)
    untouched.scatter_(1, chosen.positions, ~valid)
    assert torch.equal(masked[untouched], input_ids[untouched])
    assert (chosen.positions[valid] != 0).all() and (chosen.positions[valid] != 127).all()


def test_bert_mlm_forward_backward_and_padding():
    cfg = _tiny_cfg()
    model = BertMLMModel(cfg)
    input_ids = torch.randint(5, cfg.model.vocab_size, (3, 32))
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask[1, 20:] = False
    input_ids[~attention_mask] = cfg.model.pad_token_id
    out = model(input_ids, attention_mask)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    # An untrained model predicts about uniformly: loss near log(vocab).
    assert abs(out.loss.item() - torch.log(torch.tensor(float(cfg.model.vocab_size))).item()) < 1.0
    assert out.disc_loss.item() == 0.0 and 0 <= out.metrics["mlm_accuracy"].item() <= 1
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["embeddings.word_embeddings.weight"].abs().sum() > 0  # input and tied output
    assert grads["electra.encoder.layer.0.attention.self.qkv.weight"].abs().sum() > 0
    assert grads["generator_lm_head_bias"].abs().sum() > 0
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    with pytest.raises(ValueError, match="input_ids must be"):
        model(input_ids[0])


def test_bert_mlm_matches_hugging_face_electra_for_masked_lm():
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import build_hf_bert_mlm

    cfg = _tiny_cfg()
    model = BertMLMModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf = build_hf_bert_mlm(cfg.model, "cpu").eval()
    missing, unexpected = hf.load_state_dict(model.hf_state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k], (missing, unexpected)
    input_ids = torch.randint(5, cfg.model.vocab_size, (2, 32))
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    types = torch.zeros_like(input_ids)
    from electra_fast.model import TokenLayout

    with torch.no_grad():
        rows = model.encode(input_ids, types, TokenLayout.build(mask, packed=False))
        ours = torch.nn.functional.linear(model.generator_predictions(rows), model.embeddings.word_embeddings.weight,
                                          model.generator_lm_head_bias).view(2, 32, -1)
        theirs = hf(input_ids=input_ids, attention_mask=mask.long(), token_type_ids=types).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_probe_corruptions():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import equal_compute as ec

    rng = random.Random(0)
    sentence = "the discriminator learns from every token of the input sequence."
    words = sentence.split()
    for _ in range(20):
        shuffled = ec.shuffle_words(sentence, rng).split()
        assert sorted(shuffled) == sorted(words) and shuffled != words
        swapped = ec.swap_two_words(sentence, rng).split()
        assert sorted(swapped) == sorted(words) and sum(a != b for a, b in zip(swapped, words)) == 2
        replaced = ec.replace_words(sentence, rng, ["alpha", "beta", "gamma"]).split()
        assert len(replaced) == len(words) and 1 <= sum(a != b for a, b in zip(replaced, words)) <= 3
    assert ec.shuffle_words("same same same same", rng) is None
    documents = [[f"sentence number {i} has quite a few words in it." for i in range(50)]]
    for corruption in ec.CORRUPTIONS:
        train, dev = ec.build_probe(documents, 30, 10, seed=1, corruption=corruption)
        assert len(train) == 30 and len(dev) == 10
        assert {label for *_, label in train + dev} == {0, 1}


def test_convergence_cpu_smoke(tmp_path):
    """benchmarks/convergence.py --cpu-smoke: reference, interpreted kernels and the perturbed reference
    for a few steps; fp32, so the fused curve matches the reference to round-off."""
    out = _run("convergence.py", "--cpu-smoke", "--results-dir", str(tmp_path))
    assert "CPU smoke run" in out.stdout and "noise bound" in out.stdout
    (row,) = _rows(tmp_path / "convergence.jsonl")
    assert row["cpu_smoke"] and row["device"] == "cpu" and row["precision"] == "fp32"
    assert {name: len(curve) for name, curve in row["curves"].items()} == {"reference": 6, "fused": 6, "perturbed": 6}
    assert row["curves"]["fused"] != row["curves"]["reference"]  # the kernels ran (interpreted), not the references
    assert row["max_rel_diff_mlm"] < 1e-4 and row["max_rel_diff_disc"] < 1e-4
    assert (tmp_path / "convergence.png").is_file()


def test_geglu_cpu_smoke(tmp_path):
    """benchmarks/geglu.py --cpu-smoke: the script runs end to end and writes its rows."""
    out = _run("geglu.py", "--cpu-smoke", "--results-dir", str(tmp_path))
    assert "CPU smoke run" in out.stdout
    rows = _rows(tmp_path / "geglu.jsonl")
    assert {r["impl"] for r in rows} == {"ours", "torch eager"} and all(r["cpu_smoke"] for r in rows)
