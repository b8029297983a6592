"""benchmarks/run_gpu.sh's plan, from its dry run (no GPU, nothing measured): the core steps' worst case fits
the wall budget of one lent-GPU call, the rows that matter most are in the core and come first, and every
script, flag, throughput variant and size the plan names exists (a renamed flag would otherwise cost a GPU
session)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"
# One device call is at most 10 minutes with the machine's start-up; the script itself aims at <= 8.5.
CALL_LIMIT_S = 510
STEP = re.compile(r"^step (\d+) (core|extra) (\S+) limit=(\d+)s min=(\d+)s \((cum=(\d+)s|if time is left)\): "
                  r"(.+?)(?:  \[needs ([^\]]+)\])?$")
SETUP = re.compile(r"setup allowance (\d+)s, kill grace (\d+)s per step")


def dry_run(**env) -> tuple[int, str, list[dict]]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("QUICK", "FULL", "GATES", "MODERN", "ONLY", "SKIP", "TOTAL_BUDGET_S")}
    full_env.update(DRY_RUN="1", PYTHON="python", **env)
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full_env, timeout=60, cwd=ROOT)
    steps = []
    for line in out.stdout.splitlines():
        match = STEP.match(line)
        if match:
            number, tier, name, limit, minimum, _, cum, command, needs = match.groups()
            steps.append(dict(number=int(number), tier=tier, name=name, limit=int(limit), min=int(minimum),
                              cum=int(cum) if cum else None, argv=shlex.split(command),
                              needs=needs.split() if needs else []))
    return out.returncode, out.stdout + out.stderr, steps


def worst_case(text: str, steps: list[dict]) -> int:
    setup, grace = (int(x) for x in SETUP.search(text).groups())
    return setup + sum(s["limit"] + grace for s in steps if s["tier"] == "core")


def _script_and_flags(argv: list[str]) -> tuple[str, list[str]]:
    """(the benchmark script or pytest, the --flags) of one planned command."""
    if argv[0] == "env":  # env [-u NAME] [NAME=VALUE]... command
        rest, i = argv[1:], 0
        while rest[i] == "-u" or "=" in rest[i]:
            i += 2 if rest[i] == "-u" else 1
        argv = rest[i:]
    assert argv[0] == "python", argv
    if argv[1:3] == ["-m", "pytest"]:
        return "pytest", argv[3:]
    return argv[1], [a.split("=")[0] for a in argv[2:] if a.startswith("--")]


def undefined_flags(steps: list[dict]) -> list[str]:
    """Every script the plan runs exists, and every --flag it passes is in that script's --help."""
    scripts = {}
    problems = []
    for s in steps:
        script, flags = _script_and_flags(s["argv"])
        if script == "pytest":
            files = [a for a in flags if a.endswith(".py")]
            problems += [f"{s['name']}: no test file {a}" for a in files if not (ROOT / a).is_file()]
            problems += [f"{s['name']}: no test files"] if not files else []
            continue
        if not (ROOT / script).is_file():
            problems.append(f"{s['name']}: no script {script}")
            continue
        scripts.setdefault(script, set()).update(flags)
    # The --help runs in parallel: each one imports torch.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    helps = {script: subprocess.Popen([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for script in scripts}
    for script, proc in helps.items():
        text = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, f"{script} --help failed:\n{text[-2000:]}"
        known = set(re.findall(r"--[a-z0-9][a-z0-9-]*", text))
        problems += [f"{script}: no flag {flag}" for flag in sorted(scripts[script] - known)]
    return problems


def _option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_the_default_plan_fits_one_device_call_and_measures_what_matters_first():
    rc, text, steps = dry_run()
    assert rc == 0, text
    budget = int(re.search(r"plan: budget (\d+)s", text).group(1))
    assert budget <= CALL_LIMIT_S
    core = [s for s in steps if s["tier"] == "core"]
    assert worst_case(text, steps) <= budget
    assert f"core worst case: {worst_case(text, steps)}s of {budget}s" in text
    assert core[-1]["cum"] == worst_case(text, steps)  # the printed running total is the same sum
    # The core runs first; each step's minimum fits its own limit.
    assert [s["tier"] for s in steps] == ["core"] * len(core) + ["extra"] * (len(steps) - len(core))
    assert all(s["min"] <= s["limit"] for s in steps)

    def core_step(script, *flags):
        found = [s for s in core if script in s["argv"] and all(f in s["argv"] for f in flags)]
        assert found, f"no core step runs {script} {' '.join(flags)}:\n{text}"
        return found[0]

    # The anchors first: ours (every fast configuration) vs HF eager and HF + torch.compile, ELECTRA-Small.
    first = core[0]
    assert "benchmarks/throughput.py" in first["argv"] and _option(first["argv"], "--sizes") == "small"
    variants = _option(first["argv"], "--variants").split(",")
    assert variants[0] == "hf-compile"  # the ratio column's baseline before anything can time out
    assert {"ours-fast", "ours-graphs", "ours-packed-graphs", "ours-triton", "hf-eager", "hf-compile"} <= set(variants)
    # Kernel ratios, the FLOPs accounting, the ModernBERT rows of issue 21.
    core_step("benchmarks/attention.py", "--check")
    core_step("benchmarks/heads.py")
    core_step("benchmarks/flops.py", "--counted-size")
    core_step("benchmarks/attention.py", "--modern-sweep")
    core_step("benchmarks/geglu.py")
    assert _option(core_step("benchmarks/hf_bert.py", "--model")["argv"], "--model") == "modernbert"
    # Base and Large, the gates and the long runs are there, after the core.
    names = [s["name"] for s in steps]
    for extra in ("throughput_base", "throughput_large", "kernel_tests", "compile_report", "convergence"):
        assert extra in names and next(s for s in steps if s["name"] == extra)["tier"] == "extra"
    # What the lent machine may lack is named, so the step is skipped there instead of failing.
    assert next(s for s in steps if s["name"] == "kernel_tests")["needs"] == ["pytest"]
    assert not any(s["needs"] for s in core)


@pytest.mark.parametrize("env", [dict(QUICK="1"), dict(GATES="0", MODERN="0"), dict(FULL="1"),
                                 dict(ONLY="throughput_base,throughput_large,compile_report")],
                         ids=["quick", "no-gates-no-modern", "full", "only"])
def test_every_knob_keeps_the_worst_case_in_its_budget(env):
    rc, text, steps = dry_run(**env)
    assert rc == 0, text
    budget = int(re.search(r"plan: budget (\d+)s", text).group(1))
    assert worst_case(text, steps) <= budget
    names = [s["name"] for s in steps]
    if env.get("GATES") == "0":
        assert "kernel_tests" not in names and "compile_report" not in names
        assert not {"modern_attention", "geglu", "hf_modernbert", "throughput_modern"} & set(names)
    if env.get("FULL"):
        attention = next(s for s in steps if s["name"] == "attention")
        assert all(s["tier"] == "core" for s in steps) and "--no-autotune" not in attention["argv"]
    if env.get("ONLY"):
        assert names == env["ONLY"].split(",")


def test_the_budget_check_and_the_step_names_can_fail():
    rc, text, _ = dry_run(TOTAL_BUDGET_S="300")
    assert rc == 1 and "exceeds the budget" in text
    rc, text, _ = dry_run(ONLY="throughput_smal")
    assert rc == 2 and "no step named 'throughput_smal'" in text


def test_every_script_and_flag_the_plan_names_exists():
    _, _, steps = dry_run(FULL="1")  # every step
    assert not undefined_flags(steps)
    # The check trips on a renamed flag, a missing script or test file.
    broken = [dict(name="a", argv=["python", "benchmarks/heads.py", "--rep-msec", "5"]),
              dict(name="b", argv=["python", "benchmarks/nope.py"]),
              dict(name="c", argv=["env", "-u", "X", "Y=1", "python", "-m", "pytest", "-q", "tests/kernels/nope.py"])]
    assert sorted(undefined_flags(broken)) == ["b: no script benchmarks/nope.py",
                                               "benchmarks/heads.py: no flag --rep-msec",
                                               "c: no test file tests/kernels/nope.py"]


def test_throughput_variants_and_sizes_in_the_plan_exist():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    _, _, steps = dry_run(FULL="1")
    runs = [s["argv"] for s in steps if "benchmarks/throughput.py" in s["argv"]]
    assert len(runs) >= 4
    for argv in runs:
        assert set(_option(argv, "--variants").split(",")) <= set(throughput.VARIANTS), argv
        assert set(_option(argv, "--sizes").split(",")) <= set(throughput.SHAPES), argv
