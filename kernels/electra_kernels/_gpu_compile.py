"""Compile a kernel for a real GPU target on any machine (no GPU needed) and read what it costs.

Triton's interpreter, which the CPU tests use, accepts code and resource use that the GPU compiler does
not: register spills, shared memory beyond the architecture's per-block limit, a ``tl.dot`` that falls
back from Hopper's wgmma to mma.sync. ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
runs the real pipeline down to a cubin on the CPU; this module does that for one :class:`Variant` (a
kernel with its argument types, constexprs, warps and stages) and reports

* registers per thread and spilled bytes (ptxas ``-v``),
* shared memory per block against the architecture's limit (:data:`SMEM_LIMIT`),
* the tensor-core instructions in the PTX: ``wgmma``, ``mma`` (mma.sync), both, or ``none``.

Each kernel file lists the variants its launchers can launch (``compile_variants()``, next to the
launchers and built from the same config lists), so ``benchmarks/compile_report.py`` and
``tests/kernels/test_gpu_compile.py`` compile exactly what the code runs. This module imports triton
only inside the functions that compile (the kernel files import it whether or not triton is installed).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# Largest shared memory one block may use (bytes, opt-in maximum), by compute capability: what
# cudaDevAttrMaxSharedMemoryPerBlockOptin reports. The autotune pruning uses the device's own value
# (``smem_limit``); the compile report, which has no device, uses the target's from this table.
SMEM_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class Variant:
    """One compilation: a @triton.jit function (or an autotuned/heuristics wrapper of one), the type of
    every runtime argument (``"*bf16"``, ``"i32"``, ``"fp32"`` ...), the constexpr values, the launch
    options, and labels for the report (``tags``: dtype, layout, sizes ...). ``aligned``: runtime
    arguments the JIT would see as multiples of 16 (pointers always are: torch allocations are)."""

    kernel: str
    fn: Any
    types: dict
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    default: bool = True
    matmul: bool = False
    tags: dict = field(default_factory=dict)
    aligned: frozenset = frozenset()
    # The architectures whose launchers run this variant (None: all). The fused rotary attention, for
    # one, is launched on sm_90+ only (attention._rotary_mode); compile_many skips the other targets.
    archs: Optional[frozenset] = None

    def key(self) -> tuple:
        """Identity of the compiled binary (two variants with the same key compile to the same code)."""
        return (id(_jit_function(self.fn)), tuple(sorted(self.types.items())),
                tuple(sorted((k, str(v)) for k, v in self.constexprs.items())),
                self.num_warps, self.num_stages, tuple(sorted(self.aligned)))

    def config(self) -> str:
        blocks = " ".join(f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK"))
        return f"{blocks} w{self.num_warps} s{self.num_stages}".strip()


def _jit_function(fn):
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def smem_limit(device=None, arch: Optional[int] = None) -> int:
    """Shared memory per block: the CUDA device's opt-in maximum, or the table's value for ``arch``."""
    if arch is not None:
        return SMEM_LIMIT.get(arch, min(SMEM_LIMIT.values()))
    import torch

    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit:
        return int(limit)
    return SMEM_LIMIT.get(props.major * 10 + props.minor, min(SMEM_LIMIT.values()))


def tensor_core_kind(ptx: str) -> str:
    """'wgmma', 'mma' (mma.sync), 'wgmma+mma' or 'none', from the PTX text."""
    wgmma = "wgmma.mma_async" in ptx
    mma = re.search(r"\bmma\.sync\b", ptx) is not None
    return {(True, False): "wgmma", (False, True): "mma", (True, True): "wgmma+mma"}.get((wgmma, mma), "none")


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (3.9 picks a newer one for sm_90+)."""
    from triton.backends.nvidia import compiler

    if hasattr(compiler, "get_ptxas"):
        try:
            found = compiler.get_ptxas(arch)
        except TypeError:  # no arch argument
            found = compiler.get_ptxas()
    else:
        found = compiler._path_to_binary("ptxas")
    return found.path if hasattr(found, "path") else found[0]  # a tool object (3.4+) or (path, version)


def _ptxas_usage(ptx: str, arch: int) -> tuple[Optional[int], Optional[int]]:
    """(registers, spilled bytes) from a second ``ptxas -v`` on the PTX, for Triton releases whose
    compiler cannot show its own ptxas log."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([_ptxas_path(arch), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True)
    return _parse_ptxas_log(run.stderr + run.stdout)


def _compile(triton, src, arch: int, options: dict):
    """triton.compile for ``sm_<arch>``; returns (kernel, ptxas -v log or None). Triton >= 3.4 prints
    the log of its own ptxas run (same binary, same flags) when asked; it is captured here."""
    from triton.backends.compiler import GPUTarget

    nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if nvidia is None or not hasattr(nvidia, "dump_ptxas_log"):
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options), None
    old = nvidia.dump_ptxas_log
    nvidia.dump_ptxas_log = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        nvidia.dump_ptxas_log = old
    return kernel, log.getvalue()


def _parse_ptxas_log(log: str) -> tuple[Optional[int], Optional[int]]:
    regs = [int(m) for m in _PTXAS_USAGE.findall(log)]
    spills = [max(int(s), int(l)) for s, l in _PTXAS_SPILL.findall(log)]
    return (max(regs) if regs else None), (max(spills) if spills else None)


def _source(triton, fn, variant: Variant):
    """An ASTSource in the form the installed Triton takes (the signature API changed in 3.2 and 3.3)."""
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    unknown = set(variant.types) - set(names) | set(variant.constexprs) - set(names)
    if unknown:
        raise ValueError(f"{variant.kernel}: no such argument(s) {sorted(unknown)} in {fn.__name__}")
    missing = [n for n in names if n not in variant.types and n not in variant.constexprs]
    if missing:
        raise ValueError(f"{variant.kernel}: no type for argument(s) {missing} of {fn.__name__}")
    aligned = [i for i, n in enumerate(names)
               if n in variant.types and (variant.types[n].startswith("*") or n in variant.aligned)]
    major_minor = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    if major_minor >= (3, 3):
        signature = {n: variant.types.get(n, "constexpr") for n in names}
        constexprs = {(names.index(n),): v for n, v in variant.constexprs.items()}
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    if major_minor < (3, 2):  # Triton 3.0 / 3.1: index-keyed signature without the constexprs
        from triton.compiler.compiler import AttrsDescriptor

        signature = {i: variant.types[n] for i, n in enumerate(names) if n in variant.types}
        constants = {names.index(n): v for n, v in variant.constexprs.items()}
        return ASTSource(fn=fn, signature=signature, constants=constants,
                         attrs=AttrsDescriptor(divisible_by_16=set(aligned), equal_to_1=set()))
    from triton.backends.compiler import AttrsDescriptor  # Triton 3.2

    signature = {n: variant.types.get(n, "constexpr") for n in names}
    attrs = AttrsDescriptor.from_hints({i: 16 for i in aligned})
    return ASTSource(fn=fn, signature=signature, constants=dict(variant.constexprs), attrs=attrs)


def compile_variant(variant: Variant, arch: int) -> dict:
    """Compile ``variant`` for ``sm_<arch>`` and return the report row (never raises: a failure is a
    row with ``error`` set)."""
    row = dict(kernel=variant.kernel, arch=arch, config=variant.config(), default=variant.default,
               matmul=variant.matmul, num_warps=variant.num_warps, num_stages=variant.num_stages,
               **variant.tags, smem_limit=SMEM_LIMIT.get(arch))
    start = time.perf_counter()
    try:
        import triton

        fn = _jit_function(variant.fn)
        kernel, log = _compile(triton, _source(triton, fn, variant), arch,
                               {"num_warps": variant.num_warps, "num_stages": variant.num_stages})
        ptx = kernel.asm["ptx"]
        regs, spills = _parse_ptxas_log(log) if log else _ptxas_usage(ptx, arch)
        row.update(registers=regs, spill_bytes=spills, shared=int(kernel.metadata.shared),
                   tensor_core=tensor_core_kind(ptx), error=None)
    except Exception as exc:  # noqa: BLE001 - a report row per failure, the caller decides
        row.update(registers=None, spill_bytes=None, shared=None, tensor_core=None,
                   error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:300])
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def problems(row: dict) -> list[str]:
    """What a default config must not do, for one report row: fail to compile, spill, exceed the
    shared-memory limit, or (a matmul kernel in a 16-bit dtype) miss the architecture's tensor cores."""
    if row.get("error"):
        return [f"does not compile: {row['error']}"]
    found = []
    # An unread count (a ptxas log this module could not parse) is not a zero: flag it.
    if row.get("spill_bytes") is None:
        found.append("spilled bytes unknown (no ptxas -v line read)")
    elif row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} B")
    if row.get("shared") is None:
        found.append("shared memory unknown")
    elif row.get("smem_limit") is None:
        found.append(f"no shared-memory limit known for sm_{row['arch']}")
    elif row["shared"] > row["smem_limit"]:
        found.append(f"shared memory {row['shared']} B > {row['smem_limit']} B")
    if row.get("matmul") and row.get("dtype") in ("bf16", "fp16"):
        want = "wgmma" if row["arch"] >= 90 else "mma"
        if row["tensor_core"] != want:
            found.append(f"tensor cores: {row['tensor_core']} (want {want} only)")
    return found


def kernel_modules() -> list[str]:
    """The package's kernel files: every public module (no leading underscore) that defines
    ``compile_variants()``, found by listing the package, so a new kernel file is covered without
    being named here."""
    import importlib
    import pkgutil

    package = importlib.import_module(__package__)
    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        # By module path: the package re-exports functions named like some modules (attention).
        module = importlib.import_module(f"{__package__}.{info.name}")
        if callable(getattr(module, "compile_variants", None)):
            found.append(info.name)
    return found


def all_variants() -> list[Variant]:
    """Every kernel of the package in every variant its launchers use, all autotune candidates."""
    import importlib

    variants = []
    for name in kernel_modules():
        variants.extend(importlib.import_module(f"{__package__}.{name}").compile_variants())
    return variants


def default_variants() -> list[Variant]:
    """What the launchers run without tuning: each kernel's default config in every variant (dtype,
    layout, head dim, sizes, flags) the public functions can reach on a GPU. The compile gate
    (tests/kernels/test_gpu_compile.py) checks exactly these; ``compile_report.py --defaults-only``
    prints them."""
    return [v for v in all_variants() if v.default]


# What ELECTRA Small / Base / Large run: bf16, head dim 64, padded (key mask) and packed attention, the
# MLM head at embedding sizes 128 / 768 / 1024 (vocabulary 30522), LayerNorm / GELU / the BCE head at
# hidden 256 / 768 / 1024. A tag a variant does not have does not filter it.
ELECTRA = dict(dtype={"bf16"}, head_dim={64}, layout={"packed", "padded+mask"}, embedding={128, 768, 1024},
               hidden={256, 768, 1024})


def is_electra(variant: Variant) -> bool:
    return all(variant.tags.get(key) is None or variant.tags[key] in allowed for key, allowed in ELECTRA.items())


@contextlib.contextmanager
def fresh_triton_cache():
    """A throw-away Triton cache: every compile really runs (and nothing is kept between runs)."""
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as tmp:
        old = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = tmp
        try:
            yield tmp
        finally:
            if old is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old



def runtime_args(fn) -> list[str]:
    """The names of fn's non-constexpr parameters (the ones a Variant must give a type)."""
    fn = _jit_function(fn)
    return [p.name for p in fn.params if not p.is_constexpr]


_POOL_VARIANTS: list = []


def _compile_indexed(job):
    index, arch = job
    return compile_variant(_POOL_VARIANTS[index], arch)


def _runs_on(variant: Variant, arch: int) -> bool:
    return variant.archs is None or arch in variant.archs


def compile_many(variants, archs, jobs: int = 2, progress=None) -> list[dict]:
    """Compile every (variant, arch) pair, ``jobs`` at a time in forked worker processes (each compile is
    single-threaded LLVM + ptxas work). Variants that compile to the same binary (e.g. sizes that are
    runtime arguments) are compiled once; every variant still gets its own row, in the order of
    ``variants`` x ``archs``. ``progress(row)`` is called as each compile ends."""
    import concurrent.futures
    import multiprocessing

    variants = list(variants)
    unique = list({v.key(): v for v in reversed(variants)}.values())[::-1]
    work = [(i, arch) for i in range(len(unique)) for arch in archs if _runs_on(unique[i], arch)]
    _POOL_VARIANTS[:] = unique
    results = {}
    with fresh_triton_cache():
        if jobs <= 1:
            for job in work:
                results[job] = _compile_indexed(job)
                if progress:
                    progress(results[job])
        else:
            # fork: the workers inherit the variant list (jitted functions do not pickle) and the cache dir.
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
                futures = {pool.submit(_compile_indexed, job): job for job in work}
                for future in concurrent.futures.as_completed(futures):
                    results[futures[future]] = future.result()
                    if progress:
                        progress(results[futures[future]])
    index = {v.key(): i for i, v in enumerate(unique)}
    rows = []
    for v in variants:
        for arch in archs:
            if not _runs_on(v, arch):
                continue
            compiled = results[(index[v.key()], arch)]
            measured = {k: compiled[k] for k in ("registers", "spill_bytes", "shared", "tensor_core", "error",
                                                 "seconds")}
            rows.append(dict(kernel=v.kernel, arch=arch, config=v.config(), default=v.default, matmul=v.matmul,
                             num_warps=v.num_warps, num_stages=v.num_stages, **v.tags,
                             smem_limit=SMEM_LIMIT.get(arch), **measured))
    return rows
