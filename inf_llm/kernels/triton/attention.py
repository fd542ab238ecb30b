"""Flash attention over a key range per query: `windowed_attention` (the local stage), `prefix_attention`
(the host path's global stage) and `merge_partials` (two partials into one softmax), with their kernels, the
prefill autotuning configs and the key-split plan for few query rows. Knows nothing of memory blocks (the
device path's global stage, which reads them, is `global_stage`).

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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inf_llm.kernels.launcher import DirectLauncher
from inf_llm.kernels.reference import NEG_INF
from inf_llm.kernels.triton.common import (
    DTYPES,
    INTERPRETED,
    INTERPRETER_BLOCK,
    LN2,
    LOG2E,
    MAX_POSITION,
    MAX_SPLITS,
    attn_tiles,
    cdiv,
    check_device,
    check_qk,
    check_scale,
    check_tensor,
    check_window,
    device_guard,
    dot_precision,
    next_pow2,
    prune_configs,
    reduce_max,
    reduce_min,
    round_to,
    sm_count,
)

# Queries per windowed_attention call that ContextMemory should use: the kernel skips key tiles outside
# every query's window, so a whole prefill chunk is one launch, and its output is the call's (pieces of
# 2048 queries cost four launches and a copy of each piece's output per layer).
LOCAL_STAGE_ROWS = 1 << 16
_MODE_WINDOW = 0  # key j visible to query at pos iff pos - window < j <= pos
_MODE_PREFIX = 1  # key j visible to query i iff j < visible[i]
_DECODE_MAX_BLOCK_M = 64  # row tiles of the split (decode) path: G * Lq rows rounded up to a power of two
_SPLIT_MIN_TILES = 4  # each key split must cover >= 4 key tiles to pay for its partial write and the combine
_COMBINE_BLOCK_R = 16  # rows per program of the elementwise merge/combine kernels


def _tune_configs() -> list[triton.Config]:
    """H100 search space for the prefill-sized launches (not used by the interpreter): BLOCK_M/BLOCK_N
    64/128, 4/8 warps, 2/3 stages, limited to five combinations so that a first call compiles five
    variants, not sixteen (each takes seconds). 64x64/4 warps/3 stages won at Mistral-7B prefill shapes on
    an H100; 8 warps only pay on 128-row tiles."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in ((64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2))
    ]


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
    lo_min = reduce_min(tl.where(row_ok, lo_r, k_len), 0, INTERPRETER)
    lo_max = reduce_max(tl.where(row_ok, lo_r, 0), 0, INTERPRETER)
    hi_min = reduce_min(tl.where(row_ok, hi_r, k_len), 0, INTERPRETER)
    hi_max = reduce_max(tl.where(row_ok, hi_r, 0), 0, INTERPRETER)
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
    acc, m_i, l_i = attn_tiles(  # interior: no masks
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len,
        tl.maximum(il, s_lo), tl.minimum(ih, s_hi), 0, 0, qk_scale,
        False, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )
    acc, m_i, l_i = attn_tiles(  # the edges left and right of it: per-row masks
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len,
        tl.maximum(kb0, s_lo), tl.minimum(il, s_hi), tl.maximum(ih, s_lo), tl.minimum(kb1, s_hi), qk_scale,
        True, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )

    empty = l_i == 0.0  # no visible key (in this split): out 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    # Contiguous outputs: row (split, b, head, i) -> ((split * B + b) * Hq + head) * Lq + i.
    l_rows = split.to(tl.int64) * out_rows + (b64 * n_kv_heads * GROUP + head) * q_len + qi  # (BM,)
    if OUT_TOKEN_MAJOR:  # row (b, i, head): what transformers reshapes the attention output from
        o_rows = (b64 * q_len + qi) * (n_kv_heads * GROUP) + head
    else:
        o_rows = l_rows
    tl.store(
        Out + o_rows[:, None] * HEAD_DIM + offs_d[None, :],
        round_to(out, Out.dtype.element_ty, INTERPRETER),
        mask=row_ok[:, None],
    )
    tl.store(Lse + l_rows, lse, mask=row_ok)


_attn_fwd_tuned = triton.autotune(
    configs=_tune_configs(),
    key=["tune_rows", "HEAD_DIM", "GROUP", "MODE"],
    prune_configs_by={"early_config_prune": prune_configs},
    cache_results=True,  # keep the choice in Triton's on-disk cache: a restarted server does not re-tune
)(_attn_fwd_kernel)


@triton.jit
def _combine_splits_kernel(
    Ws, WsLse, Out, Lse, n_rows, stride_ws, stride_wl,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """Merge the key splits of the decode path by log-sum-exp. Ws (S, R, D) / WsLse (S, R) float32,
    Out (R, D) and Lse (R,) contiguous; R = B * Hq * Lq. NUM_SPLITS is a constexpr (at most MAX_SPLITS
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
        round_to(out, Out.dtype.element_ty, INTERPRETER),
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
        round_to(out, Out.dtype.element_ty, INTERPRETER),
        mask=mask,
    )
    tl.store(Lse + rows64, tl.where(empty, float("-inf"), m_use + tl.log(den_safe)), mask=row_ok)


# the ops launch their kernels through these (see inf_llm.kernels.launcher)
_attn_fwd = DirectLauncher(_attn_fwd_kernel)
_combine_splits = DirectLauncher(_combine_splits_kernel)
_merge = DirectLauncher(_merge_kernel)


def _split_plan(device: torch.device, n_rows: int, n_bh: int, key_span: int, head_dim: int):
    """(BLOCK_M, BLOCK_N, splits) for the untuned small-row launch, or None to use the autotuned kernel.

    Few rows (decode, short chunks) give fewer programs than SMs: split the keys until about SMs / 2
    programs run (on an H100 a 4096-key decode took 14 us in 8 splits, 16 in 16, 25 in 32, 44 in 64: more
    splits cost more than the extra parallelism brings).
    Decided from shapes only (no device sync), so the result is fixed for a given shape.
    """
    if INTERPRETED:
        block_m = block_n = INTERPRETER_BLOCK
    else:
        block_m = max(16, min(next_pow2(n_rows), _DECODE_MAX_BLOCK_M))
        block_n = 64 if head_dim >= 128 else 128
    programs = cdiv(n_rows, block_m) * n_bh
    sms = sm_count(device)
    if not INTERPRETED and programs * 2 > sms:
        return None
    key_tiles = cdiv(max(key_span, 1), block_n)
    splits = min(cdiv(sms, 2 * programs), cdiv(key_tiles, _SPLIT_MIN_TILES), MAX_SPLITS)
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
            block = INTERPRETER_BLOCK if INTERPRETED else 64
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
    if lk > MAX_POSITION:
        raise ValueError(f"k has {lk} keys, more than {MAX_POSITION}")
    vis = visible if visible is not None else lse  # placeholder pointer, never read in window mode
    vis_stride = visible.stride(0) if visible is not None else 0
    rows = b * hq * lq
    args = (q, k, v, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], vis_stride,
            hkv, lq, lk, q_offset, window, scale * LOG2E)
    const = dict(GROUP=group, HEAD_DIM=d, MODE=mode, DOT_PRECISION=dot_precision(q.dtype), INTERPRETER=INTERPRETED,
                 OUT_TOKEN_MAJOR=token_major)
    with device_guard(q.device):
        if plan is None:
            grid = lambda meta: (cdiv(n_rows, meta["BLOCK_M"]), b * hkv, 1)  # noqa: E731
            _attn_fwd_tuned[grid](
                out, lse, vis, *args, 1, rows, next_pow2(min(n_rows, 8192)), **const
            )
            return out, lse
        block_m, block_n, splits = plan
        grid = (cdiv(n_rows, block_m), b * hkv, splits)
        tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=3)
        if splits == 1:
            _attn_fwd[grid](out, lse, vis, *args, 1, rows, 0, **const, **tiles)
            return out, lse
        ws = torch.empty((splits, rows, d), dtype=torch.float32, device=q.device)  # (S, B*Hq*Lq, D)
        ws_lse = torch.empty((splits, rows), dtype=torch.float32, device=q.device)  # (S, B*Hq*Lq)
        _attn_fwd[grid](ws, ws_lse, vis, *args, splits, rows, 0, **const, **tiles)
        _combine_splits[(cdiv(rows, _COMBINE_BLOCK_R),)](
            ws, ws_lse, out, lse, rows, ws.stride(0), ws_lse.stride(0),
            NUM_SPLITS=splits, HEAD_DIM=d, BLOCK_R=_COMBINE_BLOCK_R, INTERPRETER=INTERPRETED,
        )
    return out, lse


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
    check_qk(q, k, v)
    scale = check_scale(scale)
    q_offset, win = check_window(q_offset, window, q.shape[2])
    return _attention(q, k, v, scale=scale, mode=_MODE_WINDOW, q_offset=q_offset, window=win,
                      token_major=bool(token_major_out))


def prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, visible: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where query i sees keys 0 .. visible[i]-1 (the global stage), as `reference.prefix_attention`.

    visible: (Lq,) integer tensor on q's device, any order; counts < 0 or > Lk are clamped on the device.
    Returns out (B, Hq, Lq, D) in q.dtype and lse (B, Hq, Lq) float32.
    """
    check_qk(q, k, v)
    scale = check_scale(scale)
    check_tensor("visible", visible, 1)
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
        check_tensor(name, t, nd)
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != out_a.device:
            raise ValueError(f"{name} is on {t.device} but out_a is on {out_a.device}")
        if t.numel() and t.stride(-1) != 1 and nd == 4:
            raise ValueError(f"{name} must be contiguous in its last dimension; call .contiguous() first")
    if out_a.dtype not in DTYPES:
        raise ValueError(f"out_a must be float16, bfloat16 or float32, got {out_a.dtype}")
    check_device(out_a.device)
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
    with device_guard(out_a.device):
        _merge[(cdiv(rows, _COMBINE_BLOCK_R),)](
            out_a, lse_a, out_b, lse_b, out, lse, rows, h, seq, d,
            *out_a.stride()[:3], *out_b.stride()[:3], *lse_a.stride(), *lse_b.stride(),
            BLOCK_D=next_pow2(d), BLOCK_R=_COMBINE_BLOCK_R, INTERPRETER=INTERPRETED,
        )
    return out, lse
