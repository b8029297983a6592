"""One autotune style for every kernel file.

* A kernel's candidate space is a list of tuples, block sizes first, then ``num_warps`` and
  ``num_stages``; its first entry is the default, the one config used without tuning. Every default
  is checked by ``tests/kernels/test_gpu_compile.py`` (compiles for sm_80 and sm_90, no spills, shared
  memory within the limit, tensor cores); ``benchmarks/compile_report.py`` shows every candidate.
* ``ELECTRA_KERNELS_AUTOTUNE=0`` (read at import) keeps only the first candidate of every space: no
  tuning pass (which compiles and times every candidate on the first call of a new shape), for quick
  starts and benchmarks under a time limit.
* Pruning drops candidates whose estimated shared memory exceeds the device's own per-block limit
  (read from the device: an A100 allows 163 KiB, an H100 227 KiB), so no launch fails for lack of it.
* ``autotune`` is ``triton.autotune``, except where Triton 3.2 / 3.3 cannot build an autotuner (a
  CPU-only machine: they ask for a live GPU driver at import); there no kernel ever launches (the
  ``*_ref`` references run), and the plain jitted function is kept so that the package still imports.
* Under Triton's interpreter each kernel uses one small config of its own (the CPU tests run programs
  one after another; small blocks that still cross block boundaries keep them fast).
"""

from __future__ import annotations

import functools
import os

from ._gpu_compile import smem_limit

AUTOTUNE = os.environ.get("ELECTRA_KERNELS_AUTOTUNE", "1") != "0"


def candidates(space: list) -> list:
    """The space, or its first (default) entry when autotuning is off."""
    return list(space) if AUTOTUNE else list(space[:1])


def triton_configs(space: list, names: tuple) -> list:
    """triton.Config objects for the (blocks..., num_warps, num_stages) tuples of ``space``."""
    import triton

    return [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1]) for c in candidates(space)]


def autotune(**kwargs):
    """``triton.autotune(**kwargs)`` as a decorator, tolerant of a machine without a GPU driver."""
    import triton

    def wrap(fn):
        try:
            return triton.autotune(**kwargs)(fn)
        except RuntimeError:  # Triton < 3.4 without a GPU: "0 active drivers"
            return fn

    return wrap


@functools.lru_cache(maxsize=None)
def _device_limit(device) -> int:
    return smem_limit(device)


def device_smem_limit(named_args: dict) -> int:
    """Per-block shared-memory limit of the GPU the launch's tensors live on (no limit off the GPU)."""
    for value in named_args.values():
        device = getattr(value, "device", None)
        if device is not None and device.type == "cuda":
            return _device_limit(device)
    return 1 << 30
