#!/usr/bin/env bash
# The kernel gates, then every benchmark on one GPU machine (gates <= 9 minutes, benchmarks < 10), with
# all results in one folder.
#
#   benchmarks/run_gpu.sh                     # -> benchmarks/results/gpu-<UTC date>/
#   benchmarks/run_gpu.sh /path/to/out        # or an explicit folder ($OUT on the lent GPU machine)
#   QUICK=1 benchmarks/run_gpu.sh             # fewer steps everywhere (about 5 minutes)
#   FULL=1 benchmarks/run_gpu.sh              # autotune the attention kernel too (about 15 minutes)
#   GATES=0 benchmarks/run_gpu.sh             # skip the compile report and the kernel tests
#   MODERN=1 benchmarks/run_gpu.sh            # also the ModernBERT rows (window / rotary sweep, GeGLU,
#                                             # patched ModernBertForMaskedLM; about 4 more minutes)
#
# The folder receives each script's .jsonl rows and .png plot (through $ELECTRA_BENCH_RESULTS, which
# benchmarks/_common.py reads) and its printed tables as <script>.log; summary.txt lists what ran, how
# long it took and how it ended. Each script runs under its own time limit so one overrun cannot eat
# the others' time; a failure is recorded and the next script still runs.
#
# First the kernel gates (a few minutes, before any timing): the compile report of every default
# config (registers, spills, shared memory, tensor cores; compile_report.log) and the kernel tests on
# the GPU itself (kernel_tests.log). Then the benchmarks. On a machine without DeepSpeed, carry its
# wheels in .whl/ and this script installs them into /tmp/site. The project itself is installed
# editable when `import electra_fast, electra_kernels` fails.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export ELECTRA_BENCH_RESULTS="$OUT_DIR"
PY=${PYTHON:-python3}
# DeepSpeed's op builder fails to parse Hopper's "9.0a" arch list, so name the arch plainly.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TOKENIZERS_PARALLELISM=false

if ! $PY -c "import deepspeed" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if ! $PY -c "import electra_fast, electra_kernels" 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-build-isolation -e ./kernels -e . >/dev/null
fi

SUMMARY="$OUT_DIR/summary.txt"
{
    echo "electra-fast GPU benchmarks, $(date -u +%FT%TZ), commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
    $PY -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', '| torch', torch.__version__)"
} | tee "$SUMMARY"

# run_cmd NAME SECONDS COMMAND [ARGS...]: any command, its output in NAME.log, its status in summary.txt
run_cmd() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (limit ${limit}s)"
    local start=$SECONDS status
    timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT_DIR/$name.log") 2>&1
    status=$?
    local took=$((SECONDS - start))
    case $status in
        0) echo "$name: ok in ${took}s" ;;
        124|137) echo "$name: TIMED OUT after ${took}s (limit ${limit}s)" ;;
        *) echo "$name: FAILED (exit $status) after ${took}s" ;;
    esac | tee -a "$SUMMARY"
}

# run NAME SECONDS SCRIPT [ARGS...]
run() {
    local name=$1 limit=$2 script=$3
    shift 3
    if [ ! -f "benchmarks/$script" ]; then
        echo "$name: skipped (benchmarks/$script does not exist)" | tee -a "$SUMMARY"
        return
    fi
    echo "== $name: python benchmarks/$script $* (limit ${limit}s)"
    local start=$SECONDS status
    timeout --kill-after=10 "$limit" $PY "benchmarks/$script" "$@" > >(tee "$OUT_DIR/$name.log") 2>&1
    status=$?
    local took=$((SECONDS - start))
    case $status in
        0) echo "$name: ok in ${took}s" ;;
        124|137) echo "$name: TIMED OUT after ${took}s (limit ${limit}s)" ;;
        *) echo "$name: FAILED (exit $status) after ${took}s" ;;
    esac | tee -a "$SUMMARY"
}

if [ "${QUICK:-0}" = 1 ]; then
    STEPS=300; ITERS=5; SEEDS=1,2
else
    STEPS=600; ITERS=10; SEEDS=1,2,3
fi

# Kernel gates first: what the compiler says about every default config (no GPU needed, but this is
# where the numbers matter), then the kernel tests on the GPU (CUDA tensors, no interpreter; one config
# per kernel so that no tuning pass runs).
if [ "${GATES:-1}" = 1 ]; then
    run_cmd compile_report 240 env -u TRITON_INTERPRET $PY benchmarks/compile_report.py --defaults-only --electra
    run_cmd kernel_tests 300 env TRITON_INTERPRET=0 ELECTRA_KERNELS_AUTOTUNE=0 $PY -m pytest -q -x tests/kernels
fi

# Benchmark limits (seconds) add up to 10.7 minutes (9.7 before the modern row). The attention kernel's
# autotuning compiles ~20 configs per layout (minutes), so the default run uses its default configs; FULL=1
# autotunes, with room for it.
if [ "${FULL:-0}" = 1 ]; then ATTN_ARGS=(); ATTN_LIMIT=400; else ATTN_ARGS=(--no-autotune); ATTN_LIMIT=90; fi
run flops 40 flops.py --counted-size small --batch 4
# ELECTRA step variants at every size; BERT-MLM compiled where RESULTS.md's reference has it (eager at large).
run throughput 150 throughput.py --iters "$ITERS" --variants ours-torch,ours-triton,ours-deepspeed,hf-eager,hf-compile
run throughput_bert 45 throughput.py --iters "$ITERS" --sizes small,base --variants hf-bert-mlm-compile
run throughput_bert_large 20 throughput.py --iters "$ITERS" --sizes large --variants hf-bert-mlm
# The modern encoder (model.architecture=modern) at sequence 1,024: its targets are >= 300k tokens/s and >= 1.5x
# transformers' ModernBERT pair (hf-modernbert) in the same run.
run throughput_modern 60 throughput.py --iters "$ITERS" --sizes modern-base --variants ours-triton,hf-modernbert
run attention "$ATTN_LIMIT" attention.py --check "${ATTN_ARGS[@]}"
run heads 120 heads.py
run hf_bert 40 hf_bert.py
run equal_compute 75 equal_compute.py --size small --electra-steps "$STEPS" --seeds "$SEEDS" --probe-epochs 2

# ModernBERT kernels (issue 21), opt-in: they do not fit the default 10-minute budget.
if [ "${MODERN:-0}" = 1 ]; then
    run modern_attention 120 attention.py --modern-sweep --no-autotune
    run geglu 40 geglu.py --compile
    run hf_modernbert 90 hf_bert.py --model modernbert --batch 16 --seq 1024
fi

# Convergence parity at ELECTRA-Small in bf16: every fused kernel vs the references, against the measured
# noise bound (a reference run with its initial weights moved by half a bf16 ulp).
run convergence 150 convergence.py --steps "$([ "${QUICK:-0}" = 1 ] && echo 150 || echo 300)"

echo "results in $OUT_DIR" | tee -a "$SUMMARY"
