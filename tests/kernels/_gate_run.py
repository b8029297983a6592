"""The GPU-compile gate's compiles (tests/kernels/test_gpu_compile.py), started in the background when
pytest has collected the session, so that they overlap the rest of the suite.

Why: the compiles are ~500 CPU-seconds of LLVM and ptxas work, while most other tests keep one of CI's two
cores busy (a single Python thread: the Triton interpreter, tiny models). Run at low priority (nice 19)
from collection time, the compiles take the idle core and yield the busy ones; the gate's tests run last
(tests/kernels/conftest.py moves them) and find the result ready or nearly so. The compiles themselves
are unchanged: a fresh Triton cache, one worker per CPU, every default variant.

Imported as ``_gate_run`` (pytest's "prepend" import mode puts tests/kernels on sys.path, as for
``_compare``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GATE_PYTHON = os.environ.get("ELECTRA_GATE_PYTHON")
TIMEOUT_S = 1200

COMPILE = r"""
import json, os, resource, sys, time
if os.environ.get("ELECTRA_GATE_NICE"):  # in the background: yield the CPU to the tests (pool workers inherit it)
    os.nice(int(os.environ["ELECTRA_GATE_NICE"]))
try:
    import triton
    import triton.backends.nvidia  # noqa: F401
except ImportError as err:
    print("SKIP", err); sys.exit(0)
from electra_kernels import _gpu_compile as g
sys.path.insert(0, sys.argv[1])
import compile_report  # what `compile_report.py --defaults-only` prints, selected by its own code
start = time.time()
variants = g.default_variants()
report = compile_report.select(g.all_variants(), compile_report.parse_args(["--defaults-only"]))
assert [v.key() for v in report] == [v.key() for v in variants], "the report and the gate disagree"
rows = g.compile_many(variants, (90, 80), jobs=os.cpu_count() or 2)
children = resource.getrusage(resource.RUSAGE_CHILDREN)
me = resource.getrusage(resource.RUSAGE_SELF)
cpu = children.ru_utime + children.ru_stime + me.ru_utime + me.ru_stime
# A variant compiles for the archs it runs on (Variant.archs: the fused rotary kernels are sm_90+ only).
expected_rows = sum(1 for v in variants for arch in (90, 80) if g._runs_on(v, arch))
print("META", json.dumps(dict(triton=triton.__version__, variants=len(variants), report_variants=len(report),
                              expected_rows=expected_rows,
                              modules=g.kernel_modules(),
                              binaries=len({v.key() for v in variants}), wall=time.time() - start, cpu=cpu)))
print("ROWS", json.dumps(rows))
"""


class GateRun:
    """One run of the compile subprocess; its output goes to temporary files (a pipe nobody reads
    until the end would block the child once its ~0.5 MB of rows fill the pipe's buffer)."""

    def __init__(self, background: bool):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; silences Triton 3.9's notice
        # Another venv's interpreter (torch and triton only) still imports the kernels, and the report's
        # helpers (electra_fast.provenance: standard library only), from this checkout.
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "kernels"), str(ROOT), env.get("PYTHONPATH", "")])
        env.pop("ELECTRA_GATE_NICE", None)
        if background:
            env["ELECTRA_GATE_NICE"] = "19"
        self.stdout = tempfile.TemporaryFile("w+")
        self.stderr = tempfile.TemporaryFile("w+")
        self.started = time.monotonic()
        self.background = background
        # Its own session: the pool's workers are ended with it (stop()).
        self.proc = subprocess.Popen([GATE_PYTHON or sys.executable, "-c", COMPILE, str(ROOT / "benchmarks")],
                                     stdout=self.stdout, stderr=self.stderr, text=True, env=env,
                                     start_new_session=True)

    def result(self) -> tuple[int, str, str, float]:
        """(exit status, stdout, stderr, seconds this call waited); waits for the end."""
        waited = time.monotonic()
        try:
            self.proc.wait(timeout=max(1.0, TIMEOUT_S - (waited - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        waited = time.monotonic() - waited
        self.stdout.seek(0), self.stderr.seek(0)
        return self.proc.returncode, self.stdout.read(), self.stderr.read(), waited

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


_RUN: GateRun | None = None


def start_in_background() -> None:
    global _RUN
    if _RUN is None:
        _RUN = GateRun(background=True)


def take() -> GateRun:
    """The background run if one was started (once), else a new one in the foreground."""
    global _RUN
    run, _RUN = _RUN, None
    return run if run is not None else GateRun(background=False)


def stop_background() -> None:
    """The session ends before the gate's tests took the run (-x, deselection, an interrupt)."""
    global _RUN
    if _RUN is not None:
        _RUN.stop()
        _RUN = None
