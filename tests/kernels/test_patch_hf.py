"""electra_kernels.patch_hf on tiny randomly initialised Hugging Face models (no download, CPU).

The patched copy must give the unpatched model's outputs and gradients (fp32, eval mode so dropout is
off); our kernels run in Triton's interpreter here (tests/conftest.py sets TRITON_INTERPRET=1), so the
models are tiny. Also: configurations the kernels cannot honour are refused before anything changes,
``import electra_kernels`` stays free of transformers / electra_fast / deepspeed, and the HF benchmark
script runs its CPU smoke mode.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import electra_kernels  # noqa: E402
from electra_kernels import FusedLayerNorm, patch_hf  # noqa: E402

hf_patch = importlib.import_module("electra_kernels.hf_patch")
REPO = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=40)


def _tiny_model(kind: str, **overrides):
    if kind == "bert":
        config = transformers.BertConfig(**{**TINY, **overrides})
        return transformers.BertForMaskedLM(config)
    if kind == "roberta":
        config = transformers.RobertaConfig(**{**TINY, "pad_token_id": 1, **overrides})
        return transformers.RobertaForMaskedLM(config)
    if kind == "electra":  # embedding_size != hidden_size: exercises embeddings_project too
        config = transformers.ElectraConfig(**{**TINY, "embedding_size": 32, **overrides})
        return transformers.ElectraForPreTraining(config)
    raise AssertionError(kind)


def _batch(kind: str, batch: int = 2, seq: int = 16):
    input_ids = torch.randint(3, TINY["vocab_size"], (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, 11:] = 0  # the second sequence is padded
    input_ids = input_ids.masked_fill(attention_mask == 0, 1 if kind == "roberta" else 0)
    if kind == "electra":
        labels = (torch.rand(batch, seq) < 0.3).long()
    else:
        labels = torch.where(torch.rand(batch, seq) < 0.3, input_ids, torch.full_like(input_ids, -100))
        labels[0, 0] = input_ids[0, 0]  # at least one target
        labels = labels.masked_fill(attention_mask == 0, -100)  # no targets on padding, as HF's collators
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


@pytest.fixture
def attention_calls(monkeypatch):
    """The key-padding masks of the calls into electra_kernels.attention made by the patched models."""
    calls = []
    real = hf_patch.attention

    def counting_attention(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_patch, "attention", counting_attention)
    return calls


@pytest.fixture
def varlen_calls(monkeypatch):
    """(q shape, cu_seqlens, max_seqlen) of the calls into electra_kernels.attention_varlen."""
    calls = []
    real = hf_patch.attention_varlen

    def counting_varlen(q, k, v, cu_seqlens, max_seqlen, *args, **kwargs):
        calls.append((tuple(q.shape), cu_seqlens.tolist(), max_seqlen))
        return real(q, k, v, cu_seqlens, max_seqlen, *args, **kwargs)

    monkeypatch.setattr(hf_patch, "attention_varlen", counting_varlen)
    return calls


@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("kind", ["bert", "roberta", "electra"])
def test_patched_model_matches_unpatched(kind, unpad, attention_calls, varlen_calls):
    """Outputs and gradients of the patched model equal the unpatched one's. Unpadded (the default), the
    layers run on the 11 + 16 real tokens through attention_varlen and padding positions come back as
    zero states (their logits are not compared); padded, the key-padding mask goes to attention and every
    position matches."""
    reference = _tiny_model(kind).eval()
    patched = copy.deepcopy(reference)
    params_before = {name: p for name, p in patched.named_parameters()}
    patched, replaced = patch_hf(patched, unpad=unpad)

    # Same parameter objects under the same names; same state-dict keys as the original.
    assert {name: p for name, p in patched.named_parameters()}.keys() == params_before.keys()
    assert all(p is params_before[name] for name, p in patched.named_parameters())
    assert patched.state_dict().keys() == reference.state_dict().keys()
    layers = TINY["num_hidden_layers"]
    assert sum("-> electra_kernels.attention" in r for r in replaced) == layers
    assert sum("FusedDenseDropoutAddLayerNorm" in r for r in replaced) == 2 * layers
    assert sum("FusedDenseBiasGELU" in r for r in replaced) == layers
    assert any(r.endswith("embeddings.LayerNorm: LayerNorm -> FusedLayerNorm") for r in replaced)
    assert not any(type(m) is torch.nn.LayerNorm for m in patched.modules())
    norm_lines = [r for r in replaced if r.endswith("-> FusedLayerNorm")]
    assert isinstance(patched.get_submodule(norm_lines[-1].split(":")[0]), FusedLayerNorm)

    assert sum(".forward -> unpadded" in r for r in replaced) == int(unpad)

    batch = _batch(kind)
    ref_out = reference(**batch)
    out = patched(**batch)
    if unpad:
        assert not attention_calls and varlen_calls == [((27, 2, 32), [0, 16, 27], 16)] * layers
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(out.logits[real], ref_out.logits[real], atol=2e-5, rtol=1e-4)
    else:
        assert not varlen_calls and len(attention_calls) == layers and attention_calls[0].dtype == torch.bool
        assert attention_calls[0].shape == batch["attention_mask"].shape
        torch.testing.assert_close(out.logits, ref_out.logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref_out.loss, atol=2e-5, rtol=1e-4)
    ref_out.loss.backward()
    out.loss.backward()
    for (name, p), (_, ref_p) in zip(patched.named_parameters(), reference.named_parameters()):
        if ref_p.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, ref_p.grad, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_bf16_autocast_mixed_dtypes():
    """Under autocast the dense outputs are bf16 and the residual stream fp32: the fused LayerNorm takes
    both. Logits, loss and every parameter gradient of the patched model stay within 2x the unpatched
    model's own bf16-autocast error of the float64 truth (plus 1% of the largest value)."""
    torch.manual_seed(0)
    # Weights 10x BERT's init: at std 0.02 the attention output is so small next to the residual stream
    # that zeroing it moved the logits by about the budget; here it moves them 50x the budget.
    reference = _tiny_model("bert", num_hidden_layers=2, initializer_range=0.2).eval()
    patched, _ = patch_hf(copy.deepcopy(reference))
    truth_model = copy.deepcopy(reference).double()
    batch = _batch("bert")
    truth = truth_model(**batch)
    truth.loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref_out = patched(**batch), reference(**batch)
    assert out.logits.dtype == ref_out.logits.dtype == torch.bfloat16
    out.loss.backward()
    ref_out.loss.backward()

    def check(name, got, same_dtype, exact):
        exact = exact.double()
        err = (got.double() - exact).abs().max().item()
        budget = 2 * (same_dtype.double() - exact).abs().max().item() + 1e-2 * exact.abs().max().item()
        assert err <= budget, f"{name}: patched error {err:.3g} > {budget:.3g} (2x unpatched bf16 + 1%)"

    real = batch["attention_mask"].bool()  # padding positions are zero states when unpadded
    check("logits", out.logits[real], ref_out.logits[real], truth.logits[real])
    check("loss", out.loss, ref_out.loss, truth.loss)
    compared = 0
    for (name, p), (_, ref_p), (_, exact) in zip(patched.named_parameters(), reference.named_parameters(),
                                                 truth_model.named_parameters()):
        if exact.grad is None:
            continue
        assert p.grad.dtype == torch.float32, name
        check(f"d{name}", p.grad, ref_p.grad, exact.grad)
        compared += 1
    assert compared > 20


def test_train_mode_dropout_runs_and_masks_key_padding():
    torch.manual_seed(1)
    model, _ = patch_hf(_tiny_model("bert", num_hidden_layers=1))
    model.train()
    batch = _batch("bert")
    first = model(**batch)
    first.loss.backward()
    second = model(**batch)
    assert torch.isfinite(first.logits).all() and torch.isfinite(second.logits).all()
    assert not torch.allclose(first.logits, second.logits)  # fresh dropout masks per call
    # Padded keys are invisible: changing the ids at padded positions changes nothing for real tokens.
    model.eval()
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][1, 11:] = 7
    a = model(**batch).logits[1, :11]
    b = model(**changed).logits[1, :11]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prebuilt_4d_masks(attention_calls):
    reference = _tiny_model("bert").eval()
    patched, _ = patch_hf(copy.deepcopy(reference))
    batch = _batch("bert")
    pad = batch["attention_mask"]
    additive = (1.0 - pad[:, None, None, :].float()) * torch.finfo(torch.float32).min
    additive = additive.expand(2, 1, 16, 16)
    torch.testing.assert_close(patched(input_ids=batch["input_ids"], attention_mask=additive).logits,
                               reference(input_ids=batch["input_ids"], attention_mask=additive).logits,
                               atol=2e-5, rtol=1e-4)
    causal = torch.ones(16, 16, dtype=torch.bool).tril().expand(2, 1, 16, 16)
    with pytest.raises(ValueError, match="only key-padding masks"):
        patched(input_ids=batch["input_ids"], attention_mask=causal)
    biased = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="attention bias"):
        patched(input_ids=batch["input_ids"], attention_mask=biased)


def test_patched_model_compiles_fullgraph():
    """A patched model stays torch.compile-friendly: no graph break in the mask/attention glue."""
    reference = _tiny_model("bert", num_hidden_layers=1).eval()
    patched, _ = patch_hf(copy.deepcopy(reference))
    batch = _batch("bert")
    torch._dynamo.reset()
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    out = compiled(**batch)
    torch.testing.assert_close(out.logits, reference(**batch).logits, atol=2e-5, rtol=1e-4)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)


def test_output_attentions_at_call_time_is_refused():
    model, _ = patch_hf(_tiny_model("bert").eval())
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=torch.randint(3, 99, (1, 8)), output_attentions=True)


@pytest.mark.parametrize(
    "kind, overrides, match",
    [
        ("bert", dict(position_embedding_type="relative_key"), "position_embedding_type"),
        ("bert", dict(output_attentions=True), "output_attentions"),
        ("bert", dict(is_decoder=True), "decoder"),
        ("roberta", dict(is_decoder=True, add_cross_attention=True), "cross-attention"),
        ("electra", dict(hidden_size=256, num_attention_heads=1), "head dim 256"),
    ],
)
def test_unsupported_configurations_are_refused(kind, overrides, match):
    model = _tiny_model(kind, **overrides)
    before = copy.deepcopy(model.state_dict())
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match=match):
        patch_hf(model)
    # Nothing changed.
    assert model.config._attn_implementation == implementation
    assert any(type(m) is torch.nn.LayerNorm for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_model_type_is_refused():
    config = transformers.DistilBertConfig(vocab_size=99, dim=64, n_layers=1, n_heads=2, hidden_dim=128)
    with pytest.raises(ValueError, match="model types"):
        patch_hf(transformers.DistilBertModel(config))
    with pytest.raises(ValueError, match="PreTrainedModel"):
        patch_hf(torch.nn.Linear(2, 2))


def test_partial_patch_keeps_the_rest():
    model, replaced = patch_hf(_tiny_model("bert"), attention=False, bias_gelu=False)
    assert all("LayerNorm" in r for r in replaced) and replaced
    assert model.config._attn_implementation != hf_patch.IMPLEMENTATION_NAME
    assert type(model.bert.encoder.layer[0].intermediate).__name__ == "BertIntermediate"


def test_import_does_not_pull_heavy_packages():
    code = (
        "import sys, electra_kernels\n"
        "heavy = [m for m in ('transformers', 'electra_fast', 'deepspeed', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(electra_kernels.patch_hf)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


def test_hf_bert_benchmark_cpu_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the script imports benchmarks/_common.py
    spec = importlib.util.spec_from_file_location("hf_bert_benchmark", REPO / "benchmarks" / "hf_bert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--cpu-smoke", "--results-dir", str(tmp_path), "--no-plot"])
    printed = capsys.readouterr().out
    assert re.search(r"\|\s+hf \|", printed) and re.search(r"\|\s+patched \|", printed)
    assert re.search(r"\|\s+patched-padded \|", printed)
    rows = (tmp_path / "hf_bert.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and rows[0].startswith("date,")  # header + one row per variant
    assert len((tmp_path / "hf_bert.jsonl").read_text().strip().splitlines()) == 3
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA"):
            module.main(["--no-save"])


@pytest.mark.parametrize("kind", ["bert", "electra"])
def test_unpadded_hidden_states_pooler_and_fallbacks(kind, attention_calls, varlen_calls):
    """Unpadded: every hidden state (the first layer's input, each layer's output) and BERT's pooler equal
    the unpatched model's at real positions, with zeros at padding, left padding included; gradient
    checkpointing in train mode gives the same gradients. A mask with a hole inside a row runs padded."""
    torch.manual_seed(7)
    config_class, model_class = ((transformers.BertConfig, transformers.BertModel) if kind == "bert"
                                 else (transformers.ElectraConfig, transformers.ElectraModel))
    extra = {"embedding_size": 32} if kind == "electra" else {}
    reference = model_class(config_class(**TINY, **extra)).eval()
    patched, _ = patch_hf(copy.deepcopy(reference))
    batch = _batch(kind)
    batch.pop("labels")
    batch["attention_mask"] = batch["attention_mask"].flip(1)  # left padding
    real = batch["attention_mask"].bool()
    out = patched(**batch, output_hidden_states=True)
    ref = reference(**batch, output_hidden_states=True)
    assert len(varlen_calls) == TINY["num_hidden_layers"] and not attention_calls
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for state, state_ref in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(state[real], state_ref[real], atol=2e-5, rtol=1e-4)
        assert state[~real].abs().max() == 0
    if kind == "bert":  # the pooler reads column 0: a real token in row 0 (padding in row 1 is zeros)
        torch.testing.assert_close(out.pooler_output[0], ref.pooler_output[0], atol=2e-5, rtol=1e-4)
    as_tuple = patched(**batch, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state, atol=0, rtol=0)

    for model in (reference, patched):
        model.train()
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**batch).last_hidden_state[real].square().sum().backward()
    for (name, p), (_, ref_p) in zip(patched.named_parameters(), reference.named_parameters()):
        if ref_p.grad is not None:
            # A squared-sum loss: gradients of order 10, summed over every token (fp32 order of summation).
            torch.testing.assert_close(p.grad, ref_p.grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")

    holed = dict(batch, attention_mask=batch["attention_mask"].clone())
    holed["attention_mask"][0, 4:6] = 0
    attention_calls.clear(), varlen_calls.clear()
    patched.eval()
    reference.eval()
    holed_real = holed["attention_mask"].bool()
    torch.testing.assert_close(patched(**holed).last_hidden_state[holed_real],
                               reference(**holed).last_hidden_state[holed_real], atol=2e-5, rtol=1e-4)
    assert len(attention_calls) == TINY["num_hidden_layers"] and not varlen_calls


def test_a_patched_model_pickles_and_copies_with_its_unpadded_forward(varlen_calls):
    """Pickling (what torch.save(model) and multiprocessing do) and deepcopy keep the unpadded forward (a
    bound method would pickle as a name the instance does not have)."""
    import pickle

    reference = _tiny_model("bert", num_hidden_layers=1).eval()
    patched, _ = patch_hf(copy.deepcopy(reference))
    batch = _batch("bert")
    real = batch["attention_mask"].bool()
    for model in (pickle.loads(pickle.dumps(patched)), copy.deepcopy(patched)):
        assert model.bert.forward.__self__ is model.bert
        varlen_calls.clear()
        torch.testing.assert_close(model(**batch).logits[real], reference(**batch).logits[real], atol=2e-5,
                                   rtol=1e-4)
        assert len(varlen_calls) == 1
