"""Reference attention ops (torch): the specification the Triton kernels are checked against, and the
path that runs on CPU. Tensor in, tensor out: nothing here knows about memory blocks or transformers.

Shapes: q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D) with Hq = G * Hkv (GQA: query head h reads KV head h // G).
Every op returns the attention output in q's dtype and the log-sum-exp of the scaled scores in float32,
so that partial results over disjoint key sets merge exactly into one softmax (`merge_partials`).
A query with no visible key gets output 0 and lse -inf (it contributes nothing to a merge).
The `check` argument of the ops the context memory calls per execution block exists for signature parity
with the Triton ops (which then skip their argument checks); torch checks what it needs here.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
# Below this many query rows per KV head (decoding), a plain matmul-softmax beats the CPU flash kernel,
# whose masked path costs ~6x more for a single query (measured: 11.5 ms vs 1.8 ms over 2K keys).
SMALL_QUERY_ROWS = 32
# Queries per windowed_attention call that ContextMemory should use: None = one execution block. These ops
# compute every (query, key) pair of a call, so a call over many execution blocks would also score the keys
# outside each query's window (a 2048-query call over a 512-token window: 4x the work).
LOCAL_STAGE_ROWS = None


def _fold_groups(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, Hq, Lq, D) -> (B, Hkv, G*Lq, D): GQA without copying K/V (the group joins the query axis)."""
    b, hq, lq, d = q.shape
    return q.reshape(b, num_kv_heads, (hq // num_kv_heads) * lq, d)


def _unfold_groups(x: torch.Tensor, num_q_heads: int, lq: int) -> torch.Tensor:
    """Inverse of `_fold_groups` for outputs (B, Hkv, G*Lq, ...) -> (B, Hq, Lq, ...)."""
    return x.reshape(x.shape[0], num_q_heads, lq, *x.shape[3:])


def window_mask(lq: int, lk: int, q_offset: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Bool (Lq, Lk): query i (position q_offset + i) sees key j iff j <= pos and j > pos - window."""
    q_pos = torch.arange(lq, device=device).unsqueeze(1) + q_offset
    k_pos = torch.arange(lk, device=device).unsqueeze(0)
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    return visible


def prefix_mask(visible: torch.Tensor, lk: int) -> torch.Tensor:
    """Bool (Lq, Lk) from per-query counts `visible` (Lq,): query i sees keys 0 .. visible[i]-1."""
    return torch.arange(lk, device=visible.device).unsqueeze(0) < visible.unsqueeze(1)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, scale: float,
    empty_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k/v with a bool mask (Lq, Lk) shared by all heads -> (out, lse).

    out (B, Hq, Lq, D) in q.dtype; lse (B, Hq, Lq) float32, -inf for rows with no visible key.
    empty_rows: optional (Lq,) bool of rows that see no key, when the caller knows it cheaply.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if lk == 0 or lq == 0:
        return q.new_zeros(q.shape), torch.full((b, hq, lq), NEG_INF, dtype=torch.float32, device=q.device)
    group = hq // hkv
    qf = _fold_groups(q, hkv)  # (B, Hkv, G*Lq, D)
    mask_g = mask.repeat(group, 1)  # (G*Lq, Lk): the same rows for every head of the group
    empty_rows = ~mask.any(dim=-1) if empty_rows is None else empty_rows
    empty_rows = empty_rows.repeat(group)  # (G*Lq,)
    if q.device.type == "cpu" and qf.shape[2] > SMALL_QUERY_ROWS:
        # The CPU flash kernel returns the log-sum-exp; 3x faster than an explicit softmax for prefill.
        bias = torch.zeros(mask_g.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask_g, NEG_INF)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qf, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
    else:
        out, lse = _explicit_attention(qf, k, v, mask_g, scale)
    if bool(empty_rows.any()):  # host sync: only on the (rare) fully-masked rows path
        lse = lse.masked_fill(empty_rows, NEG_INF)
        out = out.masked_fill(empty_rows.unsqueeze(-1), 0.0)
    return _unfold_groups(out, hq, lq), _unfold_groups(lse.float(), hq, lq)


def _explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention in float32 (any device). q (B, H, L, D), k/v (B, H, Lk, D), mask (L, Lk)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, L, Lk)
    scores = scores.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, L)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    probs = probs.masked_fill(~mask, 0.0)
    return torch.matmul(probs, v.float()).to(q.dtype), lse


def windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_offset: int, window: int | None,
    token_major_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sliding-window attention (the local stage).

    Query i sits at position q_offset + i, key j at position j; query i sees key j iff
    j <= q_offset + i and (window is None or j > q_offset + i - window). Returns (out, lse).
    `token_major_out`: out (B, Hq, Lq, D) is a view of (B, Lq, Hq, D) storage, so that out.transpose(1, 2),
    the layout transformers reshapes the attention output from, is contiguous (no copy there). Same values.
    """
    if _causal_prefix_case(q, k, q_offset, window):
        out, lse = _causal_with_prefix(q, k, v, scale=scale, q_offset=q_offset)
    else:
        mask = window_mask(q.shape[2], k.shape[2], q_offset, window, q.device)
        # query i sees keys lo..hi: empty exactly when lo > hi (cheaper than scanning the mask)
        pos = torch.arange(q.shape[2], device=q.device) + q_offset
        lo = torch.zeros_like(pos) if window is None else (pos - window + 1).clamp_min(0)
        hi = pos.clamp_max(k.shape[2] - 1)
        out, lse = masked_attention(q, k, v, mask, scale=scale, empty_rows=lo > hi)
    if token_major_out:
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return out, lse


def _causal_prefix_case(q: torch.Tensor, k: torch.Tensor, q_offset: int, window: int | None) -> bool:
    """The window reaches every key (full attention, or a window as wide as the conversation) and the keys
    end at the last query: on a CPU the attention is then a prefix every query sees whole, plus a causal
    square, two flash calls that skip the masked half instead of one over an explicit (Lq, Lk) mask."""
    lq, lk, group = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    return (q.device.type == "cpu" and lq > 1 and lq * group > SMALL_QUERY_ROWS and lk == q_offset + lq
            and (window is None or window >= lk))


def _causal_with_prefix(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`windowed_attention` where query i sees keys 0 .. q_offset + i (see `_causal_prefix_case`)."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # the square: causal rows need one query head per key head (the K/V copy is Lq rows, not Lk)
    k_sq, v_sq = k[:, :, q_offset:], v[:, :, q_offset:]
    if group > 1:
        k_sq, v_sq = k_sq.repeat_interleave(group, dim=1), v_sq.repeat_interleave(group, dim=1)
    out, lse = flash(q, k_sq, v_sq, 0.0, True, scale=scale)
    if q_offset == 0:
        return out, lse.float()
    # the prefix: every query sees every key, so the group's queries stack on one key head (no K/V copy)
    out_p, lse_p = flash(_fold_groups(q, hkv), k[:, :, :q_offset], v[:, :, :q_offset], 0.0, False, scale=scale)
    return merge_partials(out, lse.float(), _unfold_groups(out_p, hq, lq), _unfold_groups(lse_p.float(), hq, lq))


def prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, visible: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where query i sees the first visible[i] keys (the global stage: memory blocks first,
    then sinks and remainder in position order, so "out of my local window" is a prefix).

    visible: (Lq,) int64 on q's device, non-decreasing is not required. Returns (out, lse).
    """
    return masked_attention(q, k, v, prefix_mask(visible, k.shape[2]), scale=scale,
                            empty_rows=visible.clamp(0, k.shape[2]) <= 0)


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention partials over disjoint key sets into the result of one softmax.

    out_* (B, H, L, D), lse_* (B, H, L) float32. Returns (out in out_a.dtype, lse float32).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)  # exp(-inf) = 0 for an empty partial
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    out = out_a.float() * w_a + out_b.float() * w_b
    return out.to(out_a.dtype), lse


def gather_blocks(
    src_k: torch.Tensor, src_v: torch.Tensor, block_ids: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor
) -> None:
    """dst[j, h] = src[block_ids[h or 0, j], h] for K and V: the selected store blocks into device slots.

    src_k/v (N, Hkv, block_size, D) (the store, possibly on the host), block_ids (1 or Hkv, K) int,
    dst_k/v (K, Hkv, block_size, D) (any strides). Here through the host when src is elsewhere (the Triton
    op reads pinned host memory from the GPU instead).
    """
    hkv = dst_k.shape[1]
    ids = block_ids.to(src_k.device).expand(hkv, -1)  # (Hkv, K)
    heads = torch.arange(hkv, device=src_k.device).unsqueeze(1)
    dst_k.copy_(src_k[ids, heads].transpose(0, 1))  # (Hkv, K, bs, D) -> (K, Hkv, bs, D)
    dst_v.copy_(src_v[ids, heads].transpose(0, 1))


def cache_blocks(
    src_k: torch.Tensor, src_v: torch.Tensor, block_ids: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
    tags: torch.Tensor, stamps: torch.Tensor, counters: torch.Tensor, prefetch: bool = False, ring=None,
    check: bool = True, scales=None,
) -> torch.Tensor:
    """Make the selected blocks resident in a device cache with LRU eviction, bookkept on the device, and
    return the slot of each (1, K) int64, for `global_stage_into` / `gather_blocks` over the cache.

    src_k/v (N, Hkv, block_size, D): the store (pinned host memory for the Triton op); block_ids (1, K) int,
    distinct, >= 0; cache_k/v (C, Hkv, block_size, D) with C >= K; tags (C,) int64: the block each slot
    holds (-1: empty); stamps (C,) int64: the clock value of its last use; counters (4,) int64: the clock
    (one tick per call), the blocks requested, the misses among them, and the blocks prefetched. A selected
    block already in a slot keeps it (a hit); each miss takes the least recently used slot that no hit of
    this call holds (empty ones first, then lower stamps, then lower slot numbers), and is copied there from
    the store. `prefetch`: blocks read ahead of the lookups that will want them: ids may repeat (a repeat
    gets slot -1) and outnumber the slots (misses beyond the free ones get -1); counted as prefetched.
    `ring` (ring_k, ring_v, lo, hi): device slots (R, Hkv, block_size, D) holding blocks lo <= id < hi at
    slot id % R (the newest blocks, whose copy to the store may still be under way): read from there.
    `scales` (k_scale (N, Hkv, 1, D), v_scale (N, Hkv, bs, 1), float32): src holds fp8/int8 codes (an
    `offload_dtype` store), decoded as codes * scale in float32, rounded to the cache's dtype
    (`BlockCodec.decode_into`). Not together with `ring`.
    """
    if scales is not None and ring is not None:
        raise ValueError("ring and scales together are not supported: a store of codes has no formation ring")
    ids = block_ids[0].to(tags.device, torch.int64)  # (K,)
    n_slots, k = tags.shape[0], ids.shape[0]
    slot_range = torch.arange(n_slots, device=tags.device)
    match = ids[:, None] == tags[None, :]  # (K, C)
    hit_slot = torch.where(match, slot_range, -1).amax(1) if n_slots else torch.full_like(ids, -1)
    wanted = torch.ones_like(ids, dtype=torch.bool)
    if prefetch:  # first occurrences only
        wanted = ~torch.tril(ids[:, None] == ids[None, :], diagonal=-1).any(1)
    miss = wanted & (hit_slot < 0)
    held = match.any(0)
    lru_key = torch.where(held, torch.iinfo(torch.int64).max, stamps * n_slots + slot_range)
    before = torch.cumsum(miss, 0) - miss.long()  # misses ahead of each miss
    if prefetch:
        miss &= before < n_slots - int(held.sum())
    victims = lru_key.topk(min(k, n_slots), largest=False).indices  # ascending: the j-th miss takes victims[j]
    slots = torch.where(wanted, hit_slot, -1)
    slots[miss] = victims[before[miss]]
    placed = slots >= 0
    clock = counters[0].clone()
    tags[slots[placed]] = ids[placed]
    stamps[slots[placed]] = clock
    counters[0] += 1
    if prefetch:
        counters[3] += miss.sum()
    else:
        counters[1] += k
        counters[2] += miss.sum()
    fill, fetch = slots[miss], ids[miss]
    ring_k, ring_v, lo, hi = ring if ring is not None else (None, None, 0, 0)
    in_ring = (fetch >= lo) & (fetch < hi)
    scale_k, scale_v = scales if scales is not None else (None, None)
    for cache, src, ring_src, scale in ((cache_k, src_k, ring_k, scale_k), (cache_v, src_v, ring_v, scale_v)):
        blocks = src.index_select(0, fetch.to(src.device)).to(cache.device)
        if scale is not None:
            decoded = blocks.float().mul_(scale.index_select(0, fetch.to(scale.device)).to(cache.device))
            blocks = decoded.to(cache.dtype)  # rounded once, as BlockCodec.decode_into's copy
        if ring_src is not None:
            blocks[in_ring] = ring_src[fetch[in_ring] % ring_src.shape[0]]
        cache[fill] = blocks
    return slots[None]


def refine_topk(
    values: torch.Tensor, indices: torch.Tensor, query: torch.Tensor, reprs: torch.Tensor, first: int, k: int,
    check: bool = True,
) -> torch.Tensor:
    """Top-k block ids (Hsel, k), int64, among an earlier top-k and the blocks formed since.

    values/indices (Hsel, k0): the top-k0 scores and ids of blocks [0, first), scored earlier in a batch;
    query (Hsel, X) float32: the lookup vector; reprs (N, Hsel * X) float32: representatives, rows
    [first, N) are scored here (row n's head h is the slice [h * X, (h + 1) * X)). The overall top-k lies
    inside (earlier top-k0) + (new blocks), so this equals a top-k over all N blocks when k <= k0, up to
    ties; ids come in score order. Needs k <= k0 + N - first.
    """
    hsel, x = query.shape
    new = reprs[first:].view(-1, hsel, x)  # (n_new, Hsel, X)
    scores = torch.einsum("hx,nhx->hn", query, new)
    new_ids = torch.arange(first, first + new.shape[0], device=indices.device).expand(hsel, -1)
    candidates = torch.cat([values, scores], dim=-1)
    return torch.cat([indices, new_ids], dim=-1).gather(-1, candidates.topk(k, dim=-1).indices)


def refine_and_cache(
    values: torch.Tensor, indices: torch.Tensor, query: torch.Tensor, reprs: torch.Tensor, first: int, k: int,
    src_k: torch.Tensor, src_v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
    tags: torch.Tensor, stamps: torch.Tensor, counters: torch.Tensor, ring=None, check: bool = True, scales=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`refine_topk` of a shared top-k (query (1, X)), then `cache_blocks` of the ids it finds (`ring` and
    `scales` as there): returns (ids, slots), each (1, k) int64 (offload_access: direct looks up and makes
    resident in one step)."""
    ids = refine_topk(values, indices, query, reprs, first, k)
    return ids, cache_blocks(src_k, src_v, ids, cache_k, cache_v, tags, stamps, counters, ring=ring, scales=scales)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE: `x * cos + rotate_half(x) * sin` for x (H, L, D) and cos/sin (L, D), or (1, D) for one angle for
    every row, in x's dtype exactly as transformers computes it, without materialising rotate_half (same
    roundings: a + (-b)c = a - bc). Written into `out` (x's shape, not overlapping x) when given."""
    half = x.shape[-1] // 2
    out = torch.mul(x, cos, out=out) if out is not None else x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


def decode_prologue(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, angle: torch.Tensor,
    write: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor, tail_k_rot: torch.Tensor,
    tail_score: torch.Tensor,
) -> torch.Tensor:
    """The static decode step's first part: q (Hq, 1, D) and k (Hkv, 1, D) rotated to row `angle` of cos/sin
    (`rotate`'s roundings); k, v and the rotated k written into column `write` of the tail's (Hkv, R, D)
    buffers and that column's score (Hkv, R) zeroed. `angle` and `write` are int64 (1,) tensors on the device
    (a replayed CUDA graph reads each step's). Returns the rotated q (Hq, 1, D)."""
    qk = rotate(torch.cat((q, k)), cos.index_select(0, angle), sin.index_select(0, angle))
    hq = q.shape[0]
    tail_k.index_copy_(1, write, k)
    tail_v.index_copy_(1, write, v)
    tail_k_rot.index_copy_(1, write, qk[hq:])
    tail_score.index_fill_(1, write, 0.0)
    return qk[:hq]


def block_representatives(keys: torch.Tensor, scores: torch.Tensor, repr_topk: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, Hr, D) in `dtype`: per block and score head, the mean of the `repr_topk` keys (Hkv, n, bs, D) with
    the highest scores (Hr, n, bs). Hr = Hkv: one representative per KV head; Hr = Hq (a multiple of Hkv):
    one per query head h, from its own scores over the keys of its KV head h // (Hq / Hkv)."""
    group = scores.shape[0] // keys.shape[0]
    if group > 1:  # per query head: each reads its KV head's keys
        keys = keys.repeat_interleave(group, dim=0)  # (Hq, n, bs, D)
    best = scores.topk(repr_topk, dim=-1).indices  # (Hr, n, repr_topk)
    chosen = keys.gather(2, best.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))  # (Hr, n, repr_topk, D)
    return chosen.mean(dim=2, dtype=dtype).transpose(0, 1)


# offload_dtype's codes and the largest magnitude each holds
CODE_MAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}


def encode_codes(x: torch.Tensor, dtype: torch.dtype, keys: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks x (n, Hkv, bs, D) -> (codes in `dtype`, fp8 e4m3 or int8; float32 scales broadcastable to x):
    keys scaled per channel over a block's tokens (n, Hkv, 1, D), values per token (n, Hkv, bs, 1). The
    encoding of `offload_dtype` (`BlockCodec.encode`), here so that `form_blocks` and its kernel share it."""
    max_code = CODE_MAX[dtype]
    xf = x.float()
    amax = xf.abs().amax(dim=2 if keys else 3, keepdim=True)
    # times the reciprocal, not divided: what torch computes on CUDA for a tensor over a Python number (and
    # so the same bits on every device and in the Triton kernel)
    scale = (amax * (1.0 / max_code)).clamp_min(torch.finfo(torch.float32).tiny)
    scaled = xf / scale
    if dtype == torch.int8:
        return scaled.round_().clamp_(-max_code, max_code).to(torch.int8), scale
    return scaled.to(dtype), scale  # |scaled| <= 448 (up to its rounding): inside e4m3's range


def form_blocks(
    keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, repr_topk: int,
    dst_k: torch.Tensor, dst_v: torch.Tensor, dst_repr: torch.Tensor, check: bool = True, scales=None,
) -> None:
    """New memory blocks into the store: dst_k/dst_v (n, Hkv, bs, D) = keys/values (Hkv, n, bs, D), and
    dst_repr (n, Hr, D) = per block and head the mean (in dst_repr's dtype) of the `repr_topk` keys with the
    highest scores (Hr, n, bs) (`block_representatives`: Hr = Hkv, or Hq for a representative per query
    head; the Triton op takes Hr = Hkv only). `scales` (k_scale (n, Hkv, 1, D), v_scale (n, Hkv, bs, 1), float32): dst_k/
    dst_v hold fp8/int8 codes, written with their scales as `encode_codes` makes them."""
    dst_repr.copy_(block_representatives(keys, scores, repr_topk, dst_repr.dtype))
    if scales is None:
        dst_k.copy_(keys.transpose(0, 1))
        dst_v.copy_(values.transpose(0, 1))
        return
    for dst, scale_dst, x, is_keys in ((dst_k, scales[0], keys, True), (dst_v, scales[1], values, False)):
        codes, scale = encode_codes(x.transpose(0, 1), dst.dtype, keys=is_keys)
        dst.copy_(codes)
        scale_dst.copy_(scale)


def global_stage_into(
    q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    sink_k: torch.Tensor, sink_v: torch.Tensor,
    store_k: torch.Tensor, store_v: torch.Tensor, block_ids: torch.Tensor,
    rem_k: torch.Tensor, rem_v: torch.Tensor, *, rem_offset: int, scale: float, check: bool = True,
) -> None:
    """The global stage of one execution block, merged in place into its local-stage result (one sequence,
    no batch dimension: the memory's own layout, so no staging copy is needed).

    q (Hq, Lq, D): the queries at the global angle. out (Hq, Lq, D) / lse (Hq, Lq) float32: the local
    stage's partials, overwritten with the merged softmax. Keys, in this order: the sinks sink_k/v
    (Hkv, S, D) and the blocks `block_ids` (Hsel, K) of the store store_k/v (N, Hkv, block_size, D), seen by
    every query (Hsel 1: the same blocks for all heads; Hsel = Hkv: each KV head its own), then the
    remainder rem_k/v (Hkv, R, D), of which query i sees the first clamp(i + rem_offset, 0, R).
    Equals `prefix_attention` over the concatenated keys followed by `merge_partials`.
    """
    hkv, lq = sink_k.shape[0], q.shape[1]
    n_sel, bs, d = block_ids.shape[1], store_k.shape[2], store_k.shape[3]
    blocks_k = torch.empty(hkv, n_sel, bs, d, dtype=store_k.dtype, device=q.device)  # (Hkv, K, bs, D)
    blocks_v = torch.empty_like(blocks_k)
    gather_blocks(store_k, store_v, block_ids, blocks_k.transpose(0, 1), blocks_v.transpose(0, 1))
    keys = torch.cat((sink_k, blocks_k.flatten(1, 2), rem_k), dim=1)  # [sinks | K * bs block keys | remainder]
    values = torch.cat((sink_v, blocks_v.flatten(1, 2), rem_v), dim=1)
    always = sink_k.shape[1] + n_sel * bs
    visible = always + (torch.arange(lq, device=q.device) + rem_offset).clamp(0, rem_k.shape[1])
    out_g, lse_g = prefix_attention(q[None], keys[None], values[None], scale=scale, visible=visible)
    merged, merged_lse = merge_partials(out[None], lse[None], out_g, lse_g)
    out.copy_(merged[0])
    lse.copy_(merged_lse[0])


def decode_attention(
    q_loc: torch.Tensor, k_loc: torch.Tensor, v_loc: torch.Tensor,
    q_glb: torch.Tensor, k_glb: torch.Tensor, v_glb: torch.Tensor, *, scale: float,
    global_bias: torch.Tensor | None = None, window: tuple[torch.Tensor, int] | None = None,
    received_into: torch.Tensor | None = None, blocks: tuple | None = None, remainder: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query that sees every key it is given: the decoding step of both stages in one softmax.

    q_loc/q_glb (Hq, D): the query at its local and its global angle; k_loc/v_loc (Hkv, Ll, D) the window,
    k_glb/v_glb (Hkv, Lg, D) the global keys (Lg may be 0). Equals `windowed_attention` + `prefix_attention`
    + `merge_partials` + `window_key_scores` for a single query, in a handful of small ops instead of ~60
    (decoding on a CPU is bound by op count, not arithmetic). Returns out (Hq, D) in q's dtype, lse (Hq,)
    float32 and the probability each window key receives, summed over its group's query heads (Hkv, Ll).
    `global_bias` (Lg,) float32, added to the scaled global scores: -inf hides a global key (the static decode
    step's fixed-size remainder slots past the live ones). `window` (start, length): k_loc/v_loc are whole
    buffers (Hkv, R, D) and the window is their rows [start, start + length), `start` an int64 (1,) tensor on
    their device (read there, so a CUDA graph replays each step's window; the caller keeps start + length
    <= R). `received_into` (Hkv, R) float32: the probabilities are added to it at the window's rows (rows
    [0, Ll) without `window`), and it is returned in place of `received`; (Hq, R) (GQA): each query head's
    own probability, not summed over the group (`lookup_heads: query`; the Triton op takes (Hkv, R) only). The global keys are k_glb's,
    then with `blocks` (store_k, store_v, ids) the blocks `ids` (1, K) names in a store (N, Hkv, bs, D), then
    with `remainder` (rem_k, rem_v, start, slots, live) rows [start, start + slots) of (Hkv, R, D) buffers,
    of which the first `live` are seen (start and live: int64 (1,) tensors on the device, as `window`'s):
    the static decode step's [sinks | selected blocks | remainder], read where they lie.
    """
    if blocks is not None or remainder is not None:
        k_glb, v_glb, global_bias = _joined_global_keys(k_glb, v_glb, global_bias, blocks, remainder)
    rows = None
    if window is not None:
        start, length = window
        rows = torch.arange(length, device=k_loc.device) + start  # on the device: no host read of start
        k_loc, v_loc = k_loc.index_select(1, rows), v_loc.index_select(1, rows)
    hkv, lg = k_loc.shape[0], k_glb.shape[1]
    group = q_loc.shape[0] // hkv
    q_g = q_glb.float().view(hkv, group, -1)  # (Hkv, G, D): GQA without copying K/V
    q_l = q_loc.float().view(hkv, group, -1)
    # K/V are read where they lie (no concatenated copy; `.float()` is free when the memory keeps them in
    # float32, as it does on CPUs): only the score rows are joined, for the one softmax
    scores = torch.cat((q_g @ k_glb.float().transpose(1, 2), q_l @ k_loc.float().transpose(1, 2)), dim=-1)
    scores.mul_(scale)
    if global_bias is not None:
        scores[..., :lg] += global_bias
    probs = torch.softmax(scores, dim=-1)  # (Hkv, G, Lg+Ll): [global | window]
    # lse from the largest probability, p_max = exp(max - lse): same value to rounding, half the time of
    # logsumexp + subtract + exp on a CPU (finite: the window is never empty)
    lse = scores.amax(dim=-1, keepdim=True) - probs.amax(dim=-1, keepdim=True).log()  # (Hkv, G, 1)
    out = torch.baddbmm(probs[..., lg:] @ v_loc.float(), probs[..., :lg], v_glb.float())  # window + global
    out = out.view(hkv * group, -1).to(q_loc.dtype)
    if received_into is not None and received_into.shape[0] == hkv * group != hkv:  # per query head
        received = probs[..., lg:].reshape(hkv * group, -1)  # (Hq, Ll)
    else:
        received = probs[..., lg:].sum(dim=1)  # (Hkv, Ll)
    if received_into is None:
        return out, lse.view(-1), received
    if rows is None:
        received_into[:, : received.shape[1]] += received
    else:
        received_into.index_add_(1, rows, received)
    return out, lse.view(-1), received_into


def _joined_global_keys(k_glb, v_glb, bias, blocks, remainder):
    """`decode_attention`'s global keys [k_glb | blocks | remainder] in one (Hkv, Lg, D) pair, and their
    bias (the remainder's rows past its live count hidden)."""
    hkv, d = k_glb.shape[0], k_glb.shape[2]
    keys, values = [k_glb], [v_glb]
    biases = [bias if bias is not None else torch.zeros(k_glb.shape[1], device=k_glb.device)]
    if blocks is not None:
        store_k, store_v, ids = blocks
        for parts, store in ((keys, store_k), (values, store_v)):
            parts.append(store.index_select(0, ids[0]).to(k_glb.device).transpose(0, 1).reshape(hkv, -1, d))
        biases.append(torch.zeros(keys[-1].shape[1], device=k_glb.device))
    if remainder is not None:
        rem_k, rem_v, start, slots, live = remainder
        offsets = torch.arange(slots, device=rem_k.device)
        rows = (offsets + start).clamp_(max=rem_k.shape[1] - 1)  # slots past the buffer are hidden below
        keys.append(rem_k.index_select(1, rows))
        values.append(rem_v.index_select(1, rows))
        biases.append(torch.where(offsets < live, 0.0, float("-inf")).to(k_glb.device))
    return torch.cat(keys, dim=1), torch.cat(values, dim=1), torch.cat(biases)


def window_key_scores(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, q_offset: int, window: int | None, lse: torch.Tensor,
    into: torch.Tensor | None = None, check: bool = True,
) -> torch.Tensor:
    """Per-key attention probability mass received in the local stage, normalised by the FINAL lse.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), lse (B, Hq, Lq) float32 = log-sum-exp over all keys each query
    attended (local and global). Returns (B, Hkv, Lk) float32: sum over visible queries and over the query
    heads of each KV head's group of exp(q.k * scale - lse); added to `into` (same shape) and returned as it
    when given. `into` (B, Hq, Lk) (GQA): each query head's own sum, not summed over the group (a score per
    query head, `lookup_heads: query`; the Triton op takes (B, Hkv, Lk) only).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    mask = window_mask(lq, lk, q_offset, window, q.device).repeat(group, 1)  # (G*Lq, Lk)
    qf = _fold_groups(q, hkv).float()  # (B, Hkv, G*Lq, D): no copy of K per query head
    lse_f = lse.reshape(b, hkv, group * lq, 1)
    safe_lse = torch.where(torch.isfinite(lse_f), lse_f, torch.full_like(lse_f, float("inf")))
    probs = torch.matmul(qf, k.float().transpose(-1, -2))  # (B, Hkv, G*Lq, Lk)
    probs.mul_(scale).sub_(safe_lse).exp_().masked_fill_(~mask, 0.0)
    if into is not None and into.shape[1] == hq != hkv:  # per query head: (B, Hq, Lq, Lk) summed over Lq
        return into.add_(probs.view(b, hq, lq, lk).sum(dim=2))
    return probs.sum(dim=2) if into is None else into.add_(probs.sum(dim=2))
