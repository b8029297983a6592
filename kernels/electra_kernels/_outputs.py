"""Where every kernel allocates its output buffers, so that tests can poison them all in one place.

A kernel that forgets to write an element leaves whatever the allocator handed out, which is often a
harmless-looking zero. With ``POISON`` set (the kernel tests' ``poisoned_outputs`` fixture sets it for
every kernel test), each buffer starts as garbage instead: NaN for floats, True for bools, the most
negative value for signed integers and 0xA5 for bytes, so an unwritten element fails the comparison.
"""

from __future__ import annotations

import torch

POISON = False


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill t with the garbage described above (in place) and return it."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    if t.dtype == torch.uint8:
        return t.fill_(0xA5)
    return t.fill_(torch.iinfo(t.dtype).min)


def new_empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for a kernel output (poisoned when ``POISON`` is set)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return poison_(out) if POISON else out
