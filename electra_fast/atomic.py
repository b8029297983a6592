"""Write files and folders so that readers see the old result or the new one, never half of one.

Everything the project publishes (prepared datasets, Hugging Face exports, fine-tuned models, metrics
and the checkpoint pointer) is written next to its destination and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    """Replace ``path`` with ``text`` in one rename; ``durable`` also fsyncs the file and its folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def make_staging_directory(out_dir: str | os.PathLike) -> Path:
    """An empty hidden folder beside ``out_dir`` (same filesystem, so publishing is a rename), with the
    permissions a plain ``mkdir`` would give (mkdtemp makes it private)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def publish_directory(staging: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Move a finished ``staging`` folder to ``out_dir``; an old ``out_dir`` is swapped out, then deleted."""
    staging, out_dir = Path(staging), Path(out_dir)
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, trash)
        os.replace(staging, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory(out) as tmp:`` write into ``tmp``; on success it becomes ``out``,
    on any error it is removed and ``out`` is left as it was."""
    staging = make_staging_directory(out_dir)
    try:
        yield staging
        publish_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
