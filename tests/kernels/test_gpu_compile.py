"""The GPU-compile gate, on the CPU: every kernel's default config, in every variant the public functions
can reach on a GPU (dtypes, layouts, head dims, sizes, flags), compiled for sm_90 (H100) and sm_80 (A100)
through Triton's real pipeline down to a cubin.

Triton's interpreter (which runs the other kernel tests) accepts what the GPU compiler does not. Here
each default must compile, spill no register (an unread spill count fails too), fit the architecture's
shared memory per block, and, for the matmul kernels in a 16-bit dtype, run every product on the
architecture's tensor cores: wgmma on Hopper, mma.sync on Ampere (a ``tl.dot`` whose shape wgmma cannot
take falls back to mma.sync silently). The verdict per row is ``_gpu_compile.problems``, the same
function that fills ``benchmarks/compile_report.py``'s last column.

The variants are ``_gpu_compile.default_variants()``: every kernel file's ``compile_variants()`` (found by
listing the package, so a new kernel file is covered once it defines one), default configs only — the
rows ``python benchmarks/compile_report.py --defaults-only`` prints. Variants that compile to the same
binary (sizes that are runtime arguments) are compiled once.

Which Triton. The compiler is the one GPU users get: torch 2.13's CUDA build pins triton==3.7.1, and
requirements/cpu.lock pins the same, so CI compiles with it (a mismatch fails
``test_the_gate_compiles_with_the_locked_triton``). To run the gate against another Triton, make a venv
with it (``python -m venv /tmp/t39 && /tmp/t39/bin/pip install torch triton==3.9.0``) and point the gate
at its interpreter; the kernels are imported from this checkout:

    ELECTRA_GATE_PYTHON=/tmp/t39/bin/python pytest tests/kernels/test_gpu_compile.py

The compiles run in a subprocess without TRITON_INTERPRET (the interpreter replaces the compiler at
import), one per CPU, in a fresh Triton cache: nothing is reused between runs. Time (Triton 3.7.1,
2026-12-05): 566 default variants, 1,060 compiles (the fused rotary kernels only for sm_90), 255 s on
two otherwise idle cores (``pytest -s`` prints it; kernels/README.md, "Compiled for real GPUs"). Within
the whole suite they start at collection time, in the background at low priority, and these tests run
last (tests/kernels/_gate_run.py, conftest.py): the compiles fill the core the other tests leave idle.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import _gate_run
import pytest

from electra_kernels import _gpu_compile

ROOT = Path(__file__).resolve().parents[2]
GATE_PYTHON = _gate_run.GATE_PYTHON


def _locked_triton() -> str:
    lock = (ROOT / "requirements" / "cpu.lock").read_text()
    return re.search(r"^triton==(\S+)", lock, re.M).group(1)


@pytest.fixture(scope="module")
def compiled():
    # Started at collection time, in the background (tests/kernels/_gate_run.py), when this module was
    # collected with the rest of the suite; otherwise here.
    returncode, stdout, stderr, waited = _gate_run.take().result()
    if stdout.startswith("SKIP"):
        pytest.skip(f"triton has no NVIDIA backend here: {stdout}")
    assert returncode == 0, stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in stdout.splitlines() if " " in line}
    meta = json.loads(lines["META"])
    print(f"compile gate: triton {meta['triton']}, {meta['variants']} default variants = {meta['binaries']} "
          f"binaries x 2 archs, {meta['wall']:.0f} s wall, {meta['cpu']:.0f} s CPU, {waited:.0f} s waited for")
    return meta, json.loads(lines["ROWS"])


@pytest.fixture(scope="module")
def rows(compiled):
    return compiled[1]


def _describe(row):
    tags = {k: row[k] for k in ("dtype", "layout", "dropout", "head_dim", "embedding", "hidden", "residual")
            if row.get(k) is not None}
    return f"{row['kernel']} sm_{row['arch']} {row['config']} {tags}"


def test_the_gate_compiles_with_the_locked_triton(compiled):
    """CI compiles with the Triton GPU users get (the lock's pin, torch 2.13's CUDA pin), unless the gate
    was pointed at another venv on purpose (ELECTRA_GATE_PYTHON)."""
    meta, _ = compiled
    if GATE_PYTHON:
        pytest.skip(f"ELECTRA_GATE_PYTHON set: compiled with triton {meta['triton']}")
    if os.environ.get("ELECTRA_TEST_LATEST"):  # make test-latest: the newest Triton, on purpose
        pytest.skip(f"make test-latest: compiled with the newest triton, {meta['triton']}")
    assert meta["triton"] == _locked_triton(), (
        f"the gate compiled with triton {meta['triton']}, the lock pins {_locked_triton()}: `make install`")


def test_every_default_the_report_prints_is_checked(compiled):
    """The gate's rows are the report's ``--defaults-only`` rows (the subprocess asserts the two lists
    are the same variants): every kernel file, every arch a variant runs on (both, unless its ``archs``
    says otherwise), every dtype / layout / head dim reachable."""
    meta, rows = compiled
    assert meta["report_variants"] == meta["variants"]
    assert len(rows) == meta["expected_rows"] and meta["variants"] < len(rows) <= 2 * meta["variants"]
    assert set(meta["modules"]) >= {"attention", "mlm_head", "disc_head", "layer_norm", "bias_gelu"}
    kernels = {r["kernel"] for r in rows}
    for needed in ("attention fwd", "attention dk/dv", "attention dk/dv/dq fused", "attention dq", "mlm head fwd",
                   "mlm head dlogits", "disc head fwd", "disc head bwd", "layer norm fwd", "layer norm bwd",
                   "bias gelu fwd", "bias gelu bwd"):
        assert needed in kernels, f"{needed} is not compiled"
        assert {r["arch"] for r in rows if r["kernel"] == needed} == {80, 90}
    attention = [r for r in rows if r["kernel"] == "attention fwd"]
    assert {(r["dtype"], r["layout"], r["dropout"], r["head_dim"]) for r in attention} == {
        (dtype, layout, dropout, d) for dtype in ("bf16", "fp16") for layout in ("packed", "padded", "padded+mask")
        for dropout in (False, True) for d in (16, 32, 64, 96, 128)}
    for kernel in ("layer norm fwd", "layer norm bwd", "bias gelu fwd", "disc head fwd"):
        assert {r["dtype"] for r in rows if r["kernel"] == kernel} == {"bf16", "fp16", "fp32"}, kernel
    # fp32 attention and MLM head run torch on the GPU (GPU_DTYPES): nothing to compile for them.
    for kernel in ("attention fwd", "mlm head fwd", "mlm head dlogits"):
        assert {r["dtype"] for r in rows if r["kernel"] == kernel} == {"bf16", "fp16"}, kernel


def test_defaults_have_no_problem(rows):
    """Compiles, no spilled byte (an unread count is a problem), shared memory within the limit,
    tensor cores: ``problems()`` for every row."""
    bad = [f"{_describe(r)}: {'; '.join(_gpu_compile.problems(r))} ({r['registers']} registers)" for r in rows
           if _gpu_compile.problems(r)]
    assert not bad, f"{len(bad)} of {len(rows)} default rows:\n" + "\n".join(bad)


def test_matmul_kernels_are_checked_for_tensor_cores(rows):
    """The tensor-core rule applies: 16-bit matmul rows exist on both archs and use wgmma / mma.sync."""
    matmuls = [r for r in rows if r["matmul"] and r.get("dtype") in ("bf16", "fp16")]
    assert {r["arch"] for r in matmuls} == {80, 90}
    assert all(r["tensor_core"] == ("wgmma" if r["arch"] >= 90 else "mma") for r in matmuls if not r["error"])


def test_the_checks_can_fail():
    """``problems`` (what the report flags and the gate fails on) trips on each defect it is meant to catch."""
    good = dict(kernel="k", arch=90, error=None, spill_bytes=0, shared=1000, smem_limit=232448, matmul=True,
                dtype="bf16", tensor_core="wgmma")
    assert _gpu_compile.problems(good) == []
    assert _gpu_compile.problems(dict(good, spill_bytes=4))
    assert _gpu_compile.problems(dict(good, spill_bytes=None))  # unread is not zero
    assert _gpu_compile.problems(dict(good, shared=None))
    assert _gpu_compile.problems(dict(good, smem_limit=None))
    assert _gpu_compile.problems(dict(good, shared=232449))
    assert _gpu_compile.problems(dict(good, tensor_core="wgmma+mma"))
    assert _gpu_compile.problems(dict(good, arch=80, smem_limit=166912, tensor_core="wgmma"))
    assert _gpu_compile.problems(dict(good, error="boom"))
    assert _gpu_compile.problems(dict(good, dtype="fp32", tensor_core="none")) == []
    assert _gpu_compile.tensor_core_kind("wgmma.mma_async.sync.aligned.m64n64k16") == "wgmma"
    assert _gpu_compile.tensor_core_kind("mma.sync.aligned.m16n8k16.row.col") == "mma"
    assert _gpu_compile.tensor_core_kind("fma.rn.f32") == "none"
    assert _gpu_compile._parse_ptxas_log(
        "ptxas info : Used 255 registers, used 1 barriers, 1704 bytes stack frame, 1700 bytes spill stores, "
        "1696 bytes spill loads") == (255, 1700)
    assert _gpu_compile._parse_ptxas_log("ptxas info : Used 40 registers") == (40, None)


def test_fp32_attention_and_mlm_head_take_torch_on_the_gpu():
    """On a GPU the dispatch sends fp32 attention / MLM head to torch and 16-bit to the kernels (the
    dtypes the gate compiles); under the interpreter fp32 still runs the kernels."""
    import importlib

    import torch

    from electra_kernels import _dispatch

    class FakeCuda:  # use_triton looks at .is_cuda only
        is_cuda = True

    for name in ("attention", "mlm_head"):  # the modules (the package re-exports a function `attention`)
        gpu_dtypes = importlib.import_module(f"electra_kernels.{name}").GPU_DTYPES
        assert gpu_dtypes == (torch.bfloat16, torch.float16)
        assert not _dispatch.use_triton(FakeCuda(), dtype=torch.float32, gpu_dtypes=gpu_dtypes)
        assert _dispatch.use_triton(FakeCuda(), dtype=torch.bfloat16, gpu_dtypes=gpu_dtypes)
        assert _dispatch.use_triton(torch.zeros(1), dtype=torch.float32, gpu_dtypes=gpu_dtypes)  # interpreter
