"""The import rules between the layers, checked on the source and in a fresh interpreter.

* ``electra_kernels`` (the kernels library) imports none of electra_fast, DeepSpeed, transformers, datasets;
* the model side (``electra_fast.model``, ``electra_fast.objective``) imports no DeepSpeed, datasets or
  transformers, and ``electra-fast --help`` (the CLI module) none of them either;
* inside electra_fast, only the trainer modules import DeepSpeed and only the data modules import
  datasets / tokenizers (lazy imports inside functions count too);
* the modules of electra_fast import each other without a cycle.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "electra_fast"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")

# The one place for each heavy dependency (the project's architecture rules).
TRAINER_MODULES = {"train", "distributed", "checkpoints", "optimizer_state", "safe_load"}
DATA_MODULES = {"prepare", "corpus_reader", "tokenizer_training", "tokenizer_roles", "packing", "loader", "manifest"}
HEAVY = ("electra_fast", "deepspeed", "transformers", "datasets", "tokenizers")


def _loaded_after(statement: str) -> list[str]:
    """Top-level packages among HEAVY that ``statement`` loads in a fresh interpreter."""
    code = (f"import json, sys\n{statement}\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("statement, allowed", [
    ("import electra_kernels", set()),
    ("import electra_fast.model, electra_fast.objective", {"electra_fast"}),
    ("import electra_fast.cli", {"electra_fast"}),
])
def test_import_loads_no_heavier_layer(statement, allowed):
    loaded = set(_loaded_after(statement))
    assert loaded <= allowed, f"`{statement}` loads {sorted(loaded - allowed)}"


def _imports(module: str) -> list[tuple[str, int]]:
    """(imported module, line) of every import in electra_fast/<module>.py, relative ones resolved to
    ``electra_fast.<name>`` (``from . import x`` names the submodule x when there is one)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"{module}.py")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = "electra_fast" + (f".{base}" if base else "")
            if base == "electra_fast":
                found += [(f"electra_fast.{a.name}" if a.name in MODULES else "electra_fast", node.lineno)
                          for a in node.names]
            else:
                found.append((base, node.lineno))
    return found


@pytest.mark.parametrize("dependency, owners", [
    ("deepspeed", TRAINER_MODULES),
    ("datasets", DATA_MODULES),
    ("tokenizers", DATA_MODULES),
])
def test_heavy_dependency_is_imported_only_by_its_modules(dependency, owners):
    assert owners <= set(MODULES), f"listed modules that do not exist: {sorted(owners - set(MODULES))}"
    offenders = [f"electra_fast/{module}.py:{line}" for module in MODULES if module not in owners
                 for name, line in _imports(module) if name.split(".")[0] == dependency]
    assert not offenders, f"{dependency} is imported outside {sorted(owners)}: {offenders}"
    assert any(name.split(".")[0] == dependency for module in owners for name, _ in _imports(module)), \
        f"no module of {sorted(owners)} imports {dependency}: is the list out of date?"


def _graph() -> dict[str, set[str]]:
    return {module: {name.split(".")[1] for name, _ in _imports(module)
                     if name.startswith("electra_fast.") and name.split(".")[1] in MODULES} - {module}
            for module in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (depth-first search), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state and (found := visit(child)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_electra_fast_modules_import_each_other_without_cycles():
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()))}"


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
