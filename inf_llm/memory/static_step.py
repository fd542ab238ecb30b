"""One layer's decode step with every per-step quantity in device tensors, so a CUDA graph can replay it.

`ContextMemory._decode_step` decides on the host at every step (window bounds, remainder length, block
count, rotation angle) and slices its buffers at host offsets: a captured graph would replay the first
step's choices. `StaticDecodeStep` computes the same step with fixed shapes instead:

  window     always `n_local` keys, read at a device offset
  remainder  `block_size` slots read at a device offset, those past the live count (a device value) masked
  lookup     top-k over the store's whole capacity, blocks past the count scored -inf
  positions  the local rotation angle and the tail's write slot, read from `args`

The caller fills `args` with `plan()`'s values, runs (or replays) `run`, then calls `advance()` for the
host bookkeeping the graph cannot do. Steps that change the layout (a block forms, the window is
re-rotated, sinks are still filling) are refused by `plan()` and take the ordinary path; `layout()` names
every buffer address a graph bakes in, so the caller re-captures when one moved (a buffer grew).
Reads the memory through its public members only (`ContextMemory.lookup`, `residency`, `rebase_due`, the
buffers); the memory does not import this module. Knows nothing of transformers or CUDA graphs.
"""

from __future__ import annotations

import torch

from inf_llm.memory.context_memory import ROTATION_SLACK, ContextMemory

# The int64 values of `args`, in order (indices into the tail's buffers unless said otherwise).
ARGS = ("write", "window", "remainder", "remainder_len", "rotation", "blocks")


class StaticDecodeStep:
    """The fixed-shape decode step of one `ContextMemory` (inf-llm, device path, shared top-k)."""

    def __init__(self, memory: ContextMemory):
        if not self.supports(memory):
            raise ValueError("the static decode step needs inf-llm on the device path with a shared top-k")
        m = self.memory = memory
        cfg, device = m.cfg, m.device
        self.args = torch.zeros(len(ARGS), dtype=torch.int64, device=device)  # the caller may rebind a view
        self.neg_inf = torch.tensor(float("-inf"), device=device)
        self.ones = torch.ones(cfg.topk, dtype=torch.int32, device=device)
        self.rotation_rows = cfg.n_local + ROTATION_SLACK * m.exc + 1  # every angle the window uses
        self.block_ids: torch.Tensor | None = None  # the last step's selection (1, topk), on the device
        self.store_slots = torch.arange(0, device=device)  # 0..capacity-1, made by plan() as the store grows

    @staticmethod
    def supports(memory: ContextMemory) -> bool:
        cfg = memory.cfg
        # block_score: attention with candidates (block_score_refresh > 1) keeps host-side state per step
        return (memory.policy.keeps_blocks and memory.device_lookup and cfg.topk > 0 and not cfg.perhead
                and not cfg.dense_decoding and (cfg.block_score != "attention" or cfg.block_score_refresh == 1))

    def plan(self) -> list[int] | None:
        """`args` for the next step, or None when it must take the ordinary path (it forms a block, re-rotates
        the window, fills sinks, or finds fewer than top-k blocks or a full tail buffer). Prepares what the
        step reads (rotation table rows, count buffer) outside any capture."""
        m, cfg = self.memory, self.memory.cfg
        p, tail = m.seen, m.tail
        remainder_len = p - m.n_local + 1 - tail.first_pos  # tokens behind the window, not yet a block
        if (m.init_len < m.n_init or m.rebase_due(p) or not 0 <= remainder_len < cfg.block_size
                or m.store.count < cfg.topk
                or tail.offset + tail.length >= tail.k.shape[1]):
            return None
        m.rope.cos_sin(0, self.rotation_rows, m.dtype)
        m.residency.ready_for_replay()  # direct: its device cache allocated, prefetches and copies waited for
        lookup = m.lookup
        lookup.flush_counts(force=True)  # the ordinary steps' pending selections
        capacity = m.store.repr.shape[0]
        if lookup.device_counts is None or lookup.device_counts.shape[0] < capacity:
            lookup.grow_counts(capacity)
        if self.store_slots.shape[0] != capacity:  # slot numbers of the store, for the lookup's mask
            self.store_slots = torch.arange(capacity, device=m.device)
        return [tail.offset + tail.length, tail.offset + remainder_len, tail.offset, remainder_len,
                p - m.rot_base, m.store.count]

    def layout(self) -> tuple:
        """Addresses and sizes a captured step depends on: equal layouts replay the same graph."""
        m = self.memory
        cos, sin = m.rope.cos_sin(0, self.rotation_rows, m.dtype)
        tensors = (m.tail.k, m.tail.v, m.tail.k_rot, m.tail.score, m.store.k, m.store.v, m.store.repr,
                   m.lookup.device_counts, m.init_k, m.init_v, cos, sin, self.args, self.store_slots)
        tensors += m.residency.layout_tensors()  # direct: the device block cache
        tensors += m.store.scales() or ()  # a store of codes: the misses are decoded with these
        return tuple((t.data_ptr(), tuple(t.shape)) for t in tensors)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """The step for q (Hq, 1, D), k/v (Hkv, 1, D) un-rotated, as `ContextMemory.process` would compute it;
        device ops only (no host sync, no host-dependent shape). Returns (Hq, 1, D)."""
        m, cfg = self.memory, self.memory.cfg
        a, tail = self.args, m.tail
        cos, sin = m.rope.cos_sin(0, self.rotation_rows, q.dtype)
        # q and k rotated to the local angle a[4], k, v and the rotated k written at the tail's column a[0],
        # its score zeroed: one kernel on a GPU (the torch ops are eight), bit-identical in 16-bit dtypes
        q_loc = m.ops.decode_prologue(q, k, v, cos, sin, a[4:5], a[0:1], tail.k, tail.v, tail.k_rot, tail.score)
        # lookup: the shared top-k over every store slot, slots past the block count never chosen
        q_glb = m.rope.rotate_at(q.to(m.repr_dtype), m.policy.global_query_pos)
        qvec = m.lookup.query_vector(q, q_glb)  # (1, Hkv * D), or (1, Hq * D)
        scores = m.lookup.slot_scores(qvec)  # (1, capacity)
        ids = torch.where(self.store_slots < a[5], scores, self.neg_inf).topk(cfg.topk, dim=-1).indices  # (1, topk)
        # every key read where it lies, no staging copies (they were ~10 kernels and 24 MB of copies per
        # Mistral-7B layer and step): the sinks; the selected blocks by id (direct: in the device cache, its
        # misses made resident first); the remainder at device offset a[2], its first a[3] rows live; the
        # window at a[1], whose keys' received probabilities are added to their scores in place
        out, _, _ = m.ops.decode_attention(
            q_loc[:, 0], tail.k_rot, tail.v, q_glb[:, 0], m.init_k, m.init_v, scale=scale,
            window=(a[1:2], m.n_local), received_into=tail.score, blocks=m.residency.resident_blocks(ids),
            remainder=(tail.k, tail.v, a[2:3], cfg.block_size, a[3:4]),
        )
        m.lookup.device_counts.index_add_(0, ids[0], self.ones)
        self.block_ids = ids
        return out[:, None]

    def advance(self) -> None:
        """The host bookkeeping of a step `run` computed on the device (after it ran or was replayed)."""
        m = self.memory
        m.tail.length += 1
        m.seen += 1
        m.lookup.start()
        m.lookup.retrieved.append(self.block_ids)
