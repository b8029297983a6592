"""replaced_token_bce: the fused Triton kernels (run by Triton's interpreter on the CPU) against
float64 references: loss, logits, accuracy counts, every gradient (grad_output != 1 and == 1, a
gradient through the logits too), all-padding batches, label dtypes, torch.compile, the module, and
NaN-poisoned outputs.

On a GPU machine, ``TRITON_INTERPRET=0 pytest tests/kernels/test_disc_head.py`` runs the same tests
on CUDA plus one at 16,384 tokens x 768.
"""

import pytest
import torch

import electra_kernels as ek
from electra_kernels import disc_head as dh

from _compare import DEVICE, DTYPES, assert_close_to_fp64


def make_inputs(N, H, dtype, *, bias=True, pad_frac=0.3, label_dtype=torch.int64, weight_dtype=None):
    weight_dtype = dtype if weight_dtype is None else weight_dtype
    hidden = torch.randn(N, H, device=DEVICE).to(dtype)
    weight = (torch.randn(1, H, device=DEVICE) / H**0.5 * 2.0).to(weight_dtype)
    b = torch.randn(1, device=DEVICE).to(weight_dtype) if bias else None
    labels = (torch.rand(N, device=DEVICE) < 0.15).to(label_dtype)
    mask = torch.rand(N, device=DEVICE) >= pad_frac
    return hidden, weight, b, labels, mask


def run(fn, hidden, weight, bias, labels, mask, grad_loss, grad_logits=None):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss, logits, *stats = fn(*leaves, labels, mask)
    objective = loss * grad_loss.to(loss.dtype)
    if grad_logits is not None:
        objective = objective + (logits * grad_logits.to(logits.dtype)).sum()
    objective.backward()
    return loss.detach(), logits.detach(), stats, [t.grad if t is not None else None for t in leaves]


def check_against_reference(N, H, dtype, *, bias=True, pad_frac=0.3, label_dtype=torch.int64,
                            grad_loss=None, with_logits_grad=False, weight_dtype=None):
    hidden, weight, b, labels, mask = make_inputs(N, H, dtype, bias=bias, pad_frac=pad_frac,
                                                  label_dtype=label_dtype, weight_dtype=weight_dtype)
    grad_loss = torch.randn((), device=DEVICE) if grad_loss is None else torch.tensor(grad_loss, device=DEVICE)
    grad_logits = torch.randn(N, device=DEVICE) if with_logits_grad else None
    args = (hidden, weight, b, labels, mask)
    loss, logits, (num_correct, num_tokens), grads = run(ek.replaced_token_bce_with_stats, *args,
                                                         grad_loss, grad_logits)
    # torch's own computation in the inputs' dtype (autocast supplies the cast when they differ)
    with torch.autocast(DEVICE, dtype=dtype, enabled=weight.dtype != hidden.dtype):
        loss_t, logits_t, _, grads_t = run(ek.replaced_token_bce_ref, *args, grad_loss, grad_logits)
    as64 = [t.double() if t is not None else None for t in (hidden, weight, b)]
    loss_x, logits_x, (correct_x, tokens_x), grads_x = run(
        ek.replaced_token_bce_with_stats_ref, *as64, labels, mask, grad_loss.double(),
        grad_logits.double() if grad_logits is not None else None)

    assert loss.shape == () and loss.dtype == torch.float32
    assert logits.shape == (N,) and logits.dtype == torch.float32
    assert_close_to_fp64("loss", loss, loss_t, loss_x, dtype)
    assert_close_to_fp64("logits", logits, logits_t, logits_x, dtype)
    for name, g, g_t, g_x, src in zip(("hidden", "weight", "bias"), grads, grads_t, grads_x, as64):
        if src is None:
            continue
        assert g.shape == g_x.shape
        assert_close_to_fp64(f"d{name}", g, g_t, g_x, dtype)
    assert grads[0].dtype == hidden.dtype and grads[1].dtype == weight.dtype

    assert num_tokens.dtype == torch.int64 and num_tokens.item() == mask.sum().item()
    clear = logits_x.abs() > 1e-4  # the sign of a logit this close to 0 may flip with rounding
    correct = ((logits > 0) == (labels.float() > 0.5)) & mask
    assert torch.equal(correct[clear], (((logits_x > 0) == (labels.float() > 0.5)) & mask)[clear])
    assert num_correct.dtype == torch.int64 and num_correct.item() == correct.sum().item()
    if bool(clear.all()):
        assert num_correct.item() == correct_x.item() and num_tokens.item() == tokens_x.item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, H", [(1, 16), (77, 48), (1023, 96)])
def test_matches_fp64(N, H, dtype):
    check_against_reference(N, H, dtype)


def test_bf16_hidden_with_fp32_weight():
    # Autocast's situation: the weight is an fp32 master copy; its gradient must come back in fp32.
    check_against_reference(77, 48, torch.bfloat16, weight_dtype=torch.float32)


@pytest.mark.parametrize("label_dtype", [torch.bool, torch.float32, torch.int32])
def test_label_dtypes_and_no_bias(label_dtype):
    check_against_reference(77, 48, torch.float32, bias=False, label_dtype=label_dtype)


def test_soft_labels():
    hidden, weight, b, _, mask = make_inputs(77, 32, torch.float32)
    labels = torch.rand(77, device=DEVICE)  # BCE is defined for targets in [0, 1]
    loss, _ = ek.replaced_token_bce(hidden, weight, b, labels, mask)
    loss_x, _ = ek.replaced_token_bce_ref(hidden.double(), weight.double(), b.double(), labels, mask)
    torch.testing.assert_close(loss.double(), loss_x.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grad_loss", [1.0, 50.0])
def test_grad_output_scaling(grad_loss):
    # 1.0: the plain loss.backward(); 50.0: ELECTRA's discriminator weight.
    check_against_reference(77, 48, torch.float32, grad_loss=grad_loss)


def test_gradient_through_logits():
    check_against_reference(77, 48, torch.float32, with_logits_grad=True)


def test_all_padding_gives_zero_loss_and_gradients():
    hidden, weight, b, labels, _ = make_inputs(77, 48, torch.bfloat16)
    mask = torch.zeros(77, dtype=torch.bool, device=DEVICE)
    loss, logits, (num_correct, num_tokens), grads = run(
        ek.replaced_token_bce_with_stats, hidden, weight, b, labels, mask, torch.tensor(2.0, device=DEVICE))
    assert loss.item() == 0.0 and num_correct.item() == 0 and num_tokens.item() == 0
    assert torch.isfinite(logits).all()
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_no_rows():
    hidden, weight, b, labels, mask = make_inputs(0, 48, torch.float32)
    loss, logits, (num_correct, num_tokens), grads = run(
        ek.replaced_token_bce_with_stats, hidden, weight, b, labels, mask, torch.tensor(1.0, device=DEVICE))
    assert loss.item() == 0.0 and logits.shape == (0,) and num_tokens.item() == 0
    assert grads[0].shape == (0, 48) and torch.equal(grads[1], torch.zeros_like(grads[1]))


@pytest.mark.skipif(DEVICE != "cuda", reason="16k tokens: too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_electra_base_shape_on_gpu(dtype):
    check_against_reference(16384, 768, dtype)


def test_module_matches_linear_and_compiles():
    torch.manual_seed(1)
    head = ek.ReplacedTokenBCE(32).to(DEVICE)
    linear = torch.nn.Linear(32, 1).to(DEVICE)
    head.load_state_dict(linear.state_dict())  # same parameter names and shapes as nn.Linear(H, 1)
    assert set(head.state_dict()) == {"weight", "bias"}

    class TinyDiscriminator(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = torch.nn.Linear(32, 32)
            self.head = head

        def forward(self, x, labels, mask):
            return self.head(torch.nn.functional.gelu(self.dense(x)), labels, mask, return_stats=True)

    model = TinyDiscriminator().to(DEVICE)
    x = torch.randn(77, 32, device=DEVICE)
    labels = torch.randint(0, 2, (77,), device=DEVICE)
    mask = torch.rand(77, device=DEVICE) > 0.2

    def step(m):
        model.zero_grad()
        loss, logits, num_correct, num_tokens = m(x, labels, mask)
        (50.0 * loss).backward()
        return [loss.detach(), logits.detach(), num_correct, num_tokens] + [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    compiled = step(torch.compile(model, backend="aot_eager", fullgraph=True))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e)
    with torch.no_grad():
        h = torch.nn.functional.gelu(model.dense(x))
        torch.testing.assert_close(eager[1], linear(h).squeeze(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU fallback")
def test_reference_path_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = make_inputs(77, 48, torch.float32)
    for got, want in zip(ek.replaced_token_bce_with_stats(*args), ek.replaced_token_bce_with_stats_ref(*args)):
        assert torch.equal(got, want)


def test_bad_inputs_raise_clear_errors():
    hidden, weight, b, labels, mask = make_inputs(7, 16, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        ek.replaced_token_bce(hidden, weight[:, :8], b, labels, mask)
    with pytest.raises(ValueError, match="bias"):
        ek.replaced_token_bce(hidden, weight, torch.zeros(2, device=DEVICE), labels, mask)
    with pytest.raises(ValueError, match="labels"):
        ek.replaced_token_bce(hidden, weight, b, labels[:3], mask)
    with pytest.raises(ValueError, match="mask"):
        ek.replaced_token_bce(hidden, weight, b, labels, mask[:3])
    with pytest.raises(ValueError, match="hidden"):
        ek.replaced_token_bce(hidden[None], weight, b, labels, mask)


def test_reference_computes_in_float64_when_called_so():
    """The fp64 truth is fp64: logits and loss of float64 inputs match a hand-written float64 BCE to 1e-12."""
    hidden, weight, bias = torch.randn(77, 48, dtype=torch.float64), torch.randn(1, 48, dtype=torch.float64), \
        torch.randn(1, dtype=torch.float64)
    labels, mask = torch.rand(77) < 0.3, torch.rand(77) < 0.8
    loss, logits = ek.replaced_token_bce_ref(hidden, weight, bias, labels, mask)
    z = hidden @ weight[0] + bias[0]
    y = labels.double()
    per_token = torch.clamp(z, min=0) - z * y + torch.log1p(torch.exp(-z.abs()))
    assert logits.dtype == loss.dtype == torch.float64
    torch.testing.assert_close(logits, z, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, (per_token * mask).sum() / mask.sum(), rtol=1e-12, atol=1e-15)
