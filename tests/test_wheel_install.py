"""The two wheels as a user installs them: into a fresh venv that holds only torch and the wheels' own
dependencies, used from an empty directory far from the checkout.

1. electra-kernels alone (torch + triton): `import electra_kernels` works, runs its PyTorch reference
   on the CPU, and neither DeepSpeed nor electra_fast is importable there.
2. electra-fast beside it: the README's "Install as a package" commands, as written: prepare the default
   corpus, pretrain the named size `tiny` for two steps (no YAML, the shipped DeepSpeed config), export,
   and load the export with transformers.

The venv follows requirements/cpu.lock, as `make install` does, so the test sees the versions CI pins
(under `make test-latest`, the newest releases).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The lock's versions, as `make install` takes them; `make test-latest` (ELECTRA_TEST_LATEST) wants the
# newest releases here too.
CONSTRAINTS = [] if os.environ.get("ELECTRA_TEST_LATEST") else ["-c", str(REPO / "requirements" / "cpu.lock")]
# pip install --no-compile: no .pyc for the thousands of modules of torch, transformers and the rest that the
# test never imports (Python compiles the ones it does import, as it would anyway): seconds of CI saved,
# nothing the test checks changed.

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 900) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


# What each wheel is built from: a copy, so that the build leaves nothing in the checkout and no stale
# build/ folder of an earlier build can slip a deleted file into the wheel.
SOURCES = {"kernels": ("pyproject.toml", "README.md", "electra_kernels"),
           "project": ("pyproject.toml", "README.md", "electra_fast")}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    out, src = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name, files in SOURCES.items():
        origin = REPO / "kernels" if name == "kernels" else REPO
        for file in files:
            if (origin / file).is_dir():
                shutil.copytree(origin / file, src / name / file, ignore=ignore)
            else:
                (src / name).mkdir(exist_ok=True)
                shutil.copy2(origin / file, src / name / file)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src / "kernels"),
          str(src / "project")], cwd=out)
    names = sorted(p.name for p in out.glob("*.whl"))
    assert [n.split("-")[0] for n in names] == ["electra_fast", "electra_kernels"], names
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with torch and nothing else of ours."""
    folder = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", str(folder)], cwd=folder.parent)
    # The CPU build the Makefile installs (a bare `torch` would fetch a multi-GB CUDA build).
    _run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", *CONSTRAINTS, "torch==2.13.0"],
         cwd=folder.parent)
    return folder


def _user_env(venv: Path) -> dict:
    """The environment of a user of that venv: its bin/ first, nothing of the checkout on the path. The
    DeepSpeed CPU op compiled for the same torch and DeepSpeed (the lock pins both) is reused."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def test_the_kernels_wheel_works_with_torch_alone(wheels, venv, tmp_path):
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", "--no-compile", *CONSTRAINTS, *map(str, wheels.glob("electra_kernels-*.whl"))],
         cwd=tmp_path)
    check = textwrap.dedent("""
        import importlib.util, torch, electra_kernels as ek
        assert "site-packages" in ek.__file__, ek.__file__
        for absent in ("deepspeed", "electra_fast", "datasets"):
            assert importlib.util.find_spec(absent) is None, absent + " is importable"
        x, w, b = torch.randn(5, 32), torch.randn(32), torch.randn(32)
        torch.testing.assert_close(ek.layer_norm(x, w, b), ek.layer_norm_ref(x, w, b))
        q = torch.randn(2, 7, 2, 16)
        torch.testing.assert_close(ek.attention(q, q, q), ek.attention_ref(q, q, q))
        print("electra_kernels", ek.__version__)
    """)
    out = _run([python, "-c", check], cwd=tmp_path, env=_user_env(venv))
    assert out.startswith("electra_kernels ")


def test_the_package_pretrains_exports_and_loads_from_an_empty_directory(wheels, venv, tmp_path):
    """The README's "Install as a package" section, command by command."""
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", "--no-compile", *CONSTRAINTS, "--find-links", str(wheels),
          *map(str, wheels.glob("electra_fast-*.whl")), "transformers"], cwd=tmp_path)
    work = tmp_path / "empty"
    work.mkdir()
    env = _user_env(venv)
    cli = str(venv / "bin" / "electra-fast")
    _run([cli, "prepare", "--default", "--out", "d", "--seq-len", "64", "--vocab-size", "1024"], cwd=work, env=env)
    _run([cli, "pretrain", "--size", "tiny", "--run-dir", "r", "--set", "data.path=d", "--set", "train.max_steps=2"],
         cwd=work, env=env)
    _run([cli, "export", "--checkpoint", "r", "--out", "e"], cwd=work, env=env)
    load = textwrap.dedent("""
        import torch
        from transformers import AutoTokenizer, ElectraForMaskedLM, ElectraForPreTraining
        tok = AutoTokenizer.from_pretrained("e/discriminator")
        ids = tok("the function returns a list", return_tensors="pt")
        disc = ElectraForPreTraining.from_pretrained("e/discriminator")
        gen = ElectraForMaskedLM.from_pretrained("e/generator")
        with torch.no_grad():
            scores, logits = disc(**ids).logits, gen(**ids).logits
        assert scores.shape == ids["input_ids"].shape and torch.isfinite(scores).all()
        assert logits.shape[-1] == gen.config.vocab_size and torch.isfinite(logits).all()
        print("loaded", tuple(scores.shape))
    """)
    assert _run([python, "-c", load], cwd=work, env=env).startswith("loaded")
    # Nothing was written outside the empty directory's own three folders.
    assert sorted(p.name for p in work.iterdir()) == ["d", "e", "r"]
