"""The decode step's ops: `decode_prologue` (a token's q and k rotated at a device angle, and k, v and the
rotated k written into the tail's column at a device index) and `decode_attention` (one decoding query over
global and window keys in one softmax, with the probability each window key receives), each with no host
sync so that a decode step can be replayed as a CUDA graph. Knows nothing of how the step is planned
(`inf_llm.memory.static_step`): buffers, offsets and counts arrive as tensors.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from inf_llm.kernels.launcher import DirectLauncher
from inf_llm.kernels.triton.common import (
    INTERPRETED,
    INTERPRETER_BLOCK,
    MAX_HEAD_DIM,
    MAX_SPLITS,
    MIN_HEAD_DIM,
    cdiv,
    check_device,
    check_scale,
    check_tensor,
    check_tensors,
    device_guard,
    dot_acc,
    next_pow2,
    reduce_max,
    reduce_sum,
    rotated_halves,
    round_to,
    sm_count,
)


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
        s = dot_acc(q, tl.trans(k), tl.full([BLOCK_G, BLOCK_N], 0, tl.float32), "ieee", INTERPRETER) * scale
        if t < tiles_glb:
            if HAS_BIAS:  # over the given global keys only
                s += tl.load(Bias + cols, mask=ok & (t < tiles_sink), other=0.0)[None, :]
        else:  # the window keys' scores, for the probabilities they receive
            w_ptrs = WinS + (h * GROUP + rows[:, None].to(tl.int64)) * n_loc + cols[None, :]
            tl.store(w_ptrs, s, mask=row_ok[:, None] & ok[None, :])
        s = tl.where(row_ok[:, None] & ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, reduce_max(s, 1, INTERPRETER))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        v = tl.load(v_ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
        l_i = l_i * alpha + reduce_sum(p, 1, INTERPRETER)
        acc = dot_acc(p, v, acc * alpha[:, None], "ieee", INTERPRETER)
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
             round_to(acc / den_safe[:, None], Out.dtype.element_ty, INTERPRETER), mask=row_ok[:, None])
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
        received = reduce_sum(tl.exp(s - tl.where(row_ok, lse, 0.0)[:, None]), 0, INTERPRETER)
        if ACCUMULATE:  # each program owns its head's row: no other program adds to these
            received += tl.load(r_base + cols, mask=ok, other=0.0)
        tl.store(r_base + cols, received, mask=ok)
        c0 += BLOCK_N


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
        o1, o2 = rotated_halves(x1, x2, c1, c2, s1, s2, QOut.dtype.element_ty, INTERPRETER)
        o_base = QOut + h.to(tl.int64) * stride_oh
        tl.store(o_base + d, o1)
        tl.store(o_base + HALF + d, o2)
    else:
        g = (h - n_q_heads).to(tl.int64)
        col = tl.load(Write).to(tl.int64)
        k1 = tl.load(K + g * stride_kh + d)
        k2 = tl.load(K + g * stride_kh + HALF + d)
        o1, o2 = rotated_halves(k1.to(tl.float32), k2.to(tl.float32), c1, c2, s1, s2,
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


# the ops launch their kernels through these (see inf_llm.kernels.launcher)
_decode_attn = DirectLauncher(_decode_attn_kernel)
_decode_combine = DirectLauncher(_decode_combine_kernel)
_decode_prologue = DirectLauncher(_decode_prologue_kernel)


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
    check_tensors((("q_loc", q_loc, 2), ("q_glb", q_glb, 2), ("k_loc", k_loc, 3), ("v_loc", v_loc, 3),
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
    if d & (d - 1) or not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported: need a power of two in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if global_bias is not None and (global_bias.shape != (n_glb,) or global_bias.dtype != torch.float32
                                    or global_bias.device != q_loc.device):
        raise ValueError(f"global_bias must be ({n_glb},) float32 on {q_loc.device}")
    if received_into is not None and (received_into.shape != (hkv, rows) or received_into.dtype != torch.float32
                                      or received_into.device != q_loc.device or received_into.stride(-1) != 1):
        raise ValueError(f"received_into must be ({hkv}, {rows}) float32 on {q_loc.device}, contiguous in its "
                         f"last dimension")
    check_device(q_loc.device)
    store_k, store_v, block_ids, block_size = _check_decode_blocks(blocks, k_glb)
    rem_k, rem_v, rem_start, rem_slots, rem_live = _check_decode_remainder(remainder, k_glb)
    group = hq // hkv
    block_n = INTERPRETER_BLOCK if INTERPRETED else 64
    tiles_sink = cdiv(n_glb, block_n)
    tiles_per_block = cdiv(block_size, block_n)
    tiles_blocks = block_ids.shape[1] * tiles_per_block if blocks is not None else 0
    tiles_glb = tiles_sink + tiles_blocks + cdiv(rem_slots, block_n)
    n_tiles = tiles_glb + cdiv(n_loc, block_n)
    want = min(MAX_SPLITS, cdiv(2 * sm_count(q_loc.device), hkv))
    per_split = cdiv(n_tiles, min(want, n_tiles))
    splits = cdiv(n_tiles, per_split)
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
    block_g = max(16, next_pow2(group))  # tl.dot needs 16 rows
    loc_start = start if start is not None else lse  # a placeholder pointer without a window offset
    with device_guard(dev):
        _decode_attn[(splits, hkv)](
            q_loc, q_glb, k_loc, v_loc, k_glb, v_glb, global_bias if global_bias is not None else lse,
            part_o, part_m, part_l, win_s, loc_start,
            store_k, store_v, block_ids, rem_k, rem_v, rem_start, rem_live,
            q_loc.stride(0), q_glb.stride(0), k_loc.stride(0), k_loc.stride(1), v_loc.stride(0), v_loc.stride(1),
            k_glb.stride(0), k_glb.stride(1), v_glb.stride(0), v_glb.stride(1),
            *store_k.stride()[:3], *store_v.stride()[:3], *rem_k.stride()[:2], *rem_v.stride()[:2],
            n_loc, n_glb, tiles_sink, tiles_blocks, tiles_per_block, block_size, tiles_glb, n_tiles, per_split,
            splits, check_scale(scale),
            GROUP=group, BLOCK_G=block_g, HEAD_DIM=d, BLOCK_N=block_n, HAS_BIAS=global_bias is not None,
            HAS_START=start is not None, INTERPRETER=INTERPRETED,
        )
        _decode_combine[(hkv,)](
            part_o, part_m, part_l, win_s, out, lse, received, loc_start, received.stride(0), n_loc, splits, hkv,
            GROUP=group, BLOCK_G=block_g, HEAD_DIM=d, BLOCK_N=block_n,
            # a fresh `received` holds the window's rows only; `received_into` all of the buffers' rows
            HAS_START=start is not None and received_into is not None,
            ACCUMULATE=received_into is not None, INTERPRETER=INTERPRETED,
        )
    return out, lse, received


def _check_decode_blocks(blocks, k_glb: torch.Tensor) -> tuple:
    """`decode_attention`'s blocks: (store_k, store_v, ids, block size); placeholders (k_glb) without."""
    if blocks is None:
        return k_glb, k_glb, k_glb, 1
    store_k, store_v, ids = blocks
    hkv, d = k_glb.shape[0], k_glb.shape[2]
    check_tensors((("store_k", store_k, 4), ("store_v", store_v, 4)), "k_glb", k_glb)
    check_tensor("block ids", ids, 2)
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
    check_tensors((("rem_k", rem_k, 3), ("rem_v", rem_v, 3)), "k_glb", k_glb)
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
    check_tensors((("q", q, 3), ("k", k, 3), ("v", v, 3), ("cos", cos, 2), ("sin", sin, 2)), "q", q)
    check_tensors((("tail_k", tail_k, 3), ("tail_v", tail_v, 3), ("tail_k_rot", tail_k_rot, 3)), "q", q)
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
    check_device(q.device)
    q_out = torch.empty((hq, 1, d), dtype=q.dtype, device=q.device)
    with device_guard(q.device):
        _decode_prologue[(hq + hkv,)](
            q, k, v, cos, sin, angle, write, q_out, tail_k, tail_v, tail_k_rot, tail_score,
            q.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0), q_out.stride(0),
            *tail_k.stride()[:2], *tail_v.stride()[:2], *tail_k_rot.stride()[:2], tail_score.stride(0), hq,
            HALF=d // 2, INTERPRETER=INTERPRETED,
        )
    return q_out
