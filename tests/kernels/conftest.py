"""Fixtures every kernel test shares, and the compile gate's scheduling.

``poisoned_outputs`` (autouse): every buffer a kernel allocates for its outputs starts as garbage
(``electra_kernels._outputs``: NaN, True, the most negative integer, 0xA5), so an element a kernel
forgets to write fails the comparison instead of passing as a lucky zero. One switch for all kernels.
"""

import _gate_run
import pytest

from electra_kernels import _outputs

GATE_MODULE = "test_gpu_compile.py"


def _needs_the_gate(item) -> bool:
    return item.path.name == GATE_MODULE and "compiled" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """The compile gate's tests run last, so that its compiles, started at collection (below), overlap
    the rest of the suite. (A conftest's collection hook sees the whole session's items.)"""
    gate = [item for item in items if item.path.name == GATE_MODULE]
    if gate and len(gate) < len(items):
        items[:] = [item for item in items if item.path.name != GATE_MODULE] + gate


def pytest_collection_finish(session):
    """Start the gate's compiles in the background when the session runs a test that reads them and
    other tests besides (alone, the fixture runs them in the foreground: nothing to overlap)."""
    if any(_needs_the_gate(item) for item in session.items) and any(
            item.path.name != GATE_MODULE for item in session.items) and not session.config.option.collectonly:
        _gate_run.start_in_background()


def pytest_sessionfinish(session, exitstatus):
    _gate_run.stop_background()


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(_outputs, "POISON", True)
    yield
