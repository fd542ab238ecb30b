"""`window_key_scores`: the probability mass each key of the local stage receives under the final lse (what
the memory adds up into its block scores), with its kernel, its autotuning configs and the tuned configs it
then launches directly. Knows nothing of blocks: it scores keys, the memory decides what they are for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inf_llm.kernels.launcher import DirectLauncher
from inf_llm.kernels.triton.common import (
    INTERPRETED,
    INTERPRETER_BLOCK,
    LOG2E,
    MAX_POSITION,
    cdiv,
    check_qk,
    check_scale,
    check_tensor,
    check_window,
    device_guard,
    dot_acc,
    dot_precision,
    next_pow2,
    prune_configs,
    reduce_sum,
)


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
    s = dot_acc(k, tl.trans(q), tl.full([BLOCK_N, BLOCK_M], 0, tl.float32), DOT_PRECISION, INTERPRETER) * qk_scale
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
    one loop for both masked edges as in `common.attn_tiles`, added elementwise into acc (BN, BM): the sum over
    the rows waits for the end of the kernel (a per-tile row sum crosses warps; deferred it cost 67 us per
    Mistral-7B execution block on an H200 instead of 89 us)."""
    n_a = (tl.maximum(end_a - start_a, 0) + BLOCK_M - 1) // BLOCK_M
    n_b = (tl.maximum(end_b - start_b, 0) + BLOCK_M - 1) // BLOCK_M
    if INTERPRETER:  # see common.attn_tiles: no tensor-bounded range in the interpreter
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
    acc = reduce_sum(acc, 1, INTERPRETER)  # (BN,)
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
    prune_configs_by={"early_config_prune": prune_configs},
    restore_value=["Out"],  # tuning runs the kernel several times: accumulated scores must not add up
    cache_results=True,
)(_window_key_scores_kernel)


# the op launches its kernel through this (see inf_llm.kernels.launcher)
_window_key_scores = DirectLauncher(_window_key_scores_kernel)


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
        check_qk(q, k, None)
    scale = check_scale(scale) if check else float(scale)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    q_offset, win = check_window(q_offset, window, lq)
    if check:
        check_tensor("lse", lse, 3)
        if lse.shape != (b, hq, lq):
            raise ValueError(f"lse has shape {tuple(lse.shape)}, expected {(b, hq, lq)}")
        if not lse.dtype.is_floating_point:
            raise ValueError(f"lse must be a floating tensor, got {lse.dtype}")
        if lse.device != q.device:
            raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
        if lk > MAX_POSITION:
            raise ValueError(f"k has {lk} keys, more than {MAX_POSITION}")
    if into is not None:
        if check:
            check_tensor("into", into, 3)
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
        hkv, lq, lk, q_offset, win, scale * LOG2E,
    )
    const = dict(GROUP=group, HEAD_DIM=d, DOT_PRECISION=dot_precision(q.dtype), INTERPRETER=INTERPRETED,
                 ACCUMULATE=into is not None)
    with device_guard(q.device):
        if INTERPRETED:
            grid = (cdiv(lk, INTERPRETER_BLOCK), b * hkv)
            _window_key_scores[grid](
                *args, 0, BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK, **const
            )
        else:
            tune_rows = next_pow2(min(group * lq, 8192))
            key = (tune_rows, d, group, q.dtype, k.dtype, lse.dtype, out.dtype)
            best = _WINDOW_SCORES_CONFIGS.get(key)
            if best is None:
                grid = lambda meta: (cdiv(lk, meta["BLOCK_N"]), b * hkv)  # noqa: E731
                _window_key_scores_tuned[grid](*args, tune_rows, **const)
                _WINDOW_SCORES_CONFIGS[key] = _window_key_scores_tuned.best_config.all_kwargs()
            else:  # the tuned launch without the autotuner's per-call dispatch (~30 us of host time)
                grid = (cdiv(lk, best["BLOCK_N"]), b * hkv)
                _window_key_scores[grid](*args, tune_rows, **const, **best)
    return out
