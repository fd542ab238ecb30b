"""The per-layer context memory of one sequence: sinks, local window, memory blocks, lookup, block cache.

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
Owns the stages, formation, the eager decode step, where blocks are read from (staging, the block caches,
direct fetches) and the layer's state. Which blocks a lookup selects is `inf_llm.memory.lookup`'s (one
`BlockLookup`, chosen here once), what a type keeps `inf_llm.memory.policy`'s, which cached block is evicted
`inf_llm.memory.eviction`'s. Knows nothing of transformers, nor of the static decode step that may replace
its single-token calls (`static_step`, a `DecodeStep`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch

from inf_llm.config import CacheStrategy, ModelConfig
from inf_llm.errors import ConfigError
from inf_llm.kernels import reference as _torch_ops
from inf_llm.kernels.reference import block_representatives
from inf_llm.memory.block_cache import BlockCache, DeviceBlockCache, FormationRing, RingSlots, check_block_cache
from inf_llm.memory.buffers import BlockStore, StorageSpec, TokenBuffer, representative_dtype
from inf_llm.memory.compression import BlockCodec
from inf_llm.memory.lookup import BlockLookup, lookup_for
from inf_llm.memory.policy import MemoryPolicy
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
        ring_slots: Callable[[tuple[int, int, int], torch.dtype, torch.device], RingSlots] | None = None,
    ):
        """`host_storage`: lent host tensors for an offloaded store (`HostBlockPool`). `ring_slots`: gives the
        formation ring's slots for (block shape, dtype, device), shared with the device's other layers (default:
        `RingSlots`, this layer's own)."""
        self.cfg = cfg
        self.copy_stream = copy_stream
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
        self._staged_blocks: list[int] = []  # block id of each staged block slot
        self.store: BlockStore | None = None
        self.cache: BlockCache | None = None
        if self.policy.keeps_blocks:
            offload = device.type != "cpu" if offload is None else offload
            if cfg.offload_dtype is not None and not offload:
                raise ConfigError(
                    f"model.offload_dtype={cfg.offload_dtype!r} compresses offloaded blocks, but blocks stay on "
                    f"{device.type} here: set model.offload=true, or remove offload_dtype"
                )
            storage = torch.device("cpu") if offload else device
            codec = BlockCodec.of(cfg.offload_dtype) if cfg.offload_dtype is not None else None
            self.store = BlockStore(num_kv_heads, cfg.block_size, head_dim, dtype, storage, device, cfg.pin_memory,
                                    codec, host_storage if offload else None, repr_heads=self.score_heads)
            check_block_cache(cfg, num_q_heads, num_kv_heads // self._kv_repeat, offload)
            if offload and cfg.offload_access == "cache":
                self.cache = BlockCache(
                    cfg.max_cached_block, CacheStrategy(cfg.cache_strategy), cfg.effective_score_decay,
                    (num_kv_heads, cfg.block_size, head_dim), dtype, device, copy_stream,
                )
        # Device path: blocks live on the compute device, or in pinned host memory read by the GPU by id
        # (offload_access: direct), and lookups stay on the device (top-k ids are never read by the host, so
        # a forward pass makes no host sync). Host paths: the block cache (it needs the ids on the host) or
        # faiss (a host index). On a CPU a host sync costs nothing, and the host path restages only the
        # blocks that changed (decoding mostly retrieves the same ones), so it is the default there
        # (device_lookup=True forces the device path, for tests).
        # offload_access: direct: the selected blocks are fetched into device slots before each global stage
        self._direct = self.store is not None and offload and cfg.offload_access == "direct"
        possible = self.store is not None and self.cache is None and not cfg.faiss
        self.device_lookup = possible and (
            (device.type != "cpu" or self._direct) if device_lookup is None else device_lookup
        )
        # the block selection of this memory's path, and the record of what it selected
        self.lookup: BlockLookup = lookup_for(
            cfg, self.store, self.device_lookup, self._refine, rope, (num_q_heads, num_kv_heads, self.score_heads),
            head_dim, self.repr_dtype, self.policy.global_query_pos, self.exc, device,
        )
        self._fetched: tuple[torch.Tensor, torch.Tensor] | None = None  # direct with perhead: fetched blocks
        self._slot_ids: torch.Tensor | None = None  # direct with perhead: 0..topk-1, the fetched blocks' slots
        # direct (a shared top-k): the blocks read from the host so far, kept in max_cached_block device slots
        # (allocated at the first lookup)
        self.device_cache: DeviceBlockCache | None = None
        self._resident_slots: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, their slots) of the last lookup
        # direct (a shared top-k) with a side stream, or on a CPU (inline, for the tests): a prefill prefetches
        # its blocks into the device cache, and forms new ones into device slots copied to the host store from
        # there (the ring, allocated at the first formation; not with a codec: it copies raw K/V)
        self._overlapped = self._direct and not cfg.perhead and (copy_stream is not None or device.type == "cpu")
        self._use_ring = self._overlapped and cfg.offload_dtype is None
        self.ring: FormationRing | None = None
        self._ring_slots = ring_slots or RingSlots
        # The ops' argument checks on the per-execution-block calls: kept on CPUs (the tests, under the Triton
        # interpreter or the torch ops), skipped on a GPU, where they cost the host about as much as a launch
        # and the host's time per prefill chunk is close to the GPU's (docs/speed.md, "Host or GPU")
        self._check_ops = device.type != "cuda"
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
        if self.ring is not None:  # the store's blocks of the last call are read below: their copies first
            self.ring.settle()
        try:
            return self._prefill(q, k, v, scale)
        finally:
            if self.ring is not None:  # this call's blocks go to the store; the slots to the next layer
                self.ring.release()

    @property
    def wide(self) -> bool:
        """The window still holds the whole conversation (full_attention_tokens)."""
        return self.full_until is not None and self.n_local != self.cfg.n_local

    @property
    def direct_access(self) -> bool:
        """offload_access: direct: blocks are read by id from pinned host memory into the device cache."""
        return self._direct

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
            if self._overlapped:
                self._prefetch_blocks()  # on a CPU (tests) inline: no stream to overlap with
        # Local stage of every query of the call in one launch: it depends on nothing the execution blocks
        # change (formation only moves the tail's front past keys no later query's window reaches).
        kv_start = self.tail.first_pos if self.n_local is None else max(start - self.n_local + 1, self.tail.first_pos)
        if self.rot_base is None or (
            self.n_local is not None and end - 1 - self.rot_base > self.n_local + max(ROTATION_SLACK * self.exc, length)
        ):
            self._rebase_rotation(kv_start)
        q_loc = self._rotate(q, start - self.rot_base)
        piece = self.ops.LOCAL_STAGE_ROWS or self.exc or LOCAL_STAGE_ROWS
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
                w_start = max(s - self.n_local + 1, self.tail.first_pos)
                self.ops.window_key_scores(
                    q_loc_rows[i], self.tail.rotated_keys(w_start, e)[None], scale=scale,
                    q_offset=s - w_start, window=self.n_local, lse=lse_rows4[i],
                    into=self.tail.scores(w_start, e)[None], check=self._check_ops,
                )
            self.seen = e
            self._form_memory(e, into_ring=True)
        self.lookup.flush_counts()
        return out

    def _decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """`process` for one query (decoding), through the ops' single-query op: the same keys, positions and
        lookup as the general path, but both stages in one softmax whose window probabilities are the key
        scores, so no merge and no second pass (decoding a small model on a CPU is bound by op count)."""
        p = self.seen
        self.plan(p + 1)
        self.lookup.start()
        self.settle_copies()  # the step reads blocks from the store only
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
        self._report_received(q_glb, k_glb[:, self.init_len :], lse[:, None], selected, scale)
        if self.policy.keeps_blocks and not per_query:
            self.tail.scores(window_start, p + 1).add_(received)
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
        device_bytes = self.tail.nbytes() + self.init_k.nbytes * 2
        host_bytes = 0
        if self.store is not None:
            storage, reprs = self.store.nbytes()
            device_bytes += reprs
            cache = self.cache if self.cache is not None else self.device_cache
            if self.ring is not None:
                device_bytes += self.ring.nbytes()
            if cache is not None:
                device_bytes += cache.nbytes()
                host_bytes += storage
            elif self.device.type == "cpu" or self.store.k.device.type == "cpu":  # CPU model, or direct
                host_bytes += storage
            else:
                device_bytes += storage
        if self.device.type == "cpu":
            host_bytes, device_bytes = host_bytes + device_bytes, 0
        hits, misses, prefetched = 0, 0, 0
        if self.cache is not None:
            hits, misses = self.cache.hits, self.cache.misses
        elif self.device_cache is not None:
            hits, misses, prefetched = self.device_cache.counts()  # host copy of the device counters, here only
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
        self._report_received(q_glb, k_glb[:, self.init_len :], lse, selected, scale)

    def _attend_global_in_place(self, qb, q_glb, out, lse, s: int, e: int, index: int, scale: float) -> None:
        """Device path (inf-llm; blocks on the compute device, or fetched from pinned host memory first with
        offload_access: direct): one `global_stage_into` per execution block reads sinks, the selected blocks
        (ids stay on the device) and the remainder where they lie; no staging copies, no `visible` tensor,
        no separate merge (host launches bound this path on a GPU)."""
        ids = self.lookup.select(qb, index)
        if ids is None:
            ids = torch.empty(1, 0, dtype=torch.int64, device=self.device)
        store_k, store_v, ids = self.resident_blocks(ids, from_ring=True)
        tail_first = self.tail.first_pos
        tail_end = max(e - self.n_local, tail_first)  # positions <= e - 1 - n_local: seen by some query here
        self.ops.global_stage_into(
            q_glb, out, lse, self.init_k[:, : self.init_len], self.init_v[:, : self.init_len],
            store_k, store_v, ids, self.tail.keys(tail_first, tail_end),
            self.tail.values(tail_first, tail_end),
            # query s+i sees remainder j iff j <= s+i - n_local (released: all of it, j <= e - 1 - n_local)
            rem_offset=tail_end - tail_first if self._whole_remainder else s - self.n_local - tail_first + 1,
            scale=scale, check=self._check_ops,
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
            self._staged_init, self._staged_blocks = self.init_len, []
        staged: list[int] = []
        if n_sel and isinstance(ids_per_head, torch.Tensor):
            self._gather_blocks(ids_per_head, k_glb, v_glb, self.init_len)
        elif n_sel:
            staged = self._stage_blocks(ids_per_head, k_glb, v_glb, self.init_len)
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

    def _gather_blocks(self, ids: torch.Tensor, k_glb, v_glb, at: int) -> None:
        """Device path: copy the selected blocks (ids (Hsel, k) on the device) from the store (on the device,
        or pinned on the host with offload_access: direct) into staging slots [at, at + k * block_size), in
        one gather, no host sync."""
        bs, n = self.cfg.block_size, ids.shape[1] * self.cfg.block_size
        dst_k = k_glb[:, at : at + n].view(self.hkv, ids.shape[1], bs, self.d).transpose(0, 1)  # (k, Hkv, bs, D)
        dst_v = v_glb[:, at : at + n].view(self.hkv, ids.shape[1], bs, self.d).transpose(0, 1)
        self.ops.gather_blocks(*self.resident_blocks(ids), dst_k, dst_v)
        self._staged_blocks = []  # the host path's slot bookkeeping no longer matches the staging buffer

    def resident_blocks(self, ids: torch.Tensor, from_ring: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Device path: where the selected blocks (ids (Hsel, k) on the device) can be read on the device:
        (K, V, ids) in the store's layout, for `global_stage_into` or `gather_blocks`. The store itself
        when it is on the device; with offload_access: direct, the device cache's slots (only blocks not
        cached yet cross the bus; `from_ring`: a prefill's newest blocks come from the formation ring), or
        with perhead fresh device slots (each head's own blocks)."""
        if not self._direct:
            return self.store.k, self.store.v, ids
        if not self.cfg.perhead:
            cache = self.block_cache_on_device()
            fetched, self._resident_slots = self._resident_slots, None
            if fetched is not None and fetched[0] is ids:
                return cache.k, cache.v, fetched[1]
            return cache.k, cache.v, cache.fetch(self.ops, self.store, ids, self._ring_blocks() if from_ring else None)
        n_sel = ids.shape[1]
        if self._fetched is None or self._fetched[0].shape[0] < n_sel:
            shape = (max(n_sel, self.cfg.topk), self.hkv, self.cfg.block_size, self.d)
            self._fetched = (torch.empty(shape, dtype=self.dtype, device=self.device),
                             torch.empty(shape, dtype=self.dtype, device=self.device))
            self._slot_ids = torch.arange(shape[0], device=self.device).unsqueeze(0)
        fetched_k, fetched_v = self._fetched[0][:n_sel], self._fetched[1][:n_sel]
        self.ops.gather_blocks(self.store.k, self.store.v, ids, fetched_k, fetched_v)
        return fetched_k, fetched_v, self._slot_ids[:, :n_sel]

    def _ring_blocks(self) -> tuple | None:
        """The formation ring's blocks for the ops' `ring` argument (None without a ring or blocks in it)."""
        return self.ring.blocks() if self.ring is not None else None

    def settle_copies(self) -> None:
        """The current stream waits for the formation ring's copies to the store (before steps that read
        blocks from the store only: decode steps, captured or not)."""
        if self.ring is not None:
            self.ring.settle()

    def block_cache_on_device(self) -> DeviceBlockCache:
        """offload_access: direct: the device block cache, allocated on first use (call it outside a CUDA
        graph capture: its initial fill must not be captured)."""
        if self.device_cache is None:
            self.device_cache = DeviceBlockCache(self.cfg.max_cached_block, (self.hkv, self.cfg.block_size, self.d),
                                                 self.dtype, self.device, self._check_ops)
        return self.device_cache

    def _stage_blocks(self, ids_per_head: list[list[int]], k_glb, v_glb, at: int) -> list[int]:
        """Write the selected blocks into staging slots [at, at + n_sel * block_size); returns the block id of
        each slot. Blocks staged last time keep their slot; only new ones are copied (from the device cache
        when offloading, else from the store)."""
        bs = self.cfg.block_size
        flat = sorted({i for ids in ids_per_head for i in ids})
        if self.cache is not None:
            slots = self.cache.fetch(flat, self.store)
            self.cache.wait_for_copies()
            slot_of = dict(zip(flat, slots))
            source_k, source_v = self.cache.k, self.cache.v
        else:
            slot_of = {i: i for i in flat}
            source_k, source_v = self.store.k, self.store.v
        if len(ids_per_head) > 1:  # perhead: head h reads its own blocks; restage everything
            rows = torch.tensor([[slot_of[i] for i in ids] for ids in ids_per_head], device=source_k.device)
            heads = torch.arange(self.hkv, device=source_k.device).unsqueeze(1)
            n = rows.shape[1] * bs
            k_glb[:, at : at + n].copy_(source_k[rows, heads].reshape(self.hkv, n, self.d))
            v_glb[:, at : at + n].copy_(source_v[rows, heads].reshape(self.hkv, n, self.d))
            self._staged_blocks = []
            return flat
        wanted = ids_per_head[0]
        previous = self._staged_blocks
        if len(previous) == len(wanted) and self.cache is None:
            keep = set(previous) & set(wanted)
            incoming = iter(i for i in wanted if i not in keep)
            order = [b if b in keep else next(incoming) for b in previous]
            changed = [slot for slot, b in enumerate(order) if b not in keep]
        else:  # the cache path restages all: cache slots may have been refilled by other blocks
            order, changed = list(wanted), list(range(len(wanted)))
        if changed:
            n = len(order) * bs
            dst_k = k_glb[:, at : at + n].view(self.hkv, len(order), bs, self.d)
            dst_v = v_glb[:, at : at + n].view(self.hkv, len(order), bs, self.d)
            if len(changed) <= 2 and source_k.device == self.device:  # decoding: a copy per slot, fewer ops
                for c in changed:
                    dst_k[:, c].copy_(source_k[slot_of[order[c]]])
                    dst_v[:, c].copy_(source_v[slot_of[order[c]]])
            else:
                src = torch.tensor([slot_of[order[c]] for c in changed], dtype=torch.int64, device=source_k.device)
                blk_k = source_k.index_select(0, src).to(self.device, non_blocking=True)  # (c, Hkv, bs, D)
                blk_v = source_v.index_select(0, src).to(self.device, non_blocking=True)
                if len(changed) == len(order):
                    dst_k.copy_(blk_k.transpose(0, 1))
                    dst_v.copy_(blk_v.transpose(0, 1))
                else:  # one scatter per K and V into the changed slots
                    slots = torch.tensor(changed, dtype=torch.int64, device=self.device)
                    dst_k.index_copy_(1, slots, blk_k.transpose(0, 1))
                    dst_v.index_copy_(1, slots, blk_v.transpose(0, 1))
        self._staged_blocks = order
        return order

    def _staging(self, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._staging_k is None or self._staging_k.shape[1] < total:
            cap = max(total, 2 * (self._staging_k.shape[1] if self._staging_k is not None else 0))
            self._staging_k = torch.empty(self.hkv, cap, self.d, dtype=self.dtype, device=self.device)
            self._staging_v = torch.empty_like(self._staging_k)
            self._staged_init, self._staged_blocks = -1, []
        return self._staging_k, self._staging_v

    def _refine(self, values: torch.Tensor, indices: torch.Tensor, query: torch.Tensor, reprs: torch.Tensor,
                first: int, k: int) -> torch.Tensor:
        """The device lookup's refinement of a batch row with blocks [first, ...) (see `lookup.Refine`)."""
        if self._direct and not self.cfg.perhead:  # the lookup makes its blocks resident in the same program
            ids, slots = self.block_cache_on_device().fetch_refined(
                self.ops, self.store, values, indices, query, reprs, first, k, self._ring_blocks(),
            )
            self._resident_slots = (ids, slots)
            return ids
        return self.ops.refine_topk(values, indices, query, reprs, first, k, check=self._check_ops)

    def _prefetch_blocks(self) -> None:
        """offload_access: direct with async_global_stream: the blocks the call's lookups select among those
        existing now (the batch top-k; execution blocks refine it only with blocks formed since) start
        crossing the bus on the side stream while the local stage runs, so that their global stages find
        them cached. Random-weight models retrieve almost at random; this hides the bus time of most of a
        prefill's misses behind the local stage."""
        n_blocks = self.store.count
        if n_blocks <= self.cfg.topk:
            return
        batch = self.lookup.batch_topk(n_blocks)
        self.block_cache_on_device().prefetch(self.ops, self.store, batch.indices.view(1, -1), self.copy_stream,
                                              self._ring_blocks())

    def rebase_due(self, p: int) -> bool:
        """A decode step at position p re-rotates the window first (angles would exceed n_local + the slack)."""
        return self.rot_base is None or p - self.rot_base > self.n_local + ROTATION_SLACK * self.exc

    def _report_received(self, q_glb, k_glb, lse, selected: list[int], scale: float) -> None:
        """The attention probability each selected block received in this execution block, to the block
        cache's eviction strategy when it uses them (LRU-S); k_glb (Hkv, n, D) starts at the selected blocks."""
        if self.cache is None or not selected or not self.cache.uses_scores:
            return
        n = len(selected) * self.cfg.block_size
        kk = k_glb[:, :n].repeat_interleave(self.group, dim=0).float()  # (Hq, n, D)
        probs = torch.exp(q_glb.float() @ kk.transpose(-1, -2) * scale - lse.unsqueeze(-1))  # (Hq, Lq, n)
        per_block = probs.sum(dim=(0, 1)).view(len(selected), self.cfg.block_size).sum(-1)
        self.cache.add_scores(selected, per_block.tolist())  # host sync: cache bookkeeping lives on host

    # --------------------------------------------------------------------------------------- formation
    def _form_memory(self, end: int, into_ring: bool = False) -> None:
        """After queries up to `end`: move tokens behind the window to the sinks, then to blocks (or drop).
        `into_ring` (a prefill): with direct and a side stream, through the formation ring."""
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
        starts = [first + i * bs for i in range(n)]
        store = self.store
        # a prefill with direct and a side stream: into the formation ring, copied to the store from there;
        # else one op writes the store's new slots: on the device, or (direct) in pinned host memory over the bus
        if into_ring and self._use_ring and self._formation_ring().size >= n:
            self.ring.form(self.ops, keys, values, scores, self.cfg.repr_topk, store, store.claim(n, starts))
        elif store.k.device == self.device or self._direct:  # (direct with a codec: encoded by the same launch)
            new = store.claim(n, starts)
            scales = None if store.codec is None else (store.k_scale[new], store.v_scale[new])
            self.ops.form_blocks(keys, values, scores, self.cfg.repr_topk, store.k[new], store.v[new],
                                 store.repr[new].view(n, self.score_heads, self.d), check=self._check_ops,
                                 scales=scales)
        else:  # to the host (cache access, compressed or not): representatives here, K/V copied asynchronously
            representatives = block_representatives(keys, scores, self.cfg.repr_topk, self.repr_dtype)
            store.add_many(keys.transpose(0, 1), values.transpose(0, 1), representatives, starts)
        self.lookup.added(n)
        self.tail.drop_front(n * bs)

    def _formation_ring(self) -> FormationRing:
        """The formation ring, created at the first formation on the shared slots (or this layer's own)."""
        if self.ring is None:
            slots = self._ring_slots((self.hkv, self.cfg.block_size, self.d), self.dtype, self.device)
            self.ring = FormationRing(slots, self.copy_stream, self._check_ops)
        return self.ring

    # ---------------------------------------------------------------------------------------- sessions
    def state(self) -> dict:
        self.settle_copies()  # the store's newest blocks may not have been copied yet
        state = {"seen": self.seen, "rot_base": self.rot_base, "n_local": self.n_local,
                 "init_k": self.init_k[:, : self.init_len].clone(),
                 "init_v": self.init_v[:, : self.init_len].clone(), "tail": self.tail.state()}
        if self.store is not None:
            state["store"] = self.store.state()
        return state

    def load_state(self, state: dict) -> None:
        self.settle_copies()  # no copy of an old block may land in the store after it is replaced
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
        self.settle_copies()  # the store's newest blocks may not have been copied yet
        return take_snapshot(self.seen, self.n_local, self.rot_base, self.init_k[:, : self.init_len],
                             self.init_v[:, : self.init_len], self.tail,
                             self.store.share() if self.store is not None else None, parent)

    def restore(self, snap: LayerSnapshot) -> None:
        """Continue from `snap`, a snapshot of this layer: the store is rewound to its blocks in place."""
        if (snap.blocks is None) != (self.store is None) or (snap.blocks is not None and snap.blocks.store is not self.store):
            raise ValueError("a layer snapshot can only be restored into the memory it was taken from")
        self.settle_copies()
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
        self._staged_init, self._staged_blocks = -1, []
        self.lookup.reset()
        self._resident_slots = None
        self.rot_base = None
        if rot_base is not None:
            self._rebase_rotation(int(rot_base))
        if self.store is None:
            return
        for cache in (self.cache, self.device_cache, self.ring):
            if cache is not None:
                cache.clear()
