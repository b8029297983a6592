#!/usr/bin/env bash
# Every GPU measurement that matters, most important first, in one call of a lent GPU machine: the whole
# run (project install included) stays within TOTAL_BUDGET_S seconds (default 480, 8 minutes), enforced
# here, so that one 10-minute device call is enough and never needs a rerun.
#
#   benchmarks/run_gpu.sh                     # -> benchmarks/results/gpu-<UTC date>/
#   benchmarks/run_gpu.sh /path/to/out        # or an explicit folder ($OUT on the lent GPU machine)
#   DRY_RUN=1 benchmarks/run_gpu.sh           # print the plan (steps, limits, cumulative budget); run nothing
#   TOTAL_BUDGET_S=560 benchmarks/run_gpu.sh  # another wall budget for the whole script, in seconds
#   ONLY=throughput_base,throughput_large benchmarks/run_gpu.sh   # just these steps (e.g. a second call
#                                             # that takes what the first one skipped); SKIP=a,b leaves some out
#   QUICK=1 benchmarks/run_gpu.sh             # fewer timed steps and seeds everywhere
#   GATES=0 benchmarks/run_gpu.sh             # no kernel tests on the GPU, no compile report
#   MODERN=0 benchmarks/run_gpu.sh            # no ModernBERT rows (issue 21)
#   FULL=1 benchmarks/run_gpu.sh              # autotune the kernels, every step core, twice its limit
#                                             # (budget 3600 s: a machine without the 10-minute limit)
#
# The plan is an ordered list of steps, each with a time limit and a minimum worth starting. The core
# steps come first, by priority: ours vs Hugging Face (eager and torch.compile) end to end with our fastest
# configs, the kernel ratios against PyTorch, the FLOPs accounting, the ModernBERT rows; their limits, plus
# the setup allowance and a kill grace per step, fit the budget (the dry run prints it, and
# tests/test_run_gpu_plan.py holds it). The extra steps follow, also by priority, and run in whatever time
# the core leaves. Each step gets min(its limit, the time left); a step whose minimum no longer fits is
# recorded as "skipped: budget". A timeout thus loses the least important measurements, never the first.
#
# The step limits are estimates (no run of this script on a GPU has been recorded yet): summary.txt gives
# each step's real time, so the next run can move them. ELECTRA_KERNELS_AUTOTUNE=0 (unless FULL=1): every
# kernel runs its default config, the one the compile gate checks; autotuning compiles ~20 configs per
# layout and shape (minutes).
#
# The folder receives each script's .jsonl rows and .png plot (through $ELECTRA_BENCH_RESULTS, which
# benchmarks/_common.py reads) and its printed tables as <step>.log; summary.txt lists what ran, how long
# it took and how it ended, and is printed last. On a machine without DeepSpeed or pytest, carry their
# wheels (and their dependencies') in .whl/ and this script installs them into /tmp/site; a step whose
# modules are still missing is recorded as skipped. The project itself is installed editable when
# `import electra_fast, electra_kernels` fails.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
QUICK=${QUICK:-0}
FULL=${FULL:-0}
GATES=${GATES:-1}
MODERN=${MODERN:-1}
if [ "$FULL" = 1 ]; then TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-3600}; else TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-480}; fi
SETUP_ALLOWANCE_S=30  # install + versions, counted in the dry run's worst case (a real run counts the real time)
KILL_GRACE_S=5        # timeout's --kill-after: a step that ignores SIGTERM may run this much longer

if [ "$QUICK" = 1 ]; then
    ITERS=5; STEPS=300; SEEDS=1,2; CONVERGENCE_STEPS=150
else
    ITERS=10; STEPS=600; SEEDS=1,2,3; CONVERGENCE_STEPS=300
fi

# ------------------------------------------------------------------------------------------------ the plan
TIERS=(); NAMES=(); LIMITS=(); MINS=(); CMDS=(); NEEDED=()
# [NEEDS="module ..."] step TIER NAME LIMIT MIN COMMAND...: TIER is core or extra; MIN the least time worth
# starting it with; NEEDS the Python modules it cannot run without (missing: recorded as skipped, no time spent).
# FULL=1 gives each step twice its limit (autotuning compiles many configs first). A command is kept as
# one string, each word shell-quoted where it needs it (so it reads as typed), and run with eval.
step() {
    local word quoted=""
    TIERS+=("$1"); NAMES+=("$2"); LIMITS+=($(( $3 * (FULL == 1 ? 2 : 1) ))); MINS+=("$4"); NEEDED+=("${NEEDS:-}")
    shift 4
    for word in "$@"; do
        if [[ ! $word =~ ^[A-Za-z0-9_./,=:@%+-]+$ ]]; then printf -v word '%q' "$word"; fi
        quoted+="${quoted:+ }$word"
    done
    CMDS+=("$quoted")
}
# bench TIER NAME LIMIT MIN SCRIPT [ARGS...]: python benchmarks/SCRIPT ARGS
bench() {
    local tier=$1 name=$2 limit=$3 min=$4 script=$5
    shift 5
    step "$tier" "$name" "$limit" "$min" "$PY" "benchmarks/$script" "$@"
}

# Variant order inside a throughput step is its priority too: the rows print as each variant ends, so a
# timeout keeps the first ones in <step>.log. The baseline first (the ratio column needs it), then ours.
ELECTRA_ROWS=hf-compile,ours-packed-graphs,ours-graphs,ours-fast,ours-triton,hf-eager
if [ "$FULL" = 1 ]; then ATTN_ARGS=(); ATTN_LIMIT=200; else ATTN_ARGS=(--no-autotune); ATTN_LIMIT=45; fi

# Core: the anchors. ELECTRA-Small end to end (target >= 8,000 seq/s; HF + torch.compile 2,000 on an
# H100), four compiled variants in one process.
bench core throughput_small 175 120 throughput.py --iters "$ITERS" --sizes small --variants "$ELECTRA_ROWS"
# The kernel ratios: our attention against every SDPA backend (checked against SDPA's math backend first),
# the fused MLM / discriminator heads against PyTorch.
bench core attention "$ATTN_LIMIT" 25 attention.py --check "${ATTN_ARGS[@]}"
bench core heads 40 25 heads.py
# The FLOPs accounting: the paper's totals, our configs, FlopCounterMode against the formulas (CPU).
bench core flops 30 15 flops.py --counted-size small --batch 4
if [ "$MODERN" = 1 ]; then
    # Issue 21: windowed (w = 64) vs global attention up to S = 8,192, rotary vs none; GeGLU against the copy
    # bandwidth; a patched ModernBertForMaskedLM step against transformers' SDPA path on mixed lengths.
    bench core modern_attention 45 25 attention.py --modern-sweep --no-autotune
    bench core geglu 20 15 geglu.py --compile
    bench core hf_modernbert 60 40 hf_bert.py --model modernbert --batch 16 --seq 1024 --no-padded-row
fi

# Extras, in the time the core leaves. The kernel tests on the GPU itself (CUDA tensors, no interpreter):
# the attention kernels (dropout, packed, window, rotary) and the heads, -x; the other kernels' tests and
# the autotune / inductor / patch_hf tests stay with CI.
if [ "$GATES" = 1 ]; then
    NEEDS=pytest step extra kernel_tests 90 30 env TRITON_INTERPRET=0 "$PY" -m pytest -q -x -p no:cacheprovider \
        tests/kernels/test_attention.py tests/kernels/test_attention_window_rotary.py \
        tests/kernels/test_mlm_head.py tests/kernels/test_disc_head.py
fi
bench extra throughput_base 150 90 throughput.py --iters "$ITERS" --sizes base --variants "$ELECTRA_ROWS"
bench extra throughput_large 160 100 throughput.py --iters "$ITERS" --sizes large --variants "$ELECTRA_ROWS"
if [ "$GATES" = 1 ]; then
    # What the GPU box's own Triton makes of every default ELECTRA config (CI compiles the full list with
    # the locked Triton; tests/kernels/test_gpu_compile.py).
    step extra compile_report 90 40 env -u TRITON_INTERPRET "$PY" benchmarks/compile_report.py --defaults-only --electra
fi
if [ "$MODERN" = 1 ]; then
    # The modern encoder at sequence 1,024: >= 300k tokens/s and >= 1.5x transformers' ModernBERT pair.
    bench extra throughput_modern 60 40 throughput.py --iters "$ITERS" --sizes modern-base --variants hf-modernbert,ours-triton
fi
# BERT-MLM, compiled where the reference has it (eager at large); DeepSpeed's engine around our step.
bench extra throughput_bert 60 30 throughput.py --iters "$ITERS" --sizes small,base --variants hf-bert-mlm-compile
bench extra throughput_bert_large 25 15 throughput.py --iters "$ITERS" --sizes large --variants hf-bert-mlm
NEEDS=deepspeed bench extra throughput_deepspeed 60 40 throughput.py --iters "$ITERS" --sizes small --variants ours-deepspeed
bench extra hf_bert 55 40 hf_bert.py
# Convergence parity at ELECTRA-Small in bf16 (every fused kernel vs the references, against the measured
# noise bound), and the paper's equal-compute claim at the small size.
bench extra convergence 150 100 convergence.py --steps "$CONVERGENCE_STEPS"
NEEDS=datasets bench extra equal_compute 75 60 equal_compute.py --size small --electra-steps "$STEPS" --seeds "$SEEDS" --probe-epochs 2

# FULL=1, or steps named in ONLY: every step is core (the budget must hold them all).
if [ "$FULL" = 1 ] || [ -n "${ONLY:-}" ]; then for i in "${!TIERS[@]}"; do TIERS[i]=core; done; fi

# ONLY / SKIP: comma-separated step names.
selected() {
    local name=$1
    if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 1; fi
    if [ -n "${SKIP:-}" ] && [[ ",$SKIP," == *",$name,"* ]]; then return 1; fi
    return 0
}
for list in "${ONLY:-}" "${SKIP:-}"; do
    for name in ${list//,/ }; do
        if [[ " ${NAMES[*]} " != *" $name "* ]]; then
            echo "run_gpu.sh: no step named '$name' (steps: ${NAMES[*]})" >&2
            exit 2
        fi
    done
done

SETTINGS="QUICK=$QUICK FULL=$FULL GATES=$GATES MODERN=$MODERN${ONLY:+ ONLY=$ONLY}${SKIP:+ SKIP=$SKIP}"
WORST_CASE=$SETUP_ALLOWANCE_S
for i in "${!NAMES[@]}"; do
    if selected "${NAMES[i]}" && [ "${TIERS[i]}" = core ]; then WORST_CASE=$((WORST_CASE + LIMITS[i] + KILL_GRACE_S)); fi
done

if [ "$DRY_RUN" = 1 ]; then
    echo "plan: budget ${TOTAL_BUDGET_S}s, setup allowance ${SETUP_ALLOWANCE_S}s, kill grace ${KILL_GRACE_S}s per step ($SETTINGS)"
    cumulative=$SETUP_ALLOWANCE_S
    for i in "${!NAMES[@]}"; do
        selected "${NAMES[i]}" || continue
        if [ "${TIERS[i]}" = core ]; then
            cumulative=$((cumulative + LIMITS[i] + KILL_GRACE_S))
            at="cum=${cumulative}s"
        else
            at="if time is left"
        fi
        echo "step $((i + 1)) ${TIERS[i]} ${NAMES[i]} limit=${LIMITS[i]}s min=${MINS[i]}s ($at): ${CMDS[i]}${NEEDED[i]:+  [needs ${NEEDED[i]}]}"
    done
    echo "core worst case: ${WORST_CASE}s of ${TOTAL_BUDGET_S}s"
    if [ "$WORST_CASE" -gt "$TOTAL_BUDGET_S" ]; then
        echo "run_gpu.sh: the core steps' worst case exceeds the budget: the last ones may be cut short" >&2
        exit 1
    fi
    exit 0
fi

# ------------------------------------------------------------------------------------------------ setup
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export ELECTRA_BENCH_RESULTS="$OUT_DIR"
# DeepSpeed's op builder fails to parse Hopper's "9.0a" arch list, so name the arch plainly.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TOKENIZERS_PARALLELISM=false
if [ "$FULL" = 1 ]; then export ELECTRA_KERNELS_AUTOTUNE=${ELECTRA_KERNELS_AUTOTUNE:-1}; else export ELECTRA_KERNELS_AUTOTUNE=0; fi

if compgen -G ".whl/*.whl" >/dev/null && ! $PY -c "import deepspeed, pytest" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if ! $PY -c "import electra_fast, electra_kernels" 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-build-isolation -e ./kernels -e . >/dev/null
fi

SUMMARY="$OUT_DIR/summary.txt"
{
    echo "electra-fast GPU benchmarks, $(date -u +%FT%TZ), commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
    $PY -c "import torch, triton; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', '| torch', torch.__version__, '| triton', triton.__version__)"
    echo "budget ${TOTAL_BUDGET_S}s, core worst case ${WORST_CASE}s ($SETTINGS); setup took ${SECONDS}s"
} | tee "$SUMMARY"

# ------------------------------------------------------------------------------------------------ the run
for i in "${!NAMES[@]}"; do
    name=${NAMES[i]}
    selected "$name" || continue
    missing=""
    for module in ${NEEDED[i]}; do $PY -c "import $module" 2>/dev/null || missing+=" $module"; done
    if [ -n "$missing" ]; then
        echo "$name: skipped: not installed:$missing (carry the wheels in .whl/)" | tee -a "$SUMMARY"
        continue
    fi
    left=$((TOTAL_BUDGET_S - SECONDS - KILL_GRACE_S))
    limit=$((LIMITS[i] < left ? LIMITS[i] : left))
    if [ "$limit" -lt "${MINS[i]}" ]; then
        echo "$name: skipped: budget (${left}s left, needs ${MINS[i]}s)" | tee -a "$SUMMARY"
        continue
    fi
    echo "== $name: ${CMDS[i]} (limit ${limit}s, ${left}s left)"
    start=$SECONDS
    eval "timeout --kill-after=$KILL_GRACE_S $limit ${CMDS[i]}" > >(tee "$OUT_DIR/$name.log") 2>&1
    status=$?
    took=$((SECONDS - start))
    case $status in
        0) echo "$name: ok in ${took}s (limit ${limit}s)" ;;
        124|137) echo "$name: TIMED OUT after ${took}s (limit ${limit}s)" ;;
        *) echo "$name: FAILED (exit $status) after ${took}s (limit ${limit}s)" ;;
    esac | tee -a "$SUMMARY"
done

echo "total ${SECONDS}s of ${TOTAL_BUDGET_S}s; results in $OUT_DIR" | tee -a "$SUMMARY"
echo
cat "$SUMMARY"
