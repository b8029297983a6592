"""The compiled training step (train.compile) gives eager's losses.

``compile_for_training`` captures the encoders and heads with torch.compile; on the CPU the
``aot_eager`` backend runs the captured (functionalised, decomposed) graphs without inductor, so a
mismatch here is a capture bug, not a code-generation one. Dropout is off: eager and compiled graphs
would consume the random stream in different orders.
"""

from __future__ import annotations

import pytest
import torch

from electra_fast.compile import compile_for_training, torch_compile_mode
from electra_fast.config import ConfigError, build_config
from electra_fast.model import ElectraPretrainingModel, packed_sizes

from helpers import random_batch, tiny_config

STEPS = 3


def _losses(cfg, state, batches, compiled: bool):
    torch._dynamo.reset()
    model = ElectraPretrainingModel(cfg)
    model.load_state_dict(state)
    if compiled:
        compile_for_training(model, "default", backend="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for batch in batches:
        out = model(*batch, **packed_sizes(batch[1]))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(torch.stack([out.mlm_loss, out.disc_loss]))
    return torch.stack(losses), model


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_compiled_step_matches_eager(impl):
    overrides = ["model.dropout=0.0", "model.attention_dropout=0.0"]
    if impl == "triton":  # the interpreter is slow: a smaller model for the kernel path
        overrides += ["model.num_layers=1", "model.vocab_size=128"]
    cfg = tiny_config(*overrides, impl=impl)
    torch.manual_seed(0)
    state = ElectraPretrainingModel(cfg).state_dict()
    batches = [random_batch(cfg, batch=2, seq_len=16, seed=i) for i in range(STEPS)]
    eager, _ = _losses(cfg, state, batches, compiled=False)
    compiled, model = _losses(cfg, state, batches, compiled=True)
    # Parameter names are untouched by the in-place compile (checkpoints and exports stay as they are).
    assert set(model.state_dict()) == set(state)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_compile_options_are_checked():
    assert torch_compile_mode("none") is None
    assert torch_compile_mode("default", cuda_graphs=True) == "reduce-overhead"
    assert torch_compile_mode("max-autotune") == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="compile mode"):
        torch_compile_mode("fast")
    assert build_config("tiny", overrides=["train.compile=max-autotune"]).train.compile == "max-autotune"
    with pytest.raises(ConfigError, match="train.compile"):
        build_config("tiny", overrides=["train.compile=fast"])
    with pytest.raises(ConfigError, match="train.cuda_graphs needs train.compile"):
        build_config("tiny", overrides=["train.cuda_graphs=true"])
    # CUDA graphs take either layout: the packed one is rounded up to token buckets (tests/test_packed_buckets.py).
    build_config("tiny", overrides=["train.cuda_graphs=true", "train.compile=default"])
    build_config("tiny", overrides=["train.cuda_graphs=true", "train.compile=default", "model.unpad=false"])
    model = ElectraPretrainingModel(tiny_config())
    assert compile_for_training(model, "none") is model
