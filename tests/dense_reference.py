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


def dense_layer(q, k, v, *, kind, n_init, n_local, block_size, topk, repr_topk, blocks, inv_freq, scale):
    """q (Hq, N, D), k/v (Hkv, N, D) un-rotated. kind: inf-llm | stream-llm | infinite-lm | origin.

    Returns (out (Hq, N, D) float64, selections: list per exec block of selected block indices).
    """
    q, k, v = q.double(), k.double(), v.double()
    hq, n, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    score = torch.zeros(hkv, n, dtype=torch.float64)  # probability each key received while local
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
        reprs = []
        for a, b in formed:
            idx = score[:, a:b].topk(repr_topk, dim=-1).indices  # (Hkv, r)
            reprs.append(torch.stack([k[h, a + idx[h]].mean(0) for h in range(hkv)]).reshape(-1))
        # lookup with the mean query of the block rotated to the global angle, group heads summed
        selected = list(range(len(formed)))
        if kind == "inf-llm" and len(formed) > topk:
            qm = rotate(q[:, s:e].mean(1, keepdim=True), inv_freq, gpos)[:, 0]  # (Hq, D)
            qvec = qm.view(hkv, g, d).sum(1).reshape(-1)
            scores = torch.stack([qvec @ r for r in reprs])
            selected = sorted(scores.topk(topk).indices.tolist())
        if kind == "inf-llm" and formed:
            selections.append(selected)
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
            global_keys = torch.tensor([j for j in range(0, p - n_local + 1) if kind != "origin" and (
                (kind == "inf-llm" and (not in_block[j] or _block_of(formed, j) in selected))
                or (kind != "inf-llm" and j < n_init))], dtype=torch.int64)
            for h in range(hq):
                hk = h // g
                qr = rotate(q[h, p : p + 1], inv_freq, [p - kv_start])[0]
                qg = rotate(q[h, p : p + 1], inv_freq, gpos)[0]
                logits = torch.cat([k_local[hk, local_keys] @ qr, k_global[hk, global_keys] @ qg]) * scale
                probs = torch.softmax(logits, dim=0)
                out[h, p] = probs @ torch.cat([v[hk, local_keys], v[hk, global_keys]])
                score[hk, local_keys] += probs[: len(local_keys)]
    return out, selections


def _block_of(formed: list[tuple[int, int]], j: int) -> int:
    return next(i for i, (a, b) in enumerate(formed) if a <= j < b)


def default_inv_freq(d: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
