"""Triton attention ops: fused GPU versions of `inf_llm.kernels.reference`, same signatures and semantics.

Owns the kernels and their validate-allocate-launch wrappers. Knows nothing of memory blocks, transformers
or which backend is in use (that is `inf_llm.kernels.get_backend`). The reference module is the spec:
every op here returns what its namesake there returns, up to floating-point rounding.

Shapes: q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D) with Hq = G * Hkv (query head h reads KV head h // G; K/V are
never repeated). D is a power of two in [16, 256]. q/k/v dtype float16, bfloat16 or float32 (float32 is
for tests: its dots run in IEEE fp32). Inputs may be strided views; only the last dimension must be
contiguous. Outputs are freshly allocated and contiguous: out in q's dtype, lse float32 (natural log of the
scaled scores), lse -inf and out 0 for a query that sees no key.

GQA packing: for one (batch, KV head) the G query heads are folded into the row (M) axis as row = i * G + g
(query i, head g of the group), so one tile holds BLOCK_M / G consecutive queries of all G heads and every
K/V tile loaded is used by the whole group. A decode step (Lq = 1) is one tile of G rows per KV head, and is
then split along the keys (flash-decoding) so the GPU has enough programs; a small combine kernel merges
the splits by log-sum-exp.

No op syncs the device with the host: `visible` counts are read on the device (out-of-range counts are
clamped there, not checked on the host) and every launch decision uses shapes and Python ints only, so the
decode ops can be captured in a CUDA graph.

On CPU the ops run under the Triton interpreter (`TRITON_INTERPRET=1` set when this module is imported and
while its kernels launch), which is how CI tests them. The `INTERPRETER` constexpr works around the Triton
3.6 interpreter's defects (bf16 `tl.dot`, truncating bf16 casts, tensor-bounded `range`, and tl.max & co.
being compiled-only when triton was imported first), leaving the GPU code unchanged; docs/kernels.md lists
them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from inf_llm.config import MAX_DEVICE_CACHED_BLOCKS
from inf_llm.kernels.launcher import DirectLauncher
from inf_llm.kernels.reference import CODE_MAX, NEG_INF, masked_attention, prefix_mask, window_mask

__all__ = [
    "NEG_INF",
    "cache_blocks",
    "decode_attention",
    "decode_prologue",
    "form_blocks",
    "gather_blocks",
    "global_stage_into",
    "masked_attention",
    "merge_partials",
    "prefix_attention",
    "prefix_mask",
    "refine_and_cache",
    "refine_topk",
    "rotate",
    "window_key_scores",
    "window_mask",
    "windowed_attention",
]

_LOG2E = 1.4426950408889634  # scores are kept in base 2 inside the kernels: exp2 is the fast hardware op
_LN2 = tl.constexpr(0.6931471805599453)  # back to natural-log lse at the store
_NEVER_USED = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # cache_blocks: the LRU key of slots no miss may take
# Queries per windowed_attention call that ContextMemory should use: the kernel skips key tiles outside
# every query's window, so a whole prefill chunk is one launch, and its output is the call's (pieces of
# 2048 queries cost four launches and a copy of each piece's output per layer).
LOCAL_STAGE_ROWS = 1 << 16
_MODE_WINDOW = 0  # key j visible to query at pos iff pos - window < j <= pos
_MODE_PREFIX = 1  # key j visible to query i iff j < visible[i]
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM = 16  # tl.dot needs every tile dimension >= 16
_MAX_HEAD_DIM = 256  # a (BLOCK_M, D) fp32 accumulator beyond this no longer fits in registers
_MAX_POSITION = 2**29  # positions, windows and lengths are int32 in the kernels; sums of three stay < 2**31
_DECODE_MAX_BLOCK_M = 64  # row tiles of the split (decode) path: G * Lq rows rounded up to a power of two
_SPLIT_MIN_TILES = 4  # each key split must cover >= 4 key tiles to pay for its partial write and the combine
_MAX_SPLITS = 64  # bounds the (splits, B, Hq, Lq, D) float32 workspace
_COMBINE_BLOCK_R = 16  # rows per program of the elementwise merge/combine kernels
_INTERPRETER_SMS = 8  # pretend "SM count" on CPU, so small CPU tests take the same split decisions
_INTERPRETER_BLOCK = 16  # interpreter tiles: the smallest tl.dot allows, so tiny tests cross tile edges


def _tune_configs() -> list[triton.Config]:
    """H100 search space for the prefill-sized launches (not used by the interpreter): BLOCK_M/BLOCK_N
    64/128, 4/8 warps, 2/3 stages, limited to five combinations so that a first call compiles five
    variants, not sixteen (each takes seconds). 64x64/4 warps/3 stages won at Mistral-7B prefill shapes on
    an H100; 8 warps only pay on 128-row tiles."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in ((64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2))
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that cannot help: 128-row tiles for < 128 rows, tiles over 64x128 at D = 256 (shared
    memory)."""
    args = {**named_args, **kwargs}
    rows = args["tune_rows"]
    head_dim = args["HEAD_DIM"]
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(64, rows)
        and not (head_dim >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 128)
    ]
    return kept or configs[:1]


# ---------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _round_to(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """float32 x -> dtype, rounding to nearest even (first on the bits where the interpreter would truncate:
    the conversion of an already rounded value is exact)."""
    if INTERPRETER:
        x = _rounded(x, dtype, INTERPRETER)
    return x.to(dtype)


@triton.jit
def _rounded(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """float32 x rounded to `dtype` (nearest even) and kept in float32: a rounding the torch ops make between
    two 16-bit ops, for more float32 arithmetic. Not `x.to(dtype).to(tl.float32)`: on the GPU the compiler
    folds that pair away (an H200 run of the rotation differed from the torch ops' in 23% of its bf16 values,
    benchmark/figures/gpu-h200-kernel-tuning/rotate-rounding-bits.txt). bf16: integer arithmetic on the bits
    (finite x); fp16: the PTX conversions;
    fp8 e4m3 (|x| <= 448): the bits, and a float32 add-and-subtract for its subnormals."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        if INTERPRETER:
            x = x.to(tl.float16).to(tl.float32)
        else:
            x = tl.inline_asm_elementwise(
                "{ .reg .b16 t; cvt.rn.f16.f32 t, $1; cvt.f32.f16 $0, t; }", "=r,r", [x],
                dtype=tl.float32, is_pure=True, pack=1,
            )
    elif dtype == tl.float8e4nv:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) << 20  # 3 mantissa bits, nearest even
        subnormal = (x + 24576.0) - 24576.0  # below 2**-6: multiples of 2**-9 (1.5 * 2**14 fixes that step)
        x = tl.where(tl.abs(x) < 0.015625, subnormal, bits.to(tl.float32, bitcast=True))
    return x


@triton.jit
def _max(x, axis: tl.constexpr, INTERPRETER: tl.constexpr):
    """tl.max. In the interpreter tl.max/min/sum/cdiv are compiled-only objects when triton was imported
    before TRITON_INTERPRET was set (as under pytest, whose conftest imports transformers): there the
    reduction is spelled with the combine function that the interpreter maps to numpy."""
    if INTERPRETER:
        r = tl.reduce(x, axis, tl.standard._elementwise_max)
    else:
        r = tl.max(x, axis)
    return r


@triton.jit
def _min(x, axis: tl.constexpr, INTERPRETER: tl.constexpr):
    """tl.min (see _max)."""
    if INTERPRETER:
        r = tl.reduce(x, axis, tl.standard._elementwise_min)
    else:
        r = tl.min(x, axis)
    return r


@triton.jit
def _sum(x, axis: tl.constexpr, INTERPRETER: tl.constexpr):
    """tl.sum (see _max)."""
    if INTERPRETER:
        r = tl.reduce(x, axis, tl.standard._sum_combine)
    else:
        r = tl.sum(x, axis)
    return r


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc + a @ b with float32 accumulation (operands upcast in the interpreter, see the module docstring)."""
    if INTERPRETER:
        res = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        res = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return res


@triton.jit
def _attn_step(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len, start_n, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """Online-softmax update with the key tile at start_n.

    MASKED=False is the interior: every key of the tile is visible to every row, so no bounds or
    visibility masks are computed. MASKED=True applies each row's interval [lo_r, hi_r) (hi_r <= k_len).
    m_i is the running max in base-2 units, l_i the running sum, acc the unnormalised output.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = start_n + offs_n  # (BN,)
    # 64-bit scalar tile base + loop-invariant 32-bit offsets inside the tile (hoisted by the compiler).
    start64 = start_n.to(tl.int64)
    k_ptrs = k_base + start64 * stride_kn + (offs_n[:, None] * stride_kn + offs_d[None, :])  # (BN, D)
    v_ptrs = v_base + start64 * stride_vn + (offs_n[:, None] * stride_vn + offs_d[None, :])  # (BN, D)
    if MASKED:
        k = tl.load(k_ptrs, mask=cols[:, None] < k_len, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < k_len, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = _dot(q, tl.trans(k), tl.full([BLOCK_M, BLOCK_N], 0, tl.float32), DOT_PRECISION, INTERPRETER) * qk_scale
    if MASKED:
        visible = (cols[None, :] >= lo_r[:, None]) & (cols[None, :] < hi_r[:, None])  # (BM, BN)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, _max(s, 1, INTERPRETER))
        # A row with nothing visible so far keeps m = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, _max(s, 1, INTERPRETER))
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)  # (BM,)
    p = tl.math.exp2(s - m_use[:, None])  # (BM, BN)
    l_i = l_i * alpha + _sum(p, 1, INTERPRETER)
    acc = _dot(_round_to(p, v.dtype, INTERPRETER), v, acc * alpha[:, None], DOT_PRECISION, INTERPRETER)
    return acc, m_new, l_i


@triton.jit
def _attn_tiles(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len,
    start_a, end_a, start_b, end_b, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """`_attn_step` over the key tiles of [start_a, end_a) then [start_b, end_b) (starts multiples of
    BLOCK_N). The masked edges on both sides of the interior share one loop (one copy of the loop body
    less to compile); the unmasked interior passes an empty second range.

    The interpreter (Triton 3.6 with NumPy >= 2.4) cannot use a runtime tensor as a `range` bound, so it
    walks the same tiles with a while loop; on the GPU the for loop is what gets software-pipelined.
    """
    n_a = (tl.maximum(end_a - start_a, 0) + BLOCK_N - 1) // BLOCK_N
    n_b = (tl.maximum(end_b - start_b, 0) + BLOCK_N - 1) // BLOCK_N
    if INTERPRETER:
        t = n_a * 0
        while t < n_a + n_b:
            start_n = tl.where(t < n_a, start_a + t * BLOCK_N, start_b + (t - n_a) * BLOCK_N)
            acc, m_i, l_i = _attn_step(
                acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len, start_n, qk_scale,
                MASKED, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
            )
            t += 1
    elif MASKED:
        for t in range(0, n_a + n_b):
            start_n = tl.where(t < n_a, start_a + t * BLOCK_N, start_b + (t - n_a) * BLOCK_N)
            acc, m_i, l_i = _attn_step(
                acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len, start_n, qk_scale,
                MASKED, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
            )
    else:
        for start_n in range(start_a, end_a, BLOCK_N):
            acc, m_i, l_i = _attn_step(
                acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len, start_n, qk_scale,
                MASKED, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
            )
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["q_len", "k_len", "q_offset", "window"])  # lengths vary per call: no recompiles
def _attn_fwd_kernel(
    Out, Lse, Visible, Q, K, V,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_vis,
    n_kv_heads, q_len, k_len, q_offset, window, qk_scale, num_splits, out_rows, tune_rows,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr, OUT_TOKEN_MAJOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (row tile, batch x KV head, key split): flash attention over the tile's visible key range.

    Grid (cdiv(G * Lq, BLOCK_M), B * Hkv, splits). Out (S, B, Hq, Lq, D) and Lse (S, B, Hq, Lq) are
    contiguous: the final tensors (S = 1) or the float32 split workspace, out_rows = B * Hq * Lq per split;
    OUT_TOKEN_MAJOR (S = 1 only): Out is stored as (B, Lq, Hq, D) instead.
    Key tiles outside every row's interval are never visited: the loop runs over [min lo, max hi) of the
    tile's rows, unmasked on [max lo, min hi) and masked on the edges.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // n_kv_heads
    kvh = pid_bh % n_kv_heads

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) packed rows i * G + g
    row_ok = rows < q_len * GROUP
    qi = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    q_rows = b64 * stride_qb + head.to(tl.int64) * stride_qh + qi.to(tl.int64) * stride_qm  # (BM,)
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # (BM, D)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh

    # Each row's visible key interval [lo_r, hi_r), clamped to [0, k_len].
    if MODE == 0:
        pos = q_offset + qi
        lo_r = pos - window + 1
        hi_r = pos + 1
    else:
        count = tl.load(Visible + qi.to(tl.int64) * stride_vis, mask=row_ok, other=0)
        hi_r = tl.minimum(tl.maximum(count, 0), k_len).to(tl.int32)
        lo_r = tl.full([BLOCK_M], 0, tl.int32)
    lo_r = tl.minimum(tl.maximum(lo_r, 0), k_len)
    hi_r = tl.minimum(tl.maximum(hi_r, 0), k_len)

    # Tile-level bounds over valid rows: the loop range and its all-visible interior.
    lo_min = _min(tl.where(row_ok, lo_r, k_len), 0, INTERPRETER)
    lo_max = _max(tl.where(row_ok, lo_r, 0), 0, INTERPRETER)
    hi_min = _min(tl.where(row_ok, hi_r, k_len), 0, INTERPRETER)
    hi_max = _max(tl.where(row_ok, hi_r, 0), 0, INTERPRETER)
    kb0 = (lo_min // BLOCK_N) * BLOCK_N
    kb1 = tl.maximum(hi_max, kb0)
    il = (lo_max + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    ih = (hi_min // BLOCK_N) * BLOCK_N
    no_interior = ih <= il
    il = tl.where(no_interior, kb0, il)
    ih = tl.where(no_interior, kb0, ih)

    # This program's share of the key tiles (all of them when num_splits == 1).
    n_tiles = (kb1 - kb0 + BLOCK_N - 1) // BLOCK_N
    per_split = (n_tiles + num_splits - 1) // num_splits * BLOCK_N
    s_lo = kb0 + split * per_split
    s_hi = tl.minimum(kb1, s_lo + per_split)

    acc = tl.full([BLOCK_M, HEAD_DIM], 0, tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0, tl.float32)
    acc, m_i, l_i = _attn_tiles(  # interior: no masks
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len,
        tl.maximum(il, s_lo), tl.minimum(ih, s_hi), 0, 0, qk_scale,
        False, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )
    acc, m_i, l_i = _attn_tiles(  # the edges left and right of it: per-row masks
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len,
        tl.maximum(kb0, s_lo), tl.minimum(il, s_hi), tl.maximum(ih, s_lo), tl.minimum(kb1, s_hi), qk_scale,
        True, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )

    empty = l_i == 0.0  # no visible key (in this split): out 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    # Contiguous outputs: row (split, b, head, i) -> ((split * B + b) * Hq + head) * Lq + i.
    l_rows = split.to(tl.int64) * out_rows + (b64 * n_kv_heads * GROUP + head) * q_len + qi  # (BM,)
    if OUT_TOKEN_MAJOR:  # row (b, i, head): what transformers reshapes the attention output from
        o_rows = (b64 * q_len + qi) * (n_kv_heads * GROUP) + head
    else:
        o_rows = l_rows
    tl.store(
        Out + o_rows[:, None] * HEAD_DIM + offs_d[None, :],
        _round_to(out, Out.dtype.element_ty, INTERPRETER),
        mask=row_ok[:, None],
    )
    tl.store(Lse + l_rows, lse, mask=row_ok)


_attn_fwd_tuned = triton.autotune(
    configs=_tune_configs(),
    key=["tune_rows", "HEAD_DIM", "GROUP", "MODE"],
    prune_configs_by={"early_config_prune": _prune_configs},
    cache_results=True,  # keep the choice in Triton's on-disk cache: a restarted server does not re-tune
)(_attn_fwd_kernel)


@triton.jit
def _combine_splits_kernel(
    Ws, WsLse, Out, Lse, n_rows, stride_ws, stride_wl,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """Merge the key splits of the decode path by log-sum-exp. Ws (S, R, D) / WsLse (S, R) float32,
    Out (R, D) and Lse (R,) contiguous; R = B * Hq * Lq. NUM_SPLITS is a constexpr (at most _MAX_SPLITS
    variants) so the interpreter can loop over it."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    # Pointers advance by a stride per split: 64-bit pointer arithmetic, no int32 split * stride product.
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    lse_ptrs = WsLse + rows64
    for _ in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(lse_ptrs, mask=row_ok, other=float("-inf")))
        lse_ptrs += stride_wl
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.full([BLOCK_R, HEAD_DIM], 0, tl.float32)
    den = tl.full([BLOCK_R], 0, tl.float32)
    lse_ptrs = WsLse + rows64
    o_ptrs = Ws + rows64[:, None] * HEAD_DIM + offs_d[None, :]
    for _ in range(NUM_SPLITS):
        w = tl.exp(tl.load(lse_ptrs, mask=row_ok, other=float("-inf")) - m_use)
        acc += w[:, None] * tl.load(o_ptrs, mask=row_ok[:, None], other=0.0)
        den += w
        lse_ptrs += stride_wl
        o_ptrs += stride_ws
    empty = den == 0.0
    den_safe = tl.where(empty, 1.0, den)
    out = acc / den_safe[:, None]
    tl.store(
        Out + rows64[:, None] * HEAD_DIM + offs_d[None, :],
        _round_to(out, Out.dtype.element_ty, INTERPRETER),
        mask=row_ok[:, None],
    )
    tl.store(Lse + rows64, tl.where(empty, float("-inf"), m_use + tl.log(den_safe)), mask=row_ok)


@triton.jit
def _merge_kernel(
    OutA, LseA, OutB, LseB, Out, Lse, n_rows, n_heads, seq_len, head_dim,
    stride_ab, stride_ah, stride_am,
    stride_bb, stride_bh, stride_bm,
    stride_lab, stride_lah, stride_lam,
    stride_lbb, stride_lbh, stride_lbm,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """Fused `merge_partials` over rows (b, h, l) of strided inputs; Out (R, D) / Lse (R,) contiguous."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    b = rows64 // (n_heads * seq_len)
    h = (rows64 // seq_len) % n_heads
    pos = rows64 % seq_len
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    la = tl.load(LseA + b * stride_lab + h * stride_lah + pos * stride_lam, mask=row_ok, other=float("-inf"))
    lb = tl.load(LseB + b * stride_lbb + h * stride_lbh + pos * stride_lbm, mask=row_ok, other=float("-inf"))
    la = la.to(tl.float32)
    lb = lb.to(tl.float32)
    m = tl.maximum(la, lb)
    m_use = tl.where(m == float("-inf"), 0.0, m)  # both partials empty: weights exp(-inf) = 0, out 0
    wa = tl.exp(la - m_use)
    wb = tl.exp(lb - m_use)
    den = wa + wb
    empty = den == 0.0
    den_safe = tl.where(empty, 1.0, den)
    a_rows = b * stride_ab + h * stride_ah + pos * stride_am  # (BR,)
    b_rows = b * stride_bb + h * stride_bh + pos * stride_bm
    oa = tl.load(OutA + a_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)  # (BR, BD)
    ob = tl.load(OutB + b_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    out = (oa.to(tl.float32) * (wa / den_safe)[:, None]) + (ob.to(tl.float32) * (wb / den_safe)[:, None])
    tl.store(
        Out + rows64[:, None] * head_dim + offs_d[None, :],
        _round_to(out, Out.dtype.element_ty, INTERPRETER),
        mask=mask,
    )
    tl.store(Lse + rows64, tl.where(empty, float("-inf"), m_use + tl.log(den_safe)), mask=row_ok)


@triton.jit
def _key_scores_step(
    Q, Lse, k, cols, b64, kvh, r0, r_hi, q_offset, window, qk_scale, stride_qb, stride_qh, stride_qm,
    stride_lb, stride_lh, stride_lm, MASKED: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Mass that each packed query row of [r0, r0 + BLOCK_M) (< r_hi) gives to each key of the tile: (BN, BM).

    MASKED=False is the interior: every row is valid and sees every key of the tile, so no row bounds and
    no (BN, BM) visibility mask are computed."""
    offs_d = tl.arange(0, HEAD_DIM)
    rows = r0 + tl.arange(0, BLOCK_M)
    qi = rows // GROUP
    head = (kvh * GROUP + rows % GROUP).to(tl.int64)
    q_rows = b64 * stride_qb + head * stride_qh + qi.to(tl.int64) * stride_qm
    l_ptrs = Lse + b64 * stride_lb + head * stride_lh + qi.to(tl.int64) * stride_lm
    if MASKED:
        row_ok = rows < r_hi
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # (BM, D)
        lse = tl.load(l_ptrs, mask=row_ok, other=0.0).to(tl.float32)
    else:
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :])
        lse = tl.load(l_ptrs).to(tl.float32)
    # A query with a non-finite lse (saw nothing) contributes exp(-inf) = 0, as in the reference.
    finite = (lse > float("-inf")) & (lse < float("inf"))
    lse2 = tl.where(finite, lse * 1.4426950408889634, float("inf"))
    s = _dot(k, tl.trans(q), tl.full([BLOCK_N, BLOCK_M], 0, tl.float32), DOT_PRECISION, INTERPRETER) * qk_scale
    if MASKED:
        pos = q_offset + qi
        visible = (cols[:, None] <= pos[None, :]) & (cols[:, None] > pos[None, :] - window) & row_ok[None, :]
        p = tl.where(visible, tl.math.exp2(s - lse2[None, :]), 0.0)  # (BN, BM)
    else:
        p = tl.math.exp2(s - lse2[None, :])
    return p


@triton.jit
def _key_scores_tiles(
    acc, Q, Lse, k, cols, b64, kvh, start_a, end_a, start_b, end_b, r_hi, q_offset, window, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_lb, stride_lh, stride_lm,
    MASKED: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """`_key_scores_step` over the row tiles of [start_a, end_a) then [start_b, end_b) (multiples of BLOCK_M),
    one loop for both masked edges as in `_attn_tiles`, added elementwise into acc (BN, BM): the sum over
    the rows waits for the end of the kernel (a per-tile row sum crosses warps; deferred it cost 67 us per
    Mistral-7B execution block on an H200 instead of 89 us)."""
    n_a = (tl.maximum(end_a - start_a, 0) + BLOCK_M - 1) // BLOCK_M
    n_b = (tl.maximum(end_b - start_b, 0) + BLOCK_M - 1) // BLOCK_M
    if INTERPRETER:  # see _attn_tiles: no tensor-bounded range in the interpreter
        t = n_a * 0
        while t < n_a + n_b:
            r0 = tl.where(t < n_a, start_a + t * BLOCK_M, start_b + (t - n_a) * BLOCK_M)
            acc += _key_scores_step(
                Q, Lse, k, cols, b64, kvh, r0, r_hi, q_offset, window, qk_scale, stride_qb, stride_qh, stride_qm,
                stride_lb, stride_lh, stride_lm, MASKED, GROUP, HEAD_DIM, DOT_PRECISION, INTERPRETER, BLOCK_M,
                BLOCK_N,
            )
            t += 1
    elif MASKED:
        for t in range(0, n_a + n_b):
            r0 = tl.where(t < n_a, start_a + t * BLOCK_M, start_b + (t - n_a) * BLOCK_M)
            acc += _key_scores_step(
                Q, Lse, k, cols, b64, kvh, r0, r_hi, q_offset, window, qk_scale, stride_qb, stride_qh, stride_qm,
                stride_lb, stride_lh, stride_lm, MASKED, GROUP, HEAD_DIM, DOT_PRECISION, INTERPRETER, BLOCK_M,
                BLOCK_N,
            )
    else:
        for r0 in range(start_a, end_a, BLOCK_M):
            acc += _key_scores_step(
                Q, Lse, k, cols, b64, kvh, r0, r_hi, q_offset, window, qk_scale, stride_qb, stride_qh, stride_qm,
                stride_lb, stride_lh, stride_lm, MASKED, GROUP, HEAD_DIM, DOT_PRECISION, INTERPRETER, BLOCK_M,
                BLOCK_N,
            )
    return acc


@triton.jit(do_not_specialize=["q_len", "k_len", "q_offset", "window"])  # lengths vary per call: no recompiles
def _window_key_scores_kernel(
    Q, K, Lse, Out,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh, stride_lm,
    stride_ob, stride_oh,
    n_kv_heads, q_len, k_len, q_offset, window, qk_scale, tune_rows,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per-key mass sum_{rows} exp(q.k * scale - lse_row) for one key tile of one (batch, KV head).

    Grid (cdiv(Lk, BLOCK_N), B * Hkv): each program owns its keys, loads them once and loops over only the
    packed query rows whose window can reach the tile, so the sum needs no atomics. Row tiles whose queries
    all see every key of the tile (most of them: the band's edges are one key tile wide) skip the masks.
    Out (B, Hkv, Lk) fp32.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    kvh = pid_bh % n_kv_heads
    b64 = b.to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < k_len
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=col_ok[:, None], other=0.0)

    # Queries that can see a key of [n0, n_last]: n0 <= pos and pos - window < n_last.
    n_last = tl.minimum(n0 + BLOCK_N, k_len) - 1
    i_lo = tl.maximum(n0 - q_offset, 0)
    i_hi = tl.minimum(n_last + window - q_offset, q_len)
    r_lo = ((i_lo * GROUP) // BLOCK_M) * BLOCK_M
    r_hi = i_hi * GROUP
    # Interior row tiles: every query at or after the tile's last key (pos >= n_last) and with the tile's
    # first key still in its window (pos <= n0 + window - 1). Keys past k_len are never stored.
    int_lo = (tl.maximum(n_last - q_offset, 0) * GROUP + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    int_hi = (tl.minimum(n0 + window - q_offset, q_len) * GROUP) // BLOCK_M * BLOCK_M
    int_lo = tl.maximum(int_lo, r_lo)
    no_interior = int_hi <= int_lo
    int_lo = tl.where(no_interior, r_lo, int_lo)
    int_hi = tl.where(no_interior, r_lo, int_hi)
    acc = tl.full([BLOCK_N, BLOCK_M], 0, tl.float32)  # (key, row) masses, summed over rows at the end
    acc = _key_scores_tiles(  # interior: no masks
        acc, Q, Lse, k, cols, b64, kvh, int_lo, int_hi, 0, 0, r_hi, q_offset, window, qk_scale,
        stride_qb, stride_qh, stride_qm, stride_lb, stride_lh, stride_lm,
        False, GROUP, HEAD_DIM, DOT_PRECISION, INTERPRETER, BLOCK_M, BLOCK_N,
    )
    acc = _key_scores_tiles(  # the edges before and after it
        acc, Q, Lse, k, cols, b64, kvh, r_lo, int_lo, int_hi, r_hi, r_hi, q_offset, window, qk_scale,
        stride_qb, stride_qh, stride_qm, stride_lb, stride_lh, stride_lm,
        True, GROUP, HEAD_DIM, DOT_PRECISION, INTERPRETER, BLOCK_M, BLOCK_N,
    )
    acc = _sum(acc, 1, INTERPRETER)  # (BN,)
    out_ptrs = Out + b64 * stride_ob + kvh.to(tl.int64) * stride_oh + cols
    if ACCUMULATE:  # added to running scores (each program owns its keys: no atomics)
        acc += tl.load(out_ptrs, mask=col_ok, other=0.0)
    tl.store(out_ptrs, acc, mask=col_ok)


# The autotuner's winner per key of _window_key_scores_tuned (its launch kwargs), for launching the kernel
# directly once tuned: this op runs once per execution block and layer, where host time is the limit.
_WINDOW_SCORES_CONFIGS: dict[tuple, dict] = {}


def _key_scores_configs() -> list[triton.Config]:
    """Search space of window_key_scores (BLOCK_N keys x BLOCK_M packed rows per step). Measured at the
    Mistral-7B execution block on an H200 (benchmark/figures/gpu-h200-kernel-tuning/explore-kernels.json):
    128 x 64 with 4 warps and 3 stages took 67 us; the attention configs' best, 128 x 64 with 8 warps, 107."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in ((128, 64, 4, 3), (128, 64, 4, 2), (64, 128, 4, 3), (64, 64, 4, 3))
    ]


_window_key_scores_tuned = triton.autotune(
    configs=_key_scores_configs(),
    key=["tune_rows", "HEAD_DIM", "GROUP"],
    prune_configs_by={"early_config_prune": _prune_configs},
    restore_value=["Out"],  # tuning runs the kernel several times: accumulated scores must not add up
    cache_results=True,
)(_window_key_scores_kernel)


@triton.jit
def _block_tile_step(
    acc, m_i, l_i, q, t, StoreK, StoreV, ids_ptr, stride_ik, zero_r, kvh64, stride_bn, stride_bh, stride_bt,
    stride_bvn, stride_bvh, stride_bvt, block_size, tiles_per_block, qk_scale,
    MASK_BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """`_attn_step` over key tile t of the selected store blocks (block ids[t // tiles_per_block])."""
    j = t // tiles_per_block
    block = tl.load(ids_ptr + j * stride_ik).to(tl.int64)
    return _attn_step(
        acc, m_i, l_i, q, StoreK + block * stride_bn + kvh64 * stride_bh,
        StoreV + block * stride_bvn + kvh64 * stride_bvh, stride_bt, stride_bvt, zero_r,
        zero_r + block_size, block_size, (t - j * tiles_per_block) * BLOCK_N, qk_scale,
        MASK_BLOCKS, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )


@triton.jit
def _attend_block_tiles(
    acc, m_i, l_i, q, StoreK, StoreV, ids_ptr, stride_ik, zero_r, kvh, stride_bn, stride_bh, stride_bt,
    stride_bvn, stride_bvh, stride_bvt, block_size, n_sel, qk_scale,
    MASK_BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """Online-softmax update with every key tile of the n_sel selected store blocks, numbered across
    blocks (tile t: block ids[t // tiles_per_block]), all visible (masks only when block_size is not a whole
    number of key tiles). One flat loop, not a loop per block: the compiler pipelines the next tile's loads
    across block boundaries (a two-tile loop per block left every block's first load exposed)."""
    tiles_per_block = (block_size + BLOCK_N - 1) // BLOCK_N
    kvh64 = kvh.to(tl.int64)
    if INTERPRETER:  # see _attn_tiles: no tensor-bounded range in the interpreter
        t = n_sel * 0
        while t < n_sel * tiles_per_block:
            acc, m_i, l_i = _block_tile_step(
                acc, m_i, l_i, q, t, StoreK, StoreV, ids_ptr, stride_ik, zero_r, kvh64, stride_bn, stride_bh,
                stride_bt, stride_bvn, stride_bvh, stride_bvt, block_size, tiles_per_block, qk_scale,
                MASK_BLOCKS, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
            )
            t += 1
    else:
        for t in range(0, n_sel * tiles_per_block):
            acc, m_i, l_i = _block_tile_step(
                acc, m_i, l_i, q, t, StoreK, StoreV, ids_ptr, stride_ik, zero_r, kvh64, stride_bn, stride_bh,
                stride_bt, stride_bvn, stride_bvh, stride_bvt, block_size, tiles_per_block, qk_scale,
                MASK_BLOCKS, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
            )
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["q_len", "n_sink", "n_sel", "n_rem", "rem_offset"])
def _global_stage_kernel(
    Q, Out, Lse, SinkK, SinkV, StoreK, StoreV, Ids, RemK, RemV,
    stride_qh, stride_qm, stride_oh, stride_om, stride_lh, stride_lm,
    stride_sh, stride_sn, stride_svh, stride_svn,
    stride_bn, stride_bh, stride_bt, stride_bvn, stride_bvh, stride_bvt,
    stride_ih, stride_ik,
    stride_rh, stride_rn, stride_rvh, stride_rvn,
    q_len, n_sink, n_sel, block_size, n_rem, rem_offset, qk_scale,
    PER_HEAD: tl.constexpr, MASK_BLOCKS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """`global_stage_into` for one (row tile, KV head): sinks, then the selected store blocks read in place
    through their ids, then each row's visible remainder prefix, in one online softmax; then the merge with
    the local partial already in Out/Lse (each program owns its rows: no races).

    Grid (cdiv(G * Lq, BLOCK_M), Hkv); rows packed i * G + g as in `_attn_fwd_kernel`.
    """
    pid_m = tl.program_id(0)
    kvh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len * GROUP
    qi = rows // GROUP
    head = (kvh * GROUP + rows % GROUP).to(tl.int64)
    qi64 = qi.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + (head * stride_qh + qi64 * stride_qm)[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0, tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0, tl.float32)
    zero_r = tl.full([BLOCK_M], 0, tl.int32)
    kvh64 = kvh.to(tl.int64)

    acc, m_i, l_i = _attn_tiles(  # sinks: every row sees all of them
        acc, m_i, l_i, q, SinkK + kvh64 * stride_sh, SinkV + kvh64 * stride_svh, stride_sn, stride_svn,
        zero_r, zero_r + n_sink, n_sink, 0, n_sink, 0, 0, qk_scale,
        True, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )
    acc, m_i, l_i = _attend_block_tiles(
        acc, m_i, l_i, q, StoreK, StoreV, Ids + kvh64 * stride_ih if PER_HEAD else Ids, stride_ik, zero_r, kvh,
        stride_bn, stride_bh, stride_bt, stride_bvn, stride_bvh, stride_bvt, block_size, n_sel, qk_scale,
        MASK_BLOCKS, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )
    hi_r = tl.minimum(tl.maximum(qi + rem_offset, 0), n_rem)  # remainder: a prefix per row
    hi_max = _max(tl.where(row_ok, hi_r, 0), 0, INTERPRETER)
    acc, m_i, l_i = _attn_tiles(
        acc, m_i, l_i, q, RemK + kvh64 * stride_rh, RemV + kvh64 * stride_rvh, stride_rn, stride_rvn,
        zero_r, hi_r, n_rem, 0, hi_max, 0, 0, qk_scale,
        True, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )

    # merge with the local partial by log-sum-exp (natural log), in float32
    empty_g = l_i == 0.0
    l_safe = tl.where(empty_g, 1.0, l_i)
    lse_g = tl.where(empty_g, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    o_ptrs = Out + (head * stride_oh + qi64 * stride_om)[:, None] + offs_d[None, :]
    l_ptrs = Lse + head * stride_lh + qi64 * stride_lm
    out_l = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    lse_l = tl.load(l_ptrs, mask=row_ok, other=float("-inf"))
    m = tl.maximum(lse_l, lse_g)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w_l = tl.exp(lse_l - m_use)
    w_g = tl.exp(lse_g - m_use)
    den = w_l + w_g
    empty = den == 0.0
    den_safe = tl.where(empty, 1.0, den)
    merged = out_l * (w_l / den_safe)[:, None] + (acc / l_safe[:, None]) * (w_g / den_safe)[:, None]
    tl.store(o_ptrs, _round_to(merged, Out.dtype.element_ty, INTERPRETER), mask=row_ok[:, None])
    tl.store(l_ptrs, tl.where(empty, float("-inf"), m_use + tl.log(den_safe)), mask=row_ok)


@triton.jit
def _decode_attn_kernel(
    QLoc, QGlb, KLoc, VLoc, KGlb, VGlb, Bias, PartO, PartM, PartL, WinS, LocStart,
    StoreK, StoreV, BlockIds, RemK, RemV, RemStart, RemLive,
    stride_qlh, stride_qgh, stride_klh, stride_kln, stride_vlh, stride_vln,
    stride_kgh, stride_kgn, stride_vgh, stride_vgn,
    stride_bn, stride_bh, stride_bt, stride_bvn, stride_bvh, stride_bvt,
    stride_rkh, stride_rkn, stride_rvh, stride_rvn,
    n_loc, n_glb, tiles_sink, tiles_blocks, tiles_per_block, block_size, tiles_glb, n_tiles, tiles_per_split,
    n_splits, scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_START: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """One split of one KV head's keys for a decoding query: [global keys, seen by the query at the global
    angle | window keys, seen at the local angle], float32 scores in natural units (scaled, plus the bias),
    online softmax over the split's tiles. Writes the split's unnormalised output, max and sum, and the
    window keys' scores (the combine turns them into the probability each key receives). HAS_START: the
    window is rows LocStart[0] .. + n_loc of KLoc/VLoc (an offset on the device: a replayed CUDA graph
    reads the window where it lies, without a copy). The global keys are [KGlb's n_glb rows | the blocks
    BlockIds names, read from StoreK/StoreV where they lie (tiles_per_block tiles each) | the remainder:
    rows RemStart[0].. of RemK/RemV, the first RemLive[0] visible]; tiles_sink/tiles_blocks count the first
    two parts' tiles (0: a part not given). Grid (splits, Hkv)."""
    split = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_rows = h * GROUP + rows.to(tl.int64)
    q_loc = tl.load(QLoc + q_rows[:, None] * stride_qlh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_glb = tl.load(QGlb + q_rows[:, None] * stride_qgh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_loc = q_loc.to(tl.float32)
    q_glb = q_glb.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0, tl.float32)
    acc = tl.full([BLOCK_G, HEAD_DIM], 0, tl.float32)
    loc0 = 0
    if HAS_START:  # a constexpr branch: only one of the two is compiled
        loc0 = tl.load(LocStart).to(tl.int64)
    t = split * tiles_per_split
    t_end = tl.minimum(t + tiles_per_split, n_tiles)
    while t < t_end:  # a while loop: the interpreter cannot take a runtime bound in `range`
        if t < tiles_glb:
            u = t - tiles_sink
            if u < 0:  # the given global keys
                cols = t * BLOCK_N + offs_n
                ok = cols < n_glb
                k_ptrs = KGlb + h * stride_kgh + cols[:, None].to(tl.int64) * stride_kgn + offs_d[None, :]
                v_ptrs = VGlb + h * stride_vgh + cols[:, None].to(tl.int64) * stride_vgn + offs_d[None, :]
            elif u < tiles_blocks:  # a selected block, read by its id where it lies
                j = u // tiles_per_block
                cols = (u - j * tiles_per_block) * BLOCK_N + offs_n
                ok = cols < block_size
                blk = tl.load(BlockIds + j).to(tl.int64)
                k_ptrs = (StoreK + blk * stride_bn + h * stride_bh + cols[:, None].to(tl.int64) * stride_bt
                          + offs_d[None, :])
                v_ptrs = (StoreV + blk * stride_bvn + h * stride_bvh + cols[:, None].to(tl.int64) * stride_bvt
                          + offs_d[None, :])
            else:  # the remainder, at its device offset, the live rows only
                cols = (u - tiles_blocks) * BLOCK_N + offs_n
                ok = cols < tl.load(RemLive)
                rem_rows = tl.load(RemStart).to(tl.int64) + cols[:, None].to(tl.int64)
                k_ptrs = RemK + h * stride_rkh + rem_rows * stride_rkn + offs_d[None, :]
                v_ptrs = RemV + h * stride_rvh + rem_rows * stride_rvn + offs_d[None, :]
            q = q_glb
        else:
            cols = (t - tiles_glb) * BLOCK_N + offs_n
            ok = cols < n_loc
            rows_kv = loc0 + cols[:, None].to(tl.int64)
            k_ptrs = KLoc + h * stride_klh + rows_kv * stride_kln + offs_d[None, :]
            v_ptrs = VLoc + h * stride_vlh + rows_kv * stride_vln + offs_d[None, :]
            q = q_loc
        k = tl.load(k_ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
        s = _dot(q, tl.trans(k), tl.full([BLOCK_G, BLOCK_N], 0, tl.float32), "ieee", INTERPRETER) * scale
        if t < tiles_glb:
            if HAS_BIAS:  # over the given global keys only
                s += tl.load(Bias + cols, mask=ok & (t < tiles_sink), other=0.0)[None, :]
        else:  # the window keys' scores, for the probabilities they receive
            w_ptrs = WinS + (h * GROUP + rows[:, None].to(tl.int64)) * n_loc + cols[None, :]
            tl.store(w_ptrs, s, mask=row_ok[:, None] & ok[None, :])
        s = tl.where(row_ok[:, None] & ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, _max(s, 1, INTERPRETER))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        v = tl.load(v_ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
        l_i = l_i * alpha + _sum(p, 1, INTERPRETER)
        acc = _dot(p, v, acc * alpha[:, None], "ieee", INTERPRETER)
        m_i = m_new
        t += 1
    part = (split.to(tl.int64) * tl.num_programs(1) + h) * GROUP + rows.to(tl.int64)  # (split, h, g) rows
    tl.store(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(PartM + part, m_i, mask=row_ok)
    tl.store(PartL + part, l_i, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    PartO, PartM, PartL, WinS, Out, Lse, Received, LocStart, stride_rh, n_loc, n_splits, n_kv,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_START: tl.constexpr, ACCUMULATE: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """The splits of one KV head merged by log-sum-exp into its G query heads' output and lse, then the
    probability each window key receives, summed over the group, stored (ACCUMULATE: added) at the window's
    rows of Received (from LocStart[0] with HAS_START). Grid (Hkv,)."""
    h = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    split = n_splits * 0
    while split < n_splits:
        part = (split.to(tl.int64) * n_kv + h) * GROUP + rows
        m = tl.maximum(m, tl.load(PartM + part, mask=row_ok, other=float("-inf")))
        split += 1
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.full([BLOCK_G, HEAD_DIM], 0, tl.float32)
    den = tl.full([BLOCK_G], 0, tl.float32)
    split = n_splits * 0
    while split < n_splits:
        part = (split.to(tl.int64) * n_kv + h) * GROUP + rows
        w = tl.exp(tl.load(PartM + part, mask=row_ok, other=float("-inf")) - m_use)
        den += w * tl.load(PartL + part, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None],
                                    other=0.0)
        split += 1
    den_safe = tl.where(den == 0.0, 1.0, den)
    lse = tl.where(den == 0.0, float("-inf"), m_use + tl.log(den_safe))
    q_rows = h * GROUP + rows
    tl.store(Out + q_rows[:, None] * HEAD_DIM + offs_d[None, :],
             _round_to(acc / den_safe[:, None], Out.dtype.element_ty, INTERPRETER), mask=row_ok[:, None])
    tl.store(Lse + q_rows, lse, mask=row_ok)
    offs_n = tl.arange(0, BLOCK_N)
    r_base = Received + h * stride_rh
    if HAS_START:
        r_base += tl.load(LocStart).to(tl.int64)
    c0 = n_loc * 0
    while c0 < n_loc:
        cols = c0 + offs_n
        ok = cols < n_loc
        s = tl.load(WinS + q_rows[:, None] * n_loc + cols[None, :], mask=row_ok[:, None] & ok[None, :],
                    other=float("-inf"))
        received = _sum(tl.exp(s - tl.where(row_ok, lse, 0.0)[:, None]), 0, INTERPRETER)
        if ACCUMULATE:  # each program owns its head's row: no other program adds to these
            received += tl.load(r_base + cols, mask=ok, other=0.0)
        tl.store(r_base + cols, received, mask=ok)
        c0 += BLOCK_N


@triton.jit
def _gather_blocks_kernel(
    SrcK, SrcV, Ids, DstK, DstV, DstRows, RingK, RingV, ScaleK, ScaleV,
    stride_sn, stride_sh, stride_st, stride_svn, stride_svh, stride_svt,
    stride_ih, stride_ik,
    stride_dn, stride_dh, stride_dt, stride_dvn, stride_dvh, stride_dvt,
    stride_ksn, stride_ksh, stride_vsn, stride_vsh, stride_vst,
    ring_lo, ring_hi, ring_size,
    PER_HEAD: tl.constexpr, INDIRECT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, RING: tl.constexpr, CODEC: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """Dst[j, h] = Src[ids[h or 0, j], h] for K and V. Grid (K, Hkv). Src may be pinned host memory, read
    by the GPU over the bus (the ids never leave the device); Dst is on the device. INDIRECT: into Dst row
    DstRows[j] instead of j, and nothing for a negative row (a cache hit: the block is there already).
    RING: blocks ring_lo <= id < ring_hi are read from Ring[id % ring_size] (on the device, Src's strides).
    CODEC (not with RING): Src holds codes (fp8/int8) decoded as codes * scale, rounded to Dst's dtype (as
    `BlockCodec.decode_into`): keys scaled per channel (ScaleK (N, Hkv, 1, D)), values per token (ScaleV
    (N, Hkv, bs, 1))."""
    j = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    ids_ptr = Ids + (h * stride_ih if PER_HEAD else 0) + j * stride_ik
    block = tl.load(ids_ptr).to(tl.int64)
    row = j.to(tl.int64)
    if INDIRECT:
        row = tl.load(DstRows + j).to(tl.int64)
    if RING:
        if (block >= ring_lo) & (block < ring_hi):
            SrcK = RingK
            SrcV = RingV
            block = block % ring_size
    if row >= 0:
        offs_d = tl.arange(0, HEAD_DIM)
        if CODEC:
            k_scale = tl.load(ScaleK + block * stride_ksn + h * stride_ksh + offs_d)  # (D,)
        for t0 in range(0, BLOCK_SIZE, BLOCK_T):  # a constexpr bound: fixed per model, unrolled
            t = t0 + tl.arange(0, BLOCK_T)
            ok = (t < BLOCK_SIZE)[:, None]
            src = block * stride_sn + h * stride_sh + t[:, None].to(tl.int64) * stride_st + offs_d[None, :]
            dst = row * stride_dn + h * stride_dh + t[:, None].to(tl.int64) * stride_dt + offs_d[None, :]
            k = tl.load(SrcK + src, mask=ok)
            if CODEC:
                k = _round_to(k.to(tl.float32) * k_scale[None, :], DstK.dtype.element_ty, INTERPRETER)
            tl.store(DstK + dst, k, mask=ok)
            src_v = block * stride_svn + h * stride_svh + t[:, None].to(tl.int64) * stride_svt + offs_d[None, :]
            dst_v = row * stride_dvn + h * stride_dvh + t[:, None].to(tl.int64) * stride_dvt + offs_d[None, :]
            v = tl.load(SrcV + src_v, mask=ok)
            if CODEC:
                v_scale = tl.load(ScaleV + block * stride_vsn + h * stride_vsh + t.to(tl.int64) * stride_vst,
                                  mask=t < BLOCK_SIZE, other=0.0)  # (BT,)
                v = _round_to(v.to(tl.float32) * v_scale[:, None], DstV.dtype.element_ty, INTERPRETER)
            tl.store(DstV + dst_v, v, mask=ok)


@triton.jit
def _cache_assign_kernel(
    Ids, Tags, Stamps, Counters, Slots, Fill, stride_ik, n_slots,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """The LRU bookkeeping of `cache_blocks` for one selection. Grid (1,)."""
    _lru_assign(Ids, Tags, Stamps, Counters, Slots, Fill, stride_ik, n_slots, K, BLOCK_K, BLOCK_C, PREFETCH,
                INTERPRETER)


@triton.jit
def _lru_assign(
    Ids, Tags, Stamps, Counters, Slots, Fill, stride_ik, n_slots,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """The LRU bookkeeping of one selection, in one program (it reads and rewrites every slot's tag).
    Slots[k]: where block Ids[k] will be; Fill[k]: that slot for a miss (to be copied), -1 for a hit.
    PREFETCH: Ids may repeat and outnumber the slots; repeats and the misses beyond the slots no hit holds
    get -1 in both."""
    kk = tl.arange(0, BLOCK_K)
    cc = tl.arange(0, BLOCK_C)
    k_ok = kk < K
    c_ok = cc < n_slots
    ids = tl.load(Ids + kk * stride_ik, mask=k_ok, other=-2).to(tl.int64)  # -2 matches no tag (empty: -1)
    tags = tl.load(Tags + cc, mask=c_ok, other=-3)
    stamps = tl.load(Stamps + cc, mask=c_ok, other=0)
    clock = tl.load(Counters)
    match = ids[:, None] == tags[None, :]  # (BLOCK_K, BLOCK_C)
    hit_slot = _max(tl.where(match, cc[None, :], -1), 1, INTERPRETER)
    wanted = k_ok
    if PREFETCH:  # a repeat of an earlier id is left out
        ahead = (kk[None, :] < kk[:, None]) & (ids[None, :] == ids[:, None])
        wanted = k_ok & (_max(ahead.to(tl.int32), 1, INTERPRETER) == 0)
    miss = wanted & (hit_slot < 0)
    held = _max(match.to(tl.int32), 0, INTERPRETER) > 0  # slots a hit of this call keeps
    # least recently used first: empty slots (stamp -1), then older stamps, then lower slot numbers
    lru_key = tl.where(held | ~c_ok, _NEVER_USED, stamps * n_slots + cc)
    before = _sum(tl.where((kk[None, :] < kk[:, None]) & miss[None, :], 1, 0), 1, INTERPRETER)  # misses ahead
    if PREFETCH:  # as many as there are slots to take
        miss = miss & (before < n_slots - _sum(held.to(tl.int32), 0, INTERPRETER))
    slot = tl.where(wanted, hit_slot, -1)
    n_miss = _sum(miss.to(tl.int64), 0, INTERPRETER)
    j = n_miss * 0
    while j < n_miss:  # the j-th miss takes the j-th least recently used slot (a lookup has few misses)
        least = _min(lru_key, 0, INTERPRETER)
        victim = _min(tl.where(lru_key == least, cc, BLOCK_C), 0, INTERPRETER)
        slot = tl.where(miss & (before == j), victim, slot)
        lru_key = tl.where(cc == victim, _NEVER_USED, lru_key)
        j += 1
    slot = slot.to(tl.int64)
    placed = k_ok & (slot >= 0)
    tl.store(Slots + kk, slot, mask=k_ok)
    tl.store(Fill + kk, tl.where(miss, slot, -1), mask=k_ok)
    tl.store(Tags + slot, ids, mask=placed)
    tl.store(Stamps + slot, slot * 0 + clock, mask=placed)
    tl.store(Counters, clock + 1)
    if PREFETCH:
        tl.store(Counters + 3, tl.load(Counters + 3) + n_miss)
    else:
        tl.store(Counters + 1, tl.load(Counters + 1) + K)
        tl.store(Counters + 2, tl.load(Counters + 2) + n_miss)


@triton.jit
def _encoded(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """float32 x, already divided by its scale -> an `offload_dtype` code, as `reference.encode_codes`: int8
    rounds half to even and clamps to +-127; fp8 e4m3 rounds to nearest even (|x| <= 448 up to rounding)."""
    if dtype == tl.int8:
        x = (x + 12582912.0) - 12582912.0  # 1.5 * 2**23: rounds |x| < 2**22 to an integer, half to even
        return tl.minimum(tl.maximum(x, -127.0), 127.0).to(dtype)
    return _round_to(x, dtype, INTERPRETER)  # fp8: the interpreter's own conversion truncates


@triton.jit
def _form_blocks_kernel(
    K, V, Score, DstK, DstV, Repr, ScaleK, ScaleV,
    stride_kh, stride_kn, stride_kt, stride_vh, stride_vn, stride_vt,
    stride_sh, stride_sn,
    stride_dn, stride_dh, stride_dt, stride_dvn, stride_dvh, stride_dvt,
    stride_rn, stride_rh, stride_ksn, stride_ksh, stride_vsn, stride_vsh, stride_vst,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_P2: tl.constexpr, REPR_TOPK: tl.constexpr,
    BLOCK_T: tl.constexpr, CODEC: tl.constexpr, MAX_CODE: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """One new memory block of one KV head: its representative (the mean of the REPR_TOPK best-scored keys,
    float32) and its K/V copied into the store. CODEC: the store holds fp8/int8 codes, encoded here as
    `reference.encode_codes` encodes them (keys scaled per channel into ScaleK (n, Hkv, 1, D), values per
    token into ScaleV (n, Hkv, bs, 1); the keys are read twice, for their per-channel maxima first), so the
    codec's torch ops (a dozen launches per formation) are not needed. Grid (n, Hkv)."""
    j = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK_P2)
    s = tl.load(Score + h * stride_sh + j * stride_sn + t, mask=t < BLOCK_SIZE, other=float("-inf"))
    acc = tl.full([HEAD_DIM], 0, tl.float32)
    k_base = K + h * stride_kh + j * stride_kn
    for _ in tl.static_range(REPR_TOPK):  # top-k by repeated arg-max (the lowest index among equal scores)
        best = _min(tl.where(s == _max(s, 0, INTERPRETER), t, BLOCK_P2), 0, INTERPRETER)
        acc += tl.load(k_base + best.to(tl.int64) * stride_kt + offs_d).to(tl.float32)
        s = tl.where(t == best, float("-inf"), s)
    tl.store(Repr + j * stride_rn + h * stride_rh + offs_d, acc / REPR_TOPK)
    v_base = V + h * stride_vh + j * stride_vn
    tiny = 1.1754943508222875e-38  # float32's smallest normal: the scale of an all-zero group
    if CODEC:
        amax = tl.full([HEAD_DIM], 0, tl.float32)
        for t0 in range(0, BLOCK_SIZE, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            keys = tl.load(k_base + rows[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                           mask=(rows < BLOCK_SIZE)[:, None], other=0.0).to(tl.float32)
            amax = tl.maximum(amax, _max(tl.abs(keys), 0, INTERPRETER))
        k_scale = tl.maximum(amax * (1.0 / MAX_CODE), tiny)  # as encode_codes: times the reciprocal
        tl.store(ScaleK + j * stride_ksn + h * stride_ksh + offs_d, k_scale)
    for t0 in range(0, BLOCK_SIZE, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        ok = (rows < BLOCK_SIZE)[:, None]
        r64 = rows[:, None].to(tl.int64)
        keys = tl.load(k_base + r64 * stride_kt + offs_d[None, :], mask=ok)
        values = tl.load(v_base + r64 * stride_vt + offs_d[None, :], mask=ok)
        if CODEC:
            keys = _encoded(tl.math.div_rn(keys.to(tl.float32), k_scale[None, :]), DstK.dtype.element_ty, INTERPRETER)
            values = values.to(tl.float32)
            v_amax = _max(tl.abs(values), 1, INTERPRETER)
            v_scale = tl.maximum(v_amax * (1.0 / MAX_CODE), tiny)
            tl.store(ScaleV + j * stride_vsn + h * stride_vsh + rows.to(tl.int64) * stride_vst, v_scale,
                     mask=rows < BLOCK_SIZE)
            values = _encoded(tl.math.div_rn(values, v_scale[:, None]), DstV.dtype.element_ty, INTERPRETER)
        tl.store(DstK + j * stride_dn + h * stride_dh + r64 * stride_dt + offs_d[None, :], keys, mask=ok)
        tl.store(DstV + j * stride_dvn + h * stride_dvh + r64 * stride_dvt + offs_d[None, :], values, mask=ok)


@triton.jit(do_not_specialize=["k0", "first", "n_new", "n_tiles"])  # they change every call: no variants
def _refine_topk_kernel(
    Values, Indices, Query, Reprs, Out, Tags, Stamps, Counters, Slots, Fill,
    stride_vh, stride_ih, stride_qh, stride_rn, stride_oh,
    k0, first, n_new, n_tiles, n_slots,
    X: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr,
    CACHE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """Top-K block ids of one lookup head. Each candidate is one int64, its score's order-preserving bits
    above its block id (unique keys: one max finds both, and equal scores rank the higher id first). The
    candidates sit in one register vector: the running top (at first the earlier top-k0) in positions
    [0, KP), new blocks BLOCK_C - KP at a time in [KP, BLOCK_C), scored against the query here; after every
    tile the best K move to positions [0, K) by K max-reductions (a bitonic sort of the vector, tl.sort,
    took 24-28 us against 10-12 on an H200 with 32-64 new blocks:
    benchmark/figures/gpu-h200-kernel-tuning/refine-topk-variants.json). CACHE (a shared
    top-k, Hsel 1): then the LRU bookkeeping of `cache_blocks` for the ids found (`_lru_assign`, reading them
    back from Out), in the same program instead of a second launch per lookup. Grid (Hsel,)."""
    h = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    none = -0x7FFFFFFFFFFFFFFF - 1  # below every candidate
    run = _score_id_keys(tl.load(Values + h * stride_vh + c, mask=c < k0, other=0.0).to(tl.float32),
                         tl.load(Indices + h * stride_ih + c, mask=c < k0, other=0).to(tl.int64))
    run = tl.where(c < k0, run, none)
    tile = n_tiles * 0
    # at least one tile: with no new block the earlier top is still reduced to K. A while loop: the
    # interpreter cannot take a runtime bound in `range` (see _attn_tiles), and nothing here pipelines.
    while tile < n_tiles:
        row = tile * (BLOCK_C - KP) + c - KP
        is_new = (c >= KP) & (row < n_new)
        block = (first + row).to(tl.int64)
        acc = tl.full([BLOCK_C, BLOCK_X], 0, tl.float32)  # products summed once, after the loads
        for x0 in tl.static_range(0, X, BLOCK_X):
            offs_x = x0 + tl.arange(0, BLOCK_X)
            qv = tl.load(Query + h * stride_qh + offs_x, mask=offs_x < X, other=0.0)
            r = tl.load(Reprs + block[:, None] * stride_rn + h * X + offs_x[None, :],
                        mask=is_new[:, None] & (offs_x < X)[None, :], other=0.0)
            acc += r * qv[None, :]
        new = _score_id_keys(_sum(acc, 1, INTERPRETER), block)
        cand = tl.where(is_new, new, tl.where(c < KP, run, none))
        run = tl.full([BLOCK_C], none, tl.int64)
        for j in range(K):
            best = _max(cand, 0, INTERPRETER)
            run = tl.where(c == j, best, run)
            cand = tl.where(cand == best, none, cand)
        tile += 1
    tl.store(Out + h * stride_oh + c, run & 0xFFFFFFFF, mask=c < K)
    if CACHE:
        tl.debug_barrier()  # the ids stored by all of the program's threads, read back in another layout
        _lru_assign(Out, Tags, Stamps, Counters, Slots, Fill, 1, n_slots, K, BLOCK_K, BLOCK_S, False, INTERPRETER)


@triton.jit
def _score_id_keys(score, block_id):
    """int64 keys ordered as (score, id): float32 bits made order-preserving as a signed int32 (negative
    floats have their magnitude bits flipped) above the id (non-negative, below 2**31)."""
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | block_id


@triton.jit
def _rotate_kernel(
    X, Cos, Sin, Out, n_rows, stride_xh, stride_xl, stride_cl, stride_sl, stride_oh, stride_ol,
    HALF: tl.constexpr, ONE_ROW: tl.constexpr, BLOCK_L: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """Out = X * cos + rotate_half(X) * sin for BLOCK_L rows of one head. Grid (cdiv(L, BLOCK_L), H); ONE_ROW:
    every row at the same angle (cos/sin row 0).

    Rounds where the torch ops round (`reference.rotate`: each product, then the sum, to X's dtype), so the
    result is bit-identical to the torch path's: a single float32 rounding moved near-tied block lookups of
    the bf16 fast-vs-torch agreement tests. Products of two 16-bit floats are exact in float32, and a float32
    difference of two of them rounded once to 16 bits is what torch's opmath computes."""
    h = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    ok = (rows < n_rows)[:, None]
    r64 = rows[:, None].to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    x_base = X + h * stride_xh + r64 * stride_xl
    x1 = tl.load(x_base + d, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + HALF + d, mask=ok, other=0.0).to(tl.float32)
    angle = r64 * 0 if ONE_ROW else r64
    c_base = Cos + angle * stride_cl
    s_base = Sin + angle * stride_sl
    c1 = tl.load(c_base + d, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_base + HALF + d, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_base + d, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_base + HALF + d, mask=ok, other=0.0).to(tl.float32)
    o_base = Out + h * stride_oh + r64 * stride_ol
    dtype = Out.dtype.element_ty
    o1, o2 = _rotated_halves(x1, x2, c1, c2, s1, s2, dtype, INTERPRETER)
    tl.store(o_base + d, o1, mask=ok)
    tl.store(o_base + HALF + d, o2, mask=ok)


@triton.jit
def _rotated_halves(x1, x2, c1, c2, s1, s2, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """(x1 * c1 - x2 * s1, x2 * c2 + x1 * s2) in `dtype`, rounded where the torch ops round (see
    `_rotate_kernel`): the halves of a rotated row from float32 halves of x, cos and sin."""
    a1 = _rounded(x1 * c1, dtype, INTERPRETER)
    b1 = _rounded(x2 * s1, dtype, INTERPRETER)
    a2 = _rounded(x2 * c2, dtype, INTERPRETER)
    b2 = _rounded(x1 * s2, dtype, INTERPRETER)
    # exact: the operands are already rounded
    return _rounded(a1 - b1, dtype, INTERPRETER).to(dtype), _rounded(a2 + b2, dtype, INTERPRETER).to(dtype)


@triton.jit
def _decode_prologue_kernel(
    Q, K, V, Cos, Sin, Angle, Write, QOut, TailK, TailV, TailKRot, TailScore,
    stride_qh, stride_kh, stride_vh, stride_cl, stride_sl, stride_oh,
    stride_tkh, stride_tkn, stride_tvh, stride_tvn, stride_trh, stride_trn, stride_tsh, n_q_heads,
    HALF: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """One head of `decode_prologue`: program h < Hq rotates query head h into QOut; program Hq + g rotates
    KV head g's key, writes it, its value and the rotated key into column Write[0] of the tail and zeroes
    that column's score. Grid (Hq + Hkv,)."""
    h = tl.program_id(0)
    d = tl.arange(0, HALF)
    angle = tl.load(Angle).to(tl.int64)
    c1 = tl.load(Cos + angle * stride_cl + d).to(tl.float32)
    c2 = tl.load(Cos + angle * stride_cl + HALF + d).to(tl.float32)
    s1 = tl.load(Sin + angle * stride_sl + d).to(tl.float32)
    s2 = tl.load(Sin + angle * stride_sl + HALF + d).to(tl.float32)
    if h < n_q_heads:
        x_base = Q + h.to(tl.int64) * stride_qh
        x1 = tl.load(x_base + d).to(tl.float32)
        x2 = tl.load(x_base + HALF + d).to(tl.float32)
        o1, o2 = _rotated_halves(x1, x2, c1, c2, s1, s2, QOut.dtype.element_ty, INTERPRETER)
        o_base = QOut + h.to(tl.int64) * stride_oh
        tl.store(o_base + d, o1)
        tl.store(o_base + HALF + d, o2)
    else:
        g = (h - n_q_heads).to(tl.int64)
        col = tl.load(Write).to(tl.int64)
        k1 = tl.load(K + g * stride_kh + d)
        k2 = tl.load(K + g * stride_kh + HALF + d)
        o1, o2 = _rotated_halves(k1.to(tl.float32), k2.to(tl.float32), c1, c2, s1, s2,
                                 TailKRot.dtype.element_ty, INTERPRETER)
        r_base = TailKRot + g * stride_trh + col * stride_trn
        tl.store(r_base + d, o1)
        tl.store(r_base + HALF + d, o2)
        k_base = TailK + g * stride_tkh + col * stride_tkn
        tl.store(k_base + d, k1)
        tl.store(k_base + HALF + d, k2)
        v_base = TailV + g * stride_tvh + col * stride_tvn
        tl.store(v_base + d, tl.load(V + g * stride_vh + d))
        tl.store(v_base + HALF + d, tl.load(V + g * stride_vh + HALF + d))
        tl.store(TailScore + g * stride_tsh + col, 0.0)


# True when triton was imported with TRITON_INTERPRET=1: kernels then run on CPU tensors (tests), with small
# fixed tiles and no autotuning. Fixed at import, like the kernel objects themselves.
_INTERPRETED = isinstance(_attn_fwd_kernel, InterpretedFunction)

# The ops launch their kernels through these (inf_llm.kernels.launcher): Triton's own path costs ~20 us more
# host time per launch, and a prefill chunk makes thousands.
_attn_fwd = DirectLauncher(_attn_fwd_kernel)
_combine_splits = DirectLauncher(_combine_splits_kernel)
_merge = DirectLauncher(_merge_kernel)
_window_key_scores = DirectLauncher(_window_key_scores_kernel)
_global_stage = DirectLauncher(_global_stage_kernel)
_decode_attn = DirectLauncher(_decode_attn_kernel)
_decode_combine = DirectLauncher(_decode_combine_kernel)
_decode_prologue = DirectLauncher(_decode_prologue_kernel)
_gather_blocks = DirectLauncher(_gather_blocks_kernel)
_cache_assign = DirectLauncher(_cache_assign_kernel)
_form_blocks = DirectLauncher(_form_blocks_kernel)
_refine_topk = DirectLauncher(_refine_topk_kernel)
_rotate = DirectLauncher(_rotate_kernel)


# ---------------------------------------------------------------------------------------------------------
# validation and launch helpers


def _cdiv(a: int, b: int) -> int:
    """triton.cdiv for host code: Triton 3.6 wraps its own in a constexpr-function dispatcher that costs a few
    microseconds per call, and the wrappers make ~6 such calls per execution block and layer."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """triton.next_power_of_2 for host code (see _cdiv), the same values (0 for n <= 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def _check_device(device: torch.device) -> None:
    if device.type == "cpu" and not _INTERPRETED:
        raise ValueError(
            "triton_attn ops need CUDA tensors; CPU tensors run only under the Triton interpreter "
            "(TRITON_INTERPRET=1 set before triton is imported). Use inf_llm.kernels.reference on CPU."
        )
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"triton_attn ops support CUDA tensors, got a tensor on {device}")


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_tensors(named, like_name: str, like) -> None:
    """Each (name, tensor, ndim) of `named`: a tensor of that rank, on the device of `like` (one of them,
    called `like_name`), contiguous in its last dimension."""
    for name, t, ndim in named:
        _check_tensor(name, t, ndim)
    for name, t, _ in named:
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device}; expected {like.device} like {like_name}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def _check_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
    """Shapes, dtypes, devices and strides shared by the attention ops (v None for window_key_scores)."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        _check_tensor(name, t, 4)
    if q.dtype not in _DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    _check_device(q.device)
    b, hq, _, d = q.shape
    if v is not None and v.shape != k.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch size or head dim")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if d < _MIN_HEAD_DIM or d > _MAX_HEAD_DIM or d & (d - 1):
        raise ValueError(
            f"head dim {d} is not supported: need a power of two in [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}]"
        )
    for name, t in named:
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)}); "
                             f"call .contiguous() first")


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def _check_window(q_offset, window, lq: int) -> tuple[int, int]:
    """Validate q_offset/window and return (q_offset, window) as int32-safe ints with the same mask.

    A window of None (causal, unbounded) or larger than every query position becomes max(pos) + 1; a window
    <= 0 hides every key, as in the reference.
    """
    if isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
        raise ValueError(f"q_offset must be an int, got {q_offset!r}")
    if abs(int(q_offset)) > _MAX_POSITION:
        raise ValueError(f"q_offset {q_offset} out of range (|q_offset| <= {_MAX_POSITION})")
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral)):
        raise ValueError(f"window must be an int or None, got {window!r}")
    q_offset = int(q_offset)
    reach = max(q_offset + lq, 0) + 1  # a window this long sees every key j >= 0 up to the last query
    win = reach if window is None else max(min(int(window), reach), 0)
    return q_offset, win


_NO_GUARD = contextlib.nullcontext()


@functools.cache
def _one_cuda_device() -> bool:
    return torch.cuda.device_count() <= 1


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: switch to the tensors' device when it is another one.
    With one GPU there is no other (asking torch for the current device cost ~8 us per launch, and a prefill
    chunk makes thousands)."""
    if device.type == "cuda" and not _one_cuda_device() and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NO_GUARD


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index).multi_processor_count  # cached by torch, no sync
    return _INTERPRETER_SMS


def _dot_precision(dtype: torch.dtype) -> str | None:
    """IEEE fp32 dots for float32 inputs (the test dtype; tf32 would cost ~1e-3); the default for 16-bit."""
    return "ieee" if dtype == torch.float32 else None


def _split_plan(device: torch.device, n_rows: int, n_bh: int, key_span: int, head_dim: int):
    """(BLOCK_M, BLOCK_N, splits) for the untuned small-row launch, or None to use the autotuned kernel.

    Few rows (decode, short chunks) give fewer programs than SMs: split the keys until about SMs / 2
    programs run (on an H100 a 4096-key decode took 14 us in 8 splits, 16 in 16, 25 in 32, 44 in 64: more
    splits cost more than the extra parallelism brings).
    Decided from shapes only (no device sync), so the result is fixed for a given shape.
    """
    if _INTERPRETED:
        block_m = block_n = _INTERPRETER_BLOCK
    else:
        block_m = max(16, min(_next_pow2(n_rows), _DECODE_MAX_BLOCK_M))
        block_n = 64 if head_dim >= 128 else 128
    programs = _cdiv(n_rows, block_m) * n_bh
    sms = _sm_count(device)
    if not _INTERPRETED and programs * 2 > sms:
        return None
    key_tiles = _cdiv(max(key_span, 1), block_n)
    splits = min(_cdiv(sms, 2 * programs), _cdiv(key_tiles, _SPLIT_MIN_TILES), _MAX_SPLITS)
    return block_m, block_n, max(splits, 1)


def _attention(q, k, v, *, scale, mode, q_offset=0, window=0, visible=None, num_splits=None, token_major=False):
    """Validated inputs -> (out, lse). `num_splits` forces the split count (tests); None decides by shape.
    `token_major`: out stored as (B, Lq, Hq, D) where the kernel writes it directly (not the split path,
    whose combine writes (B, Hq, Lq, D): out is then contiguous as usual)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    n_rows = group * lq
    plan = None
    if b * n_rows and lk:  # something to compute: the split decision (shapes only)
        key_span = min(lk, window + lq) if mode == _MODE_WINDOW else lk
        plan = _split_plan(q.device, n_rows, b * hkv, key_span, d)
        if num_splits is not None:
            block = _INTERPRETER_BLOCK if _INTERPRETED else 64
            plan = (block, block, num_splits)
    if token_major and (plan is None or plan[2] == 1):
        out = torch.empty((b, lq, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, Hq, Lq, D) view
    else:
        token_major = False
        out = torch.empty((b, hq, lq, d), dtype=q.dtype, device=q.device)  # (B, Hq, Lq, D)
    lse = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)  # (B, Hq, Lq)
    if out.numel() == 0:
        return out, lse
    if lk == 0:
        return out.zero_(), lse.fill_(NEG_INF)
    if lk > _MAX_POSITION:
        raise ValueError(f"k has {lk} keys, more than {_MAX_POSITION}")
    vis = visible if visible is not None else lse  # placeholder pointer, never read in window mode
    vis_stride = visible.stride(0) if visible is not None else 0
    rows = b * hq * lq
    args = (q, k, v, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], vis_stride,
            hkv, lq, lk, q_offset, window, scale * _LOG2E)
    const = dict(GROUP=group, HEAD_DIM=d, MODE=mode, DOT_PRECISION=_dot_precision(q.dtype), INTERPRETER=_INTERPRETED,
                 OUT_TOKEN_MAJOR=token_major)
    with _device_guard(q.device):
        if plan is None:
            grid = lambda meta: (_cdiv(n_rows, meta["BLOCK_M"]), b * hkv, 1)  # noqa: E731
            _attn_fwd_tuned[grid](
                out, lse, vis, *args, 1, rows, _next_pow2(min(n_rows, 8192)), **const
            )
            return out, lse
        block_m, block_n, splits = plan
        grid = (_cdiv(n_rows, block_m), b * hkv, splits)
        tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=3)
        if splits == 1:
            _attn_fwd[grid](out, lse, vis, *args, 1, rows, 0, **const, **tiles)
            return out, lse
        ws = torch.empty((splits, rows, d), dtype=torch.float32, device=q.device)  # (S, B*Hq*Lq, D)
        ws_lse = torch.empty((splits, rows), dtype=torch.float32, device=q.device)  # (S, B*Hq*Lq)
        _attn_fwd[grid](ws, ws_lse, vis, *args, splits, rows, 0, **const, **tiles)
        _combine_splits[(_cdiv(rows, _COMBINE_BLOCK_R),)](
            ws, ws_lse, out, lse, rows, ws.stride(0), ws_lse.stride(0),
            NUM_SPLITS=splits, HEAD_DIM=d, BLOCK_R=_COMBINE_BLOCK_R, INTERPRETER=_INTERPRETED,
        )
    return out, lse


# ---------------------------------------------------------------------------------------------------------
# public ops (signatures of inf_llm.kernels.reference)


def windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_offset: int, window: int | None,
    token_major_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sliding-window attention (the local stage), as `reference.windowed_attention`.

    q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) on one CUDA device. Query i sits at position q_offset + i and sees
    key j iff j <= q_offset + i and (window is None or j > q_offset + i - window).
    Returns out (B, Hq, Lq, D) in q.dtype and lse (B, Hq, Lq) float32. `token_major_out`: out is written as
    (B, Lq, Hq, D) storage (a transposed view is returned), so that transformers' reshape of the attention
    output needs no copy (a 64 MB copy per layer and Mistral-7B chunk otherwise); decode-sized calls (the
    split path) return a contiguous out as usual.
    """
    _check_qk(q, k, v)
    scale = _check_scale(scale)
    q_offset, win = _check_window(q_offset, window, q.shape[2])
    return _attention(q, k, v, scale=scale, mode=_MODE_WINDOW, q_offset=q_offset, window=win,
                      token_major=bool(token_major_out))


def prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, visible: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where query i sees keys 0 .. visible[i]-1 (the global stage), as `reference.prefix_attention`.

    visible: (Lq,) integer tensor on q's device, any order; counts < 0 or > Lk are clamped on the device.
    Returns out (B, Hq, Lq, D) in q.dtype and lse (B, Hq, Lq) float32.
    """
    _check_qk(q, k, v)
    scale = _check_scale(scale)
    _check_tensor("visible", visible, 1)
    if visible.shape[0] != q.shape[2]:
        raise ValueError(f"visible has {visible.shape[0]} counts but q has {q.shape[2]} queries")
    if visible.dtype.is_floating_point or visible.dtype.is_complex or visible.dtype == torch.bool:
        raise ValueError(f"visible must be an integer tensor, got {visible.dtype}")
    if visible.device != q.device:
        raise ValueError(f"visible is on {visible.device} but q is on {q.device}")
    return _attention(q, k, v, scale=scale, mode=_MODE_PREFIX, visible=visible)


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partials over disjoint key sets into one softmax, as `reference.merge_partials`.

    out_* (B, H, L, D) floating, lse_* (B, H, L) float32, all on one device. Returns (out in out_a.dtype,
    lse float32), both contiguous. One fused elementwise kernel.
    """
    for name, t, nd in (("out_a", out_a, 4), ("lse_a", lse_a, 3), ("out_b", out_b, 4), ("lse_b", lse_b, 3)):
        _check_tensor(name, t, nd)
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != out_a.device:
            raise ValueError(f"{name} is on {t.device} but out_a is on {out_a.device}")
        if t.numel() and t.stride(-1) != 1 and nd == 4:
            raise ValueError(f"{name} must be contiguous in its last dimension; call .contiguous() first")
    if out_a.dtype not in _DTYPES:
        raise ValueError(f"out_a must be float16, bfloat16 or float32, got {out_a.dtype}")
    _check_device(out_a.device)
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} differ in shape")
    if lse_a.shape != out_a.shape[:3] or lse_b.shape != out_a.shape[:3]:
        raise ValueError(
            f"lse_a {tuple(lse_a.shape)} and lse_b {tuple(lse_b.shape)} must be {tuple(out_a.shape[:3])}"
        )
    b, h, seq, d = out_a.shape
    out = torch.empty((b, h, seq, d), dtype=out_a.dtype, device=out_a.device)  # (B, H, L, D)
    lse = torch.empty((b, h, seq), dtype=torch.float32, device=out_a.device)  # (B, H, L)
    rows = b * h * seq
    if rows == 0:
        return out, lse
    if d == 0:
        return out, torch.logaddexp(lse_a.float(), lse_b.float())
    with _device_guard(out_a.device):
        _merge[(_cdiv(rows, _COMBINE_BLOCK_R),)](
            out_a, lse_a, out_b, lse_b, out, lse, rows, h, seq, d,
            *out_a.stride()[:3], *out_b.stride()[:3], *lse_a.stride(), *lse_b.stride(),
            BLOCK_D=_next_pow2(d), BLOCK_R=_COMBINE_BLOCK_R, INTERPRETER=_INTERPRETED,
        )
    return out, lse


def window_key_scores(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, q_offset: int, window: int | None, lse: torch.Tensor,
    into: torch.Tensor | None = None, check: bool = True,
) -> torch.Tensor:
    """Per-key probability mass of the local stage under the FINAL lse, as `reference.window_key_scores`.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), lse (B, Hq, Lq) float (float32 expected) on one device. Returns
    (B, Hkv, Lk) float32: for each key, sum over the visible queries and the group's query heads of
    exp(q.k * scale - lse). Queries with a non-finite lse contribute 0. `into` (B, Hkv, Lk) float32, last
    dimension contiguous: the scores are added to it in the same launch, and it is returned. `check=False`:
    no argument checks (q_offset and window are still normalized).
    """
    if check:
        _check_qk(q, k, None)
    scale = _check_scale(scale) if check else float(scale)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    q_offset, win = _check_window(q_offset, window, lq)
    if check:
        _check_tensor("lse", lse, 3)
        if lse.shape != (b, hq, lq):
            raise ValueError(f"lse has shape {tuple(lse.shape)}, expected {(b, hq, lq)}")
        if not lse.dtype.is_floating_point:
            raise ValueError(f"lse must be a floating tensor, got {lse.dtype}")
        if lse.device != q.device:
            raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
        if lk > _MAX_POSITION:
            raise ValueError(f"k has {lk} keys, more than {_MAX_POSITION}")
    if into is not None:
        if check:
            _check_tensor("into", into, 3)
            if into.shape != (b, hkv, lk) or into.dtype != torch.float32 or into.device != q.device:
                raise ValueError(f"into is {tuple(into.shape)} {into.dtype} on {into.device}; expected "
                                 f"{(b, hkv, lk)} float32 on {q.device}")
            if into.numel() and into.stride(-1) != 1:
                raise ValueError("into must be contiguous in its last dimension")
        out = into
    else:
        out = torch.zeros((b, hkv, lk), dtype=torch.float32, device=q.device)  # (B, Hkv, Lk)
    if out.numel() == 0 or lq == 0:
        return out
    group = hq // hkv
    args = (
        q, k, lse, out, *q.stride()[:3], *k.stride()[:3], *lse.stride(), *out.stride()[:2],
        hkv, lq, lk, q_offset, win, scale * _LOG2E,
    )
    const = dict(GROUP=group, HEAD_DIM=d, DOT_PRECISION=_dot_precision(q.dtype), INTERPRETER=_INTERPRETED,
                 ACCUMULATE=into is not None)
    with _device_guard(q.device):
        if _INTERPRETED:
            grid = (_cdiv(lk, _INTERPRETER_BLOCK), b * hkv)
            _window_key_scores[grid](
                *args, 0, BLOCK_M=_INTERPRETER_BLOCK, BLOCK_N=_INTERPRETER_BLOCK, **const
            )
        else:
            tune_rows = _next_pow2(min(group * lq, 8192))
            key = (tune_rows, d, group, q.dtype, k.dtype, lse.dtype, out.dtype)
            best = _WINDOW_SCORES_CONFIGS.get(key)
            if best is None:
                grid = lambda meta: (_cdiv(lk, meta["BLOCK_N"]), b * hkv)  # noqa: E731
                _window_key_scores_tuned[grid](*args, tune_rows, **const)
                _WINDOW_SCORES_CONFIGS[key] = _window_key_scores_tuned.best_config.all_kwargs()
            else:  # the tuned launch without the autotuner's per-call dispatch (~30 us of host time)
                grid = (_cdiv(lk, best["BLOCK_N"]), b * hkv)
                _window_key_scores[grid](*args, tune_rows, **const, **best)
    return out


def global_stage_into(
    q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    sink_k: torch.Tensor, sink_v: torch.Tensor,
    store_k: torch.Tensor, store_v: torch.Tensor, block_ids: torch.Tensor,
    rem_k: torch.Tensor, rem_v: torch.Tensor, *, rem_offset: int, scale: float, check: bool = True,
) -> None:
    """The global stage of one execution block merged in place into its local result, as
    `reference.global_stage_into`, in ONE launch: store blocks are read where they lie (through their ids,
    no gather into a staging buffer), the remainder's per-query prefix is computed in the kernel (no
    `visible` tensor), and the merge happens before the single store (no partial written and re-read).

    q (Hq, Lq, D), out (Hq, Lq, D) (q's dtype), lse (Hq, Lq) float32, sink_k/v (Hkv, S, D), store_k/v
    (N, Hkv, block_size, D), block_ids (1 or Hkv, K) int32/int64 on the device (not bounds-checked: ids
    come from a top-k over the store), rem_k/v (Hkv, R, D). Last dimensions contiguous. `check=False` skips
    the argument checks (a caller that built them itself: ContextMemory on a GPU, where they cost the host
    about as much as the launch).
    """
    scale = _check_scale(scale) if check else float(scale)
    hq, lq, d = q.shape
    hkv = sink_k.shape[0]
    if check:
        named = (("q", q, 3), ("out", out, 3), ("sink_k", sink_k, 3), ("sink_v", sink_v, 3), ("store_k", store_k, 4),
                 ("store_v", store_v, 4), ("rem_k", rem_k, 3), ("rem_v", rem_v, 3))
        for name, t, nd in named:
            _check_tensor(name, t, nd)
            if t.device != q.device or t.dtype != q.dtype:
                raise ValueError(f"{name} is {t.dtype} on {t.device}; expected {q.dtype} on {q.device} like q")
            if t.numel() and t.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in its last dimension; call .contiguous() first")
        _check_tensor("lse", lse, 2)
        _check_tensor("block_ids", block_ids, 2)
        if q.dtype not in _DTYPES:
            raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
        _check_device(q.device)
        if d & (d - 1) or not _MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM:
            raise ValueError(
                f"head dim {d} is not supported: need a power of two in [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}]"
            )
        if hkv == 0 or hq % hkv:
            raise ValueError(f"q has {hq} heads, not a multiple of the {hkv} KV heads")
        if out.shape != q.shape or lse.shape != (hq, lq) or lse.dtype != torch.float32:
            raise ValueError(f"out {tuple(out.shape)} / lse {tuple(lse.shape)} {lse.dtype} must be {tuple(q.shape)} / "
                             f"{(hq, lq)} float32")
        if store_k.shape[1] != hkv or store_k.shape[3] != d or store_v.shape != store_k.shape:
            raise ValueError(
                f"store_k {tuple(store_k.shape)} / store_v {tuple(store_v.shape)} must be (N, {hkv}, bs, {d})"
            )
        if block_ids.shape[0] not in (1, hkv) or block_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"block_ids must be (1 or {hkv}, K) int32/int64, got {tuple(block_ids.shape)} {block_ids.dtype}"
            )
        for name, t in (("sink", sink_k), ("rem", rem_k)):
            if t.shape[0] != hkv or t.shape[2] != d:
                raise ValueError(f"{name}_k {tuple(t.shape)} must be ({hkv}, n, {d})")
        if sink_v.shape != sink_k.shape or rem_v.shape != rem_k.shape:
            raise ValueError("sink_v / rem_v must have the shapes of sink_k / rem_k")
    if lq == 0:
        return
    group = hq // hkv
    block_size = store_k.shape[2]
    if _INTERPRETED:
        block_m = block_n = _INTERPRETER_BLOCK
        tiles = {}
    else:
        # fixed tiles (no autotuner dispatch on this per-execution-block launch): 64 x 64, 4 warps, 2 stages
        # took 64 us per Mistral-7B execution block on an H200, as 3 stages did; 128 x 64 and 8 warps 69-70,
        # 64 x 128 94, 4 stages 99 (benchmark/figures/gpu-h200-kernel-tuning/explore-kernels.json). float32
        # (tests) gets
        # 32 x 32: at D = 128 its 64 x 64 variant took minutes to compile
        block_m = block_n = 32 if q.dtype == torch.float32 else 64
        tiles = dict(num_warps=4, num_stages=2)
    grid = (_cdiv(group * lq, block_m), hkv)
    with _device_guard(q.device):
        _global_stage[grid](
            q, out, lse, sink_k, sink_v, store_k, store_v, block_ids, rem_k, rem_v,
            *q.stride()[:2], *out.stride()[:2], *lse.stride(),
            sink_k.stride(0), sink_k.stride(1), sink_v.stride(0), sink_v.stride(1),
            *store_k.stride()[:3], *store_v.stride()[:3],
            block_ids.stride(0), block_ids.stride(1),
            rem_k.stride(0), rem_k.stride(1), rem_v.stride(0), rem_v.stride(1),
            lq, sink_k.shape[1], block_ids.shape[1], block_size, rem_k.shape[1], int(rem_offset), scale * _LOG2E,
            PER_HEAD=block_ids.shape[0] > 1, MASK_BLOCKS=block_size % block_n != 0, GROUP=group, HEAD_DIM=d,
            DOT_PRECISION=_dot_precision(q.dtype), INTERPRETER=_INTERPRETED, BLOCK_M=block_m, BLOCK_N=block_n,
            **tiles,
        )


def decode_attention(
    q_loc: torch.Tensor, k_loc: torch.Tensor, v_loc: torch.Tensor,
    q_glb: torch.Tensor, k_glb: torch.Tensor, v_glb: torch.Tensor, *, scale: float,
    global_bias: torch.Tensor | None = None, window: tuple[torch.Tensor, int] | None = None,
    received_into: torch.Tensor | None = None, blocks: tuple | None = None, remainder: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoding query over [global keys | window keys] in one softmax, as `reference.decode_attention`
    (float32 scores, the same outputs), in two launches: key splits (flash-decoding) and their combine,
    which also turns the window keys' scores into the probability each receives. The torch op is ~20
    kernels per layer and step; a decode step replayed as a CUDA graph is bound by its kernel count.

    q_loc/q_glb (Hq, D) (q_glb may be float32); k_loc/v_loc (Hkv, Ll, D) and k_glb/v_glb (Hkv, Lg, D), any
    strides with a contiguous last dimension; global_bias (Lg,) float32 or None. Returns out (Hq, D) in
    q_loc's dtype, lse (Hq,) float32, received (Hkv, Ll) float32. `window`, `received_into`, `blocks` and
    `remainder` as in the reference: the window read at a device offset of whole buffers, the probabilities
    added in place, the selected blocks read by id where they lie, the remainder at a device offset.
    """
    _check_tensors((("q_loc", q_loc, 2), ("q_glb", q_glb, 2), ("k_loc", k_loc, 3), ("v_loc", v_loc, 3),
                    ("k_glb", k_glb, 3), ("v_glb", v_glb, 3)), "q_loc", q_loc)
    hq, d = q_loc.shape
    hkv, rows = k_loc.shape[:2]
    start, n_loc = _check_decode_window(window, rows, q_loc.device)
    n_glb = k_glb.shape[1]
    if (q_glb.shape != (hq, d) or v_loc.shape != k_loc.shape or v_glb.shape != k_glb.shape
            or k_loc.shape[2] != d or k_glb.shape[::2] != (hkv, d)):
        raise ValueError(f"q_loc {tuple(q_loc.shape)} / q_glb {tuple(q_glb.shape)} must be (Hq, D); k/v_loc "
                         f"{tuple(k_loc.shape)} / k/v_glb {tuple(k_glb.shape)} (Hkv, L, D) with the same Hkv, D")
    if hkv == 0 or hq % hkv or n_loc == 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv}); the window must not be empty")
    if d & (d - 1) or not _MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported: need a power of two in [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}]")
    if global_bias is not None and (global_bias.shape != (n_glb,) or global_bias.dtype != torch.float32
                                    or global_bias.device != q_loc.device):
        raise ValueError(f"global_bias must be ({n_glb},) float32 on {q_loc.device}")
    if received_into is not None and (received_into.shape != (hkv, rows) or received_into.dtype != torch.float32
                                      or received_into.device != q_loc.device or received_into.stride(-1) != 1):
        raise ValueError(f"received_into must be ({hkv}, {rows}) float32 on {q_loc.device}, contiguous in its "
                         f"last dimension")
    _check_device(q_loc.device)
    store_k, store_v, block_ids, block_size = _check_decode_blocks(blocks, k_glb)
    rem_k, rem_v, rem_start, rem_slots, rem_live = _check_decode_remainder(remainder, k_glb)
    group = hq // hkv
    block_n = _INTERPRETER_BLOCK if _INTERPRETED else 64
    tiles_sink = _cdiv(n_glb, block_n)
    tiles_per_block = _cdiv(block_size, block_n)
    tiles_blocks = block_ids.shape[1] * tiles_per_block if blocks is not None else 0
    tiles_glb = tiles_sink + tiles_blocks + _cdiv(rem_slots, block_n)
    n_tiles = tiles_glb + _cdiv(n_loc, block_n)
    want = min(_MAX_SPLITS, _cdiv(2 * _sm_count(q_loc.device), hkv))
    per_split = _cdiv(n_tiles, min(want, n_tiles))
    splits = _cdiv(n_tiles, per_split)
    dev = q_loc.device
    parts = torch.empty((splits * hkv * group * (d + 2),), dtype=torch.float32, device=dev)
    part_o = parts[: splits * hkv * group * d]
    part_m = parts[splits * hkv * group * d : splits * hkv * group * (d + 1)]
    part_l = parts[splits * hkv * group * (d + 1) :]
    win_s = torch.empty((hq * n_loc,), dtype=torch.float32, device=dev)
    out = torch.empty((hq, d), dtype=q_loc.dtype, device=dev)
    lse = torch.empty((hq,), dtype=torch.float32, device=dev)
    received = received_into if received_into is not None else torch.empty((hkv, n_loc), dtype=torch.float32,
                                                                            device=dev)
    block_g = max(16, _next_pow2(group))  # tl.dot needs 16 rows
    loc_start = start if start is not None else lse  # a placeholder pointer without a window offset
    with _device_guard(dev):
        _decode_attn[(splits, hkv)](
            q_loc, q_glb, k_loc, v_loc, k_glb, v_glb, global_bias if global_bias is not None else lse,
            part_o, part_m, part_l, win_s, loc_start,
            store_k, store_v, block_ids, rem_k, rem_v, rem_start, rem_live,
            q_loc.stride(0), q_glb.stride(0), k_loc.stride(0), k_loc.stride(1), v_loc.stride(0), v_loc.stride(1),
            k_glb.stride(0), k_glb.stride(1), v_glb.stride(0), v_glb.stride(1),
            *store_k.stride()[:3], *store_v.stride()[:3], *rem_k.stride()[:2], *rem_v.stride()[:2],
            n_loc, n_glb, tiles_sink, tiles_blocks, tiles_per_block, block_size, tiles_glb, n_tiles, per_split,
            splits, _check_scale(scale),
            GROUP=group, BLOCK_G=block_g, HEAD_DIM=d, BLOCK_N=block_n, HAS_BIAS=global_bias is not None,
            HAS_START=start is not None, INTERPRETER=_INTERPRETED,
        )
        _decode_combine[(hkv,)](
            part_o, part_m, part_l, win_s, out, lse, received, loc_start, received.stride(0), n_loc, splits, hkv,
            GROUP=group, BLOCK_G=block_g, HEAD_DIM=d, BLOCK_N=block_n,
            # a fresh `received` holds the window's rows only; `received_into` all of the buffers' rows
            HAS_START=start is not None and received_into is not None,
            ACCUMULATE=received_into is not None, INTERPRETER=_INTERPRETED,
        )
    return out, lse, received


def _check_decode_blocks(blocks, k_glb: torch.Tensor) -> tuple:
    """`decode_attention`'s blocks: (store_k, store_v, ids, block size); placeholders (k_glb) without."""
    if blocks is None:
        return k_glb, k_glb, k_glb, 1
    store_k, store_v, ids = blocks
    hkv, d = k_glb.shape[0], k_glb.shape[2]
    _check_tensors((("store_k", store_k, 4), ("store_v", store_v, 4)), "k_glb", k_glb)
    _check_tensor("block ids", ids, 2)
    if store_k.shape[1] != hkv or store_k.shape[3] != d or store_v.shape != store_k.shape:
        raise ValueError(f"store_k {tuple(store_k.shape)} / store_v {tuple(store_v.shape)} must be (N, {hkv}, bs, {d})")
    if ids.shape[0] != 1 or ids.dtype not in (torch.int32, torch.int64) or ids.device != k_glb.device or (
            ids.numel() and ids.stride(1) != 1):
        raise ValueError(f"block ids must be (1, K) int32/int64 on {k_glb.device}, contiguous: a shared top-k")
    return store_k, store_v, ids, store_k.shape[2]


def _check_decode_remainder(remainder, k_glb: torch.Tensor) -> tuple:
    """`decode_attention`'s remainder: (rem_k, rem_v, start, slots, live); placeholders (no slots) without."""
    if remainder is None:
        return k_glb, k_glb, k_glb, 0, k_glb
    rem_k, rem_v, start, slots, live = remainder
    _check_tensors((("rem_k", rem_k, 3), ("rem_v", rem_v, 3)), "k_glb", k_glb)
    if rem_k.shape[0] != k_glb.shape[0] or rem_k.shape[2] != k_glb.shape[2] or rem_v.shape != rem_k.shape:
        raise ValueError(f"rem_k {tuple(rem_k.shape)} / rem_v {tuple(rem_v.shape)} must be (Hkv, R, D) like k_glb")
    for name, t in (("remainder start", start), ("remainder live count", live)):
        if not (isinstance(t, torch.Tensor) and t.shape == (1,) and t.dtype == torch.int64
                and t.device == k_glb.device):
            raise ValueError(f"{name} must be a (1,) int64 tensor on {k_glb.device}")
    if isinstance(slots, bool) or not isinstance(slots, numbers.Integral) or not 0 <= slots <= rem_k.shape[1]:
        raise ValueError(f"remainder slots must be an int in [0, {rem_k.shape[1]}], got {slots!r}")
    return rem_k, rem_v, start, int(slots), live


def _check_decode_window(window, rows: int, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """`decode_attention`'s window: (start tensor or None, its length), for key buffers of `rows` rows."""
    if window is None:
        return None, rows
    start, length = window
    if not (isinstance(start, torch.Tensor) and start.shape == (1,) and start.dtype == torch.int64
            and start.device == device):
        raise ValueError(f"window start must be a (1,) int64 tensor on {device}")
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or not 1 <= length <= rows:
        raise ValueError(f"window length must be an int in [1, {rows}] (the key buffers' rows), got {length!r}")
    return start, int(length)


def decode_prologue(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, angle: torch.Tensor,
    write: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor, tail_k_rot: torch.Tensor,
    tail_score: torch.Tensor,
) -> torch.Tensor:
    """`reference.decode_prologue` in one launch (the torch version is a concatenation, two row gathers, a
    rotation, three column copies and a fill: eight kernels per layer of a graph-replayed decode step),
    bit-identical to it (the same roundings as `rotate`). q (Hq, 1, D), k/v (Hkv, 1, D), cos/sin (R, D), the
    tail's k/v/k_rot (Hkv, C, D) and score (Hkv, C) float32, all with a contiguous last dimension on one
    device; angle/write int64 (1,) tensors there (not bounds-checked: the caller keeps them in range)."""
    _check_tensors((("q", q, 3), ("k", k, 3), ("v", v, 3), ("cos", cos, 2), ("sin", sin, 2)), "q", q)
    _check_tensors((("tail_k", tail_k, 3), ("tail_v", tail_v, 3), ("tail_k_rot", tail_k_rot, 3)), "q", q)
    hq, one, d = q.shape
    hkv = k.shape[0]
    if (one != 1 or k.shape != (hkv, 1, d) or v.shape != k.shape or cos.shape[1] != d or sin.shape != cos.shape
            or tail_k.shape[::2] != (hkv, d) or tail_v.shape != tail_k.shape or tail_k_rot.shape != tail_k.shape):
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} / v must be (H, 1, {d}), cos/sin (R, {d}), the "
                         f"tail's k/v/k_rot ({hkv}, C, {d}); got tail_k {tuple(tail_k.shape)}")
    if tail_score.shape != tail_k.shape[:2] or tail_score.dtype != torch.float32 or tail_score.stride(-1) != 1:
        raise ValueError(f"tail_score must be {tuple(tail_k.shape[:2])} float32, contiguous in its last dimension")
    for name, t in (("angle", angle), ("write", write)):
        if not (isinstance(t, torch.Tensor) and t.shape == (1,) and t.dtype == torch.int64 and t.device == q.device):
            raise ValueError(f"{name} must be a (1,) int64 tensor on {q.device}")
    if d % 2 or (d // 2) & (d // 2 - 1):
        raise ValueError(f"head dim {d} is not supported: need twice a power of two")
    _check_device(q.device)
    q_out = torch.empty((hq, 1, d), dtype=q.dtype, device=q.device)
    with _device_guard(q.device):
        _decode_prologue[(hq + hkv,)](
            q, k, v, cos, sin, angle, write, q_out, tail_k, tail_v, tail_k_rot, tail_score,
            q.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0), q_out.stride(0),
            *tail_k.stride()[:2], *tail_v.stride()[:2], *tail_k_rot.stride()[:2], tail_score.stride(0), hq,
            HALF=d // 2, INTERPRETER=_INTERPRETED,
        )
    return q_out


def gather_blocks(
    src_k: torch.Tensor, src_v: torch.Tensor, block_ids: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor
) -> None:
    """dst[j, h] = src[block_ids[h or 0, j], h] for K and V, as `reference.gather_blocks`, in one launch.

    src_k/v (N, Hkv, block_size, D) on the device or in pinned host memory (read by the GPU directly: the
    ids stay on the device, so offloaded blocks are fetched without a host sync); block_ids (1 or Hkv, K)
    int on the device (not bounds-checked: they come from a top-k over the store); dst_k/v (K, Hkv,
    block_size, D) on the device, any strides with a contiguous last dimension (e.g. staging slots).
    """
    for name, t in (("src_k", src_k), ("src_v", src_v), ("dst_k", dst_k), ("dst_v", dst_v)):
        _check_tensor(name, t, 4)
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    _check_tensor("block_ids", block_ids, 2)
    n_sel, hkv, block_size, d = dst_k.shape
    if dst_v.shape != dst_k.shape or src_k.shape[1:] != (hkv, block_size, d) or src_v.shape != src_k.shape:
        raise ValueError(f"src {tuple(src_k.shape)}/{tuple(src_v.shape)} and dst {tuple(dst_k.shape)}/"
                         f"{tuple(dst_v.shape)} must be (N, Hkv, bs, D) and (K, Hkv, bs, D)")
    if block_ids.shape[0] not in (1, hkv) or block_ids.shape[1] != n_sel:
        raise ValueError(f"block_ids {tuple(block_ids.shape)} must be (1 or {hkv}, {n_sel})")
    if block_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_ids must be int32/int64, got {block_ids.dtype}")
    if src_k.dtype != dst_k.dtype or src_v.dtype != dst_v.dtype:
        raise ValueError(f"src ({src_k.dtype}) and dst ({dst_k.dtype}) dtypes differ")
    _check_device(dst_k.device)
    if block_ids.device != dst_k.device or dst_v.device != dst_k.device:
        raise ValueError("block_ids, dst_k and dst_v must be on one device")
    _check_on_or_pinned("src", src_k, src_v, dst_k.device)
    if d & (d - 1) or d > _MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported: need a power of two <= {_MAX_HEAD_DIM}")
    if n_sel == 0 or hkv == 0 or block_size == 0:
        return
    with _device_guard(dst_k.device):
        _launch_gather(src_k, src_v, block_ids, dst_k, dst_v)


def _check_on_or_pinned(name: str, k: torch.Tensor, v: torch.Tensor, device: torch.device) -> None:
    """K/V blocks a kernel reads or writes over the bus: on `device`, or in pinned host memory."""
    if k.device != device and not (k.is_pinned() and v.is_pinned()):
        raise ValueError(f"{name} on {k.device} must be pinned host memory (or on {device})")


def _launch_gather(src_k, src_v, block_ids, dst_k, dst_v, dst_rows: torch.Tensor | None = None, ring=None,
                   scales=None) -> None:
    """`_gather_blocks_kernel` over (K, Hkv) for validated tensors: into rows 0..K-1 of dst, or into
    `dst_rows[j]` for each j with dst_rows[j] >= 0 (the shared top-k's misses of `cache_blocks`); `ring`
    (validated by `_check_ring`): the newest blocks from there; `scales` (k_scale, v_scale): src holds codes
    (`_check_scales`)."""
    ring_k, ring_v, lo, hi = ring if ring is not None else (src_k, src_v, 0, 0)
    scale_ptrs, scale_strides = _scale_args(scales, src_k)
    _gather_blocks[(block_ids.shape[1], dst_k.shape[1])](
        src_k, src_v, block_ids, dst_k, dst_v, dst_rows if dst_rows is not None else block_ids, ring_k, ring_v,
        *scale_ptrs,
        *src_k.stride()[:3], *src_v.stride()[:3], *block_ids.stride(),
        *dst_k.stride()[:3], *dst_v.stride()[:3], *scale_strides, lo, hi, ring_k.shape[0],
        PER_HEAD=block_ids.shape[0] > 1, INDIRECT=dst_rows is not None, HEAD_DIM=dst_k.shape[3],
        BLOCK_SIZE=dst_k.shape[2], BLOCK_T=_INTERPRETER_BLOCK if _INTERPRETED else 32, RING=ring is not None,
        CODEC=scales is not None, INTERPRETER=_INTERPRETED,
    )


_CODE_DTYPES = tuple(CODE_MAX)  # offload_dtype's codes (reference.encode_codes)


def _scale_args(scales, placeholder: torch.Tensor) -> tuple[tuple, tuple]:
    """The kernels' ScaleK/ScaleV pointers and their strides (k_scale: block, head; v_scale: block, head,
    token) for `scales` (k_scale, v_scale); without a codec a placeholder pointer and zero strides (not read)."""
    if scales is None:
        return (placeholder, placeholder), (0,) * 5
    k_scale, v_scale = scales
    return (k_scale, v_scale), (*k_scale.stride()[:2], *v_scale.stride()[:3])


def _check_scales(scales, src_k: torch.Tensor, src_v: torch.Tensor, device: torch.device) -> None:
    """`scales` (k_scale, v_scale) of a store of codes: float32, keys per channel (N, Hkv, 1, D), values per
    token (N, Hkv, bs, 1), where the codes are (on the device or pinned), contiguous in their last dimension."""
    if not isinstance(scales, tuple) or len(scales) != 2:
        raise ValueError("scales must be a (k_scale, v_scale) tuple")
    n, hkv, bs, d = src_k.shape
    if src_k.dtype not in _CODE_DTYPES or src_v.dtype != src_k.dtype:
        raise ValueError(f"with scales, src_k/src_v must hold fp8 (e4m3) or int8 codes, got {src_k.dtype}/"
                         f"{src_v.dtype}")
    for name, t, shape in (("k_scale", scales[0], (n, hkv, 1, d)), ("v_scale", scales[1], (n, hkv, bs, 1))):
        _check_tensor(name, t, 4)
        if tuple(t.shape) != shape or t.dtype != torch.float32 or (t.numel() and t.stride(-1) != 1):
            raise ValueError(f"{name} must be {shape} float32, contiguous in its last dimension; got "
                             f"{tuple(t.shape)} {t.dtype}")
    _check_on_or_pinned("scales", scales[0], scales[1], device)


def _check_ring(ring, src_k: torch.Tensor, src_v: torch.Tensor, device: torch.device, scales=None) -> None:
    """`ring` (ring_k, ring_v, lo, hi) of `cache_blocks` / `refine_and_cache`: device slots laid out as the
    store (the kernel reads them with the store's strides), holding blocks lo <= id < hi at id % slots. Not
    with a store of codes (`scales`)."""
    if ring is None:
        return
    if scales is not None:
        raise ValueError("ring and scales together are not supported: a store of codes has no formation ring")
    ring_k, ring_v, lo, hi = ring
    for name, t, like in (("ring_k", ring_k, src_k), ("ring_v", ring_v, src_v)):
        _check_tensor(name, t, 4)
        if t.device != device or t.dtype != like.dtype or t.shape[1:] != like.shape[1:] or t.stride() != like.stride():
            raise ValueError(f"{name} must be (R, Hkv, bs, D) {like.dtype} on {device} with the store's strides")
    for name, x in (("lo", lo), ("hi", hi)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
            raise ValueError(f"ring {name} must be an int >= 0, got {x!r}")
    if not lo <= hi <= lo + ring_k.shape[0]:
        raise ValueError(f"ring blocks [{lo}, {hi}) do not fit its {ring_k.shape[0]} slots")


# cache_blocks' bookkeeping holds every slot's tag in one program's registers; the config refuses more
_MAX_CACHE_SLOTS = MAX_DEVICE_CACHED_BLOCKS


def cache_blocks(
    src_k: torch.Tensor, src_v: torch.Tensor, block_ids: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
    tags: torch.Tensor, stamps: torch.Tensor, counters: torch.Tensor, prefetch: bool = False, ring=None,
    check: bool = True, scales=None,
) -> torch.Tensor:
    """The selected blocks made resident in a device LRU cache, as `reference.cache_blocks`, in two launches
    and no host sync: one program does the bookkeeping (hits keep their slot, misses take the least recently
    used others), then the misses alone are read from the store (pinned host memory, over the bus) into
    their slots, or from `ring` (ring_k, ring_v, lo, hi) for blocks lo <= id < hi; with `scales` (k_scale,
    v_scale) the store holds codes, decoded on the way. Returns the slots (1, K) int64; tags/stamps/counters
    are updated in place. `check=False`: no argument checks.
    """
    if check:
        _check_tensor("block_ids", block_ids, 2)
        if block_ids.shape[0] != 1 or block_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"block_ids must be (1, K) int32/int64, got {tuple(block_ids.shape)} {block_ids.dtype}")
        _check_cache(src_k, src_v, cache_k, cache_v, tags, stamps, counters, block_ids.shape[1], prefetch, scales)
        _check_ring(ring, src_k, src_v, cache_k.device, scales)
        if block_ids.device != cache_k.device or block_ids.numel() and block_ids.stride(-1) != 1:
            raise ValueError(f"block_ids must be on {cache_k.device} like cache_k, contiguous in its last dimension")
    k = block_ids.shape[1]
    placed = torch.empty((2, k), dtype=torch.int64, device=cache_k.device)  # slots, then the misses' slots
    if k == 0:
        return placed[:1]
    n_slots = cache_k.shape[0]
    with _device_guard(cache_k.device):
        _cache_assign[(1,)](
            block_ids, tags, stamps, counters, placed, placed[1], block_ids.stride(1), n_slots,
            K=k, BLOCK_K=_next_pow2(k), BLOCK_C=_next_pow2(n_slots), PREFETCH=bool(prefetch),
            INTERPRETER=_INTERPRETED,
            # a prefetch's (ids x slots) matrices: more threads hold them (4 warps would spill them)
            **({} if _INTERPRETED else {"num_warps": 4 if _next_pow2(k) * _next_pow2(n_slots) <= 8192 else 16}),
        )
        _launch_gather(src_k, src_v, block_ids, cache_k, cache_v, dst_rows=placed[1], ring=ring, scales=scales)
    return placed[:1]


def _check_cache(src_k, src_v, cache_k, cache_v, tags, stamps, counters, k: int, prefetch: bool,
                 scales=None) -> None:
    """The store and the device cache of `cache_blocks` / `refine_and_cache`, for a selection of k blocks;
    with `scales`, a store of codes (`_check_scales`)."""
    _check_tensors((("src_k", src_k, 4), ("src_v", src_v, 4)), "src_k", src_k)
    _check_tensors((("cache_k", cache_k, 4), ("cache_v", cache_v, 4), ("tags", tags, 1), ("stamps", stamps, 1),
                    ("counters", counters, 1)), "cache_k", cache_k)
    n_slots, hkv, block_size, d = cache_k.shape
    if cache_v.shape != cache_k.shape or src_k.shape[1:] != cache_k.shape[1:] or src_v.shape != src_k.shape:
        raise ValueError(f"src {tuple(src_k.shape)}/{tuple(src_v.shape)} and cache {tuple(cache_k.shape)}/"
                         f"{tuple(cache_v.shape)} must be (N, Hkv, bs, D) and (C, Hkv, bs, D)")
    if not (prefetch or k <= n_slots) or n_slots > _MAX_CACHE_SLOTS or k > _MAX_CACHE_SLOTS:
        raise ValueError(f"the cache has {n_slots} slots: need between the {k} blocks selected and {_MAX_CACHE_SLOTS}")
    if tags.shape != (n_slots,) or stamps.shape != (n_slots,) or counters.shape != (4,):
        raise ValueError(f"tags {tuple(tags.shape)} / stamps {tuple(stamps.shape)} / counters "
                         f"{tuple(counters.shape)} must be ({n_slots},) / ({n_slots},) / (4,)")
    if any(t.dtype != torch.int64 for t in (tags, stamps, counters)):
        raise ValueError("tags, stamps and counters must be int64")
    if scales is not None:
        _check_scales(scales, src_k, src_v, cache_k.device)
    elif src_k.dtype != cache_k.dtype or src_v.dtype != cache_v.dtype:
        raise ValueError(f"src ({src_k.dtype}) and cache ({cache_k.dtype}) dtypes differ")
    _check_on_or_pinned("src", src_k, src_v, cache_k.device)
    if d & (d - 1) or d > _MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported: need a power of two <= {_MAX_HEAD_DIM}")
    _check_device(cache_k.device)


def form_blocks(
    keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, repr_topk: int,
    dst_k: torch.Tensor, dst_v: torch.Tensor, dst_repr: torch.Tensor, check: bool = True, scales=None,
) -> None:
    """New memory blocks into the store, as `reference.form_blocks`, in one launch (the torch version is a
    top-k, a gather, a mean and three copies: host launches bound the prefill's per-execution-block work).

    keys/values (Hkv, n, bs, D) and scores (Hkv, n, bs) float32, e.g. views of the tail; dst_k/dst_v
    (n, Hkv, bs, D) and dst_repr (n, Hkv, D) float32: the store's new slots, on the same device (K/V may
    also be pinned host memory, written by the GPU over the bus: offload_access: direct). Last dimensions
    contiguous. Among equal scores the lowest position is taken first. `scales` (k_scale (n, Hkv, 1, D),
    v_scale (n, Hkv, bs, 1), float32, beside dst_k): dst_k/dst_v hold fp8/int8 codes, encoded here bit for
    bit as `reference.encode_codes` encodes them. `check=False`: no argument checks.
    """
    hkv, n, bs, d = keys.shape
    if check:
        _check_tensors((("keys", keys, 4), ("values", values, 4), ("scores", scores, 3), ("dst_repr", dst_repr, 3)),
                       "keys", keys)
        _check_tensors((("dst_k", dst_k, 4), ("dst_v", dst_v, 4)), "dst_k", dst_k)
        _check_on_or_pinned("dst_k/dst_v", dst_k, dst_v, keys.device)
        if values.shape != keys.shape or scores.shape != (hkv, n, bs):
            raise ValueError(f"values {tuple(values.shape)} / scores {tuple(scores.shape)} must match keys "
                             f"{tuple(keys.shape)} / {(hkv, n, bs)}")
        if dst_k.shape != (n, hkv, bs, d) or dst_v.shape != dst_k.shape or dst_repr.shape != (n, hkv, d):
            raise ValueError(f"dst_k {tuple(dst_k.shape)} / dst_v {tuple(dst_v.shape)} / dst_repr "
                             f"{tuple(dst_repr.shape)} must be {(n, hkv, bs, d)} / {(n, hkv, d)}")
        if scales is not None:
            _check_scales(scales, dst_k, dst_v, keys.device)
        elif dst_k.dtype != keys.dtype or dst_v.dtype != values.dtype:
            raise ValueError(f"the store's dtype ({dst_k.dtype}) differs from the keys' ({keys.dtype})")
        if scores.dtype != torch.float32 or dst_repr.dtype != torch.float32:
            raise ValueError(f"scores ({scores.dtype}) and dst_repr ({dst_repr.dtype}) must be float32")
        if not 1 <= repr_topk <= bs:
            raise ValueError(f"repr_topk {repr_topk} must be in [1, block size {bs}]")
        if d & (d - 1) or d > _MAX_HEAD_DIM:
            raise ValueError(f"head dim {d} is not supported: need a power of two <= {_MAX_HEAD_DIM}")
        _check_device(keys.device)
    if n == 0 or hkv == 0:
        return
    scale_ptrs, scale_strides = _scale_args(scales, dst_k)
    with _device_guard(keys.device):
        _form_blocks[(n, hkv)](
            keys, values, scores, dst_k, dst_v, dst_repr, *scale_ptrs,
            keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
            scores.stride(0), scores.stride(1),
            *dst_k.stride()[:3], *dst_v.stride()[:3], dst_repr.stride(0), dst_repr.stride(1), *scale_strides,
            HEAD_DIM=d, BLOCK_SIZE=bs, BLOCK_P2=_next_pow2(bs), REPR_TOPK=repr_topk,
            BLOCK_T=_INTERPRETER_BLOCK if _INTERPRETED else 32, CODEC=scales is not None,
            MAX_CODE=CODE_MAX.get(dst_k.dtype, 0.0), INTERPRETER=_INTERPRETED,
        )


def refine_topk(
    values: torch.Tensor, indices: torch.Tensor, query: torch.Tensor, reprs: torch.Tensor, first: int, k: int,
    check: bool = True,
) -> torch.Tensor:
    """Top-k block ids among an earlier top-k and the blocks formed since, as `reference.refine_topk`, in one
    launch (the torch version is a GEMV, a concatenation, a top-k and a gather; a prefill's lookups are one
    per execution block and layer, so their launches count).

    values (Hsel, k0) float32 and indices (Hsel, k0) int: the earlier top-k0 of blocks [0, first); query
    (Hsel, X) float32; reprs (N, Hsel * X) float32, rows [first, N) scored here. Returns (Hsel, k) int64.
    `check=False`: no argument checks.
    """
    if check:
        _check_refine(values, indices, query, reprs, first, k)
    out = torch.empty((query.shape[0], k), dtype=torch.int64, device=query.device)
    _launch_refine(values, indices, query, reprs, first, k, out)
    return out


def refine_and_cache(
    values: torch.Tensor, indices: torch.Tensor, query: torch.Tensor, reprs: torch.Tensor, first: int, k: int,
    src_k: torch.Tensor, src_v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
    tags: torch.Tensor, stamps: torch.Tensor, counters: torch.Tensor, ring=None, check: bool = True, scales=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`refine_topk` of a shared top-k (Hsel 1), then `cache_blocks` of the ids found (`ring`, `scales` as there), as
    `reference.refine_and_cache`, in two launches instead of three: the cache's bookkeeping runs in the
    refining program, then the misses are read into their slots. Returns (ids, slots), each (1, k) int64.
    `check=False`: no argument checks.
    """
    if check:
        _check_refine(values, indices, query, reprs, first, k)
        if query.shape[0] != 1:
            raise ValueError(f"refine_and_cache takes a shared top-k: query (1, X), got {tuple(query.shape)}")
        _check_cache(src_k, src_v, cache_k, cache_v, tags, stamps, counters, k, False, scales)
        _check_ring(ring, src_k, src_v, cache_k.device, scales)
        if cache_k.device != query.device:
            raise ValueError(f"cache_k is on {cache_k.device} but query is on {query.device}")
    found = torch.empty((3, k), dtype=torch.int64, device=query.device)  # ids, their slots, the misses' slots
    _launch_refine(values, indices, query, reprs, first, k, found[:1], (tags, stamps, counters, found[1], found[2]))
    with _device_guard(query.device):
        _launch_gather(src_k, src_v, found[:1], cache_k, cache_v, dst_rows=found[2], ring=ring, scales=scales)
    return found[:1], found[1:2]


def _check_refine(values, indices, query, reprs, first, k) -> None:
    _check_tensors((("values", values, 2), ("indices", indices, 2), ("query", query, 2), ("reprs", reprs, 2)),
                   "query", query)
    hsel, x = query.shape
    k0, n = values.shape[1], reprs.shape[0]
    if values.shape[0] != hsel or indices.shape != values.shape or reprs.shape[1] != hsel * x:
        raise ValueError(f"values {tuple(values.shape)} / indices {tuple(indices.shape)} / reprs "
                         f"{tuple(reprs.shape)} must be ({hsel}, k0) / ({hsel}, k0) / (N, {hsel * x})")
    if values.dtype != torch.float32 or query.dtype != torch.float32 or reprs.dtype != torch.float32:
        raise ValueError(f"values, query and reprs must be float32, got {values.dtype}, {query.dtype}, {reprs.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32/int64, got {indices.dtype}")
    if isinstance(first, bool) or not isinstance(first, numbers.Integral) or not 0 <= first <= n:
        raise ValueError(f"first must be an int in [0, {n}], got {first!r}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= k0 + n - first:
        raise ValueError(f"k must be an int in [1, {k0 + n - first}] (the candidates), got {k!r}")
    _check_device(query.device)


def _launch_refine(values, indices, query, reprs, first: int, k: int, out: torch.Tensor, cache=None) -> None:
    """`_refine_topk_kernel` for validated tensors into out (Hsel, k); `cache` (tags, stamps, counters, slots,
    fill): with the LRU bookkeeping of the ids found."""
    hsel, x = query.shape
    k0, n = values.shape[1], reprs.shape[0]
    kp = _next_pow2(max(k0, k))
    block_c = max(128, 2 * kp)
    n_new = n - first
    tags, stamps, counters, slots, fill = cache if cache is not None else (out,) * 5  # unused without a cache
    n_slots = tags.shape[0] if cache is not None else 0
    with _device_guard(query.device):
        _refine_topk[(hsel,)](
            values, indices, query, reprs, out, tags, stamps, counters, slots, fill,
            values.stride(0), indices.stride(0), query.stride(0), reprs.stride(0), out.stride(0),
            k0, first, n_new, max(_cdiv(n_new, block_c - kp), 1), n_slots,
            X=x, K=int(k), KP=kp, BLOCK_C=block_c, BLOCK_X=min(64, _next_pow2(x)),
            CACHE=cache is not None, BLOCK_K=_next_pow2(k), BLOCK_S=_next_pow2(max(n_slots, 1)),
            INTERPRETER=_INTERPRETED, num_warps=4,
        )


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin`, as `reference.rotate` and bit-identical to it for 16-bit dtypes, in
    one launch (the torch version is five elementwise launches, each a strided pass over x).

    x (H, L, D) with any strides but a contiguous last dimension (e.g. transformers' transposed q); cos/sin
    (L, D), or (1, D) for one angle for every row. Returns a new contiguous (H, L, D) in x's dtype, or writes
    `out` (H, L, D) of x's dtype, any strides with a contiguous last dimension (e.g. a buffer's slots) and
    not overlapping x, and returns it.
    """
    _check_tensors((("x", x, 3), ("cos", cos, 2), ("sin", sin, 2)), "x", x)
    h, length, d = x.shape
    if cos.shape != sin.shape or cos.shape[0] not in (1, length) or cos.shape[1] != d:
        raise ValueError(f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must be ({length} or 1, {d})")
    if d % 2 or (d // 2) & (d // 2 - 1):
        raise ValueError(f"head dim {d} is not supported: need twice a power of two")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    _check_device(x.device)
    if out is None:
        out = torch.empty((h, length, d), dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} on {out.device} must be {tuple(x.shape)} "
                         f"{x.dtype} on {x.device}, contiguous in its last dimension")
    if out.numel() == 0:
        return out
    block_l = _INTERPRETER_BLOCK if _INTERPRETED else 64
    with _device_guard(x.device):
        _rotate[(_cdiv(length, block_l), h)](
            x, cos, sin, out, length, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
            out.stride(0), out.stride(1),
            HALF=d // 2, ONE_ROW=cos.shape[0] == 1, BLOCK_L=block_l, INTERPRETER=_INTERPRETED,
        )
    return out
