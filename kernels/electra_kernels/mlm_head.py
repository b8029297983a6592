"""The generator's masked-LM head at the gathered (masked) positions: vocabulary projection,
cross-entropy, arg-max accuracy and Gumbel-max sampling, without keeping (M, V) logits.

For M gathered rows h_m (E features), the tied embedding matrix W (V, E) and bias b (V):

    z_mv  = h_m · w_v + b_v                                   logits, never stored
    lse_m = log Σ_v exp(z_mv)                                 online, one pass over the vocabulary
    loss  = (1/U) Σ_{m used} (lse_m - z_{m,t_m})              U = number of used rows (t_m != -100)
    argmax_m = argmax_v z_mv              correct_m = used_m and argmax_m == t_m
    sample_m = argmax_v (z_mv / T + g_mv),   g_mv = -log(-log u_mv)

The Gumbel-max trick makes ``sample_m`` an exact draw from softmax(z_m / T). The uniforms u_mv come
from Philox inside the kernel; no noise tensor exists. One ``tl.rand4x(seed, counter)`` call gives
four uniforms, so the vocabulary is walked in groups of 4·Q columns (Q = ``_QUARTER`` = 32) and the
counter m·(Q·groups) + Q·g + j serves the four columns 4Q·g + j + Q·lane (lane 0..3, j < Q). That costs
a quarter of the integer work of one ``tl.rand(seed, m·V + v)`` per logit, which at ELECTRA-Base
(75M logits, ~100 integer ops per Philox-10 draw) would be ~0.5 ms of the head's budget on an H100,
more than its matmul; the map from column to (counter, lane) is independent of block sizes, so the
same seed gives the same samples whatever config the autotuner picks. ``gumbel_noise`` materialises
this noise for tests.

Forward. Programs tile (row block) x (vocabulary split). Each one walks its split in 4Q-column
groups: four (BLOCK_M, Q) logit tiles per group with ``tl.dot`` over E in BLOCK_E chunks (fp32
accumulation, one load of the hidden tile shared by the four dots), each folded into per-row running
statistics: max and rescaled sum of exponentials (flash-attention's online softmax), the target
logit, the best logit and its column, the best Gumbel score and its column. A second, tiny kernel
merges the splits (log-sum-exp of partial sums, first-column tie-break for the arg-maxes) and writes
lse, the per-row loss, the sample and the correct flag; a one-program kernel sums the loss in a fixed
order (bitwise reproducible, no atomics). Splitting the vocabulary gives the GPU enough programs when
M is small (Base: 20-40 row blocks on 132 SMs) at the cost of (splits, M) partials, a few hundred KiB.

Backward. With p = softmax(z) and s = grad_loss / U on used rows (0 on unused rows):

    dz = s · (p - onehot(t))          dH = dz W          dW = dzᵀ H          db = Σ_m dz

The softmax gradient of a row needs that row's final lse, known only after the whole vocabulary has
been seen, so it cannot be produced inside the forward sweep. The alternatives are to keep the logits
(an (M, V) tensor: what this op exists to avoid, and as much memory traffic per element as the
recompute costs in tensor-core time) or Liger's scheme (cuBLAS logits chunk, then read it twice more
to turn it into a gradient in place: bf16 logits for the loss and three extra passes over M x V).
Here the backward recomputes each logit tile in fp32 from H and W (one more M·E·V matmul on tensor
cores), forms dz in registers with lse saved by the forward (M floats), and writes it once in the
compute dtype into a chunk of at most ``_DLOGITS_CHUNK_BYTES``; cuBLAS then does dH += dz_c W_c and
dW_c = dz_cᵀ H for that vocabulary chunk (dW slices are disjoint, so only dH accumulates, in fp32).
db comes from per-program column sums in the same kernel. grad_loss / U is read from device memory
inside that kernel, so there is no separate rescale pass to skip (Liger's ``grad_output == 1``
shortcut exists because it computes gradients in the forward and rescales them afterwards), and no
host synchronisation.

Dtypes: the matmuls run in the compute dtype (the autocast dtype under autocast, else hidden's dtype;
the weight is cast to it like ``F.linear`` under autocast would); logits, statistics and dz are formed
in fp32; bias stays in its own dtype and is added in fp32. fp32 inputs use TF32 in ``tl.dot`` exactly
when ``torch.backends.cuda.matmul.allow_tf32`` allows it for torch's own matmuls.

Targets outside [0, V) other than -100 are not detected (that would need a host sync); such a row's
target logit counts as 0.

Reading order: Triton kernels -> launchers -> torch.library custom ops + autograd -> public function
and module -> reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import HAS_TRITON, interpreter_enabled, use_triton
from ._outputs import new_empty
from ._triton_utils import device_guard, target_programs

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._autotune import autotune, device_smem_limit, triton_configs
    from ._triton_utils import cast_rne, mma
else:  # pragma: no cover - the reference path needs no triton
    triton = None

IGNORE_INDEX = -100
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# On the GPU the kernels run bf16 and fp16; an fp32 compute dtype takes mlm_head_loss_ref there
# (cuBLAS logits, TF32 as torch.backends.cuda.matmul.allow_tf32 says, then torch's cross-entropy).
# The fused forward's fp32 tiles spill 2.4 KB per thread (sm_80 and sm_90, Triton 3.7.1: the four
# fp32 accumulators and noise tiles of a 128-row group plus twice the operand registers) and its
# products run on the FMA units unless TF32 is allowed; the price of torch's path is the (M, V) fp32
# logits in memory. Under the interpreter (CPU tests) fp32 still runs the kernels.
GPU_DTYPES = (torch.bfloat16, torch.float16)
# Temperatures below this behave as this (1/T stays finite); the reference applies the same floor.
_MIN_TEMPERATURE = 1e-6
# The backward writes dlogits for at most this many bytes of vocabulary columns at a time (Base:
# 2457 rows x 6.8k columns in bf16). Smaller chunks cost more launches; larger ones more memory.
_DLOGITS_CHUNK_BYTES = 32 << 20
# ... but never fewer than this many columns (V permitting). Each chunk's dH += dz_c·W_c reads and writes
# the (M, E) fp32 accumulator once, 8·M·E bytes for 2·M·E·cols FLOPs: cols/4 FLOP per byte. An H100
# does ~300 bf16 tensor-core FLOP per byte of HBM bandwidth (989 TFLOP/s over 3.35 TB/s), so below
# ~1,200 columns the accumulator's traffic, not the matmul, sets the time. With the old 256-column floor
# (reached from M ≈ 65k masked rows) and a fresh (M, E) product per chunk added to the accumulator, dH
# alone moved ~118 GB per backward at M = 80k, E = 768 (163 GB in all); 2,048 columns and addmm into the
# accumulator: 7.4 GB (26 GB in all, of which 14.6 GB is dlogits written once and read twice;
# ``benchmarks/heads.py --bytes``), for a dlogits buffer of M·2048 elements (328 MB at M = 80k, bf16).
_DLOGITS_MIN_CHUNK_COLS = 2048
# Programs to aim for per launch: two waves of the GPU's SMs.
_PROGRAMS_PER_SM = 2
# The forward walks the vocabulary in groups of four QUARTER-column logit tiles, one Philox evaluation
# giving the Gumbel noise of four logits, one in each tile (see _gumbel4). 32 columns rather than 64:
# the four accumulators and the four noise tiles are live together, and with 64 columns they need more
# than the 255 registers a thread may have (ptxas spills 1.2-1.8 KB per thread, sm_80 and sm_90).
_QUARTER = 32
_GROUP = 4 * _QUARTER


# --------------------------------------------------------------------------------------------------
# 1. Triton kernels
# --------------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# Candidate spaces (kernels/electra_kernels/_autotune.py: the first entry is the default). The forward walks the
# vocabulary in groups of 4 x _QUARTER columns (see _gumbel4); its tiles are BLOCK_M rows x one group:
# (BLOCK_M, BLOCK_E, num_warps, num_stages). Eight warps throughout: the fused epilogue (online softmax,
# Philox, two arg-maxes over four column tiles) needs the registers of 256 threads. The BLOCK_M=64
# candidates spill 8 B on sm_80 (none on sm_90); the tuner times them like the others.
_FWD_SPACE = [(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 8, 4), (128, 32, 8, 4), (64, 32, 8, 3)]
# The backward's dlogits tiles are plain BLOCK_M x BLOCK_V: (BLOCK_M, BLOCK_V, BLOCK_E, warps, stages).
# The recomputed logits, their pointers and the epilogue fill the registers quickly: 128 x 128 tiles
# spill 192-348 B (sm_80 / sm_90), 128 x 256 up to 1.9 KB, (128, 64, 128, 4 warps) 116-284 B and
# (64, 256, 32, 8 warps, 4 stages) 284 B on sm_90 (all dropped); the two kept do not spill.
_DLOGITS_SPACE = [(128, 64, 64, 8, 3), (64, 128, 32, 8, 3)]
# One small config each under the interpreter (the CPU tests).
_FWD_INTERPRETED = (64, 32, 4, 1)
_DLOGITS_INTERPRETED = (64, 256, 32, 4, 1)
_FWD_NAMES = ("BLOCK_M", "BLOCK_E")
_DLOGITS_NAMES = ("BLOCK_M", "BLOCK_V", "BLOCK_E")


def _configs(space, interpreted, names):
    if interpreter_enabled():
        return triton_configs([interpreted], names)
    return triton_configs(space, names)


def _smem_need(block_m, block_v, block_e, stages, element_size) -> int:
    """Operand buffers of the software pipeline: stages x (hidden tile + weight tile)."""
    return stages * (block_m + block_v) * block_e * element_size


def _keep_candidate(cand, names, M, E, element_size, smem_budget) -> bool:
    """Tiles not far larger than the problem (tiny M or E), operand buffers within the budget."""
    blocks = dict(zip(names, cand[:-2]))
    block_v = blocks.get("BLOCK_V", _GROUP)
    return (blocks["BLOCK_M"] <= max(64, _next_pow2(M)) and blocks["BLOCK_E"] <= max(32, _next_pow2(E))
            and _smem_need(blocks["BLOCK_M"], block_v, blocks["BLOCK_E"], cand[-1], element_size) <= smem_budget)


def _prune_matmul_configs(configs, named_args, **kwargs):
    """Drop candidates that do not fit this problem or the device's shared memory (its own per-block
    limit: 163 KiB on an A100, 227 KiB on an H100); keep at least one config, the smallest."""
    element_size = named_args["H"].element_size()
    budget = device_smem_limit(named_args)

    def as_tuple(c):
        return (*c.kwargs.values(), c.num_warps, c.num_stages)

    def need(c):
        return _smem_need(c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_V", _GROUP), c.kwargs["BLOCK_E"], c.num_stages,
                          element_size)

    kept = [c for c in configs
            if _keep_candidate(as_tuple(c), tuple(c.kwargs), named_args["M"], named_args["E"], element_size, budget)]
    return kept or [min(configs, key=need)]


if HAS_TRITON:
    _QUARTER_C = tl.constexpr(_QUARTER)
    # Set only under Triton's interpreter (the CPU tests): see _argmax_operand.
    _INTERPRETED_C = tl.constexpr(interpreter_enabled())

    @triton.jit
    def _argmax_operand(x, INTERPRETED: tl.constexpr):
        """x for tl.max(..., return_indices=True), NaN read as -inf under the interpreter only.

        On the GPU the arg-max skips NaN (max.f32 returns the other operand), and the NaN reaches the
        loss through the sums of exp instead (see _mlm_head_fwd_reduce_kernel). Triton 3.9's interpreter
        skips NaN too (np.nanmax / np.nanargmax) but raises "All-NaN slice encountered" on a row that is
        all NaN; reading NaN as -inf gives the GPU's result without the error (3.7's interpreter, np.max,
        propagated the NaN instead). Compiled code is unchanged: a NaN-free copy in the GPU kernel cost
        44 B of spills in the sm_80 forward, which sits at 255 registers."""
        if INTERPRETED:
            return tl.where(x != x, float("-inf"), x)
        return x

    @triton.jit
    def _uniform_to_gumbel(u):
        # u = 0 would give -inf and u -> 1 +inf; the same clamp as gumbel_noise_ref.
        u = tl.minimum(tl.maximum(u, 1.1754943508222875e-38), 1.0 - 1.1920928955078125e-07)
        return -tl.log(-tl.log(u))

    @triton.jit
    def _gumbel4(seed, rows, group, counters_per_row, RNG_OFFSET_64: tl.constexpr,
                 QUARTER: tl.constexpr):
        """Gumbel(0, 1) noise for the four QUARTER-column quarters of column group ``group``.

        Philox counter (row, QUARTER·group + j) yields four uniforms, for columns 4·QUARTER·group + j +
        QUARTER·lane,
        lane = 0..3: one Philox evaluation per four logits (a quarter of tl.rand's integer work, the
        epilogue's largest cost), and a column -> (counter, lane) map that does not depend on block
        sizes, so a seed gives the same samples whatever config the autotuner picks."""
        counters = group * QUARTER + tl.arange(0, QUARTER)
        if RNG_OFFSET_64:
            offsets = rows.to(tl.int64)[:, None] * counters_per_row + counters[None, :]
        else:
            offsets = rows[:, None] * counters_per_row + counters[None, :]
        u0, u1, u2, u3 = tl.rand4x(seed, offsets)
        return (_uniform_to_gumbel(u0), _uniform_to_gumbel(u1), _uniform_to_gumbel(u2),
                _uniform_to_gumbel(u3))

    @triton.jit
    def _fold_quarter(logits, first_col, targets, gumbel, inv_temperature,
                      run_max, run_sumexp, target_logit, best, best_col, draw, draw_col, V,
                      QUARTER: tl.constexpr):
        """Fold one (BLOCK_M, QUARTER) logit tile into the running per-row statistics. Tiles arrive in
        increasing column order, so a strictly greater value is needed to replace a best column:
        with tl.max's first-index tie-break, that is torch.argmax's first-occurrence rule."""
        cols = first_col + tl.arange(0, QUARTER)
        col_ok = cols < V
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        # Online log-sum-exp: rescale the running sum to the new maximum. The first quarter of a
        # split always holds a real column, so run_max is finite from then on, and a quarter past
        # the vocabulary's end adds exp(-inf) = 0.
        tile_max, tile_arg = tl.max(_argmax_operand(logits, _INTERPRETED_C), axis=1, return_indices=True)
        new_max = tl.maximum(run_max, tile_max)
        run_sumexp = run_sumexp * tl.exp(run_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1)

        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], logits, 0.0), axis=1)

        tile_best_col = first_col + tile_arg.to(tl.int32)
        better = tile_max > best
        best_col = tl.where(better, tile_best_col, best_col)
        best = tl.where(better, tile_max, best)

        scores = tl.where(col_ok[None, :], logits * inv_temperature + gumbel, float("-inf"))
        tile_draw, tile_draw_arg = tl.max(_argmax_operand(scores, _INTERPRETED_C), axis=1, return_indices=True)
        tile_draw_col = first_col + tile_draw_arg.to(tl.int32)
        better = tile_draw > draw
        draw_col = tl.where(better, tile_draw_col, draw_col)
        draw = tl.where(better, tile_draw, draw)
        return new_max, run_sumexp, target_logit, best, best_col, draw, draw_col

    @triton.jit
    def _logit_tile(H, W, rows, cols, row_ok, col_ok, E, stride_hm, stride_wv,
                    INPUT_PRECISION: tl.constexpr, EVEN_E: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr):
        """(BLOCK_M, BLOCK_V) fp32 tile of H[rows] @ W[cols]ᵀ, looping over E in BLOCK_E chunks."""
        offs_e = tl.arange(0, BLOCK_E)
        h_ptrs = H + rows.to(tl.int64)[:, None] * stride_hm + offs_e[None, :]
        # W is (V, E) row-major: loading the (BLOCK_E, BLOCK_V) tile transposed feeds tl.dot directly.
        w_ptrs = W + cols.to(tl.int64)[None, :] * stride_wv + offs_e[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            if EVEN_E:
                h = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                e_ok = (e0 + offs_e) < E
                h = tl.load(h_ptrs, mask=row_ok[:, None] & e_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=e_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(h, w, acc, INPUT_PRECISION)
            h_ptrs += BLOCK_E
            w_ptrs += BLOCK_E
        return acc

    @triton.jit
    def _logit_quarters(H, W, rows, row_ok, v0, V, E, stride_hm, stride_wv,
                        INPUT_PRECISION: tl.constexpr, EVEN_E: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, QUARTER: tl.constexpr):
        """The (BLOCK_M, QUARTER) fp32 logit tiles of columns v0 + QUARTER·q + [0, QUARTER), q = 0..3, bias not
        added: four tl.dot per BLOCK_E step sharing one load of the hidden tile."""
        offs_e = tl.arange(0, BLOCK_E)
        q_cols = v0 + tl.arange(0, QUARTER)
        h_ptrs = H + rows.to(tl.int64)[:, None] * stride_hm + offs_e[None, :]
        # W is (V, E) row-major: loading (BLOCK_E, QUARTER) tiles transposed feeds tl.dot directly.
        w_ptrs = W + q_cols.to(tl.int64)[None, :] * stride_wv + offs_e[:, None]
        quarter_stride = QUARTER * stride_wv
        ok0 = q_cols < V
        ok1 = (q_cols + QUARTER) < V
        ok2 = (q_cols + 2 * QUARTER) < V
        ok3 = (q_cols + 3 * QUARTER) < V
        acc0 = tl.zeros((BLOCK_M, QUARTER), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, QUARTER), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, QUARTER), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, QUARTER), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            if EVEN_E:
                e_ok = offs_e < BLOCK_E
            else:
                e_ok = (e0 + offs_e) < E
            h = tl.load(h_ptrs, mask=row_ok[:, None] & e_ok[None, :], other=0.0)
            w0 = tl.load(w_ptrs, mask=e_ok[:, None] & ok0[None, :], other=0.0)
            w1 = tl.load(w_ptrs + quarter_stride, mask=e_ok[:, None] & ok1[None, :], other=0.0)
            w2 = tl.load(w_ptrs + 2 * quarter_stride, mask=e_ok[:, None] & ok2[None, :], other=0.0)
            w3 = tl.load(w_ptrs + 3 * quarter_stride, mask=e_ok[:, None] & ok3[None, :], other=0.0)
            acc0 = mma(h, w0, acc0, INPUT_PRECISION)
            acc1 = mma(h, w1, acc1, INPUT_PRECISION)
            acc2 = mma(h, w2, acc2, INPUT_PRECISION)
            acc3 = mma(h, w3, acc3, INPUT_PRECISION)
            h_ptrs += BLOCK_E
            w_ptrs += BLOCK_E
        return acc0, acc1, acc2, acc3

    @autotune(
        configs=_configs(_FWD_SPACE, _FWD_INTERPRETED, _FWD_NAMES),
        key=["M_BUCKET", "V", "E"],
        prune_configs_by={"early_config_prune": _prune_matmul_configs},
    )
    @triton.heuristics({"EVEN_E": lambda args: args["E"] % args["BLOCK_E"] == 0})
    @triton.jit(do_not_specialize=["seed"])  # a new seed every step must not recompile
    def _mlm_head_fwd_kernel(
        H, W, BIAS, TARGETS,
        PART_MAX, PART_SUMEXP, PART_TARGET, PART_BEST, PART_BEST_COL, PART_DRAW, PART_DRAW_COL,
        M, V, E, M_BUCKET, stride_hm, stride_wv, seed, inv_temperature, counters_per_row,
        HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        RNG_OFFSET_64: tl.constexpr, EVEN_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        QUARTER: tl.constexpr = _QUARTER_C
        GROUP: tl.constexpr = 4 * _QUARTER_C
        tl.static_assert(BLOCK_M >= 16)  # tl.dot needs every operand dimension >= 16
        tl.static_assert(BLOCK_E >= 16)
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        targets = tl.load(TARGETS + rows, mask=row_ok, other=-100)
        q = tl.arange(0, QUARTER)

        # This split's columns: a contiguous run of whole column groups (the last split may be
        # short or empty; an empty split writes neutral partials).
        groups_per_split = tl.cdiv(tl.cdiv(V, GROUP), num_splits)
        v_begin = split * groups_per_split * GROUP
        v_end = tl.minimum(v_begin + groups_per_split * GROUP, V)

        run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        run_sumexp = tl.zeros((BLOCK_M,), dtype=tl.float32)
        target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
        best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        best_col = tl.zeros((BLOCK_M,), dtype=tl.int32)
        draw = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        draw_col = tl.zeros((BLOCK_M,), dtype=tl.int32)

        for v0 in range(v_begin, v_end, GROUP):
            z0, z1, z2, z3 = _logit_quarters(H, W, rows, row_ok, v0, V, E, stride_hm, stride_wv,
                                             INPUT_PRECISION, EVEN_E, BLOCK_M, BLOCK_E, QUARTER)
            g0, g1, g2, g3 = _gumbel4(seed, rows, v0 // GROUP, counters_per_row, RNG_OFFSET_64, QUARTER)
            if HAS_BIAS:
                c0 = v0 + q
                z0 += tl.load(BIAS + c0, mask=c0 < V, other=0.0).to(tl.float32)[None, :]
                z1 += tl.load(BIAS + c0 + QUARTER, mask=c0 + QUARTER < V, other=0.0).to(tl.float32)[None, :]
                z2 += tl.load(BIAS + c0 + 2 * QUARTER, mask=c0 + 2 * QUARTER < V,
                              other=0.0).to(tl.float32)[None, :]
                z3 += tl.load(BIAS + c0 + 3 * QUARTER, mask=c0 + 3 * QUARTER < V,
                              other=0.0).to(tl.float32)[None, :]
            run_max, run_sumexp, target_logit, best, best_col, draw, draw_col = _fold_quarter(
                z0, v0, targets, g0, inv_temperature,
                run_max, run_sumexp, target_logit, best, best_col, draw, draw_col, V, QUARTER)
            run_max, run_sumexp, target_logit, best, best_col, draw, draw_col = _fold_quarter(
                z1, v0 + QUARTER, targets, g1, inv_temperature,
                run_max, run_sumexp, target_logit, best, best_col, draw, draw_col, V, QUARTER)
            run_max, run_sumexp, target_logit, best, best_col, draw, draw_col = _fold_quarter(
                z2, v0 + 2 * QUARTER, targets, g2, inv_temperature,
                run_max, run_sumexp, target_logit, best, best_col, draw, draw_col, V, QUARTER)
            run_max, run_sumexp, target_logit, best, best_col, draw, draw_col = _fold_quarter(
                z3, v0 + 3 * QUARTER, targets, g3, inv_temperature,
                run_max, run_sumexp, target_logit, best, best_col, draw, draw_col, V, QUARTER)

        out = split * M + rows
        tl.store(PART_MAX + out, run_max, mask=row_ok)
        tl.store(PART_SUMEXP + out, run_sumexp, mask=row_ok)
        tl.store(PART_TARGET + out, target_logit, mask=row_ok)
        tl.store(PART_BEST + out, best, mask=row_ok)
        tl.store(PART_BEST_COL + out, best_col, mask=row_ok)
        tl.store(PART_DRAW + out, draw, mask=row_ok)
        tl.store(PART_DRAW_COL + out, draw_col, mask=row_ok)

    @triton.jit
    def _mlm_head_fwd_reduce_kernel(
        PART_MAX, PART_SUMEXP, PART_TARGET, PART_BEST, PART_BEST_COL, PART_DRAW, PART_DRAW_COL,
        TARGETS, LSE, ROW_LOSS, SAMPLED, CORRECT, M, num_splits,
        BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """Merge the (num_splits, M) partials of the forward into per-row results."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        splits = tl.arange(0, BLOCK_S)
        row_ok = rows < M
        ok = (splits[:, None] < num_splits) & row_ok[None, :]
        idx = splits[:, None] * M + rows[None, :]

        part_max = tl.load(PART_MAX + idx, mask=ok, other=float("-inf"))
        part_sumexp = tl.load(PART_SUMEXP + idx, mask=ok, other=0.0)
        row_max = tl.max(part_max, axis=0)
        # lse = max + log Σ_k sumexp_k · exp(max_k - max); empty splits have max_k = -inf -> weight 0.
        safe_max = tl.where(row_ok, row_max, 0.0)
        weights = tl.where(ok, tl.exp(part_max - safe_max[None, :]), 0.0)
        lse = safe_max + tl.log(tl.where(row_ok, tl.sum(part_sumexp * weights, axis=0), 1.0))
        target_logit = tl.sum(tl.load(PART_TARGET + idx, mask=ok, other=0.0), axis=0)

        # Splits hold increasing column ranges, so the first split among equal maxima holds the first
        # column: tl.argmax's left tie-break over splits keeps torch.argmax's rule.
        part_best = tl.load(PART_BEST + idx, mask=ok, other=float("-inf"))
        winner = tl.argmax(part_best, axis=0)
        best_col = tl.sum(tl.where(splits[:, None] == winner[None, :],
                                   tl.load(PART_BEST_COL + idx, mask=ok, other=0), 0), axis=0)
        part_draw = tl.load(PART_DRAW + idx, mask=ok, other=float("-inf"))
        winner = tl.argmax(part_draw, axis=0)
        draw_col = tl.sum(tl.where(splits[:, None] == winner[None, :],
                                   tl.load(PART_DRAW_COL + idx, mask=ok, other=0), 0), axis=0)

        targets = tl.load(TARGETS + rows, mask=row_ok, other=-100)
        used = targets != -100
        # A NaN logit. On the GPU tl.max / tl.argmax skip NaN (max.f32 returns the other operand), so
        # the arg-max and the Gumbel draw of such a row are a plausible column; the sums of exp do
        # propagate it (IEEE adds), so lse is NaN. Its row loss is then NaN even in an unused slot: the
        # mean loss is NaN and the trainer's non-finite guard skips the step whose samples are garbage.
        nan_row = lse != lse
        tl.store(LSE + rows, lse, mask=row_ok)
        tl.store(ROW_LOSS + rows, tl.where(used | nan_row, lse - target_logit, 0.0), mask=row_ok)
        tl.store(SAMPLED + rows, draw_col.to(tl.int64), mask=row_ok)
        tl.store(CORRECT + rows, (used & (best_col == targets) & ~nan_row).to(tl.uint8), mask=row_ok)

    @triton.jit
    def _mlm_head_loss_kernel(ROW_LOSS, TARGETS, LOSS, NUM_USED, M, BLOCK: tl.constexpr):
        """One program: loss = Σ row losses / max(used rows, 1) and the used-row count, in a fixed
        order (no atomics: the same inputs give the same bits)."""
        loss_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        used = tl.zeros((BLOCK,), dtype=tl.int32)
        for r0 in range(0, M, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            row_ok = rows < M
            loss_sum += tl.load(ROW_LOSS + rows, mask=row_ok, other=0.0)
            used += (tl.load(TARGETS + rows, mask=row_ok, other=-100) != -100).to(tl.int32)
        num_used = tl.sum(used, axis=0)
        tl.store(LOSS, tl.sum(loss_sum, axis=0) / tl.maximum(num_used, 1).to(tl.float32))
        tl.store(NUM_USED, num_used)

    @autotune(
        configs=_configs(_DLOGITS_SPACE, _DLOGITS_INTERPRETED, _DLOGITS_NAMES),
        # Not chunk_cols: the chunk width follows from M (_dlogits_chunk_cols) and the last chunk of each
        # backward is narrower, so keying on it re-tuned whenever the masked-row count moved; M's
        # power-of-two bucket stands for both.
        key=["M_BUCKET", "V", "E"],
        prune_configs_by={"early_config_prune": _prune_matmul_configs},
    )
    @triton.heuristics({"EVEN_E": lambda args: args["E"] % args["BLOCK_E"] == 0})
    @triton.jit
    def _mlm_head_dlogits_kernel(
        H, W, BIAS, TARGETS, LSE, GRAD_LOSS, NUM_USED, DLOGITS, PART_DBIAS,
        M, V, E, M_BUCKET, col_begin, chunk_cols, stride_hm, stride_wv, stride_dm,
        HAS_BIAS: tl.constexpr, WRITE_DBIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_E: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """dz = s·(softmax(z) - onehot(t)) for columns [col_begin, col_begin + chunk_cols).

        Program (vocab block, row split) walks its rows, writes dz into DLOGITS (M, chunk_cols) and
        the column sums of dz (the bias gradient) into PART_DBIAS[row split]."""
        tl.static_assert(BLOCK_M >= 16)
        tl.static_assert(BLOCK_V >= 16)
        tl.static_assert(BLOCK_E >= 16)
        pid_v = tl.program_id(0)
        row_split = tl.program_id(1)
        num_row_splits = tl.num_programs(1)
        local_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = local_cols < chunk_cols
        cols = col_begin + local_cols
        # s = grad_loss / max(used rows, 1), read on the device: no host sync, no rescale pass.
        scale = tl.load(GRAD_LOSS).to(tl.float32) / tl.maximum(tl.load(NUM_USED), 1).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)

        blocks_per_split = tl.cdiv(tl.cdiv(M, BLOCK_M), num_row_splits)
        r_begin = row_split * blocks_per_split * BLOCK_M
        r_end = tl.minimum(r_begin + blocks_per_split * BLOCK_M, M)
        dbias = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for r0 in range(r_begin, r_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < r_end
            logits = _logit_tile(H, W, rows, cols, row_ok, col_ok, E, stride_hm, stride_wv,
                                 INPUT_PRECISION, EVEN_E, BLOCK_M, BLOCK_V, BLOCK_E)
            if HAS_BIAS:
                logits += bias[None, :]
            lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
            targets = tl.load(TARGETS + rows, mask=row_ok, other=-100)
            # Unused slots (and rows past the end) get s = 0: they contribute nothing anywhere.
            row_scale = tl.where(targets != -100, scale, 0.0)
            probs = tl.exp(logits - lse[:, None])
            dz = (probs - tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)) * row_scale[:, None]
            if WRITE_DBIAS:
                dbias += tl.sum(tl.where(col_ok[None, :], dz, 0.0), axis=0)
            out = DLOGITS + rows.to(tl.int64)[:, None] * stride_dm + local_cols[None, :]
            tl.store(out, cast_rne(dz, DLOGITS.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        if WRITE_DBIAS:
            tl.store(PART_DBIAS + row_split * V + cols, dbias, mask=col_ok)

    @triton.jit(do_not_specialize=["seed"])
    def _gumbel_noise_kernel(OUT, M, V, seed, counters_per_row, RNG_OFFSET_64: tl.constexpr,
                             BLOCK_M: tl.constexpr):
        """The forward's noise for one row block and one column group, materialised."""
        QUARTER: tl.constexpr = _QUARTER_C
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        group = tl.program_id(1)
        g0, g1, g2, g3 = _gumbel4(seed, rows, group, counters_per_row, RNG_OFFSET_64, QUARTER)
        cols = group * 4 * QUARTER + tl.arange(0, QUARTER)
        out = OUT + rows.to(tl.int64)[:, None] * V + cols[None, :]
        row_ok = rows[:, None] < M
        tl.store(out, g0, mask=row_ok & (cols[None, :] < V))
        tl.store(out + QUARTER, g1, mask=row_ok & (cols[None, :] + QUARTER < V))
        tl.store(out + 2 * QUARTER, g2, mask=row_ok & (cols[None, :] + 2 * QUARTER < V))
        tl.store(out + 3 * QUARTER, g3, mask=row_ok & (cols[None, :] + 3 * QUARTER < V))


# --------------------------------------------------------------------------------------------------
# 2. Launchers
# --------------------------------------------------------------------------------------------------
def _input_precision(dtype: torch.dtype) -> str:
    # TF32 only touches fp32 operands; follow torch's own switch for fp32 matmuls.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _counters_per_row(V: int) -> int:
    # Philox counters per row: QUARTER per group of four quarters, each giving four uniforms (_gumbel4).
    return triton.cdiv(V, _GROUP) * _QUARTER


def _rng_offset_64(M: int, V: int) -> bool:
    # Counters row * counters_per_row + j: 64-bit only where 32 bits would overflow (same values below).
    return M * _counters_per_row(V) >= 2**31


def _check_kernel_inputs(hidden, weight, bias, targets):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"mlm_head_loss: hidden must be (M, E) and weight (V, E), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    M, E = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != E:
        raise ValueError(f"mlm_head_loss: hidden has {E} features but weight is {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"mlm_head_loss: bias must be ({V},), got {tuple(bias.shape)}")
    if tuple(targets.shape) != (M,):
        raise ValueError(f"mlm_head_loss: targets must be ({M},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"mlm_head_loss: targets must be integer ids, got {targets.dtype}")
    if V >= 2**31:
        raise ValueError(f"mlm_head_loss: vocabulary of {V} does not fit int32 column indices")


def mlm_head_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                     temperature: float, seed: int):
    """Launch the forward: returns (loss () fp32, sampled (M,) int64, correct (M,) bool, lse (M,) fp32,
    num_used () int32); lse and num_used are what the backward needs.

    hidden (M, E) and weight (V, E) share one of fp32/bf16/fp16; bias (V,) any float dtype or None;
    targets (M,) int32/int64 with -100 for unused slots."""
    _check_kernel_inputs(hidden, weight, bias, targets)
    M, E = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    sampled = new_empty((M,), dtype=torch.int64, device=device)
    correct = new_empty((M,), dtype=torch.bool, device=device)
    lse = new_empty((M,), dtype=torch.float32, device=device)
    if M == 0:
        return (torch.zeros((), dtype=torch.float32, device=device), sampled, correct, lse,
                torch.zeros((), dtype=torch.int32, device=device))
    loss = new_empty((), dtype=torch.float32, device=device)
    num_used = new_empty((), dtype=torch.int32, device=device)

    # Vocabulary splits: enough (row blocks x splits) programs to fill the GPU, each split at least a
    # few hundred columns so the merge stays negligible.
    row_blocks_hint = triton.cdiv(M, 128)
    max_splits = 3 if interpreter_enabled() else triton.cdiv(V, _GROUP)
    num_splits = max(1, min(max_splits, triton.cdiv(target_programs(device, _PROGRAMS_PER_SM), row_blocks_hint)))
    parts_f = new_empty((5, num_splits, M), dtype=torch.float32, device=device)
    parts_i = new_empty((2, num_splits, M), dtype=torch.int32, device=device)
    part_max, part_sumexp, part_target, part_best, part_draw = parts_f.unbind(0)
    part_best_col, part_draw_col = parts_i.unbind(0)
    row_loss = new_empty((M,), dtype=torch.float32, device=device)

    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), num_splits)  # noqa: E731
    with device_guard(hidden):
        _mlm_head_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, targets,
            part_max, part_sumexp, part_target, part_best, part_best_col, part_draw, part_draw_col,
            M, V, E, _next_pow2(M), hidden.stride(0), weight.stride(0), int(seed),
            1.0 / max(float(temperature), _MIN_TEMPERATURE), _counters_per_row(V),
            HAS_BIAS=bias is not None, INPUT_PRECISION=_input_precision(hidden.dtype),
            RNG_OFFSET_64=_rng_offset_64(M, V),
        )
        block_s = _next_pow2(num_splits)
        block_r = min(128, max(1, 4096 // block_s))  # (splits x rows) tiles of <= 4096 values
        _mlm_head_fwd_reduce_kernel[(triton.cdiv(M, block_r),)](
            part_max, part_sumexp, part_target, part_best, part_best_col, part_draw, part_draw_col,
            targets, lse, row_loss, sampled, correct.view(torch.uint8), M, num_splits,
            BLOCK_S=block_s, BLOCK_R=block_r, num_warps=4,
        )
        _mlm_head_loss_kernel[(1,)](row_loss, targets, loss, num_used, M, BLOCK=1024, num_warps=4)
    return loss, sampled, correct, lse, num_used


# Which fp32-output cuBLAS entry point this torch has: addmm into the accumulator (in place), else mm
# with an fp32 output added to it, else a 16-bit product (each found missing once, then skipped).
_fp32_out = {"addmm": True, "mm": True}


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b in place, with a and b in the compute dtype: one read and one write of acc
    per call, no (M, E) temporary."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if not a.is_cuda:  # CPU (the interpreter tests): no 16-bit cuBLAS to save memory for; widen
        acc.addmm_(a.float(), b.float())
        return
    if _fp32_out["addmm"]:
        try:  # cuBLAS with 16-bit operands and the fp32 accumulator as C (aten::addmm.dtype_out)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, NotImplementedError, RuntimeError) as err:
            if isinstance(err, torch.OutOfMemoryError):
                raise
            _fp32_out["addmm"] = False
    if _fp32_out["mm"]:
        try:  # an (M, E) fp32 product, then added: twice the accumulator's traffic
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (TypeError, NotImplementedError, RuntimeError) as err:
            if isinstance(err, torch.OutOfMemoryError):
                raise
            _fp32_out["mm"] = False
    acc.add_(torch.mm(a, b))  # older torch: the 16-bit product, rounded once per chunk


def _dlogits_chunk_cols(M: int, V: int, element_size: int, chunk_bytes: int = _DLOGITS_CHUNK_BYTES) -> int:
    """Vocabulary columns per backward chunk: ~``chunk_bytes`` of dlogits, at least
    ``_DLOGITS_MIN_CHUNK_COLS`` (see there), a multiple of 256, at most V."""
    cols = max(chunk_bytes // max(M * element_size, 1), _DLOGITS_MIN_CHUNK_COLS) // 256 * 256
    return max(1, min(cols, V))


def backward_bytes(M: int, V: int, E: int, element_size: int = 2, in_place: bool = True,
                   min_chunk_cols: int = _DLOGITS_MIN_CHUNK_COLS) -> dict:
    """Memory traffic of one :func:`mlm_head_backward` (dH, dW and db), counted from the chunking:
    per chunk, dlogits written by the kernel and read by the two matmuls, H and the W chunk read by
    the kernel and the matmuls, the dW chunk written, and the fp32 dH accumulator read and written
    (plus, without ``in_place``, a fresh (M, E) fp32 product written and read again). For
    ``benchmarks/heads.py --bytes``; a model of the launches, not a measurement."""
    cols = max(_DLOGITS_CHUNK_BYTES // max(M * element_size, 1), min_chunk_cols) // 256 * 256
    cols = max(1, min(cols, V))
    chunks = -(-V // cols)
    dlogits = 3 * M * V * element_size                     # written once, read by dW and by dH
    operands = chunks * 2 * M * E * element_size + 3 * V * E * element_size  # H per chunk (kernel, dW); W
    accumulator = (chunks * 8 * M * E if chunks > 1 else 0) + (0 if in_place or chunks == 1 else chunks * 8 * M * E)
    final = M * E * (4 + element_size) if chunks > 1 else M * E * element_size  # fp32 -> dH copy
    return dict(M=M, chunk_cols=cols, chunks=chunks, dlogits=dlogits, operands=operands, accumulator=accumulator,
                final=final, total=dlogits + operands + accumulator + final)


def mlm_head_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                      targets: Tensor, lse: Tensor, num_used: Tensor, need_hidden: bool,
                      need_weight: bool, need_bias: bool, chunk_bytes: Optional[int] = None):
    """Gradients (dH in hidden's dtype, dW in weight's dtype, db fp32) of the mean loss, or None
    where not needed; see the module docstring for the math and the vocabulary chunking."""
    M, E = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    if M == 0 or not (need_hidden or need_weight or need_bias):
        return (torch.zeros_like(hidden) if need_hidden else None,
                torch.zeros_like(weight) if need_weight else None,
                torch.zeros(V, dtype=torch.float32, device=device) if need_bias else None)
    grad_hidden = new_empty(hidden.shape, dtype=hidden.dtype, device=device) if need_hidden else None
    grad_weight = new_empty(weight.shape, dtype=weight.dtype, device=device) if need_weight else None
    grad_bias = None

    chunk_cols = _dlogits_chunk_cols(M, V, hidden.element_size(),
                                     _DLOGITS_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    num_chunks = triton.cdiv(V, chunk_cols)
    dlogits = new_empty((M, chunk_cols), dtype=hidden.dtype, device=device)
    num_row_splits = max(1, min(triton.cdiv(M, 64),
                                triton.cdiv(target_programs(device, _PROGRAMS_PER_SM), triton.cdiv(chunk_cols, 128))))
    if interpreter_enabled():
        num_row_splits = min(num_row_splits, 2)
    part_dbias = new_empty((num_row_splits, V), dtype=torch.float32, device=device) if need_bias else None
    # dH sums over vocabulary chunks: accumulate in fp32 when there is more than one.
    dh_acc = None
    if need_hidden and num_chunks > 1:
        dh_acc = torch.zeros((M, E), dtype=torch.float32, device=device)

    with device_guard(hidden):
        for c0 in range(0, V, chunk_cols):
            width = min(chunk_cols, V - c0)
            dz = dlogits[:, :width]
            grid = lambda meta: (triton.cdiv(width, meta["BLOCK_V"]), num_row_splits)  # noqa: E731
            _mlm_head_dlogits_kernel[grid](
                hidden, weight, bias if bias is not None else hidden, targets, lse, grad_loss, num_used, dz,
                part_dbias if part_dbias is not None else lse,
                M, V, E, _next_pow2(M), c0, width, hidden.stride(0), weight.stride(0), dz.stride(0),
                HAS_BIAS=bias is not None, WRITE_DBIAS=need_bias,
                INPUT_PRECISION=_input_precision(hidden.dtype),
            )
            w_chunk = weight[c0:c0 + width]
            if need_weight:
                torch.mm(dz.t(), hidden, out=grad_weight[c0:c0 + width])
            if need_hidden:
                if dh_acc is not None:
                    _accumulate_mm(dh_acc, dz, w_chunk)
                else:
                    torch.mm(dz, w_chunk, out=grad_hidden)
    if dh_acc is not None:
        grad_hidden.copy_(dh_acc)
    if need_bias:
        grad_bias = part_dbias.sum(0)
    return grad_hidden, grad_weight, grad_bias


def gumbel_noise(shape, seed: int, device) -> Tensor:
    """The (M, V) Gumbel noise the Triton kernels draw for ``seed`` (fp32), materialised: for tests and
    debugging only; the kernels never store it. Needs the Triton path (CUDA or the interpreter)."""
    M, V = shape
    out = new_empty((M, V), dtype=torch.float32, device=device)
    if M == 0 or V == 0:
        return out
    BLOCK_M = 32
    with device_guard(out):
        _gumbel_noise_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(V, _GROUP))](
            out, M, V, int(seed), _counters_per_row(V), RNG_OFFSET_64=_rng_offset_64(M, V),
            BLOCK_M=BLOCK_M,
        )
    return out


def compile_variants():
    """The kernels above in the variants the launchers use (dtypes, embedding sizes, ELECTRA's vocabulary,
    bias on), every candidate the pruning keeps for a large M: for ``benchmarks/compile_report.py`` and
    ``tests/kernels/test_gpu_compile.py``."""
    from ._gpu_compile import Variant, runtime_args

    vocab = 30522
    aligned = frozenset({"stride_hm", "stride_wv"})

    def types(kernel, dtype):
        def arg_type(name):
            if name in ("H", "W", "DLOGITS"):
                return "*" + dtype
            if name == "BIAS":
                return "*fp32"
            if name == "TARGETS":
                return "*i64"
            if name in ("PART_BEST_COL", "PART_DRAW_COL", "NUM_USED", "SAMPLED"):
                return "*i64" if name == "SAMPLED" else "*i32"
            if name == "CORRECT":
                return "*u8"
            if name.startswith("PART_") or name in ("LSE", "GRAD_LOSS", "ROW_LOSS", "LOSS", "OUT"):
                return "*fp32"
            return "fp32" if name == "inv_temperature" else "i32"

        return {a: arg_type(a) for a in runtime_args(kernel)}

    variants = []
    dtype_names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    for dtype in (dtype_names[d] for d in GPU_DTYPES):  # fp32 never reaches the kernels on a GPU
        element_size = 4 if dtype == "fp32" else 2
        precision = "ieee" if dtype == "fp32" else "tf32"  # fp32 follows torch's allow_tf32 (off by default)
        for embedding in (128, 256, 768, 1024):
            tags = dict(dtype=dtype, embedding=embedding, vocab=vocab)
            for kernel, name, space, names, extra in (
                    (_mlm_head_fwd_kernel, "mlm head fwd", _FWD_SPACE, _FWD_NAMES, dict(RNG_OFFSET_64=False)),
                    (_mlm_head_dlogits_kernel, "mlm head dlogits", _DLOGITS_SPACE, _DLOGITS_NAMES,
                     dict(WRITE_DBIAS=True))):
                kept = [c for c in space if _keep_candidate(c, names, 1 << 16, embedding, element_size, 1 << 30)]
                for i, cand in enumerate(kept):
                    blocks = dict(zip(names, cand[:-2]))
                    constexprs = dict(HAS_BIAS=True, INPUT_PRECISION=precision,
                                      EVEN_E=embedding % blocks["BLOCK_E"] == 0, **extra, **blocks)
                    variants.append(Variant(name, kernel, types(kernel, dtype), constexprs, cand[-2], cand[-1],
                                            default=i == 0, matmul=True, tags=tags, aligned=aligned))
    # The small kernels do not depend on the dtype or the sizes (splits <= 16 for ELECTRA's M).
    variants.append(Variant("mlm head fwd merge", _mlm_head_fwd_reduce_kernel,
                            types(_mlm_head_fwd_reduce_kernel, "fp32"), dict(BLOCK_S=16, BLOCK_R=128), 4))
    variants.append(Variant("mlm head loss sum", _mlm_head_loss_kernel, types(_mlm_head_loss_kernel, "fp32"),
                            dict(BLOCK=1024), 4))
    variants.append(Variant("mlm head gumbel noise (tests)", _gumbel_noise_kernel,
                            types(_gumbel_noise_kernel, "fp32"), dict(RNG_OFFSET_64=False, BLOCK_M=32), 4))
    return variants


# --------------------------------------------------------------------------------------------------
# 3. torch.library custom ops (opaque to torch.compile, with fake shapes) and their autograd
# --------------------------------------------------------------------------------------------------
_EMPTY = (0,)


@torch.library.custom_op("electra_kernels::mlm_head_fwd", mutates_args=())
def _mlm_head_fwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                     temperature: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with torch.autocast(hidden.device.type, enabled=False):
        return mlm_head_forward(hidden, weight, bias, targets, temperature, seed)


@_mlm_head_fwd_op.register_fake
def _(hidden, weight, bias, targets, temperature, seed):
    M = hidden.shape[0]
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty((M,), dtype=torch.int64),
        hidden.new_empty((M,), dtype=torch.bool),
        hidden.new_empty((M,), dtype=torch.float32),
        hidden.new_empty((), dtype=torch.int32),
    )


@torch.library.custom_op("electra_kernels::mlm_head_bwd", mutates_args=())
def _mlm_head_bwd_op(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                     targets: Tensor, lse: Tensor, num_used: Tensor, need_hidden: bool,
                     need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    with torch.autocast(hidden.device.type, enabled=False):
        dh, dw, db = mlm_head_backward(grad_loss.contiguous(), hidden, weight, bias, targets, lse,
                                       num_used, need_hidden, need_weight, need_bias)
    # Custom ops may not return None: empty placeholders stand for "not needed".
    empty = hidden.new_empty(_EMPTY)
    return (
        dh if dh is not None else empty,
        dw if dw is not None else empty,
        db.to(bias.dtype) if db is not None else empty,
    )


@_mlm_head_bwd_op.register_fake
def _(grad_loss, hidden, weight, bias, targets, lse, num_used, need_hidden, need_weight, need_bias):
    return (
        hidden.new_empty(hidden.shape if need_hidden else _EMPTY),
        weight.new_empty(weight.shape if need_weight else _EMPTY),
        hidden.new_empty(bias.shape if need_bias else _EMPTY, dtype=bias.dtype if need_bias else None),
    )


def _mlm_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, _temperature, _seed = inputs
    _, sampled, correct, lse, num_used = output
    ctx.mark_non_differentiable(sampled, correct, lse, num_used)
    # The weight is saved through autograd only (never .data), so a ZeRO-3 partitioned parameter is
    # gathered again by DeepSpeed's hooks before this backward runs.
    ctx.save_for_backward(hidden, weight, bias, targets, lse, num_used)
    ctx.has_bias = bias is not None


def _mlm_backward(ctx, grad_loss, *_non_differentiable):
    hidden, weight, bias, targets, lse, num_used = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and ctx.has_bias
    if grad_loss is None or not (need_hidden or need_weight or need_bias):
        return None, None, None, None, None, None
    dh, dw, db = torch.ops.electra_kernels.mlm_head_bwd(
        grad_loss, hidden, weight, bias, targets, lse, num_used, need_hidden, need_weight, need_bias)
    return (dh if need_hidden else None, dw if need_weight else None, db if need_bias else None,
            None, None, None)


_mlm_head_fwd_op.register_autograd(_mlm_backward, setup_context=_mlm_setup_context)


# --------------------------------------------------------------------------------------------------
# 4. Public function and module
# --------------------------------------------------------------------------------------------------
def _compute_dtype(hidden: Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def mlm_head_loss(hidden, weight, bias, targets, *, temperature: float = 1.0, seed: int = 0):
    """Masked-LM loss, accuracy and sampled replacements at M gathered rows.

    hidden: (M, E) fp32/bf16/fp16, the head's dense+GELU+LayerNorm output at the masked positions
    (an fp32 compute dtype runs ``mlm_head_loss_ref`` on the GPU: see ``GPU_DTYPES``).
    weight: (V, E) the tied word-embedding matrix. bias: (V,) or None.
    targets: (M,) int64 original token ids; IGNORE_INDEX (-100) marks unused slots of a fixed-size gather.
    temperature: sampling temperature (> 0; tiny values approach the arg-max). seed: python int for the
    Gumbel noise (same seed, same inputs -> same samples).
    Returns loss: () fp32, mean cross-entropy over used slots (0 when none is used; NaN when any row,
    used or not, has a NaN logit: the sampled id of such a row is unspecified, since on the GPU the
    arg-max skips NaN, so the NaN loss is what tells the caller to drop the step);
    sampled: (M,) int64 draws from softmax(logits / temperature), no gradient;
    correct: (M,) bool, arg-max == target (False on unused slots).

    On CUDA (or under TRITON_INTERPRET=1) this runs the fused Triton kernels, which draw their noise
    from Philox in-kernel: for a given seed they sample different (identically distributed) ids than
    ``mlm_head_loss_ref``. Matmuls run in the autocast dtype under autocast, else in hidden's dtype
    (the weight is cast to it); gradients come back in each input's own dtype.
    """
    if not temperature > 0.0:
        raise ValueError(f"mlm_head_loss: temperature must be > 0, got {temperature}")
    _check_kernel_inputs(hidden, weight, bias, targets)
    dtype = _compute_dtype(hidden)
    # float64 (gradient checks) and, on the GPU, fp32 (GPU_DTYPES) take the reference.
    if dtype not in _KERNEL_DTYPES or not use_triton(hidden, weight, bias, targets, dtype=dtype,
                                                       gpu_dtypes=GPU_DTYPES):
        return mlm_head_loss_ref(hidden, weight, bias, targets, temperature=temperature, seed=seed)
    hidden = hidden.to(dtype)
    weight = weight.to(dtype)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    loss, sampled, correct, _lse, _num_used = torch.ops.electra_kernels.mlm_head_fwd(
        hidden, weight, bias, targets.contiguous(), float(temperature), int(seed))
    return loss, sampled, correct


class MLMHeadLoss(nn.Module):
    """``mlm_head_loss`` as a module holding the sampling temperature (the weight is the tied word
    embedding and the bias belongs to the generator head, so both are passed in)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0.0:
            raise ValueError(f"MLMHeadLoss: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                seed: int = 0):
        return mlm_head_loss(hidden, weight, bias, targets, temperature=self.temperature, seed=seed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# --------------------------------------------------------------------------------------------------
# 5. Reference
# --------------------------------------------------------------------------------------------------
def gumbel_noise_ref(shape, seed: int, device) -> torch.Tensor:
    """-log(-log(U)) with U uniform in (0, 1), from a generator seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    u = torch.rand(shape, generator=gen, device=device, dtype=torch.float32)
    u = u.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - torch.finfo(torch.float32).eps)
    return -torch.log(-torch.log(u))


def mlm_head_loss_ref(hidden, weight, bias, targets, *, temperature: float = 1.0, seed: int = 0):
    """Reference: materialises the (M, V) logits in fp32 (float64 when called with float64: the tests'
    ground truth). A NaN logit in any row, used or not, makes the loss NaN, as in the kernels."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    used = targets != IGNORE_INDEX
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = loss_sum / used.sum().clamp(min=1)
    loss = torch.where(torch.isnan(logits.detach()).any(), float("nan"), loss)  # no host sync
    with torch.no_grad():
        noise = gumbel_noise_ref(logits.shape, seed, logits.device)
        sampled = torch.argmax(logits.detach() / max(temperature, _MIN_TEMPERATURE) + noise, dim=-1)
        correct = (logits.detach().argmax(dim=-1) == targets) & used
    return loss, sampled, correct
