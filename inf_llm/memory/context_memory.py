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
Knows nothing of transformers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from inf_llm.config import CacheStrategy, MemoryType, ModelConfig
from inf_llm.errors import ConfigError, MissingDependencyError
from inf_llm.kernels import reference as _torch_ops
from inf_llm.kernels.reference import block_representatives
from inf_llm.memory.block_cache import BlockCache, DeviceBlockCache, FormationRing, RingSlots, check_block_cache
from inf_llm.memory.buffers import BlockStore, StorageSpec, TokenBuffer, representative_dtype
from inf_llm.memory.compression import BlockCodec
from inf_llm.memory.rope import RotaryTable
from inf_llm.memory.snapshot import LayerSnapshot
from inf_llm.memory.snapshot import take as take_snapshot

if TYPE_CHECKING:
    from inf_llm.memory.static_step import StaticDecodeStep

log = logging.getLogger(__name__)

# Execution blocks the rotation base may lag behind before the window is re-rotated: bounds the largest
# RoPE angle used (n_local + this many blocks) while re-rotating rarely during decoding.
ROTATION_SLACK = 4
# Device-path lookups whose selections are added to the retrieval counts together (see
# _count_device_selections).
COUNT_BATCH = 64
# Queries of one local-stage call when the ops do not say (`ops.LOCAL_STAGE_ROWS`: the Triton kernels take
# a whole prefill chunk, the torch ops one execution block) and there are no execution blocks (origin):
# bounds the explicit (rows x keys) scores of the torch ops (8192 queries x 12K keys x 32 heads of fp32 took
# 12 GiB on a GPU).
LOCAL_STAGE_ROWS = 2048


@dataclass(frozen=True)
class MemoryPolicy:
    """What a memory type keeps and where it puts positions."""

    windowed: bool  # False: plain full attention over everything (origin)
    keeps_blocks: bool  # evicted tokens become retrievable blocks (inf-llm) instead of being dropped
    sink_positions: bool  # sinks rotated at 0..n_init-1 (stream-llm) instead of un-rotated
    global_query_pos: int  # the fixed angle of global-stage queries

    @staticmethod
    def of(cfg: ModelConfig) -> "MemoryPolicy":
        t = MemoryType(cfg.type)
        if t is MemoryType.ORIGIN:
            return MemoryPolicy(windowed=False, keeps_blocks=False, sink_positions=False, global_query_pos=0)
        if t is MemoryType.STREAM_LLM:
            return MemoryPolicy(True, False, True, cfg.n_init + cfg.n_local - 1)
        # inf-llm and infinite-lm: memory keys sit at distance ~n_local (code: row n_local - 1).
        return MemoryPolicy(True, t is MemoryType.INF_LLM, False, cfg.n_local - 1)


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


@dataclass
class _Lookup:
    """Batched lookups of several execution blocks (chunk_topk_calc): top-k over the blocks existing when
    the batch was scored; blocks formed later are scored individually and merged (exact)."""

    first_block: int  # index of the first execution block of the batch
    known_blocks: int  # blocks that existed when scored
    values: torch.Tensor  # (n_exec, Hsel, k) scores of the top-k among known blocks
    indices: torch.Tensor  # (n_exec, Hsel, k)
    query_vectors: torch.Tensor  # (n_exec, Hsel, Hr*D or D): to score blocks formed later
    rows: tuple | None = None  # device path: (values, indices, query_vectors) unbound per execution block


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
        # Lookups of the last forward, as selected: host lists (host paths) or device id tensors (device path);
        # read through `retrieved_last` / `retrieval_counts`, which convert once, when asked.
        self._retrieved: list = []
        self._counts: dict[int, int] = {}  # block id -> execution blocks that selected it (host paths)
        self._device_counts: torch.Tensor | None = None  # the same, counted on the device (device path)
        self._uncounted: list[torch.Tensor] = []  # device path: selections not yet added to _device_counts
        self._lookup: _Lookup | None = None
        self._call_qvecs: torch.Tensor | None = None
        self._staging_k: torch.Tensor | None = None  # (Hkv, cap, D): [sinks | blocks | remainder]
        self._staging_v: torch.Tensor | None = None
        self._staged_init = -1  # sink count currently staged
        self._staged_blocks: list[int] = []  # block id of each staged block slot
        self.store: BlockStore | None = None
        self.cache: BlockCache | None = None
        self._faiss_index = None
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
            if cfg.faiss:
                self._faiss_index = _new_faiss_index(num_kv_heads * head_dim if not cfg.perhead else head_dim,
                                                     num_kv_heads if cfg.perhead else 1)
        # Device path: blocks live on the compute device, or in pinned host memory read by the GPU by id
        # (offload_access: direct), and lookups stay on the device (top-k ids are never read by the host, so
        # a forward pass makes no host sync). Host paths: the block cache (it needs the ids on the host) or
        # faiss (a host index). On a CPU a host sync costs nothing, and the host path restages only the
        # blocks that changed (decoding mostly retrieves the same ones), so it is the default there
        # (device_lookup=True forces the device path, for tests).
        # offload_access: direct: the selected blocks are fetched into device slots before each global stage
        self._direct = self.store is not None and offload and cfg.offload_access == "direct"
        possible = self.store is not None and self.cache is None and self._faiss_index is None
        self.device_lookup = possible and (
            (device.type != "cpu" or self._direct) if device_lookup is None else device_lookup
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
        self.static_step: StaticDecodeStep | None = None

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
        if length == 1 and self.policy.windowed and hasattr(self.ops, "decode_attention"):
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
        self._retrieved = []
        bounds = self._exec_bounds(start, end)
        self._lookup = None
        self._call_qvecs = None
        # global-stage queries: all rows at one angle, rotated once for the call
        has_global = self.n_local is not None and end - 1 - self.n_local >= 0
        q_glb = self._rotate(q, self.policy.global_query_pos, one_angle=True) if has_global else None
        # Lookup vectors of all execution blocks at once: they depend on the queries only (the device path's
        # per-block ops are host launches; chunk_topk_calc scores them in batches)
        if has_global and self.policy.keeps_blocks and len(bounds) > 1 and (
            self.device_lookup or self.cfg.chunk_topk_calc
        ):
            self._call_qvecs = self._query_vectors(q_glb, bounds, start)
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
        piece = getattr(self.ops, "LOCAL_STAGE_ROWS", None) or self.exc or LOCAL_STAGE_ROWS
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
        self._count_device_selections()
        return out

    def _decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """`process` for one query (decoding), through the ops' single-query op: the same keys, positions and
        lookup as the general path, but both stages in one softmax whose window probabilities are the key
        scores, so no merge and no second pass (decoding a small model on a CPU is bound by op count)."""
        p = self.seen
        self.plan(p + 1)
        self._retrieved, self._lookup, self._call_qvecs = [], None, None
        self.settle_copies()  # the step reads blocks from the store only
        window_start = max(p - self.n_local + 1, self.tail.first_pos)
        if self._rebase_due(p):
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
        self._count_device_selections()
        return out[:, None]

    @property
    def retrieved_last(self) -> list[list[int]]:
        """Block ids selected by each execution block of the last forward (sorted, heads merged)."""
        return [ids if isinstance(ids, list) else sorted(set(ids.flatten().tolist())) for ids in self._retrieved]

    @property
    def retrieval_counts(self) -> dict[int, int]:
        """Block id -> execution blocks that selected it, since the last `reset_retrieval_counts`."""
        counts = dict(self._counts)
        # counts made by forwards in inference mode are inference tensors: updated in that mode only
        with torch.inference_mode(self._device_counts is not None and self._device_counts.is_inference()):
            self._count_device_selections(force=True)
        if self._device_counts is not None:
            hits = self._device_counts[: self.store.count].tolist()  # host copy, only when asked
            for block, n in enumerate(hits):
                if n:
                    counts[block] = counts.get(block, 0) + int(n)
        return counts

    def reset_retrieval_counts(self) -> None:
        self._counts.clear()
        self._device_counts = None
        self._uncounted.clear()

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
        ids = self._select_blocks(qb, index)
        if ids is None:
            ids = torch.empty(1, 0, dtype=torch.int64, device=self.device)
        store_k, store_v, ids = self._resident(ids, from_ring=True)
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
        ids_per_head = self._select_blocks(qb, index, q_rotated) if self.policy.keeps_blocks else None
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
        self.ops.gather_blocks(*self._resident(ids), dst_k, dst_v)
        self._staged_blocks = []  # the host path's slot bookkeeping no longer matches the staging buffer

    def _resident(self, ids: torch.Tensor, from_ring: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

    # ------------------------------------------------------------------------------------------ lookup
    def _query_vector(self, qb: torch.Tensor, q_rotated: torch.Tensor | None = None) -> torch.Tensor:
        """Lookup vector of an execution block: the mean of its un-rotated queries rotated to the global
        angle (rotation is linear), heads of each KV group summed (lookup_heads: kv) or one per query head
        (query). (1, Hr*D) (Hr = score_heads), or (Hkv, D) with perhead.
        `q_rotated`: one query already rotated to the global angle in the representatives' dtype."""
        if q_rotated is None:
            q_mean = qb.to(self.repr_dtype)
            q_rotated = self.rope.rotate_at(q_mean if qb.shape[1] == 1 else q_mean.mean(dim=1, keepdim=True),
                                            self.policy.global_query_pos)
        per_head = q_rotated[:, 0]  # (Hq, D)
        if self.score_heads == self.hkv:
            per_head = per_head.view(self.hkv, self.group, self.d).sum(dim=1)  # (Hkv, D)
        return per_head if self.cfg.perhead else per_head.reshape(1, -1)

    def _query_vectors(self, q_glb: torch.Tensor, bounds: list[tuple[int, int]], start: int) -> torch.Tensor:
        """`_query_vector` of every execution block of a call, (n, Hsel, X), in a few ops, from the call's
        queries already rotated to the global angle (rotation is linear: the mean of rotated queries is the
        rotated mean, up to their rounding, as the original averages its rotated global queries). Means in
        the representatives' precision, read straight from the contiguous q_glb: converting q first cost a
        full float32 copy of it per layer. Runs of full blocks by one reshaped mean, a partial first or last
        block by its own."""
        means, k = [], 0
        while k < len(bounds):
            j = k
            while j < len(bounds) and bounds[j][1] - bounds[j][0] == self.exc:
                j += 1
            if j > k:  # blocks k..j-1 are full: (Hq, j-k, D)
                rows = q_glb[:, bounds[k][0] - start : bounds[j - 1][1] - start]
                means.append(rows.unflatten(1, (j - k, self.exc)).mean(dim=2, dtype=self.repr_dtype))
                k = j
            else:
                s, e = bounds[k]
                means.append(q_glb[:, s - start : e - start].mean(dim=1, keepdim=True, dtype=self.repr_dtype))
                k += 1
        mean = means[0] if len(means) == 1 else torch.cat(means, dim=1)  # (Hq, n, D)
        if self.score_heads == self.hkv:
            mean = mean.view(self.hkv, self.group, len(bounds), self.d).sum(dim=1)  # (Hkv, n, D)
        per_head = mean.transpose(0, 1)  # (n, Hr, D)
        return per_head if self.cfg.perhead else per_head.reshape(len(bounds), 1, -1)

    def _block_scores(self, qvec: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Scores (..., Hsel, last-first) of blocks [first, last) for query vectors qvec (..., Hsel, X)."""
        reprs = self.store.representatives()[first:last]  # (N, Hr*D), float32 (float64 in float64 tests)
        if self.cfg.perhead:
            return torch.einsum("...hd,nhd->...hn", qvec, reprs.view(-1, self.hkv, self.d))
        # (N, X) @ (X, Hsel): a GEMV for cuBLAS (as qvec @ reprs.T, an m=1 GEMM, it took 56 us on an H200);
        # one lookup vector through torch.mv, which dispatches in less host time than matmul
        if qvec.dim() == 2:
            return torch.mv(reprs, qvec[0]).unsqueeze(0)  # (1, N)
        return (reprs @ qvec.mT).mT  # (..., 1, N)

    def _select_blocks(self, qb: torch.Tensor, index: int, q_rotated: torch.Tensor | None = None
                       ) -> list[list[int]] | torch.Tensor | None:
        """Top-k block ids for this execution block: one list, or Hkv lists with perhead; on the device
        path a (1 or Hkv, k) int64 tensor of ids on the device instead (in score order: the kernels do not
        care about the order, and a sort cost a launch per lookup)."""
        n_blocks = self.store.count
        if n_blocks == 0:
            return None
        topk = self.cfg.topk
        heads = self.hkv if self.cfg.perhead else 1
        if self.device_lookup and topk > 0:
            return self._device_select(qb, n_blocks, heads, q_rotated, index)
        if n_blocks <= topk or (self.cfg.dense_decoding and qb.shape[1] == 1):
            ids = [list(range(n_blocks))] * heads
        elif topk == 0:
            self._record([[]])
            return None
        elif self._call_qvecs is not None:
            ids = self._batched_select(index)
        else:
            qvec = self._query_vector(qb, q_rotated)
            if self._faiss_index is not None:
                ids = self._faiss_search(qvec, topk)
            else:
                scores = self._block_scores(qvec, 0, n_blocks)  # (Hsel, N)
                ids = scores.topk(topk, dim=-1).indices.sort(dim=-1).values.tolist()  # host sync: ids drive the gather
        self._record(ids)
        return ids

    def _device_select(self, qb: torch.Tensor, n_blocks: int, heads: int, q_rotated: torch.Tensor | None = None,
                       index: int = 0) -> torch.Tensor:
        if n_blocks <= self.cfg.topk or (self.cfg.dense_decoding and qb.shape[1] == 1):
            ids = torch.arange(n_blocks, device=self.store.repr.device).expand(heads, -1)
        elif self._call_qvecs is not None:
            ids = self._device_batched_select(index, n_blocks)
        else:
            qvec = self._query_vector(qb, q_rotated)
            ids = self._block_scores(qvec, 0, n_blocks).topk(self.cfg.topk, dim=-1).indices  # (Hsel, k)
        self._retrieved.append(ids)
        self._uncounted.append(ids)  # counted in batches by _count_device_selections
        return ids

    def _device_batched_select(self, index: int, n_blocks: int) -> torch.Tensor:
        """Device path, execution block `index` of a call: the call's lookups score the blocks that exist
        at its first lookup in one matmul and one top-k; each execution block then refines its row with
        the blocks formed since (`ops.refine_topk`, one launch; exact, as in _batched_select). A lookup per
        execution block was a GEMV and a top-k of several launches each, in every layer."""
        topk, batch = self.cfg.topk, self._lookup
        if batch is None:
            batch = self._batch_lookup(n_blocks)
        values, indices, query = (part[index] for part in batch.rows)
        if n_blocks == batch.known_blocks:
            return indices
        reprs = self.store.representatives()
        if self._direct and not self.cfg.perhead:  # the lookup makes its blocks resident in the same program
            ids, slots = self.block_cache_on_device().fetch_refined(
                self.ops, self.store, values, indices, query, reprs, batch.known_blocks, topk,
                self._ring_blocks(),
            )
            self._resident_slots = (ids, slots)
            return ids
        return self.ops.refine_topk(values, indices, query, reprs, batch.known_blocks, topk, check=self._check_ops)

    def _batch_lookup(self, n_blocks: int) -> _Lookup:
        """The call's lookups over the blocks existing now: one matmul and one top-k (device path)."""
        scores = self._block_scores(self._call_qvecs, 0, n_blocks)  # (n_exec, Hsel, N)
        values, indices = scores.topk(self.cfg.topk, dim=-1)
        rows = (values.unbind(0), indices.unbind(0), self._call_qvecs.unbind(0))  # views in three calls
        self._lookup = _Lookup(0, n_blocks, values, indices, self._call_qvecs, rows)
        return self._lookup

    def _prefetch_blocks(self) -> None:
        """offload_access: direct with async_global_stream: the blocks the call's lookups select among those
        existing now (the batch top-k; execution blocks refine it only with blocks formed since) start
        crossing the bus on the side stream while the local stage runs, so that their global stages find
        them cached. Random-weight models retrieve almost at random; this hides the bus time of most of a
        prefill's misses behind the local stage."""
        n_blocks = self.store.count
        if n_blocks <= self.cfg.topk:
            return
        batch = self._batch_lookup(n_blocks)
        self.block_cache_on_device().prefetch(self.ops, self.store, batch.indices.view(1, -1), self.copy_stream,
                                              self._ring_blocks())

    def _count_device_selections(self, force: bool = False) -> None:
        """Device path: add the pending selections to the per-block counts, on the device (a block counts
        once per execution block, whatever the heads), a few ops per COUNT_BATCH selections (or when the
        counts are read): decoding would otherwise pay three launches per layer and step."""
        if len(self._uncounted) < COUNT_BATCH and not (force and self._uncounted):
            return
        selections, self._uncounted = self._uncounted, []
        n_blocks = self.store.count
        if self._device_counts is None or self._device_counts.shape[0] < n_blocks:
            self._grow_device_counts(max(2 * n_blocks, 64))
        if all(ids.shape[0] == 1 for ids in selections):  # one id list per execution block: no duplicates
            flat = torch.cat([ids[0] for ids in selections])
            # index_add_ (atomic adds): index_put_(accumulate=True) sorts the indices and waits for the device
            # (a sync that cost the prefill its overlap of host and GPU, every 64 lookups of every layer)
            ones = torch.ones(flat.shape, dtype=torch.int32, device=flat.device)
            self._device_counts.index_add_(0, flat, ones)
            return
        for ids in selections:  # perhead: a block selected by several heads counts once
            hit = torch.zeros(n_blocks, dtype=torch.int32, device=ids.device).index_fill_(0, ids.flatten(), 1)
            self._device_counts[:n_blocks] += hit

    def _grow_device_counts(self, size: int) -> None:
        """The device path's per-block counts with room for `size` blocks, the counts so far kept."""
        grown = torch.zeros(size, dtype=torch.int32, device=self.device)
        if self._device_counts is not None:
            grown[: self._device_counts.shape[0]] = self._device_counts
        self._device_counts = grown

    def _rebase_due(self, p: int) -> bool:
        """A decode step at position p re-rotates the window first (angles would exceed n_local + the slack)."""
        return self.rot_base is None or p - self.rot_base > self.n_local + ROTATION_SLACK * self.exc

    def _batched_select(self, index: int) -> list[list[int]]:
        """chunk_topk_calc: score the execution blocks of `chunk_topk_calc` tokens in one matmul and one host
        sync. Blocks formed after the batch was scored are merged in exactly (the overall top-k is inside
        old top-k plus new blocks), so the selection equals the per-block lookup."""
        topk, n_blocks = self.cfg.topk, self.store.count
        batch = self._lookup
        if batch is None or index >= batch.first_block + batch.values.shape[0]:
            per_batch = max(1, self.cfg.chunk_topk_calc // self.cfg.exc_block_size)
            qvecs = self._call_qvecs[index : index + per_batch]  # (n, Hsel, X)
            scores = self._block_scores(qvecs, 0, n_blocks)  # (n, Hsel, N)
            values, indices = scores.topk(min(topk, n_blocks), dim=-1)
            # host sync: once per batch of execution blocks
            batch = _Lookup(index, n_blocks, values.cpu(), indices.cpu(), qvecs)
            self._lookup = batch
        j = index - batch.first_block
        values, ids = batch.values[j], batch.indices[j]  # (Hsel, k)
        if n_blocks > batch.known_blocks:
            fresh = self._block_scores(batch.query_vectors[j], batch.known_blocks, n_blocks).cpu()  # host sync
            fresh_ids = torch.arange(batch.known_blocks, n_blocks).expand(fresh.shape[0], -1)
            values, ids = torch.cat([values, fresh], dim=-1), torch.cat([ids, fresh_ids], dim=-1)
            ids = ids.gather(-1, values.topk(topk, dim=-1).indices)
        return ids.sort(dim=-1).values.tolist()

    def _record(self, ids_per_head: list[list[int]]) -> None:
        flat = sorted({i for ids in ids_per_head for i in ids})
        self._retrieved.append(flat)
        for i in flat:
            self._counts[i] = self._counts.get(i, 0) + 1

    def _faiss_search(self, qvec: torch.Tensor, topk: int) -> list[list[int]]:
        import numpy as np

        indexes = self._faiss_index
        result = []
        for h, index in enumerate(indexes):
            query = np.ascontiguousarray(qvec[h : h + 1].detach().cpu().numpy().astype("float32"))  # host sync
            _, ids = index.search(query, topk)
            result.append(sorted(int(i) for i in ids[0]))
        return result

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
        if self._faiss_index is not None:
            for representative in store.repr[store.count - n : store.count]:
                self._faiss_add(representative)
        self.tail.drop_front(n * bs)

    def _formation_ring(self) -> FormationRing:
        """The formation ring, created at the first formation on the shared slots (or this layer's own)."""
        if self.ring is None:
            slots = self._ring_slots((self.hkv, self.cfg.block_size, self.d), self.dtype, self.device)
            self.ring = FormationRing(slots, self.copy_stream, self._check_ops)
        return self.ring

    def _faiss_add(self, representative: torch.Tensor) -> None:
        vec = representative.float().detach().cpu().numpy()  # host sync: faiss lives on the host
        if self.cfg.perhead:
            for h, index in enumerate(self._faiss_index):
                index.add(vec[None, h * self.d : (h + 1) * self.d])
        else:
            self._faiss_index[0].add(vec[None])

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
        self._lookup, self._call_qvecs, self._retrieved, self._resident_slots = None, None, [], None
        self.reset_retrieval_counts()
        self.rot_base = None
        if rot_base is not None:
            self._rebase_rotation(int(rot_base))
        if self.store is None:
            return
        for cache in (self.cache, self.device_cache, self.ring):
            if cache is not None:
                cache.clear()
        if self._faiss_index is not None:
            for index in self._faiss_index:
                index.reset()
            for i in range(self.store.count):
                self._faiss_add(self.store.repr[i])


def _new_faiss_index(dim: int, count: int) -> list:
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(
            "model.faiss: true needs the faiss package (pip install faiss-cpu), or set model.faiss=false"
        ) from exc
    return [faiss.IndexFlatIP(dim) for _ in range(count)]
