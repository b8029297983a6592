"""Fixtures every kernel test shares.

``poisoned_outputs`` (autouse): every buffer a kernel allocates for its outputs starts as garbage
(``electra_kernels._outputs``: NaN, True, the most negative integer, 0xA5), so an element a kernel
forgets to write fails the comparison instead of passing as a lucky zero. One switch for all kernels.
"""

import pytest

from electra_kernels import _outputs


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(_outputs, "POISON", True)
    yield
