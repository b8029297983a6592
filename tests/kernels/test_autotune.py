"""One autotune style (kernels/_autotune.py) and one output-poisoning helper (kernels/_outputs.py).

``ELECTRA_KERNELS_AUTOTUNE=0`` must leave every autotuned kernel with exactly its space's first
candidate (checked in a subprocess without the interpreter, which replaces the GPU configs with one
small config of its own); with tuning on, every candidate is there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from electra_kernels import _outputs

_LIST_CONFIGS = r"""
import importlib, json
from triton.runtime.autotuner import Autotuner
found = {}
for name in ("attention", "mlm_head"):
    module = importlib.import_module(f"electra_kernels.{name}")
    for attr, value in vars(module).items():
        if isinstance(value, Autotuner):
            found[f"{name}.{attr}"] = [[*c.kwargs.values(), c.num_warps, c.num_stages] for c in value.configs]
spaces = {
    "attention._attn_fwd_kernel": "_FWD_SPACE", "attention._attn_bwd_dkdv_kernel": "_DKDV_SPACE",
    "attention._attn_bwd_fused_kernel": "_FUSED_SPACE", "attention._attn_bwd_dq_kernel": "_DQ_SPACE",
    "mlm_head._mlm_head_fwd_kernel": "_FWD_SPACE", "mlm_head._mlm_head_dlogits_kernel": "_DLOGITS_SPACE",
}
out = {}
for key, space in spaces.items():
    module = importlib.import_module("electra_kernels." + key.split(".")[0])
    out[key] = {"configs": found.get(key), "space": [list(c) for c in getattr(module, space)]}
print("CONFIGS", json.dumps(out))
"""


def _configs(autotune: str):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ELECTRA_KERNELS_AUTOTUNE"] = autotune
    result = subprocess.run([sys.executable, "-c", _LIST_CONFIGS], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("CONFIGS "))
    return json.loads(line[8:])


@pytest.mark.parametrize("autotune", ["0", "1"])
def test_autotune_switch_keeps_only_the_default_everywhere(autotune):
    found = _configs(autotune)
    assert len(found) == 6
    for key, entry in found.items():
        assert entry["configs"] is not None, f"{key} is not autotuned"
        expected = entry["space"][:1] if autotune == "0" else entry["space"]
        assert entry["configs"] == expected, key


def test_poisoning_helper_fills_every_dtype_with_garbage():
    assert _outputs.POISON  # tests/kernels/conftest.py turns it on for every kernel test
    values = {dtype: _outputs.new_empty((3,), dtype=dtype, device="cpu") for dtype in
              (torch.float32, torch.bfloat16, torch.bool, torch.uint8, torch.int32, torch.int64)}
    assert values[torch.float32].isnan().all() and values[torch.bfloat16].isnan().all()
    assert values[torch.bool].all()
    assert (values[torch.uint8] == 0xA5).all()
    assert (values[torch.int32] == torch.iinfo(torch.int32).min).all()
    assert (values[torch.int64] == torch.iinfo(torch.int64).min).all()


def test_every_kernel_module_allocates_outputs_through_the_helper():
    """No kernel output bypasses the poisoning (a plain torch.empty in a launcher would)."""
    import importlib
    import inspect

    for name in ("attention", "mlm_head", "disc_head", "layer_norm", "bias_gelu"):
        source = inspect.getsource(importlib.import_module(f"electra_kernels.{name}"))
        assert "new_empty" in source, name
        assert "torch.empty(" not in source.replace("nn.Parameter(torch.empty(", ""), name
