"""electra_kernels.patch_hf on tiny random ModernBERT models (fp32, CPU, kernels in Triton's interpreter):
outputs and gradients match the unpatched model (transformers' eager attention), global and sliding-window
layers, rotary, bias-free norms, GeGLU; unsupported configurations are refused before anything changes."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
mb = pytest.importorskip("transformers.models.modernbert.modeling_modernbert")

from electra_kernels import FusedLayerNorm, patch_hf  # noqa: E402
from electra_kernels.hf_patch_modernbert import FusedModernBertAttention, FusedModernBertMLP  # noqa: E402

# 3 layers with global_attn_every_n_layers=2: layers 0 and 2 global, layer 1 sliding (window 4 < seq 24,
# so the window really masks); head dim 16.
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=64, local_attention=8, global_attn_every_n_layers=2, pad_token_id=0,
            attn_implementation="eager")


def _batch(seq=24, labels_kind="mlm"):
    input_ids = torch.randint(3, TINY["vocab_size"], (2, seq))
    attention_mask = torch.ones(2, seq, dtype=torch.long)
    attention_mask[1, 15:] = 0  # second row right-padded
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    if labels_kind == "mlm":
        labels = torch.where(torch.rand(2, seq) < 0.3, input_ids, torch.full_like(input_ids, -100))
        labels[0, 0] = input_ids[0, 0]
        # No targets on padding: its hidden states mean nothing (a padded query with no real key in its
        # window gets zeros from the kernel and an average of padding from transformers' eager softmax).
        labels = labels.masked_fill(attention_mask == 0, -100)
    elif labels_kind == "seq":
        labels = torch.tensor([0, 1])
    elif labels_kind == "tok":
        labels = torch.randint(0, 2, (2, seq)).masked_fill(attention_mask == 0, -100)
    else:
        labels = None
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if labels is not None:
        batch["labels"] = labels
    return batch


def _compare(model, batch, out_key):
    model.eval()
    patched = copy.deepcopy(model)
    _, replaced = patch_hf(patched)
    assert any("FusedModernBertAttention" in r for r in replaced) and any("GeGLU" in r for r in replaced)
    out_ref = model(**batch)
    out = patched(**batch)
    mask = batch["attention_mask"].bool()
    ref_value, value = getattr(out_ref, out_key), getattr(out, out_key)
    if out_key == "last_hidden_state" or (out_key == "logits" and ref_value.dim() == 3):
        ref_value, value = ref_value[mask], value[mask]  # padded positions carry no meaning
    torch.testing.assert_close(value, ref_value, rtol=2e-4, atol=2e-4)
    loss_ref = out_ref.loss if getattr(out_ref, "loss", None) is not None else (ref_value.square().sum())
    loss = out.loss if getattr(out, "loss", None) is not None else value.square().sum()
    torch.testing.assert_close(loss, loss_ref, rtol=2e-4, atol=2e-4)
    loss_ref.backward()
    loss.backward()
    grads = dict(patched.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None or grads[name].grad.abs().max() == 0, name
            continue
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    return patched, replaced


@pytest.mark.parametrize("rotary_mode", ["fused", "separate"])
def test_masked_lm_matches_unpatched(rotary_mode, monkeypatch):
    monkeypatch.setenv("ELECTRA_KERNELS_ROTARY", rotary_mode)  # in the attention kernels, or the rotary kernel
    torch.manual_seed(0)
    model = mb.ModernBertForMaskedLM(mb.ModernBertConfig(**TINY))
    patched, replaced = _compare(model, _batch(), "logits")
    attn = [m for m in patched.modules() if isinstance(m, FusedModernBertAttention)]
    assert [a.window for a in attn] == [None, 4, None]  # local_attention 8 -> |i - j| <= 4
    assert sum(isinstance(m, FusedModernBertMLP) for m in patched.modules()) == 3
    norms = [m for m in patched.modules() if isinstance(m, FusedLayerNorm)]
    assert norms and all(n.bias is None for n in norms)  # norm_bias=False by default
    assert not any(type(m) is torch.nn.LayerNorm for m in patched.modules())


@pytest.mark.parametrize("head", ["base", "seq", "tok"])
def test_other_heads_match_unpatched(head):
    torch.manual_seed(1)
    config = mb.ModernBertConfig(**TINY, num_labels=2, norm_bias=True, mlp_bias=True, attention_bias=True)
    if head == "base":
        _compare(mb.ModernBertModel(config), _batch(labels_kind=None), "last_hidden_state")
    elif head == "seq":
        _compare(mb.ModernBertForSequenceClassification(config), _batch(labels_kind="seq"), "logits")
    else:
        _compare(mb.ModernBertForTokenClassification(config), _batch(labels_kind="tok"), "logits")


def test_per_row_position_ids_are_honoured():
    """position_ids that differ between rows give per-row cos/sin: the separate rotary kernel takes them."""
    torch.manual_seed(3)
    model = mb.ModernBertModel(mb.ModernBertConfig(**TINY)).eval()
    patched = copy.deepcopy(model)
    patch_hf(patched)
    batch = _batch(labels_kind=None)
    batch["position_ids"] = torch.stack([torch.arange(24), torch.arange(24) + 5])
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(patched(**batch).last_hidden_state[mask], model(**batch).last_hidden_state[mask],
                               rtol=2e-4, atol=2e-4)


def test_check_can_fail_without_the_window():
    """The comparison notices when the sliding layer attends globally."""
    torch.manual_seed(2)
    model = mb.ModernBertModel(mb.ModernBertConfig(**TINY)).eval()
    patched = copy.deepcopy(model)
    patch_hf(patched)
    for m in patched.modules():
        if isinstance(m, FusedModernBertAttention):
            m.window = None
    batch = _batch(labels_kind=None)
    mask = batch["attention_mask"].bool()
    diff = (patched(**batch).last_hidden_state[mask] - model(**batch).last_hidden_state[mask]).abs().max()
    assert diff > 1e-3


def test_unsupported_configurations_are_refused_before_any_change():
    for overrides, match in ((dict(hidden_activation="gelu_pytorch_tanh"), "hidden_activation"),
                             (dict(hidden_size=30, num_attention_heads=2), "head dim 15")):
        model = mb.ModernBertModel(mb.ModernBertConfig(**{**TINY, **overrides}))
        before = [type(m) for m in model.modules()]
        with pytest.raises(ValueError, match=match):
            patch_hf(model)
        assert [type(m) for m in model.modules()] == before
    model = mb.ModernBertModel(mb.ModernBertConfig(**TINY, hidden_activation="gelu_pytorch_tanh"))
    _, replaced = patch_hf(model, geglu=False)  # the tanh MLP kept, the rest patched
    assert not any("GeGLU" in r for r in replaced)


def test_hf_benchmark_modernbert_cpu_smoke(tmp_path, capsys, monkeypatch):
    from pathlib import Path
    import importlib.util
    import re

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.syspath_prepend(str(repo / "benchmarks"))
    spec = importlib.util.spec_from_file_location("hf_bert_benchmark_modern", repo / "benchmarks" / "hf_bert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--cpu-smoke", "--model", "modernbert", "--results-dir", str(tmp_path), "--no-plot"])
    printed = capsys.readouterr().out
    assert re.search(r"\|\s+hf-modernbert \|", printed) and re.search(r"\|\s+patched-modernbert \|", printed)
    assert re.search(r"\|\s+patched-modernbert-padded \|", printed)
    assert len((tmp_path / "hf_bert.jsonl").read_text().strip().splitlines()) == 3


# ----------------------------------------------------------------------------------------------------
# The unpadded encoder (electra_kernels/hf_modernbert_unpadded.py)
# ----------------------------------------------------------------------------------------------------
def _spy_calls(monkeypatch):
    """Record which attention entry point each patched layer used and how many rows its MLP saw."""
    from electra_kernels import hf_patch_modernbert as hpm

    calls = []
    for name in ("attention", "attention_varlen", "attention_rotary"):
        if name == "attention_rotary":
            import electra_kernels.attention_rotary as module
        else:
            module = hpm
        original = getattr(module, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    rows = []
    original_mlp = FusedModernBertMLP.forward
    monkeypatch.setattr(FusedModernBertMLP, "forward",
                        lambda self, h: rows.append(h.shape[:-1].numel()) or original_mlp(self, h))
    return calls, rows


def _masked(seq=24, left=False, hole=False):
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 5:] = 0
    if left:
        mask = mask.flip(1)
    if hole:
        mask[0, 3:6] = 0
    ids = torch.randint(3, TINY["vocab_size"], (3, seq)).masked_fill(mask == 0, 0)
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("left,rotary_mode,expected", [(False, "fused", "attention_rotary"),
                                                        (False, "separate", "attention_varlen"),
                                                        (True, "fused", "attention_varlen")])
def test_unpadded_encoder_runs_real_tokens_only(left, rotary_mode, expected, monkeypatch):
    """Padding never enters a layer: every MLP sees the real tokens only, attention runs varlen (the fused
    rotary kernels index their table by in-row offset only when rows start at column 0), and every hidden
    state equals the unpatched model's at real positions, zeros at padding; gradients match."""
    monkeypatch.setenv("ELECTRA_KERNELS_ROTARY", rotary_mode)
    torch.manual_seed(4)
    model = mb.ModernBertModel(mb.ModernBertConfig(**TINY)).eval()
    patched = copy.deepcopy(model)
    _, replaced = patch_hf(patched)
    assert any("ModernBertModel.forward -> unpadded" in r for r in replaced)
    batch = _masked(left=left)
    mask = batch["attention_mask"].bool()
    calls, rows = _spy_calls(monkeypatch)
    out = patched(**batch, output_hidden_states=True)
    ref = model(**batch, output_hidden_states=True)
    assert calls == [expected] * 3 and rows == [int(mask.sum())] * 3
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for state, state_ref in zip(out.hidden_states, ref.hidden_states):
        assert state.shape == state_ref.shape
        torch.testing.assert_close(state[mask], state_ref[mask], rtol=2e-4, atol=2e-4)
        assert state[~mask].abs().max() == 0
    torch.testing.assert_close(out.last_hidden_state, out.hidden_states[-1], rtol=0, atol=0)
    out.last_hidden_state[mask].square().sum().backward()
    ref.last_hidden_state[mask].square().sum().backward()
    grads = dict(patched.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    selected = patched(**batch, output_hidden_states=[0, -1], return_dict=False)
    torch.testing.assert_close(selected[1][1], out.last_hidden_state, rtol=0, atol=0)
    assert len(selected[1]) == 2


def test_padded_path_where_unpadding_cannot_be_exact(monkeypatch):
    """A mask with a hole inside a row (columns, not packed offsets, are the positions and window
    distances there), a batch with no padding, and unpad=False all keep the padded layout, and match."""
    monkeypatch.setenv("ELECTRA_KERNELS_ROTARY", "separate")  # the padded path then calls `attention`
    torch.manual_seed(5)
    model = mb.ModernBertModel(mb.ModernBertConfig(**TINY)).eval()
    patched = copy.deepcopy(model)
    patch_hf(patched)
    kept = copy.deepcopy(model)
    _, replaced = patch_hf(kept, unpad=False)
    assert not any("unpadded" in r for r in replaced)
    calls, rows = _spy_calls(monkeypatch)
    holed = _masked(hole=True)
    full = dict(input_ids=holed["input_ids"], attention_mask=torch.ones_like(holed["attention_mask"]))
    for m, batch in ((patched, holed), (patched, full), (kept, _masked())):
        calls.clear(), rows.clear()
        mask = batch["attention_mask"].bool()
        out = m(**batch).last_hidden_state
        assert calls == ["attention"] * 3 and rows == [mask.numel()] * 3
        torch.testing.assert_close(out[mask], model(**batch).last_hidden_state[mask], rtol=2e-4, atol=2e-4)


def test_a_packed_batch_keeps_documents_apart():
    """One row holding three documents (transformers' flattened-batch keywords cu_seq_lens_q / max_length_q,
    positions restarting per document) equals each document run alone through the unpatched model."""
    torch.manual_seed(6)
    model = mb.ModernBertModel(mb.ModernBertConfig(**TINY)).eval()
    patched = copy.deepcopy(model)
    patch_hf(patched)
    lengths = [9, 13, 6]
    docs = [torch.randint(3, TINY["vocab_size"], (1, n)) for n in lengths]
    cu = torch.tensor([0, 9, 22, 28], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    out = patched(input_ids=torch.cat(docs, dim=1), position_ids=positions, cu_seq_lens_q=cu, max_length_q=13,
                  cu_seq_lens_k=cu, max_length_k=13).last_hidden_state
    ref = torch.cat([model(input_ids=d).last_hidden_state for d in docs], dim=1)
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)


def test_patched_model_compiles_fullgraph():
    """Inside torch.compile the unpadded forward keeps the padded layout (no host read of the mask), so a
    patched model still compiles to one graph, and matches."""
    torch.manual_seed(8)
    model = mb.ModernBertModel(mb.ModernBertConfig(**TINY)).eval()
    patched = copy.deepcopy(model)
    patch_hf(patched)
    batch = _masked()
    torch._dynamo.reset()
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(compiled(**batch).last_hidden_state[mask], model(**batch).last_hidden_state[mask],
                               rtol=2e-4, atol=2e-4)
