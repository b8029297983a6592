"""The GPU-compile gate, on the CPU: every kernel's default config, in the variants ELECTRA Small / Base /
Large run, compiled for sm_90 (H100) and sm_80 (A100) through Triton's real pipeline down to a cubin.

Triton's interpreter (which runs the other kernel tests) accepts what the GPU compiler does not. Here
each default must compile, spill no register, fit the architecture's shared memory per block, and, for
the matmul kernels, run every product on the architecture's tensor cores: wgmma on Hopper, mma.sync on
Ampere (a ``tl.dot`` whose shape wgmma cannot take falls back to mma.sync silently).

The variants come from the kernel files' own ``compile_variants()`` (``electra_kernels._gpu_compile``),
the same list ``benchmarks/compile_report.py --electra --defaults-only`` prints, plus the attention
defaults at head dim 128 (bf16, padded + key mask and packed, dropout on and off: what ``patch_hf`` runs
for BERT-style models with 128-dim heads; ``--head-dim 128 --kernel attention --defaults-only``), which
have their own config spaces (14 more variants, ~40 s on two busy cores). The compiles run in a
subprocess without TRITON_INTERPRET (the interpreter replaces the compiler at import), one per CPU, in
a fresh Triton cache: nothing is reused between runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from electra_kernels import _gpu_compile

_COMPILE = r"""
import json, os, sys
try:
    import triton.backends.nvidia  # noqa: F401
except ImportError as err:
    print("SKIP", err); sys.exit(0)
from electra_kernels import _gpu_compile as g
head_dim_128 = lambda v: (v.kernel.startswith("attention") and v.tags.get("head_dim") == 128
                          and v.tags.get("dtype") == "bf16" and v.tags.get("layout") in ("packed", "padded+mask"))
variants = [v for v in g.all_variants() if v.default and (g.is_electra(v) or head_dim_128(v))]
rows = g.compile_many(variants, (90, 80), jobs=os.cpu_count() or 2)
print("ROWS", json.dumps(rows))
"""


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; silences Triton 3.9's notice
    result = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=900)
    if result.stdout.startswith("SKIP"):
        pytest.skip(f"triton has no NVIDIA backend here: {result.stdout}")
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("ROWS "))
    return json.loads(line[5:])


def _describe(row):
    tags = {k: row[k] for k in ("dtype", "layout", "dropout", "head_dim", "embedding", "hidden", "residual")
            if row.get(k) is not None}
    return f"{row['kernel']} sm_{row['arch']} {row['config']} {tags}"


def test_every_kernel_and_both_architectures_are_covered(rows):
    kernels = {r["kernel"] for r in rows}
    for needed in ("attention fwd", "attention dk/dv", "attention dk/dv/dq fused", "attention dq", "mlm head fwd",
                   "mlm head dlogits", "disc head fwd", "disc head bwd", "layer norm fwd", "layer norm bwd",
                   "bias gelu fwd", "bias gelu bwd"):
        assert needed in kernels, f"{needed} is not compiled"
        assert {r["arch"] for r in rows if r["kernel"] == needed} == {80, 90}
    attention = [r for r in rows if r["kernel"] == "attention fwd"]
    assert {(r["layout"], r["dropout"]) for r in attention} == {
        (layout, dropout) for layout in ("packed", "padded+mask") for dropout in (False, True)}
    assert {r["embedding"] for r in rows if r["kernel"] == "mlm head fwd"} == {128, 768, 1024}
    for kernel in ("attention fwd", "attention dk/dv", "attention dq"):  # d=128: no fused kernel (attention.py)
        assert {(r["head_dim"], r["layout"], r["dropout"], r["arch"]) for r in rows if r["kernel"] == kernel} >= {
            (128, layout, dropout, arch) for layout in ("packed", "padded+mask") for dropout in (False, True)
            for arch in (80, 90)}, kernel


def test_defaults_compile(rows):
    failed = [f"{_describe(r)}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "\n".join(failed)


def test_defaults_do_not_spill(rows):
    spilled = [f"{_describe(r)}: {r['spill_bytes']} B spilled, {r['registers']} registers" for r in rows
               if not r["error"] and r["spill_bytes"]]
    assert not spilled, "\n".join(spilled)


def test_defaults_fit_shared_memory(rows):
    over = [f"{_describe(r)}: {r['shared']} B > {r['smem_limit']} B" for r in rows
            if not r["error"] and r["shared"] > r["smem_limit"]]
    assert not over, "\n".join(over)


def test_matmul_kernels_use_the_tensor_cores(rows):
    """wgmma (and no mma.sync fallback) on sm_90, mma.sync on sm_80, for every matmul kernel."""
    matmuls = [r for r in rows if r["matmul"] and not r["error"]]
    assert matmuls
    wrong = [f"{_describe(r)}: {r['tensor_core']}" for r in matmuls
             if r["tensor_core"] != ("wgmma" if r["arch"] >= 90 else "mma")]
    assert not wrong, "\n".join(wrong)


def test_the_checks_can_fail():
    """``problems`` (what the report flags) trips on each defect it is meant to catch."""
    good = dict(kernel="k", arch=90, error=None, spill_bytes=0, shared=1000, smem_limit=232448, matmul=True,
                dtype="bf16", tensor_core="wgmma")
    assert _gpu_compile.problems(good) == []
    assert _gpu_compile.problems(dict(good, spill_bytes=4))
    assert _gpu_compile.problems(dict(good, shared=232449))
    assert _gpu_compile.problems(dict(good, tensor_core="wgmma+mma"))
    assert _gpu_compile.problems(dict(good, arch=80, smem_limit=166912, tensor_core="wgmma"))
    assert _gpu_compile.problems(dict(good, error="boom"))
    assert _gpu_compile.tensor_core_kind("wgmma.mma_async.sync.aligned.m64n64k16") == "wgmma"
    assert _gpu_compile.tensor_core_kind("mma.sync.aligned.m16n8k16.row.col") == "mma"
    assert _gpu_compile.tensor_core_kind("fma.rn.f32") == "none"
    assert _gpu_compile._parse_ptxas_log(
        "ptxas info : Used 255 registers, used 1 barriers, 1704 bytes stack frame, 1700 bytes spill stores, "
        "1696 bytes spill loads") == (255, 1700)
