"""Where one layer's memory blocks live and how the selected ones reach the attention.

One residency per `ContextMemory`, chosen once when the memory is made (`residency_for`, which also makes the
layer's `BlockStore` where the config puts it):
- `DeviceResidency` (offload: false): the store on the compute device; a host lookup's blocks are staged
  from it into the global keys (blocks staged for the previous execution block keep their slot), a device
  lookup's are read in place by id. Also the residency of memories without blocks (no store, nothing to
  place).
- `CachedHostResidency` (offload: true, offload_access: cache): the store in host memory; the selected
  blocks are made resident in a `BlockCache` (bookkept on the host, evicted by `cache_strategy`) and staged
  from its slots; LRU-S gets each selected block's attention (`report_received`).
- `DirectResidency` (offload_access: direct): the store in pinned host memory, read by id on the device:
  through a `DeviceBlockCache` (a shared top-k: the lookup's refinement makes its blocks resident in the same
  program, a prefill's batch is prefetched on the side stream, new blocks are formed into a `FormationRing`)
  or into fresh device slots (perhead).
Knows nothing of the stages (windows, positions, the softmax) nor of how a lookup selects blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from inf_llm.config import CacheStrategy, ModelConfig
from inf_llm.errors import ConfigError
from inf_llm.kernels.reference import block_representatives
from inf_llm.memory.block_cache import BlockCache, DeviceBlockCache, FormationRing, RingSlots, check_block_cache
from inf_llm.memory.buffers import BlockStore, StorageSpec, representative_dtype
from inf_llm.memory.compression import BlockCodec

if TYPE_CHECKING:
    from inf_llm.memory.lookup import BlockLookup

# (block shape, dtype, device) -> the formation ring's slots, shared with the device's other layers
SlotsFor = Callable[[tuple[int, int, int], torch.dtype, torch.device], RingSlots]


class DeviceResidency:
    """offload: false: the blocks stay in the store on the compute device and are read there (staged for a
    host lookup, in place by id for a device lookup). The base of the other residencies: each hook here is
    what a store read where it lies needs (often nothing)."""

    cache: BlockCache | None = None  # offload_access: cache
    device_cache: DeviceBlockCache | None = None  # offload_access: direct, a shared top-k (at the first lookup)
    ring: FormationRing | None = None  # offload_access: direct with a side stream (at the first formation)
    keeps_staged = True  # blocks staged for the previous lookup keep their staging slot

    def __init__(self, cfg: ModelConfig, store: BlockStore | None, ops: ModuleType, heads: tuple[int, int, int],
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        """`heads`: (query heads, KV heads as stored, score heads: those of the representatives)."""
        self.cfg, self.store, self.ops = cfg, store, ops
        hq, self.hkv, self.score_heads = heads
        self.group, self.d = hq // self.hkv, head_dim
        self.dtype, self.device = dtype, device
        self.repr_dtype = representative_dtype(dtype)
        # The ops' argument checks on the per-execution-block calls: kept on CPUs (the tests, under the Triton
        # interpreter or the torch ops), skipped on a GPU, where they cost the host about as much as a launch
        # and the host's time per prefill chunk is close to the GPU's (docs/speed.md, "Host or GPU")
        self.check = device.type != "cuda"
        self.staged: list[int] = []  # block id of each staged block slot (host lookups)

    def lookup_on_device(self, faiss: bool, forced: bool | None) -> bool:
        """Whether lookups stay on the device (top-k ids never read by the host, so a forward pass makes no host
        sync). On a CPU a host sync costs nothing, and a host lookup restages only the blocks that changed
        (decoding mostly retrieves the same ones), so the host lookup is the default there; faiss is a host
        index. `forced` (tests): the device lookup (True) or the host's (False)."""
        return self.store is not None and not faiss and (self.device.type != "cpu" if forced is None else forced)

    # ------------------------------------------------------------------------- blocks into the attention
    def stage(self, ids: list[list[int]] | torch.Tensor, k_glb: torch.Tensor, v_glb: torch.Tensor,
              at: int) -> list[int]:
        """Write the selected blocks into the global keys' slots [at, at + n_sel * block_size) (k_glb, v_glb
        (Hkv, cap, D)); returns the block id of each slot. `ids`: a host lookup's sorted lists (one, or one per
        KV head with perhead), or a device lookup's (Hsel, k) tensor (gathered on the device; returns [])."""
        if isinstance(ids, torch.Tensor):
            self._gather(ids, k_glb, v_glb, at)
            return []
        bs = self.cfg.block_size
        flat = sorted({i for head_ids in ids for i in head_ids})
        slot_of, source_k, source_v = self._sources(flat)
        if len(ids) > 1:  # perhead: head h reads its own blocks; restage everything
            rows = torch.tensor([[slot_of[i] for i in head_ids] for head_ids in ids], device=source_k.device)
            heads = torch.arange(self.hkv, device=source_k.device).unsqueeze(1)
            n = rows.shape[1] * bs
            k_glb[:, at : at + n].copy_(source_k[rows, heads].reshape(self.hkv, n, self.d))
            v_glb[:, at : at + n].copy_(source_v[rows, heads].reshape(self.hkv, n, self.d))
            self.staged = []
            return flat
        wanted = ids[0]
        previous = self.staged
        if len(previous) == len(wanted) and self.keeps_staged:
            keep = set(previous) & set(wanted)
            incoming = iter(i for i in wanted if i not in keep)
            order = [b if b in keep else next(incoming) for b in previous]
            changed = [slot for slot, b in enumerate(order) if b not in keep]
        else:
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
        self.staged = order
        return order

    def _sources(self, flat: list[int]) -> tuple[dict[int, int], torch.Tensor, torch.Tensor]:
        """Where a host lookup's blocks `flat` are copied from: (slot of each block, K, V), the store here."""
        return {i: i for i in flat}, self.store.k, self.store.v

    def _gather(self, ids: torch.Tensor, k_glb: torch.Tensor, v_glb: torch.Tensor, at: int) -> None:
        """A device lookup's blocks (ids (Hsel, k) on the device) from where they are resident into the global
        keys' slots [at, at + k * block_size), in one gather, no host sync."""
        bs, n = self.cfg.block_size, ids.shape[1] * self.cfg.block_size
        dst_k = k_glb[:, at : at + n].view(self.hkv, ids.shape[1], bs, self.d).transpose(0, 1)  # (k, Hkv, bs, D)
        dst_v = v_glb[:, at : at + n].view(self.hkv, ids.shape[1], bs, self.d).transpose(0, 1)
        self.ops.gather_blocks(*self.resident_blocks(ids), dst_k, dst_v)
        self.staged = []  # the host lookups' slot bookkeeping no longer matches the staging buffer

    def resident_blocks(self, ids: torch.Tensor, from_ring: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where a device lookup's blocks (ids (Hsel, k) on the device) can be read on the device: (K, V, ids)
        in the store's layout, for `global_stage_into`, `gather_blocks` or `decode_attention`; here the store
        itself. `from_ring`: a prefill's newest blocks may be read from the formation ring."""
        return self.store.k, self.store.v, ids

    def refine(self, values: torch.Tensor, indices: torch.Tensor, query: torch.Tensor, reprs: torch.Tensor,
               first: int, k: int) -> torch.Tensor:
        """The device lookup's refinement of a batch row with blocks [first, ...) (see `lookup.Refine`)."""
        return self.ops.refine_topk(values, indices, query, reprs, first, k, check=self.check)

    def report_received(self, q_glb: torch.Tensor, k_glb: torch.Tensor, lse: torch.Tensor, selected: list[int],
                        scale: float) -> None:
        """The attention an execution block's queries gave the staged blocks `selected` (q_glb (Hq, Lq, D), k_glb
        (Hkv, n, D) starting at the selected blocks, lse (Hq, Lq) of the merged softmax): only a block cache
        whose eviction strategy uses it (LRU-S) wants it."""

    def prefetch(self, lookup: BlockLookup) -> None:
        """A prefill call's lookup vectors are ready (`lookup.prepare`): blocks may start moving ahead."""

    # ------------------------------------------------------------------------------------ formation
    def form(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, starts: list[int],
             into_ring: bool = False) -> None:
        """New blocks into the store: keys/values (Hkv, n, bs, D), scores (Hr, n, bs), `starts` their first
        positions. `into_ring`: a prefill (direct with a side stream forms through the formation ring)."""
        if self.store.k.device == self.device:
            self._form_in_store(keys, values, scores, starts)
        else:  # to the host (cache access, compressed or not): representatives here, K/V copied asynchronously
            representatives = block_representatives(keys, scores, self.cfg.repr_topk, self.repr_dtype)
            self.store.add_many(keys.transpose(0, 1), values.transpose(0, 1), representatives, starts)

    def _form_in_store(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                       starts: list[int]) -> None:
        """One op writes the store's new slots (on the device, or in pinned host memory over the bus; a store of
        codes is encoded by the same launch)."""
        store, n = self.store, len(starts)
        new = store.claim(n, starts)
        scales = None if store.codec is None else (store.k_scale[new], store.v_scale[new])
        self.ops.form_blocks(keys, values, scores, self.cfg.repr_topk, store.k[new], store.v[new],
                             store.repr[new].view(n, self.score_heads, self.d), check=self.check, scales=scales)

    # ---------------------------------------------------------------------------- calls and copies
    def begin_prefill(self) -> None:
        """A prefill call starts (it reads the store's blocks of the last call)."""

    def end_prefill(self) -> None:
        """A prefill call ended (even by an error)."""

    def settle(self) -> None:
        """The current stream waits for copies still on their way to the store (before a step that reads blocks
        from the store only, and before the store's state is read or replaced)."""

    def ready_for_replay(self) -> None:
        """Before a static decode step, outside any CUDA graph capture: what it reads is allocated and no copy
        or prefetch is pending."""

    def layout_tensors(self) -> tuple[torch.Tensor, ...]:
        """Tensors besides the store's that a static decode step reads (their addresses are baked into a graph)."""
        return ()

    # ---------------------------------------------------------------------------- accounting, sessions
    def nbytes(self) -> tuple[int, int]:
        """(bytes on the compute device, bytes in host memory) of the blocks and what serves them."""
        if self.store is None:
            return 0, 0
        storage, reprs = self.store.nbytes()
        if self.store.k.device.type == "cpu":
            return reprs, storage
        return reprs + storage, 0

    def counts(self) -> tuple[int, int, int]:
        """Blocks found resident, blocks read from the store, blocks prefetched (the caches' counters)."""
        return 0, 0, 0

    def forget_staged(self) -> None:
        """The global keys' buffer was reallocated or its sinks restaged: no block sits in a slot any more."""
        self.staged = []

    def reset(self) -> None:
        """The store's contents were replaced (a session or snapshot loaded): what derives from the old blocks
        goes (staged slots, cached blocks, formed blocks not yet copied)."""
        self.staged = []


class CachedHostResidency(DeviceResidency):
    """offload_access: cache: the store in host memory; each host lookup's blocks are made resident in the block
    cache's `max_cached_block` device slots (loads on the side stream with `async_global_stream`), then staged
    from there."""

    keeps_staged = False  # cache slots may have been refilled by other blocks: the cache path restages all

    def __init__(self, *args, copy_stream: torch.cuda.Stream | None = None):
        super().__init__(*args)
        cfg = self.cfg
        self.cache = BlockCache(cfg.max_cached_block, CacheStrategy(cfg.cache_strategy), cfg.effective_score_decay,
                                (self.hkv, cfg.block_size, self.d), self.dtype, self.device, copy_stream)

    def lookup_on_device(self, faiss: bool, forced: bool | None) -> bool:
        return False  # the cache is bookkept on the host: it needs the ids there

    def _sources(self, flat: list[int]) -> tuple[dict[int, int], torch.Tensor, torch.Tensor]:
        slots = self.cache.fetch(flat, self.store)
        self.cache.wait_for_copies()
        return dict(zip(flat, slots)), self.cache.k, self.cache.v

    def report_received(self, q_glb: torch.Tensor, k_glb: torch.Tensor, lse: torch.Tensor, selected: list[int],
                        scale: float) -> None:
        if not selected or not self.cache.uses_scores:
            return
        n = len(selected) * self.cfg.block_size
        kk = k_glb[:, :n].repeat_interleave(self.group, dim=0).float()  # (Hq, n, D)
        probs = torch.exp(q_glb.float() @ kk.transpose(-1, -2) * scale - lse.unsqueeze(-1))  # (Hq, Lq, n)
        per_block = probs.sum(dim=(0, 1)).view(len(selected), self.cfg.block_size).sum(-1)
        self.cache.add_scores(selected, per_block.tolist())  # host sync: cache bookkeeping lives on host

    def nbytes(self) -> tuple[int, int]:
        storage, reprs = self.store.nbytes()
        return reprs + self.cache.nbytes(), storage

    def counts(self) -> tuple[int, int, int]:
        return self.cache.hits, self.cache.misses, 0

    def reset(self) -> None:
        super().reset()
        self.cache.clear()


class DirectResidency(DeviceResidency):
    """offload_access: direct: the store in pinned host memory, read by the GPU by id. A shared top-k keeps the
    blocks read so far in the device block cache (`max_cached_block` slots, LRU bookkept on the device, at
    the first lookup); with perhead each lookup's blocks are read into fresh device slots (each head its
    own). With a side stream (or on a CPU, inline, for the tests) a shared top-k's prefill prefetches its
    blocks into the device cache and forms new ones into device slots copied to the store from there (the
    formation ring, at the first formation; not with a codec: it copies raw K/V)."""

    def __init__(self, *args, copy_stream: torch.cuda.Stream | None = None, ring_slots: SlotsFor | None = None):
        super().__init__(*args)
        self.copy_stream = copy_stream
        self.overlapped = not self.cfg.perhead and (copy_stream is not None or self.device.type == "cpu")
        self.use_ring = self.overlapped and self.cfg.offload_dtype is None
        self.ring_slots = ring_slots or RingSlots
        self._resident: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, their slots) of the last refine
        self._fetched: tuple[torch.Tensor, torch.Tensor] | None = None  # perhead: the fetched blocks' slots
        self._slot_ids: torch.Tensor | None = None  # perhead: 0..topk-1, the fetched blocks' slot numbers

    def lookup_on_device(self, faiss: bool, forced: bool | None) -> bool:
        return not faiss and (True if forced is None else forced)

    def device_block_cache(self) -> DeviceBlockCache:
        """The device block cache, allocated on first use (call it outside a CUDA graph capture: its initial
        fill must not be captured)."""
        if self.device_cache is None:
            self.device_cache = DeviceBlockCache(self.cfg.max_cached_block, (self.hkv, self.cfg.block_size, self.d),
                                                 self.dtype, self.device, self.check)
        return self.device_cache

    def _ring_blocks(self) -> tuple | None:
        """The formation ring's blocks for the ops' `ring` argument (None without a ring or blocks in it)."""
        return self.ring.blocks() if self.ring is not None else None

    def resident_blocks(self, ids: torch.Tensor, from_ring: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device cache's slots (only blocks not cached yet cross the bus; a refined lookup's were made
        resident by the refinement), or with perhead fresh device slots."""
        if self.cfg.perhead:
            return self._fresh_slots(ids)
        cache = self.device_block_cache()
        fetched, self._resident = self._resident, None
        if fetched is not None and fetched[0] is ids:
            return cache.k, cache.v, fetched[1]
        return cache.k, cache.v, cache.fetch(self.ops, self.store, ids, self._ring_blocks() if from_ring else None)

    def _fresh_slots(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """perhead: each head's blocks (ids (Hkv, k)) read from the store into device slots kept for this."""
        n_sel = ids.shape[1]
        if self._fetched is None or self._fetched[0].shape[0] < n_sel:
            shape = (max(n_sel, self.cfg.topk), self.hkv, self.cfg.block_size, self.d)
            self._fetched = (torch.empty(shape, dtype=self.dtype, device=self.device),
                             torch.empty(shape, dtype=self.dtype, device=self.device))
            self._slot_ids = torch.arange(shape[0], device=self.device).unsqueeze(0)
        fetched_k, fetched_v = self._fetched[0][:n_sel], self._fetched[1][:n_sel]
        self.ops.gather_blocks(self.store.k, self.store.v, ids, fetched_k, fetched_v)
        return fetched_k, fetched_v, self._slot_ids[:, :n_sel]

    def refine(self, values: torch.Tensor, indices: torch.Tensor, query: torch.Tensor, reprs: torch.Tensor,
               first: int, k: int) -> torch.Tensor:
        """A shared top-k: the refinement makes its blocks resident in the same program (`refine_and_cache`)."""
        if self.cfg.perhead:
            return super().refine(values, indices, query, reprs, first, k)
        ids, slots = self.device_block_cache().fetch_refined(
            self.ops, self.store, values, indices, query, reprs, first, k, self._ring_blocks(),
        )
        self._resident = (ids, slots)
        return ids

    def prefetch(self, lookup: BlockLookup) -> None:
        """With a side stream: the blocks the call's lookups select among those existing now (the batch top-k;
        execution blocks refine it only with blocks formed since) start crossing the bus while the local stage
        runs, so that their global stages find them cached. Random-weight models retrieve almost at random;
        this hides the bus time of most of a prefill's misses behind the local stage."""
        n_blocks = self.store.count
        if not self.overlapped or n_blocks <= self.cfg.topk:
            return
        batch = lookup.batch_topk(n_blocks)
        self.device_block_cache().prefetch(self.ops, self.store, batch.indices.view(1, -1), self.copy_stream,
                                           self._ring_blocks())

    def form(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, starts: list[int],
             into_ring: bool = False) -> None:
        """A prefill with a side stream: into the formation ring, copied to the store from there; else over the
        bus into the pinned store (with a codec: encoded by the same launch)."""
        n, store = len(starts), self.store
        if into_ring and self.use_ring and self._formation_ring().size >= n:
            self.ring.form(self.ops, keys, values, scores, self.cfg.repr_topk, store, store.claim(n, starts))
        else:
            self._form_in_store(keys, values, scores, starts)

    def _formation_ring(self) -> FormationRing:
        """The formation ring, created at the first formation on the shared slots (or this layer's own)."""
        if self.ring is None:
            slots = self.ring_slots((self.hkv, self.cfg.block_size, self.d), self.dtype, self.device)
            self.ring = FormationRing(slots, self.copy_stream, self.check)
        return self.ring

    def begin_prefill(self) -> None:
        if self.ring is not None:  # the store's blocks of the last call are read: their copies first
            self.ring.settle()

    def end_prefill(self) -> None:
        if self.ring is not None:  # this call's blocks go to the store; the slots to the next layer
            self.ring.release()

    def settle(self) -> None:
        if self.ring is not None:
            self.ring.settle()

    def ready_for_replay(self) -> None:
        self.device_block_cache().settle()  # allocated (and emptied) here, a prefill's prefetch waited for
        self.settle()

    def layout_tensors(self) -> tuple[torch.Tensor, ...]:
        cache = self.device_cache
        return () if cache is None else (cache.k, cache.v, cache.tags, cache.stamps, cache.counters)

    def nbytes(self) -> tuple[int, int]:
        storage, reprs = self.store.nbytes()  # the store is in host memory
        device = reprs + (self.ring.nbytes() if self.ring is not None else 0)
        return device + (self.device_cache.nbytes() if self.device_cache is not None else 0), storage

    def counts(self) -> tuple[int, int, int]:
        if self.device_cache is None:
            return 0, 0, 0
        return self.device_cache.counts()  # host copy of the device counters, here only

    def reset(self) -> None:
        super().reset()
        self._resident = None
        for cache in (self.device_cache, self.ring):
            if cache is not None:
                cache.clear()


def residency_for(cfg: ModelConfig, keeps_blocks: bool, heads: tuple[int, int, int], head_dim: int,
                  dtype: torch.dtype, device: torch.device, ops: ModuleType, offload: bool | None = None,
                  copy_stream: torch.cuda.Stream | None = None,
                  host_storage: Callable[[StorageSpec], dict[str, torch.Tensor]] | None = None,
                  ring_slots: SlotsFor | None = None) -> DeviceResidency:
    """The residency of a memory (and its store, if it keeps blocks): `offload` (default: off a CPU) puts the
    store in host memory, read through the block cache or directly (`offload_access`). `heads` as
    `DeviceResidency`'s; `host_storage`: lent host tensors for an offloaded store (`HostBlockPool`);
    `ring_slots`: the formation ring's slots (default: `RingSlots`, the layer's own)."""
    args = (cfg, None, ops, heads, head_dim, dtype, device)
    if not keeps_blocks:
        return DeviceResidency(*args)
    hq, hkv, score_heads = heads
    offload = device.type != "cpu" if offload is None else offload
    if cfg.offload_dtype is not None and not offload:
        raise ConfigError(
            f"model.offload_dtype={cfg.offload_dtype!r} compresses offloaded blocks, but blocks stay on "
            f"{device.type} here: set model.offload=true, or remove offload_dtype"
        )
    storage = torch.device("cpu") if offload else device
    codec = BlockCodec.of(cfg.offload_dtype) if cfg.offload_dtype is not None else None
    store = BlockStore(hkv, cfg.block_size, head_dim, dtype, storage, device, cfg.pin_memory, codec,
                       host_storage if offload else None, repr_heads=score_heads)
    # the stored KV heads differ from the model's only with lookup_heads: query, where the check counts query heads
    check_block_cache(cfg, hq, hkv, offload)
    args = (cfg, store, ops, heads, head_dim, dtype, device)
    if offload and cfg.offload_access == "cache":
        return CachedHostResidency(*args, copy_stream=copy_stream)
    if offload and cfg.offload_access == "direct":
        return DirectResidency(*args, copy_stream=copy_stream, ring_slots=ring_slots)
    return DeviceResidency(*args)
