"""`global_stage_into`: the device path's global stage of one execution block in one launch (the sinks, the
selected store blocks read where they lie through their ids, each query's remainder prefix), merged in place
into the block's local result. Knows nothing of how the blocks were selected or cached: the store, the ids
and the remainder arrive as tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inf_llm.kernels.launcher import DirectLauncher
from inf_llm.kernels.triton.common import (
    DTYPES,
    INTERPRETED,
    INTERPRETER_BLOCK,
    LN2,
    LOG2E,
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    attn_step,
    attn_tiles,
    cdiv,
    check_device,
    check_scale,
    check_tensor,
    device_guard,
    dot_precision,
    reduce_max,
    round_to,
)


@triton.jit
def _block_tile_step(
    acc, m_i, l_i, q, t, StoreK, StoreV, ids_ptr, stride_ik, zero_r, kvh64, stride_bn, stride_bh, stride_bt,
    stride_bvn, stride_bvh, stride_bvt, block_size, tiles_per_block, qk_scale,
    MASK_BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """`attn_step` over key tile t of the selected store blocks (block ids[t // tiles_per_block])."""
    j = t // tiles_per_block
    block = tl.load(ids_ptr + j * stride_ik).to(tl.int64)
    return attn_step(
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
    if INTERPRETER:  # see attn_tiles: no tensor-bounded range in the interpreter
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

    Grid (cdiv(G * Lq, BLOCK_M), Hkv); rows packed i * G + g as in `attention._attn_fwd_kernel`.
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

    acc, m_i, l_i = attn_tiles(  # sinks: every row sees all of them
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
    hi_max = reduce_max(tl.where(row_ok, hi_r, 0), 0, INTERPRETER)
    acc, m_i, l_i = attn_tiles(
        acc, m_i, l_i, q, RemK + kvh64 * stride_rh, RemV + kvh64 * stride_rvh, stride_rn, stride_rvn,
        zero_r, hi_r, n_rem, 0, hi_max, 0, 0, qk_scale,
        True, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )

    # merge with the local partial by log-sum-exp (natural log), in float32
    empty_g = l_i == 0.0
    l_safe = tl.where(empty_g, 1.0, l_i)
    lse_g = tl.where(empty_g, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
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
    tl.store(o_ptrs, round_to(merged, Out.dtype.element_ty, INTERPRETER), mask=row_ok[:, None])
    tl.store(l_ptrs, tl.where(empty, float("-inf"), m_use + tl.log(den_safe)), mask=row_ok)


# the op launches its kernel through this (see inf_llm.kernels.launcher)
_global_stage = DirectLauncher(_global_stage_kernel)


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
    scale = check_scale(scale) if check else float(scale)
    hq, lq, d = q.shape
    hkv = sink_k.shape[0]
    if check:
        named = (("q", q, 3), ("out", out, 3), ("sink_k", sink_k, 3), ("sink_v", sink_v, 3), ("store_k", store_k, 4),
                 ("store_v", store_v, 4), ("rem_k", rem_k, 3), ("rem_v", rem_v, 3))
        for name, t, nd in named:
            check_tensor(name, t, nd)
            if t.device != q.device or t.dtype != q.dtype:
                raise ValueError(f"{name} is {t.dtype} on {t.device}; expected {q.dtype} on {q.device} like q")
            if t.numel() and t.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in its last dimension; call .contiguous() first")
        check_tensor("lse", lse, 2)
        check_tensor("block_ids", block_ids, 2)
        if q.dtype not in DTYPES:
            raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
        check_device(q.device)
        if d & (d - 1) or not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
            raise ValueError(
                f"head dim {d} is not supported: need a power of two in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
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
    if INTERPRETED:
        block_m = block_n = INTERPRETER_BLOCK
        tiles = {}
    else:
        # fixed tiles (no autotuner dispatch on this per-execution-block launch): 64 x 64, 4 warps, 2 stages
        # took 64 us per Mistral-7B execution block on an H200, as 3 stages did; 128 x 64 and 8 warps 69-70,
        # 64 x 128 94, 4 stages 99 (benchmark/figures/gpu-h200-kernel-tuning/explore-kernels.json). float32
        # (tests) gets
        # 32 x 32: at D = 128 its 64 x 64 variant took minutes to compile
        block_m = block_n = 32 if q.dtype == torch.float32 else 64
        tiles = dict(num_warps=4, num_stages=2)
    grid = (cdiv(group * lq, block_m), hkv)
    with device_guard(q.device):
        _global_stage[grid](
            q, out, lse, sink_k, sink_v, store_k, store_v, block_ids, rem_k, rem_v,
            *q.stride()[:2], *out.stride()[:2], *lse.stride(),
            sink_k.stride(0), sink_k.stride(1), sink_v.stride(0), sink_v.stride(1),
            *store_k.stride()[:3], *store_v.stride()[:3],
            block_ids.stride(0), block_ids.stride(1),
            rem_k.stride(0), rem_k.stride(1), rem_v.stride(0), rem_v.stride(1),
            lq, sink_k.shape[1], block_ids.shape[1], block_size, rem_k.shape[1], int(rem_offset), scale * LOG2E,
            PER_HEAD=block_ids.shape[0] > 1, MASK_BLOCKS=block_size % block_n != 0, GROUP=group, HEAD_DIM=d,
            DOT_PRECISION=dot_precision(q.dtype), INTERPRETER=INTERPRETED, BLOCK_M=block_m, BLOCK_N=block_n,
            **tiles,
        )
