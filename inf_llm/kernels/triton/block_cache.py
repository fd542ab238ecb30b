"""Selected blocks brought to where attention reads them: `gather_blocks` (a gather by id from the device or
from pinned host memory, decoding fp8/int8 codes on the way), the device block cache's LRU bookkeeping
(`cache_blocks`: tags, stamps and counters in device tensors, no host sync) and the lookup's top-k
refinement (`refine_topk`), which `refine_and_cache` runs with that bookkeeping in one program. Knows nothing
of attention, nor of how blocks are formed and encoded (`formation`): the store, the cache and the formation
ring arrive as tensors.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from inf_llm.config import MAX_DEVICE_CACHED_BLOCKS
from inf_llm.kernels.launcher import DirectLauncher
from inf_llm.kernels.triton.common import (
    INTERPRETED,
    INTERPRETER_BLOCK,
    MAX_HEAD_DIM,
    cdiv,
    check_device,
    check_on_or_pinned,
    check_scales,
    check_tensor,
    check_tensors,
    device_guard,
    next_pow2,
    reduce_max,
    reduce_min,
    reduce_sum,
    round_to,
    scale_args,
)

_NEVER_USED = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # cache_blocks: the LRU key of slots no miss may take


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
                k = round_to(k.to(tl.float32) * k_scale[None, :], DstK.dtype.element_ty, INTERPRETER)
            tl.store(DstK + dst, k, mask=ok)
            src_v = block * stride_svn + h * stride_svh + t[:, None].to(tl.int64) * stride_svt + offs_d[None, :]
            dst_v = row * stride_dvn + h * stride_dvh + t[:, None].to(tl.int64) * stride_dvt + offs_d[None, :]
            v = tl.load(SrcV + src_v, mask=ok)
            if CODEC:
                v_scale = tl.load(ScaleV + block * stride_vsn + h * stride_vsh + t.to(tl.int64) * stride_vst,
                                  mask=t < BLOCK_SIZE, other=0.0)  # (BT,)
                v = round_to(v.to(tl.float32) * v_scale[:, None], DstV.dtype.element_ty, INTERPRETER)
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
    hit_slot = reduce_max(tl.where(match, cc[None, :], -1), 1, INTERPRETER)
    wanted = k_ok
    if PREFETCH:  # a repeat of an earlier id is left out
        ahead = (kk[None, :] < kk[:, None]) & (ids[None, :] == ids[:, None])
        wanted = k_ok & (reduce_max(ahead.to(tl.int32), 1, INTERPRETER) == 0)
    miss = wanted & (hit_slot < 0)
    held = reduce_max(match.to(tl.int32), 0, INTERPRETER) > 0  # slots a hit of this call keeps
    # least recently used first: empty slots (stamp -1), then older stamps, then lower slot numbers
    lru_key = tl.where(held | ~c_ok, _NEVER_USED, stamps * n_slots + cc)
    before = reduce_sum(tl.where((kk[None, :] < kk[:, None]) & miss[None, :], 1, 0), 1, INTERPRETER)  # misses ahead
    if PREFETCH:  # as many as there are slots to take
        miss = miss & (before < n_slots - reduce_sum(held.to(tl.int32), 0, INTERPRETER))
    slot = tl.where(wanted, hit_slot, -1)
    n_miss = reduce_sum(miss.to(tl.int64), 0, INTERPRETER)
    j = n_miss * 0
    while j < n_miss:  # the j-th miss takes the j-th least recently used slot (a lookup has few misses)
        least = reduce_min(lru_key, 0, INTERPRETER)
        victim = reduce_min(tl.where(lru_key == least, cc, BLOCK_C), 0, INTERPRETER)
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
    # interpreter cannot take a runtime bound in `range` (see common.attn_tiles), and nothing here pipelines.
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
        new = _score_id_keys(reduce_sum(acc, 1, INTERPRETER), block)
        cand = tl.where(is_new, new, tl.where(c < KP, run, none))
        run = tl.full([BLOCK_C], none, tl.int64)
        for j in range(K):
            best = reduce_max(cand, 0, INTERPRETER)
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


# the ops launch their kernels through these (see inf_llm.kernels.launcher)
_gather_blocks = DirectLauncher(_gather_blocks_kernel)
_cache_assign = DirectLauncher(_cache_assign_kernel)
_refine_topk = DirectLauncher(_refine_topk_kernel)


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
        check_tensor(name, t, 4)
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    check_tensor("block_ids", block_ids, 2)
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
    check_device(dst_k.device)
    if block_ids.device != dst_k.device or dst_v.device != dst_k.device:
        raise ValueError("block_ids, dst_k and dst_v must be on one device")
    check_on_or_pinned("src", src_k, src_v, dst_k.device)
    if d & (d - 1) or d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported: need a power of two <= {MAX_HEAD_DIM}")
    if n_sel == 0 or hkv == 0 or block_size == 0:
        return
    with device_guard(dst_k.device):
        _launch_gather(src_k, src_v, block_ids, dst_k, dst_v)


def _launch_gather(src_k, src_v, block_ids, dst_k, dst_v, dst_rows: torch.Tensor | None = None, ring=None,
                   scales=None) -> None:
    """`_gather_blocks_kernel` over (K, Hkv) for validated tensors: into rows 0..K-1 of dst, or into
    `dst_rows[j]` for each j with dst_rows[j] >= 0 (the shared top-k's misses of `cache_blocks`); `ring`
    (validated by `_check_ring`): the newest blocks from there; `scales` (k_scale, v_scale): src holds codes
    (`check_scales`)."""
    ring_k, ring_v, lo, hi = ring if ring is not None else (src_k, src_v, 0, 0)
    scale_ptrs, scale_strides = scale_args(scales, src_k)
    _gather_blocks[(block_ids.shape[1], dst_k.shape[1])](
        src_k, src_v, block_ids, dst_k, dst_v, dst_rows if dst_rows is not None else block_ids, ring_k, ring_v,
        *scale_ptrs,
        *src_k.stride()[:3], *src_v.stride()[:3], *block_ids.stride(),
        *dst_k.stride()[:3], *dst_v.stride()[:3], *scale_strides, lo, hi, ring_k.shape[0],
        PER_HEAD=block_ids.shape[0] > 1, INDIRECT=dst_rows is not None, HEAD_DIM=dst_k.shape[3],
        BLOCK_SIZE=dst_k.shape[2], BLOCK_T=INTERPRETER_BLOCK if INTERPRETED else 32, RING=ring is not None,
        CODEC=scales is not None, INTERPRETER=INTERPRETED,
    )


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
        check_tensor(name, t, 4)
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
        check_tensor("block_ids", block_ids, 2)
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
    with device_guard(cache_k.device):
        _cache_assign[(1,)](
            block_ids, tags, stamps, counters, placed, placed[1], block_ids.stride(1), n_slots,
            K=k, BLOCK_K=next_pow2(k), BLOCK_C=next_pow2(n_slots), PREFETCH=bool(prefetch),
            INTERPRETER=INTERPRETED,
            # a prefetch's (ids x slots) matrices: more threads hold them (4 warps would spill them)
            **({} if INTERPRETED else {"num_warps": 4 if next_pow2(k) * next_pow2(n_slots) <= 8192 else 16}),
        )
        _launch_gather(src_k, src_v, block_ids, cache_k, cache_v, dst_rows=placed[1], ring=ring, scales=scales)
    return placed[:1]


def _check_cache(src_k, src_v, cache_k, cache_v, tags, stamps, counters, k: int, prefetch: bool,
                 scales=None) -> None:
    """The store and the device cache of `cache_blocks` / `refine_and_cache`, for a selection of k blocks;
    with `scales`, a store of codes (`check_scales`)."""
    check_tensors((("src_k", src_k, 4), ("src_v", src_v, 4)), "src_k", src_k)
    check_tensors((("cache_k", cache_k, 4), ("cache_v", cache_v, 4), ("tags", tags, 1), ("stamps", stamps, 1),
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
        check_scales(scales, src_k, src_v, cache_k.device)
    elif src_k.dtype != cache_k.dtype or src_v.dtype != cache_v.dtype:
        raise ValueError(f"src ({src_k.dtype}) and cache ({cache_k.dtype}) dtypes differ")
    check_on_or_pinned("src", src_k, src_v, cache_k.device)
    if d & (d - 1) or d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported: need a power of two <= {MAX_HEAD_DIM}")
    check_device(cache_k.device)


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
    with device_guard(query.device):
        _launch_gather(src_k, src_v, found[:1], cache_k, cache_v, dst_rows=found[2], ring=ring, scales=scales)
    return found[:1], found[1:2]


def _check_refine(values, indices, query, reprs, first, k) -> None:
    check_tensors((("values", values, 2), ("indices", indices, 2), ("query", query, 2), ("reprs", reprs, 2)),
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
    check_device(query.device)


def _launch_refine(values, indices, query, reprs, first: int, k: int, out: torch.Tensor, cache=None) -> None:
    """`_refine_topk_kernel` for validated tensors into out (Hsel, k); `cache` (tags, stamps, counters, slots,
    fill): with the LRU bookkeeping of the ids found."""
    hsel, x = query.shape
    k0, n = values.shape[1], reprs.shape[0]
    kp = next_pow2(max(k0, k))
    block_c = max(128, 2 * kp)
    n_new = n - first
    tags, stamps, counters, slots, fill = cache if cache is not None else (out,) * 5  # unused without a cache
    n_slots = tags.shape[0] if cache is not None else 0
    with device_guard(query.device):
        _refine_topk[(hsel,)](
            values, indices, query, reprs, out, tags, stamps, counters, slots, fill,
            values.stride(0), indices.stride(0), query.stride(0), reprs.stride(0), out.stride(0),
            k0, first, n_new, max(cdiv(n_new, block_c - kp), 1), n_slots,
            X=x, K=int(k), KP=kp, BLOCK_C=block_c, BLOCK_X=min(64, next_pow2(x)),
            CACHE=cache is not None, BLOCK_K=next_pow2(k), BLOCK_S=next_pow2(max(n_slots, 1)),
            INTERPRETER=INTERPRETED, num_warps=4,
        )
