"""Which code produced a result: the git commit of this checkout, for run directories and benchmark rows."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit(short: bool = False) -> str | None:
    """HEAD of the checkout the package runs from, suffixed ``-dirty`` when tracked files changed;
    None outside a git checkout (an installed wheel) or without git."""
    try:
        out = subprocess.run(["git", "rev-parse", *(["--short=12"] if short else []), "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")
