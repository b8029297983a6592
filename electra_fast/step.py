"""The pretraining step's fast path for the trainer, decided in one place.

    note = compile_model(model, cfg.train)                       # in place, before deepspeed.initialize
    args, sizes = step_inputs(batch, device)                     # one loader batch -> engine(*args, **sizes)

``step_inputs``: the three token tensors go to the device without blocking; the packed layout's
``max_seqlen`` / ``total_tokens`` stay host integers (the loader computed them from its host copy of
the mask), so the forward builds its layout with no host-device synchronisation.

``compile_model``: ``train.compile`` / ``train.cuda_graphs`` through
:func:`electra_fast.compile.compile_for_training`, which compiles each encoder and head in place
(``nn.Module.compile``) and leaves the objective eager. The same call serves every ZeRO stage: the
parameter names DeepSpeed sees are unchanged, and ZeRO-3's parameter-gathering module hooks, which
DeepSpeed marks ``torch.compiler.disable``, run eagerly around the compiled graphs (on the CPU a ZeRO-3
run compiled with ``aot_eager`` gives the eager run's losses). DeepSpeed 0.19's ``engine.compile()`` is
not used: without its DeepCompile passes it compiles the whole top-level forward, objective included,
whose masks and sampling seeds come from host generators (a graph break or a recompile every step).
"""

from __future__ import annotations

from typing import Any

import torch

from .compile import compile_for_training

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def step_inputs(batch: dict[str, Any], device: torch.device) -> tuple[tuple[torch.Tensor, ...], dict[str, int]]:
    """A loader batch as the model's positional inputs on ``device`` and its host-side size keywords."""
    tensors = tuple(batch[key].to(device, non_blocking=True) for key in TOKEN_KEYS)
    return tensors, dict(batch.get("packed_sizes") or {})


def compile_model(model: torch.nn.Module, train_cfg, backend: str = "inductor") -> str | None:
    """Apply ``train.compile`` / ``train.cuda_graphs`` to ``model`` in place; what was done, for the log
    (None when nothing was). ``backend``: torch.compile's (the CPU tests use "aot_eager")."""
    if train_cfg.compile == "none":
        return None
    compile_for_training(model, train_cfg.compile, train_cfg.cuda_graphs, backend=backend)
    return f"torch.compile {train_cfg.compile}" + (" + CUDA graphs" if train_cfg.cuda_graphs else "")
