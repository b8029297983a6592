"""Reading checkpoint files without running code hidden in them.

A ``.pt`` file is a pickle: loading one with ``weights_only=False`` may call any function the file
names. DeepSpeed's own loaders do exactly that (``engine.load_checkpoint`` through its checkpoint
engine, and ``zero_to_fp32`` during export), so every file they would read is loaded here first with
``torch.load(weights_only=True)``, which refuses every global that is not allow-listed, and DeepSpeed's
own calls run under :func:`deepspeed_loads_safely`, which turns their ``torch.load`` into the same
weights-only load for the duration.

The allowlist is what DeepSpeed 0.19's ZeRO 0-3 checkpoints need beyond tensors and plain containers,
found by saving fp32 and bf16 checkpoints of every stage and listing what a weights-only load rejects
(``torch.serialization.get_unsafe_globals_in_checkpoint``): the ZeRO stage enum, the loss scaler and
the fragment addresses of the bf16/ZeRO optimizers. All three are plain data classes; rebuilding them
calls no code the file chooses. ``DynamicLossScaler`` (fp16) is the scaler's other class.
"""

from __future__ import annotations

import contextlib
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint cannot be used: the message names the file and the cause (the CLIs exit with 2)."""


def checkpoint_safe_globals() -> list:
    """The non-tensor types DeepSpeed writes into its checkpoints (imported lazily: only trainers need them)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _refusal(path: Path, exc: BaseException) -> CheckpointError:
    """The one-line reason a weights-only load of ``path`` failed."""
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc):
        try:  # lists the globals without unpickling anything
            wanted = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - the refusal itself is the message; the list is a detail
            wanted = ""
        wanted = wanted or "an object outside the allowlist"
        return CheckpointError(f"{path}: refused to load: it would import {wanted}, which no DeepSpeed checkpoint "
                               "contains (a crafted or foreign file; nothing in it was run)")
    if isinstance(exc, FileNotFoundError):
        return CheckpointError(f"{path}: missing")
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(f"{path}: not a readable checkpoint file ({type(exc).__name__}: {cause[:200]}); "
                           "it is truncated or overwritten")


def safe_torch_load(path: str | Path, *, map_location="cpu", mmap: bool = False):
    """``torch.load`` with ``weights_only=True`` and the DeepSpeed allowlist; any failure is one
    :class:`CheckpointError` naming the file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError,
            AttributeError, TypeError) as exc:
        raise _refusal(path, exc) from exc


def check_loadable(paths) -> None:
    """Load each file weights-only (memory-mapped: the pickle is checked, the tensor data is not
    read) so that nothing DeepSpeed loads afterwards can run code; raises on the first refusal."""
    for path in paths:
        safe_torch_load(path, mmap=True)


@contextlib.contextmanager
def deepspeed_loads_safely() -> Iterator[None]:
    """While inside, every ``torch.load`` (DeepSpeed's included, whatever ``weights_only`` they pass)
    is a weights-only load with the allowlist, and a refused or broken file raises CheckpointError."""
    original = torch.load

    def weights_only_load(f, map_location=None, *_, **kwargs):
        kwargs.pop("weights_only", None)
        kwargs.pop("pickle_module", None)  # a custom unpickler is exactly what must not run
        try:
            with torch.serialization.safe_globals(checkpoint_safe_globals()):
                return original(f, map_location, weights_only=True, **kwargs)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as exc:
            if isinstance(f, (str, Path)):
                raise _refusal(Path(f), exc) from exc
            raise

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original
