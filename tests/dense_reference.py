"""A slow, obviously-correct InfLLM layer in float64: one query at a time, explicit key sets and positions.

It re-derives, from the method's description (docs/algorithm.md), which keys each query sees and
at which rotary positions, with no buffers, no caches and no batching, so the engine can be checked
against it on small inputs spanning many blocks.
"""

from __future__ import annotations

import math

import torch

from inf_llm.memory.rope import rotate_half


def rope_rows(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.outer(positions.double(), inv_freq.double())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, inv_freq: torch.Tensor, positions) -> torch.Tensor:
    """x (..., L, D) float64 rotated to `positions` (L,) or a single int."""
    if isinstance(positions, int):
        positions = torch.full((x.shape[-2],), positions)
    cos, sin = rope_rows(inv_freq, torch.as_tensor(positions))
    return x * cos + rotate_half(x) * sin


def exec_blocks(call_sizes: list[int], exc: int | None) -> list[tuple[int, int]]:
    """Execution blocks: each call's tokens split at absolute multiples of `exc`."""
    out, pos = [], 0
    for size in call_sizes:
        end = pos + size
        while pos < end:
            stop = end if exc is None else min(end, (pos // exc + 1) * exc)
            out.append((pos, stop))
            pos = stop
    return out


def dense_layer(q, k, v, *, kind, n_init, n_local, block_size, topk, repr_topk, blocks, inv_freq, scale,
                lookup_heads="kv", remainder_visibility="exact", perhead=False, block_score="representative"):
    """q (Hq, N, D), k/v (Hkv, N, D) un-rotated. kind: inf-llm | stream-llm | infinite-lm | origin.

    inf-llm's retrieval options, as `ModelConfig` names them:
    - lookup_heads "kv": a key score per KV head (the probabilities its group's query heads give it, summed),
      a representative per KV head, lookup vector per KV head = the sum of its group's mean queries; "query"
      (the released code, which expands K to the query heads): a score and a representative per query head
      (the mean of its KV head's keys at that query head's top-`repr_topk` scores), lookup score
      sum_h mean_q_h . r_h.
    - remainder_visibility "exact": query p sees the remainder tokens j <= p - n_local; "released": every
      query of the execution block [s, e) sees those j <= e - 1 - n_local (the released code's sliding-window
      offset is the whole remainder's length), its own window's among them, un-rotated, besides their local
      copies.
    - perhead: each score head retrieves its own top-k; the query heads attend their score head's blocks.
    - block_score "attention": a block's score is sum_h logsumexp_t(mean_q_h . k_t * scale) over query heads h
      and the block's (un-rotated) keys t of h's KV head, instead of its representative's.

    Returns (out (Hq, N, D) float64, selections: list per exec block of selected block indices, heads merged).
    """
    q, k, v = q.double(), k.double(), v.double()
    hq, n, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    per_query = lookup_heads == "query"
    hs = hq if per_query else hkv  # score heads
    score_head = (lambda h: h) if per_query else (lambda h: h // g)  # the score head of query head h
    kv_of_score = (lambda r: r // g) if per_query else (lambda r: r)  # the KV head of score head r
    score = torch.zeros(hs, n, dtype=torch.float64)  # probability each key received while local
    out = torch.zeros(hq, n, d, dtype=torch.float64)
    selections = []
    gpos = n_init + n_local - 1 if kind == "stream-llm" else n_local - 1
    for s, e in blocks:
        # memory blocks existing when this execution block starts: complete blocks after the sinks whose
        # last token is behind the window of the previous query (position s - 1)
        formed = []
        b0 = n_init
        while kind == "inf-llm" and b0 + block_size <= s - n_local:
            formed.append((b0, b0 + block_size))
            b0 += block_size
        reprs = []  # per block (Hs, D)
        for a, b in formed:
            idx = score[:, a:b].topk(repr_topk, dim=-1).indices  # (Hs, r)
            reprs.append(torch.stack([k[kv_of_score(r), a + idx[r]].mean(0) for r in range(hs)]))
        # lookup with the mean query of the block rotated to the global angle
        chosen = [list(range(len(formed)))] * hs  # per score head
        if kind == "inf-llm" and len(formed) > topk:
            qm = rotate(q[:, s:e].mean(1, keepdim=True), inv_freq, gpos)[:, 0]  # (Hq, D)
            qvec = qm if per_query else qm.view(hkv, g, d).sum(1)  # (Hs, D)
            if block_score == "attention":
                block_scores = torch.stack([
                    sum(torch.logsumexp(k[h // g, a:b] @ qm[h] * scale, dim=0) for h in range(hq)) for a, b in formed])
                chosen = [sorted(block_scores.topk(topk).indices.tolist())] * hs
            elif perhead:
                chosen = [sorted(torch.stack([qvec[r] @ rep[r] for rep in reprs]).topk(topk).indices.tolist())
                          for r in range(hs)]
            else:
                block_scores = torch.stack([(qvec * rep).sum() for rep in reprs])
                chosen = [sorted(block_scores.topk(topk).indices.tolist())] * hs
        if kind == "inf-llm" and formed:
            selections.append(sorted({i for ids in chosen for i in ids}))
        in_block = torch.zeros(n, dtype=torch.bool)
        for a, b in formed:
            in_block[a:b] = True
        kv_start = 0 if kind == "origin" else max(s - n_local + 1, 0)
        # keys as each stage sees them: local at window-relative positions, global un-rotated (stream-llm:
        # sinks at their own positions)
        k_local = rotate(k, inv_freq, torch.arange(n) - kv_start)  # (Hkv, N, D)
        k_global = rotate(k, inv_freq, torch.arange(n)) if kind == "stream-llm" else k
        for p in range(s, e):
            lo = 0 if kind == "origin" else max(p - n_local + 1, 0)
            local_keys = torch.arange(lo, p + 1)  # window (p - n_local, p]
            last = e - 1 if kind == "inf-llm" and remainder_visibility == "released" else p
            for h in range(hq):
                hk, selected = h // g, chosen[score_head(h)]
                global_keys = torch.tensor([j for j in range(last - n_local + 1) if kind != "origin" and (
                    (kind == "inf-llm" and (not in_block[j] or _block_of(formed, j) in selected))
                    or (kind != "inf-llm" and j < n_init))], dtype=torch.int64)
                qr = rotate(q[h, p : p + 1], inv_freq, [p - kv_start])[0]
                qg = rotate(q[h, p : p + 1], inv_freq, gpos)[0]
                logits = torch.cat([k_local[hk, local_keys] @ qr, k_global[hk, global_keys] @ qg]) * scale
                probs = torch.softmax(logits, dim=0)
                out[h, p] = probs @ torch.cat([v[hk, local_keys], v[hk, global_keys]])
                score[score_head(h), local_keys] += probs[: len(local_keys)]
    return out, selections


def _block_of(formed: list[tuple[int, int]], j: int) -> int:
    return next(i for i, (a, b) in enumerate(formed) if a <= j < b)


def default_inv_freq(d: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
