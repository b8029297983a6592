"""sha256 of a file, read in blocks: the one hash the data manifest, the run record and the checkpoint
manifest use to tell whether a file is the one that was written."""
from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 8 << 20  # big enough for disk throughput, small enough to keep memory flat on GB-sized files


def sha256_file(path: str | Path, digest: "hashlib._Hash | None" = None) -> str:
    """Hex sha256 of the file's bytes; with ``digest``, the bytes are added to it and its hex returned
    (to hash several files as one)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
