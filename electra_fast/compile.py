"""``train.compile`` / ``train.cuda_graphs``: capture the model's encoders with ``torch.compile``.

    compile_for_training(model, "default")                    # inductor, dynamic packed shapes allowed
    compile_for_training(model, "default", cuda_graphs=True)  # + CUDA graphs, one per token bucket

What is compiled: the shared embeddings, each encoder body and the prediction heads' dense layers, each
in place (``nn.Module.compile``), so parameter names, state dicts, checkpoints and the DeepSpeed engine
see the same modules as in eager mode. What stays eager, on purpose: the objective (its masks come from
a ``torch.Generator`` and the sampling seed from a host generator, which would break or specialise a
graph each step) and the fused loss heads (``torch.library`` ops: one node either way). The Triton
kernels inside the encoders are ``torch.library`` custom ops too, so they trace as single nodes.

CUDA graphs need static shapes. The padded layout (``model.unpad=false``) has them: every shape is fixed
by (micro batch, seq_len, max_predictions). The packed layout's token count changes every step, so with
CUDA graphs it is rounded up to one of ``token_buckets`` fixed counts (:mod:`electra_fast.buckets`,
inert rows that nothing reads fill the gap, ``max_seqlen`` is ``seq_len``) and the parts are compiled
with static shapes: one graph, and one CUDA graph, per bucket a run meets (a few: the token counts of
one dataset cluster). Compiled without CUDA graphs the packed count is marked dynamic after the first
change instead (one recompile, no padding).
"""

from __future__ import annotations

import torch
from torch import nn

from .buckets import DEFAULT_BUCKETS

# train.compile x train.cuda_graphs -> torch.compile mode.
_TORCH_MODES = {
    ("default", False): "default",
    ("default", True): "reduce-overhead",
    ("max-autotune", False): "max-autotune-no-cudagraphs",
    ("max-autotune", True): "max-autotune",
}

# The submodules that are compiled, where the model has them.
_COMPILED_PARTS = ("embeddings", "discriminator_embeddings", "generator", "discriminator", "electra",
                   "generator_predictions", "discriminator_predictions")


def torch_compile_mode(mode: str, cuda_graphs: bool = False) -> str | None:
    """The torch.compile mode for ``train.compile`` / ``train.cuda_graphs``; None for "none"."""
    if mode == "none":
        if cuda_graphs:
            raise ValueError("cuda_graphs needs compile mode default or max-autotune (torch.compile captures them)")
        return None
    if (mode, bool(cuda_graphs)) not in _TORCH_MODES:
        raise ValueError(f"compile mode must be none, default or max-autotune, got {mode!r}")
    return _TORCH_MODES[(mode, bool(cuda_graphs))]


def compile_for_training(model: nn.Module, mode: str, cuda_graphs: bool = False, *,
                         backend="inductor", token_buckets: int = DEFAULT_BUCKETS) -> nn.Module:
    """Compile ``model``'s encoders and heads in place for training; returns ``model``.

    ``mode``: "none" (nothing happens), "default" or "max-autotune". ``backend``: torch.compile's
    backend ("aot_eager" runs the captured graphs without inductor: the CPU tests use it). Call it
    before handing the model to DeepSpeed; with ZeRO-3 prefer ``engine.compile`` (ZeRO-3's parameter
    gathering hooks run inside each submodule call). ``token_buckets``: with ``cuda_graphs``, how many
    fixed token counts the packed layout is rounded up to (set on ``model.token_buckets``).
    """
    torch_mode = torch_compile_mode(mode, cuda_graphs)
    if torch_mode is None:
        return model
    options = {} if backend != "inductor" else {"mode": torch_mode}
    if cuda_graphs:
        if token_buckets <= 0:
            raise ValueError(f"cuda_graphs needs token_buckets >= 1, got {token_buckets}")
        if hasattr(model, "token_buckets"):
            model.token_buckets = int(token_buckets)
        elif getattr(getattr(model, "config", None), "unpad", False):
            raise ValueError(f"cuda_graphs on the packed layout needs token buckets, which {type(model).__name__} "
                             "does not have: set model.unpad=false")
        # Static shapes: one graph per bucket, each compiled for its own row count (inductor's static code,
        # and nothing for CUDA graphs to re-record). Each compiled part may then see every bucket, in train
        # and eval mode, for both networks (they share code): room for all of them before dynamo gives up.
        options["dynamic"] = False
        limit = 4 * token_buckets
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    for name in _COMPILED_PARTS:
        part = getattr(model, name, None)
        if isinstance(part, nn.Module):
            part.compile(backend=backend, **options)
    return model
