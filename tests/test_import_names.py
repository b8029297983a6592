"""Nothing at the checkout's root may shadow an installed distribution.

pytest, ``python -m electra_fast...`` and the Makefile all run from the checkout's root, which puts the
root first on ``sys.path``; a root-level ``kernels/__init__.py`` once made ``import transformers`` fail
(transformers imports Hugging Face's ``kernels``). This test names the next collision before a
traceback does: every top-level name the root makes importable (a module, a regular package, an
extension module) against every top-level name an installed distribution provides.

A folder without ``__init__.py`` (``kernels/``, ``tests/``, ``configs/``) is at most a namespace package,
which the import system takes only when no regular package or module of that name exists anywhere on
``sys.path``: it cannot shadow an installed distribution, so it is not counted.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Names that must never be importable from the root, installed here or not: transformers requires
# Hugging Face's `kernels`, so a user's environment has it even when this one lacks it.
RESERVED = {"kernels"}
# The project's own distributions provide their own names (electra_fast from the root, editable).
OWN_DISTRIBUTIONS = {"electra-fast", "electra-kernels"}
MODULE_SUFFIXES = tuple(importlib.machinery.all_suffixes())


def root_import_names(root: Path) -> dict[str, Path]:
    """Every top-level name that ``import NAME`` resolves inside ``root`` when it is first on sys.path."""
    names = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file() and entry.name.isidentifier():
            names[entry.name] = entry
        elif entry.is_file() and entry.name.endswith(MODULE_SUFFIXES):
            stem = entry.name.split(".", 1)[0]
            if stem.isidentifier():
                names[stem] = entry
    return names


def shadowed(root: Path) -> list[str]:
    """One line for each root-importable name that an installed distribution (or RESERVED) also uses."""
    installed = importlib.metadata.packages_distributions()
    problems = []
    for name, path in root_import_names(root).items():
        owners = set(installed.get(name, [])) - OWN_DISTRIBUTIONS
        if name in RESERVED or owners:
            who = ", ".join(sorted(owners)) or "reserved: Hugging Face's kernel hub"
            problems.append(f"{path.relative_to(root)} is importable as '{name}', which {who} provides")
    return problems


def test_the_checkout_root_shadows_no_installed_distribution():
    assert shadowed(ROOT) == []


def test_the_check_finds_a_root_package_named_kernels(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "README.md").write_text("")
    (tmp_path / "electra_fast").mkdir()
    (tmp_path / "electra_fast" / "__init__.py").write_text("")
    problems = shadowed(tmp_path)
    assert len(problems) == 1 and "'kernels'" in problems[0]


def test_the_check_finds_a_root_module_named_after_an_installed_distribution(tmp_path):
    (tmp_path / "yaml.py").write_text("")  # pyyaml, a dependency, provides `yaml`
    (tmp_path / "namespace_only").mkdir()  # no __init__.py: cannot shadow
    assert [line.split(" ")[0] for line in shadowed(tmp_path)] == ["yaml.py"]


def test_transformers_imports_from_the_checkout_root():
    """What broke: transformers imports `kernels` at import time, and the root's copy answered."""
    code = ("import transformers, kernels, electra_kernels; from transformers import ElectraModel; "
            "assert 'site-packages' in kernels.__file__, kernels.__file__")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
