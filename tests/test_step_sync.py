"""No host-device synchronisation inside a training step (forward + backward).

On the CPU nothing synchronises, so this test counts the calls that would on CUDA: reading a tensor's
value on the host (``item``, ``tolist``, ``__bool__``/``__int__``/``__float__``/``__index__``, ``cpu``,
``numpy``), ops whose output size depends on values (``nonzero``, ``argwhere``, ``masked_select``,
``unique``) and boolean-mask indexing, when made from the project's own code (electra_fast or
electra_kernels). Two calls are allowed by name because they read *host* generators by design on every
device: ``ObjectiveRNG.next_sampling_seed`` (the MLM head's Gumbel seed) and the attention launcher's
``_seed_value`` (the dropout seed, drawn from torch's CPU generator). A third reads only host tensors:
``attention._check_packed_sizes`` reads ``cu_seqlens`` when it lives on the CPU (here, where the whole
model does) and never when it is on the GPU. On CUDA,
``benchmarks/throughput.py --sync-check`` runs a step under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import electra_fast
import electra_kernels
from electra_fast.model import ElectraPretrainingModel, packed_sizes

from helpers import random_batch, tiny_config

_OWN_CODE = tuple(str(Path(m.__file__).resolve().parent) for m in (electra_fast, electra_kernels))
_HOST_GENERATOR_READERS = {"next_sampling_seed", "_seed_value"}
# Functions that read a tensor's values only when it is a host tensor: attention_varlen's contract check
# reads cu_seqlens when it lies on the CPU (free there) and skips the read for a device tensor, which is
# what cu_seqlens is in a GPU run. On this CPU stand-in for the GPU its read is not a would-be sync.
_HOST_TENSOR_READERS = {"_check_packed_sizes"}
_VALUE_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
                "masked_select", "unique")
_SIZE_FROM_VALUES = ("nonzero", "argwhere", "masked_select", "unique")


def _is_bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@pytest.fixture
def sync_counter(monkeypatch):
    """Counter of would-be synchronisations made from our code, keyed by 'caller:what'."""
    counts: Counter = Counter()

    def record(what: str) -> None:
        frame = sys._getframe(2)  # the caller of the patched function
        caller = str(Path(frame.f_code.co_filename).resolve())
        if caller.startswith(_OWN_CODE) and frame.f_code.co_name not in _HOST_GENERATOR_READERS | _HOST_TENSOR_READERS:
            counts[f"{Path(caller).name}:{frame.f_code.co_name}:{what}"] += 1

    def wrap(owner, name):
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            record(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, patched)

    for name in _VALUE_READS:
        wrap(torch.Tensor, name)
    for name in _SIZE_FROM_VALUES:
        wrap(torch, name)
    getitem = torch.Tensor.__getitem__

    def patched_getitem(self, index):
        if _is_bool_index(index):
            record("bool-index")
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", patched_getitem)
    return counts


def _step(model, batch, **sizes):
    out = model(*batch, **sizes)
    out.loss.backward()
    return out


def test_reference_padded_step_has_no_sync(sync_counter):
    cfg = tiny_config()  # dropout on: the training step as it runs
    model = ElectraPretrainingModel(cfg)
    batch = random_batch(cfg, batch=3, seq_len=16)
    _step(model, batch)
    assert not sync_counter, dict(sync_counter)


def test_kernel_packed_step_has_no_sync_with_host_sizes(sync_counter):
    cfg = tiny_config(impl="triton")  # every hot spot on its kernel (interpreter), packed layout
    model = ElectraPretrainingModel(cfg)
    batch = random_batch(cfg, batch=2, seq_len=16)
    assert model._layout(batch[1], **packed_sizes(batch[1])).packed
    sizes = packed_sizes(batch[1])  # on the host, before the step (what the loader does)
    sync_counter.clear()
    _step(model, batch, **sizes)
    assert not sync_counter, dict(sync_counter)

    # Without the host sizes the layout reads them from the device: the counter sees it (it can trip).
    _step(model, batch)
    assert sum(sync_counter.values()) >= 2, dict(sync_counter)


def test_host_sizes_give_the_same_layout_and_loss():
    cfg = tiny_config("model.dropout=0.0", "model.attention_dropout=0.0", impl="triton")
    model = ElectraPretrainingModel(cfg)
    batch = random_batch(cfg, batch=3, seq_len=16)
    derived = model._layout(batch[1])
    given = model._layout(batch[1], **packed_sizes(batch[1]))
    assert given.max_seqlen == derived.max_seqlen
    assert torch.equal(given.indices, derived.indices) and torch.equal(given.cu_seqlens, derived.cu_seqlens)
    with pytest.raises(ValueError, match="host"):
        packed_sizes(batch[1].to("meta"))
