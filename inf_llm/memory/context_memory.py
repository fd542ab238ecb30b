"""The per-layer context memory of one sequence: sinks, local window, memory blocks and their lookup.

One engine, four policies (`MemoryPolicy`): `inf-llm`, `stream-llm`, `infinite-lm` and `origin` differ only
in what they keep and how they place positions (see docs/algorithm.md). Tokens arrive
un-rotated; this module applies RoPE at the positions the policy chooses.

For an execution block of queries at positions [s, e) (blocks split at multiples of `exc_block_size`):
  local stage   keys (p - n_local, p] of each query p, window-relative RoPE positions;
  global stage  [retrieved blocks | sinks | remainder] for keys out of p's window (j <= p - n_local);
                keys un-rotated, queries at one fixed angle (stream-llm: sinks at 0..n_init-1);
  one softmax   both stages merged by log-sum-exp;
  scores        every local key accumulates the final softmax probability it receives;
  formation     tokens behind the window fill the sinks once, then become blocks of `block_size`
                (inf-llm; representative = mean of the `repr_topk` best-scored keys per head) or are
                dropped (stream-llm, infinite-lm).
Owns the stages, when blocks form, the eager decode step and the layer's state. Where blocks live and how the
selected ones reach the attention (the store on the device, the block cache, direct reads, the formation
ring) is `inf_llm.memory.residency`'s (one residency, chosen here once); which blocks a lookup selects
`inf_llm.memory.lookup`'s (one `BlockLookup`, chosen here once), what a type keeps `inf_llm.memory.policy`'s,
which cached block is evicted `inf_llm.memory.eviction`'s. Knows nothing of transformers, nor of the static
decode step that may replace its single-token calls (`static_step`, a `DecodeStep`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch

from inf_llm.config import ModelConfig
from inf_llm.errors import ConfigError
from inf_llm.kernels import reference as _torch_ops
from inf_llm.memory.block_cache import BlockCache, DeviceBlockCache, FormationRing
from inf_llm.memory.block_cache import check_block_cache as check_block_cache  # re-exported: adapter.hf imports it here
from inf_llm.memory.buffers import BlockStore, StorageSpec, TokenBuffer, representative_dtype
from inf_llm.memory.lookup import BlockLookup, lookup_for
from inf_llm.memory.policy import MemoryPolicy
from inf_llm.memory.residency import DeviceResidency, DirectResidency, SlotsFor, residency_for
from inf_llm.memory.rope import RotaryTable
from inf_llm.memory.snapshot import LayerSnapshot
from inf_llm.memory.snapshot import take as take_snapshot

log = logging.getLogger(__name__)

# Execution blocks the rotation base may lag behind before the window is re-rotated: bounds the largest
# RoPE angle used (n_local + this many blocks) while re-rotating rarely during decoding.
ROTATION_SLACK = 4
# Queries of one local-stage call when the ops do not say (`ops.LOCAL_STAGE_ROWS`: the Triton kernels take
# a whole prefill chunk, the torch ops one execution block) and there are no execution blocks (origin):
# bounds the explicit (rows x keys) scores of the torch ops (8192 queries x 12K keys x 32 heads of fp32 took
# 12 GiB on a GPU).
LOCAL_STAGE_ROWS = 2048


@dataclass
class LayerStats:
    """Introspection of one layer after forward passes (see ContextMemory.stats)."""

    seen_tokens: int
    init_tokens: int
    window_tokens: int
    blocks: int
    retrieved_last: list[list[int]]  # block ids selected per execution block of the last forward
    cache_hits: int
    cache_misses: int
    device_bytes: int
    host_bytes: int
    cache_prefetched: int = 0  # offload_access: direct: blocks read ahead of the lookups (async_global_stream)


class DecodeStep(Protocol):
    """A replacement for single-token `process` calls (`inf_llm.memory.static_step.StaticDecodeStep`)."""

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor: ...


class ContextMemory:
    """State of one attention layer for one sequence (batch size 1)."""

    def __init__(
        self,
        cfg: ModelConfig,
        rope: RotaryTable,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        ops: ModuleType,
        offload: bool | None = None,
        copy_stream: "torch.cuda.Stream | None" = None,
        device_lookup: bool | None = None,
        host_storage: Callable[[StorageSpec], dict[str, torch.Tensor]] | None = None,
        ring_slots: SlotsFor | None = None,
    ):
        """`offload` (default: off a CPU) puts the blocks in host memory, `copy_stream` is the side stream of
        async_global_stream; `host_storage`: lent host tensors for an offloaded store (`HostBlockPool`);
        `ring_slots`: gives the formation ring's slots for (block shape, dtype, device), shared with the
        device's other layers (default: `RingSlots`, this layer's own). See `residency.residency_for`."""
        self.cfg = cfg
        self.policy = MemoryPolicy.of(cfg)
        self.rope = rope
        self.ops = ops
        # lookup_heads: query with perhead: each query head retrieves and attends its own blocks, so the memory
        # keeps K/V per query head (as the released code's perhead, which repeats K/V per query head: Hq/Hkv
        # times the K/V memory); then every head is its own group
        self._kv_repeat = num_q_heads // num_kv_heads if cfg.perhead and cfg.lookup_heads == "query" else 1
        num_kv_heads *= self._kv_repeat
        self.hq, self.hkv, self.d = num_q_heads, num_kv_heads, head_dim
        self.group = num_q_heads // num_kv_heads
        self.dtype, self.device = dtype, device
        self.repr_dtype = representative_dtype(dtype)
        # full_attention_tokens (an int here: the adapter resolves auto): the whole conversation stays in the
        # window while it fits, so a prompt within the model's own context reads as with plain attention
        limit = cfg.full_attention_tokens if self.policy.windowed else None
        self.full_until = limit if isinstance(limit, int) and limit > cfg.n_local else None
        self.n_local = (self.full_until or cfg.n_local) if self.policy.windowed else None
        # A key's score sums the probability it receives from the queries of the configured window, also while
        # the window is wide (full_attention_tokens): the blocks it forms on narrowing are scored as they would
        # have been without the option, and a wide prefill scores 512 keys per query, not the whole context.
        self.score_window = cfg.n_local
        self.n_init = cfg.n_init if self.policy.windowed else 0
        self.exc = cfg.exc_block_size if self.policy.windowed else None
        self.seen = 0
        # Local-stage keys are kept rotated to (position - rot_base); RoPE depends only on distances, so any
        # base <= the window start gives the same scores. The base moves forward (and the window is
        # re-rotated once) when angles would exceed n_local + ROTATION_SLACK execution blocks.
        self.rot_base: int | None = 0
        # heads of the window key scores, the representatives and the lookup vectors (lookup_heads)
        self.score_heads = num_q_heads if cfg.lookup_heads == "query" else num_kv_heads
        if self.score_heads != num_kv_heads and ops is not _torch_ops:
            raise ConfigError("model.lookup_heads: query needs the torch ops (the Triton kernels score keys, form "
                              "blocks and decode per KV head): set model.fattn: false or lookup_heads: kv")
        if cfg.lookup_heads == "query" and cfg.faiss:
            raise ConfigError("model.lookup_heads: query does not work with model.faiss yet (its index holds "
                              "per-KV-head representatives): set lookup_heads: kv or faiss: false")
        # remainder_visibility: released: every query of an execution block sees the whole remainder
        self._whole_remainder = cfg.remainder_visibility == "released" and self.policy.keeps_blocks
        self.tail = TokenBuffer(num_kv_heads, head_dim, dtype, device, with_scores=self.policy.keeps_blocks,
                                score_heads=self.score_heads)
        self.init_k = torch.zeros(num_kv_heads, self.n_init, head_dim, dtype=dtype, device=device)
        self.init_v = torch.zeros_like(self.init_k)
        self.init_len = 0
        self._staging_k: torch.Tensor | None = None  # (Hkv, cap, D): [sinks | blocks | remainder]
        self._staging_v: torch.Tensor | None = None
        self._staged_init = -1  # sink count currently staged
        # where the blocks live and how the selected ones reach the attention (`inf_llm.memory.residency`:
        # on the device, offloaded through the block cache, or read directly), and the store it made
        self.residency: DeviceResidency = residency_for(
            cfg, self.policy.keeps_blocks, (num_q_heads, num_kv_heads, self.score_heads), head_dim, dtype, device,
            ops, offload, copy_stream, host_storage, ring_slots,
        )
        self.store: BlockStore | None = self.residency.store
        # Device lookup: top-k ids stay on the device (never read by the host, so a forward pass makes no host
        # sync), and the global stage reads the blocks where they are resident by id; host lookup: exact host
        # lists, the blocks staged. The residency says which it allows and prefers (device_lookup=True forces
        # the device lookup where allowed, for tests).
        self.device_lookup = self.residency.lookup_on_device(cfg.faiss, device_lookup)
        # the block selection of this memory's path, and the record of what it selected
        self.lookup: BlockLookup = lookup_for(
            cfg, self.store, self.device_lookup, self.residency.refine, rope,
            (num_q_heads, num_kv_heads, self.score_heads), head_dim, self.repr_dtype, self.policy.global_query_pos,
            self.exc, device,
        )
        # Set by a caller that replays decode steps as a CUDA graph (adapter.decode_graph): single-token calls
        # then run its fixed-shape step, and the caller plans and advances the host state around them.
        self.static_step: DecodeStep | None = None

    # ------------------------------------------------------------------------------------------ public
    def process(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attend the new tokens and store them.

        q (Hq, L, D), k/v (Hkv, L, D): un-rotated projections of positions seen .. seen+L-1, on `device`.
        Returns the attention output (Hq, L, D) in q's dtype.
        """
        length = q.shape[1]
        if self._kv_repeat > 1:  # (Hkv, L, D) -> (Hq, L, D): query head h gets its copy of KV head h // G
            k, v = k.repeat_interleave(self._kv_repeat, dim=0), v.repeat_interleave(self._kv_repeat, dim=0)
        if length == 1 and self.static_step is not None:
            return self.static_step.run(q, k, v, scale)
        if length == 1 and self.policy.windowed:
            return self._decode_step(q, k, v, scale)
        self.residency.begin_prefill()
        try:
            return self._prefill(q, k, v, scale)
        finally:
            self.residency.end_prefill()

    @property
    def wide(self) -> bool:
        """The window still holds the whole conversation (full_attention_tokens)."""
        return self.full_until is not None and self.n_local != self.cfg.n_local

    def plan(self, total_tokens: int) -> None:
        """The conversation is about to reach `total_tokens`: past full_attention_tokens the window narrows now
        (before a request's prefill, so the whole prompt reads with the configured window, as without the
        option; before a call that crosses the limit, as a last resort)."""
        if self.wide and total_tokens > self.full_until:
            self._narrow()

    def _narrow(self) -> None:
        """The window becomes the configured one: the tokens behind it fill the sinks and form blocks (their
        scores were accumulated under the wide window)."""
        self.n_local = self.cfg.n_local
        self._form_memory(self.seen)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """`process` of several tokens (a prompt chunk), or of one without the ops' single-query op."""
        length = q.shape[1]
        self.plan(self.seen + length)
        start, end = self.seen, self.seen + length
        self.tail.append(k, v)
        if self.rot_base is not None:  # the new keys' rotated copies, written in place
            self._rotate(k, start - self.rot_base, out=self.tail.rotated_keys(start, end))
        self.lookup.start()
        bounds = self._exec_bounds(start, end)
        # global-stage queries: all rows at one angle, rotated once for the call
        has_global = self.n_local is not None and end - 1 - self.n_local >= 0
        q_glb = self._rotate(q, self.policy.global_query_pos, one_angle=True) if has_global else None
        # Lookup vectors of all execution blocks at once: they depend on the queries only (the device path's
        # per-block ops are host launches; chunk_topk_calc scores them in batches)
        if has_global and self.policy.keeps_blocks and len(bounds) > 1 and (
            self.device_lookup or self.cfg.chunk_topk_calc
        ):
            self.lookup.prepare(q_glb, bounds, start)
            self.residency.prefetch(self.lookup)  # direct: the batch's blocks start crossing the bus
        # Local stage of every query of the call in one launch: it depends on nothing the execution blocks
        # change (formation only moves the tail's front past keys no later query's window reaches).
        kv_start = self.tail.first_pos if self.n_local is None else max(start - self.n_local + 1, self.tail.first_pos)
        if self.rot_base is None or (
            self.n_local is not None and end - 1 - self.rot_base > self.n_local + max(ROTATION_SLACK * self.exc, length)
        ):
            self._rebase_rotation(kv_start)
        q_loc = self._rotate(q, start - self.rot_base)
        out, lse = self._local_stage(q, q_loc, start, end, scale)
        # every execution block's rows as views made in one call per tensor (a slice per block and tensor
        # costs the host more than the rest of the loop's bookkeeping)
        sizes = [e - s for s, e in bounds]
        q_rows, out_rows, lse_rows = q.split(sizes, 1), out.split(sizes, 1), lse.split(sizes, 1)
        q_glb_rows = q_glb.split(sizes, 1) if has_global else None
        if self.policy.keeps_blocks:
            q_loc_rows, lse_rows4 = q_loc[None].split(sizes, 2), lse[None].split(sizes, 2)
        for i, (s, e) in enumerate(bounds):
            if has_global and e - 1 - self.n_local >= 0:
                self._attend_global(q_rows[i], q_glb_rows[i], out_rows[i], lse_rows[i], s, e, i, scale)
            if self.policy.keeps_blocks:  # probability each window key receives from the final softmax
                w_start = max(s - self.score_window + 1, self.tail.first_pos)
                self.ops.window_key_scores(
                    q_loc_rows[i], self.tail.rotated_keys(w_start, e)[None], scale=scale,
                    q_offset=s - w_start, window=self.score_window, lse=lse_rows4[i],
                    into=self.tail.scores(w_start, e)[None], check=self.residency.check,
                )
            self.seen = e
            self._form_memory(e, into_ring=True)
        self.lookup.flush_counts()
        return out

    def _local_stage(self, q: torch.Tensor, q_loc: torch.Tensor, start: int, end: int, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The windowed attention of queries start..end-1 (q_loc (Hq, L, D) rotated to the window's base) over
        their window keys, in pieces of the ops' `LOCAL_STAGE_ROWS` queries: out (Hq, L, D), lse (Hq, L) fp32."""
        # (a wide window sees every key: pieces as large as the call cost no extra work)
        piece = self.ops.LOCAL_STAGE_ROWS or (None if self.wide else self.exc) or LOCAL_STAGE_ROWS
        out = lse = None
        a = start
        while a < end:  # pieces aligned to multiples of `piece` positions, as execution blocks are
            b = min((a // piece + 1) * piece, end)
            k0 = self.tail.first_pos if self.n_local is None else max(a - self.n_local + 1, self.tail.first_pos)
            one_piece = a == start and b == end
            piece_out, piece_lse = self.ops.windowed_attention(
                q_loc[None, :, a - start : b - start], self.tail.rotated_keys(k0, b)[None],
                self.tail.values(k0, b)[None], scale=scale, q_offset=a - k0, window=self.n_local,
                token_major_out=one_piece,  # the layout transformers reshapes the output from: no copy there
            )
            if one_piece:  # (the Triton ops): its result is the call's, no copy
                out, lse = piece_out[0], piece_lse[0]  # (Hq, L, D), (Hq, L)
            else:
                if out is None:
                    out = torch.empty_like(q)
                    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
                out[:, a - start : b - start], lse[:, a - start : b - start] = piece_out[0], piece_lse[0]
            a = b
        return out, lse

    def _decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """`process` for one query (decoding), through the ops' single-query op: the same keys, positions and
        lookup as the general path, but both stages in one softmax whose window probabilities are the key
        scores, so no merge and no second pass (decoding a small model on a CPU is bound by op count)."""
        p = self.seen
        self.plan(p + 1)
        self.lookup.start()
        self.residency.settle()  # the step reads blocks from the store only
        window_start = max(p - self.n_local + 1, self.tail.first_pos)
        if self.rebase_due(p):
            self._rebase_rotation(window_start)  # the live keys; the new one is rotated at the new base below
        # query and key at the same local position: one rotation of both (the ops' rotation, as the static step)
        qk_loc = self._rotate(torch.cat((q, k)), p - self.rot_base)
        q_loc = qk_loc[: self.hq]
        self.tail.append(k, v, qk_loc[self.hq :])
        selected: list[int] = []
        if p - self.n_local >= 0:  # keys behind the window exist: sinks, blocks, remainder (all visible)
            # rotated once, in the representatives' precision: the attention's query and the lookup vector
            q_glb = self.rope.rotate_at(q.to(self.repr_dtype), self.policy.global_query_pos)
            k_glb, v_glb, _, selected = self._global_keys(q, p, p + 1, 0, q_glb)
        else:
            q_glb, k_glb, v_glb = q_loc, k[:, :0], v[:, :0]
        # lookup_heads: query: the op adds each query head's probabilities to that head's scores
        per_query = self.policy.keeps_blocks and self.score_heads != self.hkv
        out, lse, received = self.ops.decode_attention(
            q_loc[:, 0], self.tail.rotated_keys(window_start, p + 1), self.tail.values(window_start, p + 1),
            q_glb[:, 0], k_glb, v_glb, scale=scale,
            received_into=self.tail.scores(window_start, p + 1) if per_query else None,
        )
        self.residency.report_received(q_glb, k_glb[:, self.init_len :], lse[:, None], selected, scale)
        if self.policy.keeps_blocks and not per_query:  # the keys of the score window (wide: its last ones)
            scored = min(received.shape[1], self.score_window)
            self.tail.scores(p + 1 - scored, p + 1).add_(received[:, -scored:])
        self.seen = p + 1
        self._form_memory(p + 1)
        self.lookup.flush_counts()
        return out[:, None]

    @property
    def retrieved_last(self) -> list[list[int]]:
        """Block ids selected by each execution block of the last forward (sorted, heads merged)."""
        return self.lookup.retrieved_last

    @property
    def retrieval_counts(self) -> dict[int, int]:
        """Block id -> execution blocks that selected it, since the last `reset_retrieval_counts`."""
        return self.lookup.retrieval_counts()

    def reset_retrieval_counts(self) -> None:
        self.lookup.reset_counts()

    def stats(self) -> LayerStats:
        device_bytes, host_bytes = self.residency.nbytes()
        device_bytes += self.tail.nbytes() + self.init_k.nbytes * 2
        if self.device.type == "cpu":
            host_bytes, device_bytes = host_bytes + device_bytes, 0
        hits, misses, prefetched = self.residency.counts()
        return LayerStats(
            seen_tokens=self.seen,
            init_tokens=self.init_len,
            window_tokens=self.tail.length,
            blocks=self.store.count if self.store is not None else 0,
            retrieved_last=self.retrieved_last,  # host copy of the device path's ids, here only
            cache_hits=hits,
            cache_misses=misses,
            device_bytes=device_bytes,
            host_bytes=host_bytes,
            cache_prefetched=prefetched,
        )

    def block_range(self, block_id: int) -> tuple[int, int]:
        """Token positions [start, end) of a memory block."""
        assert self.store is not None
        start = self.store.start_pos[block_id]
        return start, start + self.cfg.block_size

    # --------------------------------------------------------------------------------------- internals
    def _exec_bounds(self, start: int, end: int) -> list[tuple[int, int]]:
        if self.exc is None:
            return [(start, end)]
        bounds = []
        s = start
        while s < end:
            e = min(end, (s // self.exc + 1) * self.exc)
            bounds.append((s, e))
            s = e
        return bounds

    def _attend_global(self, qb, q_glb, out, lse, s: int, e: int, index: int, scale: float) -> None:
        """Global stage of the execution block [s, e) merged in place into its local result (out, lse views):
        [sinks | retrieved blocks | remainder] for keys out of each query's window (j <= p - n_local), keys
        un-rotated, queries at one angle."""
        if self.device_lookup:
            self._attend_global_in_place(qb, q_glb, out, lse, s, e, index, scale)
            return
        k_glb, v_glb, visible, selected = self._global_keys(qb, s, e, index)
        if k_glb.shape[1] == 0:
            return
        out_g, lse_g = self.ops.prefix_attention(q_glb[None], k_glb[None], v_glb[None], scale=scale, visible=visible)
        merged, merged_lse = self.ops.merge_partials(out[None], lse[None], out_g, lse_g)
        out.copy_(merged[0])
        lse.copy_(merged_lse[0])
        self.residency.report_received(q_glb, k_glb[:, self.init_len :], lse, selected, scale)

    def _attend_global_in_place(self, qb, q_glb, out, lse, s: int, e: int, index: int, scale: float) -> None:
        """Device path (inf-llm; blocks on the compute device, or fetched from pinned host memory first with
        offload_access: direct): one `global_stage_into` per execution block reads sinks, the selected blocks
        (ids stay on the device) and the remainder where they lie; no staging copies, no `visible` tensor,
        no separate merge (host launches bound this path on a GPU)."""
        ids = self.lookup.select(qb, index)
        if ids is None:
            ids = torch.empty(1, 0, dtype=torch.int64, device=self.device)
        store_k, store_v, ids = self.residency.resident_blocks(ids, from_ring=True)
        tail_first = self.tail.first_pos
        tail_end = max(e - self.n_local, tail_first)  # positions <= e - 1 - n_local: seen by some query here
        self.ops.global_stage_into(
            q_glb, out, lse, self.init_k[:, : self.init_len], self.init_v[:, : self.init_len],
            store_k, store_v, ids, self.tail.keys(tail_first, tail_end),
            self.tail.values(tail_first, tail_end),
            # query s+i sees remainder j iff j <= s+i - n_local (released: all of it, j <= e - 1 - n_local)
            rem_offset=tail_end - tail_first if self._whole_remainder else s - self.n_local - tail_first + 1,
            scale=scale, check=self.residency.check,
        )

    def _rotate(self, x: torch.Tensor, start: int, one_angle: bool = False, out: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (H, L, D) rotated to positions start.. (or every row to `start`) by the ops' rotation: one launch
        on the GPU instead of five strided elementwise passes per rotation of a prefill chunk's queries.
        Into `out` (e.g. the tail's rotated-key slots) when given."""
        cos, sin = self.rope.cos_sin(start, start + (1 if one_angle else x.shape[-2]), x.dtype)
        return self.ops.rotate(x, cos, sin, out=out)

    def _rebase_rotation(self, base: int) -> None:
        """Re-rotate the live keys from `base` on to positions relative to `base`, straight into their slots."""
        self.rot_base = base
        start, end = max(base, self.tail.first_pos), self.tail.end_pos
        if end > start:
            self._rotate(self.tail.keys(start, end), start - base, out=self.tail.rotated_keys(start, end))

    def _global_keys(self, qb: torch.Tensor, s: int, e: int, index: int, q_rotated: torch.Tensor | None = None):
        """Assemble [sinks | selected blocks | visible remainder] for queries s..e-1 in a staging buffer.

        Sinks and blocks that were already staged for the previous execution block stay where they are
        (consecutive decode steps mostly retrieve the same blocks), so a step copies only what changed.
        `q_rotated`: a decode step's query, already at the global angle in float32 (saves a rotation); it
        sees every global key, so `visible` is then None.
        Returns k (Hkv, Lg, D), v (Hkv, Lg, D), visible (Lq,) int64, and the staged block ids in order.
        """
        n_local = self.n_local
        ids_per_head = self.lookup.select(qb, index, q_rotated) if self.policy.keeps_blocks else None
        # tail tokens usable in the global stage: all (inf-llm) or only sink positions still in the tail
        tail_first = self.tail.first_pos
        tail_end = e - n_local  # positions <= e - 1 - n_local can be visible to some query here
        if not self.policy.keeps_blocks:
            tail_end = min(tail_end, self.n_init)
        tail_end = max(tail_end, tail_first)
        n_tail = tail_end - tail_first
        n_sel = 0 if ids_per_head is None else len(ids_per_head[0])  # a host int for tensors too (shape)
        bs = self.cfg.block_size
        fixed = self.init_len + n_sel * bs  # sinks + blocks: always visible
        k_glb, v_glb = self._staging(fixed + n_tail)
        if self._staged_init != self.init_len:
            init_k = self.init_k[:, : self.init_len]
            k_glb[:, : self.init_len].copy_(self.rope.rotate(init_k, 0) if self.policy.sink_positions else init_k)
            v_glb[:, : self.init_len].copy_(self.init_v[:, : self.init_len])
            self._staged_init = self.init_len
            self.residency.forget_staged()
        staged = self.residency.stage(ids_per_head, k_glb, v_glb, self.init_len) if n_sel else []
        if n_tail:
            tail_k = self.tail.keys(tail_first, tail_end)
            k_glb[:, fixed : fixed + n_tail].copy_(
                self.rope.rotate(tail_k, tail_first) if self.policy.sink_positions else tail_k
            )
            v_glb[:, fixed : fixed + n_tail].copy_(self.tail.values(tail_first, tail_end))
        if q_rotated is not None:
            return k_glb[:, : fixed + n_tail], v_glb[:, : fixed + n_tail], None, staged
        if self._whole_remainder:  # remainder_visibility: released: every query sees j <= e - 1 - n_local
            visible = torch.full((e - s,), fixed + n_tail, dtype=torch.int64, device=self.device)
        else:  # query p sees the remainder tokens j <= p - n_local, i.e. a prefix of the tail part
            q_pos = torch.arange(s, e, device=self.device)
            visible = (q_pos - n_local - tail_first + 1).clamp(0, n_tail) + fixed
        return k_glb[:, : fixed + n_tail], v_glb[:, : fixed + n_tail], visible, staged

    def _staging(self, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._staging_k is None or self._staging_k.shape[1] < total:
            cap = max(total, 2 * (self._staging_k.shape[1] if self._staging_k is not None else 0))
            self._staging_k = torch.empty(self.hkv, cap, self.d, dtype=self.dtype, device=self.device)
            self._staging_v = torch.empty_like(self._staging_k)
            self._staged_init = -1
            self.residency.forget_staged()
        return self._staging_k, self._staging_v

    def rebase_due(self, p: int) -> bool:
        """A decode step at position p re-rotates the window first (angles would exceed n_local + the slack)."""
        return self.rot_base is None or p - self.rot_base > self.n_local + ROTATION_SLACK * self.exc

    # --------------------------------------------------------------------------------------- formation
    def _form_memory(self, end: int, into_ring: bool = False) -> None:
        """After queries up to `end`: move tokens behind the window to the sinks, then to blocks (or drop).
        `into_ring`: a prefill (the residency may form its blocks through the formation ring)."""
        if self.n_local is None:
            return
        behind = end - self.n_local - self.tail.first_pos
        if behind <= 0:
            return
        if self.init_len < self.n_init:
            m = min(self.n_init - self.init_len, behind)
            first = self.tail.first_pos
            self.init_k[:, self.init_len : self.init_len + m].copy_(self.tail.keys(first, first + m))
            self.init_v[:, self.init_len : self.init_len + m].copy_(self.tail.values(first, first + m))
            self.init_len += m
            self.tail.drop_front(m)
            behind -= m
        if not self.policy.keeps_blocks:
            if behind > 0 and self.init_len == self.n_init:
                self.tail.drop_front(behind)
            return
        bs, n = self.cfg.block_size, behind // self.cfg.block_size
        if n == 0:
            return
        # all blocks completed by this execution block at once: one top-k, one copy to the store
        first = self.tail.first_pos
        keys = self.tail.keys(first, first + n * bs).unflatten(1, (n, bs))  # (Hkv, n, bs, D)
        values = self.tail.values(first, first + n * bs).unflatten(1, (n, bs))
        scores = self.tail.scores(first, first + n * bs).unflatten(1, (n, bs))  # (Hr, n, bs)
        self.residency.form(keys, values, scores, [first + i * bs for i in range(n)], into_ring)
        self.lookup.added(n)
        self.tail.drop_front(n * bs)

    # ---------------------------------------------------------------------------------------- sessions
    def state(self) -> dict:
        self.residency.settle()  # the store's newest blocks may not have been copied yet
        state = {"seen": self.seen, "rot_base": self.rot_base, "n_local": self.n_local,
                 "init_k": self.init_k[:, : self.init_len].clone(),
                 "init_v": self.init_v[:, : self.init_len].clone(), "tail": self.tail.state()}
        if self.store is not None:
            state["store"] = self.store.state()
        return state

    def load_state(self, state: dict) -> None:
        self.residency.settle()  # no copy of an old block may land in the store after it is replaced
        self.seen = int(state["seen"])
        if state.get("n_local") is not None:  # wide or narrowed (full_attention_tokens)
            self.n_local = int(state["n_local"])
        self._set_sinks(state["init_k"], state["init_v"])
        self.tail.load_state(state["tail"])
        if self.store is not None:
            self.store.load_state(state["store"])
        self._reloaded(state.get("rot_base"))

    def snapshot(self, parent: LayerSnapshot | None = None) -> LayerSnapshot:
        """This layer's memory now, sharing its blocks and `parent`'s window (see inf_llm.memory.snapshot)."""
        self.residency.settle()  # the store's newest blocks may not have been copied yet
        return take_snapshot(self.seen, self.n_local, self.rot_base, self.init_k[:, : self.init_len],
                             self.init_v[:, : self.init_len], self.tail,
                             self.store.share() if self.store is not None else None, parent)

    def restore(self, snap: LayerSnapshot) -> None:
        """Continue from `snap`, a snapshot of this layer: the store is rewound to its blocks in place."""
        if (snap.blocks is None) != (self.store is None) or (
                snap.blocks is not None and snap.blocks.store is not self.store):
            raise ValueError("a layer snapshot can only be restored into the memory it was taken from")
        self.residency.settle()
        self.seen = snap.seen
        if snap.n_local is not None:
            self.n_local = snap.n_local
        self._set_sinks(snap.init_k, snap.init_v)
        self.tail.restore(snap.tail_first_pos, [(p.k, p.v) for p in snap.pieces], snap.scores)
        if self.store is not None:
            self.store.rewind(snap.blocks)
        self._reloaded(snap.rot_base)

    def _set_sinks(self, init_k: torch.Tensor, init_v: torch.Tensor) -> None:
        self.init_len = init_k.shape[1]
        self.init_k[:, : self.init_len].copy_(init_k)
        self.init_v[:, : self.init_len].copy_(init_v)

    def _reloaded(self, rot_base: int | None) -> None:
        """After the state was replaced: what derives from the old blocks goes (staged slots, caches, counts,
        the faiss index is rebuilt), and the window's rotated keys are recomputed for the same base (so the
        continuation is bit-identical to the uninterrupted one)."""
        self._staged_init = -1
        self.lookup.reset()
        self.residency.reset()
        self.rot_base = None
        if rot_base is not None:
            self._rebase_rotation(int(rot_base))

    # ------------------------------------------------ the residency's parts (tests, benchmarks, introspection)
    @property
    def cache(self) -> BlockCache | None:
        """offload_access: cache: the block cache."""
        return self.residency.cache

    @property
    def device_cache(self) -> DeviceBlockCache | None:
        """offload_access: direct: the device block cache (allocated at the first lookup)."""
        return self.residency.device_cache

    @property
    def ring(self) -> FormationRing | None:
        """offload_access: direct with a side stream: the formation ring (made at the first formation)."""
        return self.residency.ring

    @property
    def _direct(self) -> bool:
        """offload_access: direct (the tests ask)."""
        return isinstance(self.residency, DirectResidency)

    @property
    def _check_ops(self) -> bool:
        """The ops' argument checks on the per-execution-block calls (the residency's; see there)."""
        return self.residency.check

    @_check_ops.setter
    def _check_ops(self, value: bool) -> None:  # the tests and benchmark/host_overhead.py switch it
        self.residency.check = value

    def settle_copies(self) -> None:
        """The current stream waits for the blocks still being copied to the store."""
        self.residency.settle()
