"""Bounded accelerator caches of memory blocks (`max_cached_block` slots) for blocks offloaded to host memory:
each lookup's selected blocks are made resident (copied from the `BlockStore` into free or evicted slots)
and the global stage reads them from the slots.

- `BlockCache` (offload_access: cache): bookkept on the host (the block ids come to the host once per
  lookup), evicting by a strategy of `inf_llm.memory.eviction` (LRU, FIFO or LRU-S).
- `DeviceBlockCache` (offload_access: direct): bookkept on the device by the ops' `cache_blocks` (LRU), so
  the ids never leave the GPU and decode steps can be replayed as CUDA graphs.
- `FormationRing` (offload_access: direct with a side stream): a prefill call's new blocks, formed on the
  device in slots that the layers share (`RingSlots`) and copied to the host store on the side stream at
  the call's end; the call's lookups read them there.

Bookkeeping plus copies; knows nothing of attention.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from inf_llm.config import CacheStrategy, MemoryType, ModelConfig
from inf_llm.errors import ConfigError
from inf_llm.memory.eviction import eviction_of

if TYPE_CHECKING:
    from inf_llm.memory.buffers import BlockStore


class BlockCache:
    """Slots (capacity, Hkv, block_size, D) on the compute device, keyed by block id."""

    def __init__(
        self,
        capacity: int,
        strategy: CacheStrategy,
        score_decay: float,
        block_shape: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        copy_stream: "torch.cuda.Stream | None" = None,
    ):
        self.capacity = capacity
        self.strategy = strategy
        self.eviction = eviction_of(strategy, score_decay)
        self.k = torch.zeros(capacity, *block_shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.copy_stream = copy_stream
        self.slot_of: dict[int, int] = {}
        self.priority: dict[int, float] = {}  # per resident block, as `eviction` sets it (lowest evicted)
        self.free = list(range(capacity - 1, -1, -1))
        self.tick = 0
        self.hits = 0
        self.misses = 0

    def fetch(self, block_ids: list[int], store: "BlockStore") -> list[int]:
        """Make `block_ids` resident and return their slot indices (host ints: no device round trip)."""
        if len(set(block_ids)) > self.capacity:
            raise ConfigError(
                f"a lookup selected {len(set(block_ids))} distinct blocks but max_cached_block is "
                f"{self.capacity}; raise model.max_cached_block"
            )
        self.tick += 1
        wanted = set(block_ids)
        slots = []
        for block in block_ids:
            slot = self.slot_of.get(block)
            if slot is None:
                self.misses += 1
                if self.free:
                    slot = self.free.pop()
                else:
                    evicted = self.eviction.victim(self.priority, wanted)
                    slot = self.slot_of.pop(evicted)
                    del self.priority[evicted]
                self._load(slot, block, store)
                self.slot_of[block] = slot
            else:
                self.hits += 1
            self.priority[block] = self.eviction.selected(self.priority.get(block), self.tick)
            slots.append(slot)
        return slots

    def _load(self, slot: int, block: int, store: "BlockStore") -> None:
        if self.copy_stream is None:
            store.copy_block(block, self.k[slot], self.v[slot])
            return
        # the block may have been written to pinned host memory by a non-blocking copy still queued on the
        # compute stream: the side stream starts after it
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.k.device))
        with torch.cuda.stream(self.copy_stream):
            store.copy_block(block, self.k[slot], self.v[slot])

    def wait_for_copies(self) -> None:
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.k.device).wait_stream(self.copy_stream)

    @property
    def uses_scores(self) -> bool:
        """The strategy wants the attention each selected block received (`add_scores`; LRU-S)."""
        return self.eviction.uses_scores

    def add_scores(self, block_ids: list[int], received: list[float]) -> None:
        """The attention probability each of `block_ids` received in one execution block, to the strategy."""
        if self.eviction.uses_scores:
            self.eviction.received(self.priority, block_ids, received)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def clear(self) -> None:
        self.slot_of.clear()
        self.priority.clear()
        self.free = list(range(self.capacity - 1, -1, -1))


def check_block_cache(cfg: ModelConfig, num_q_heads: int, num_kv_heads: int, offload: bool) -> None:
    """Refuse an offloaded memory with the block cache (`offload_access: cache`) whose lookups can select more
    distinct blocks than the cache holds: with `perhead` each KV head (each query head with `lookup_heads:
    query`) retrieves its own `topk`, up to heads * topk blocks per lookup (the cache would otherwise fail at
    the first lookup that spreads that far, part-way through a request). Needs the model's head counts:
    called when a model is patched and when a memory is made."""
    if cfg.type is not MemoryType.INF_LLM or not cfg.perhead or not offload or cfg.offload_access != "cache":
        return
    heads, kind = (num_q_heads, "query") if cfg.lookup_heads == "query" else (num_kv_heads, "KV")
    needed = heads * cfg.topk
    if cfg.max_cached_block < needed:
        raise ConfigError(
            f"model.perhead: true retrieves model.topk ({cfg.topk}) blocks for each of the model's "
            f"{heads} {kind} heads: up to {needed} distinct blocks per lookup must fit in the block cache, "
            f"but model.max_cached_block is {cfg.max_cached_block}; raise max_cached_block to {needed}, lower "
            f"topk, keep the blocks on the device (offload: false) or set perhead: false"
        )


class DeviceBlockCache:
    """Slots (capacity, Hkv, block_size, D) on the compute device whose LRU bookkeeping lives there too:
    `fetch` keeps a selection's hits where they are and reads only its misses from the (pinned host) store,
    over the bus. Decoding retrieves mostly the blocks of the step before; reading all of them from host
    memory at every step cost a Mistral-7B 256 MB of bus traffic per token."""

    def __init__(self, capacity: int, block_shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                 check: bool = True):
        self.capacity = capacity
        self.check = check  # the ops' argument checks (False: the caller vouches for the arguments)
        self.k = torch.empty(capacity, *block_shape, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.tags = torch.full((capacity,), -1, dtype=torch.int64, device=device)  # block id per slot, -1: empty
        self.stamps = torch.full_like(self.tags, -1)  # clock value of each slot's last use
        # clock, blocks requested by lookups, misses among them, blocks prefetched
        self.counters = torch.zeros(4, dtype=torch.int64, device=device)
        self._prefetched: torch.cuda.Event | None = None  # the side stream's last prefetch

    def fetch(self, ops, store: "BlockStore", block_ids: torch.Tensor, ring: tuple | None = None) -> torch.Tensor:
        """Make `block_ids` (1, K) resident (the newest from `ring`, see `FormationRing.blocks`); returns their
        slots (1, K) int64, on the device."""
        self.settle()
        return ops.cache_blocks(store.k, store.v, block_ids, self.k, self.v, self.tags, self.stamps, self.counters,
                                ring=ring, check=self.check, scales=store.scales())

    def fetch_refined(self, ops, store: "BlockStore", values: torch.Tensor, indices: torch.Tensor, query: torch.Tensor,
                      reprs: torch.Tensor, first: int, k: int, ring: tuple | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """`ops.refine_topk` (a shared top-k), then `fetch` of the ids it finds, in one step
        (`ops.refine_and_cache`); returns (ids, slots), each (1, k) int64 on the device."""
        self.settle()
        return ops.refine_and_cache(values, indices, query, reprs, first, k, store.k, store.v, self.k, self.v,
                                    self.tags, self.stamps, self.counters, ring=ring, check=self.check,
                                    scales=store.scales())

    def prefetch(self, ops, store: "BlockStore", block_ids: torch.Tensor, stream: "torch.cuda.Stream | None",
                 ring: tuple | None = None) -> None:
        """Start making `block_ids` (1, n), repeats allowed, resident (as many as there are slots) on the side
        `stream`, after the work queued so far on the current stream (which computed the ids); whatever
        touches the cache next waits for it (`settle`). Without a stream (a CPU), right here."""
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.k.device))
        with torch.cuda.stream(stream):  # a no-op without a stream
            ops.cache_blocks(store.k, store.v, block_ids, self.k, self.v, self.tags, self.stamps, self.counters,
                             prefetch=True, ring=ring, check=self.check, scales=store.scales())
        if stream is not None:
            block_ids.record_stream(stream)  # allocated on the current stream, read on the side one
            self._prefetched = stream.record_event()

    def settle(self) -> None:
        """The current stream waits for a pending prefetch (before the cache is read, changed or captured)."""
        if self._prefetched is not None:
            torch.cuda.current_stream(self.k.device).wait_event(self._prefetched)
            self._prefetched = None

    def counts(self) -> tuple[int, int, int]:
        """Blocks found resident by lookups, blocks they read from the store, and blocks prefetched, so far
        (a host read of the counters)."""
        self.settle()
        requested, misses, prefetched = self.counters[1:].tolist()
        return requested - misses, misses, prefetched

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def clear(self) -> None:
        """Forget every slot (the store's contents changed)."""
        self.settle()
        self.tags.fill_(-1)
        self.stamps.fill_(-1)


# Slots of the formation rings of one device: a prefill chunk's blocks of one layer (8192 tokens of the
# Mistral-7B preset / blocks of 128), so that a layer copies its chunk's blocks to the store once, at the
# end of the chunk, and never waits for a copy in the middle of it (calls forming more flush first)
FORMATION_RING_BLOCKS = 64


class RingSlots:
    """Device slots (size, Hkv, block_size, D) that the formation rings of one device's layers share: a layer's
    ring holds blocks only during one prefill call (it copies them to its store at the call's end), and the
    layers' calls run one after another, so one chunk's worth of slots serves them all (per-layer slots
    cost a Mistral-7B 8 MB per layer at 16 slots, and a copy batch every other execution block). Per slot,
    the event of the copy that read it last: whoever writes the slot again waits for it first."""

    def __init__(self, block_shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                 size: int = FORMATION_RING_BLOCKS):
        self.k = torch.empty(size, *block_shape, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.copied: list = [None] * size
        self.users: weakref.WeakSet = weakref.WeakSet()  # the live rings on these slots (each reports its share)

    def wait_for_copies(self, first: int, count: int) -> None:
        """The current stream waits for the copies that last read slots [first, first + count); a wait covers
        every slot its event covers, which then needs no wait again: a device's layers form their blocks on one
        current stream (the engine's single worker thread), so what it waited for once stays waited for."""
        for slot in range(first, first + count):
            event = self.copied[slot]
            if event is not None:
                torch.cuda.current_stream(self.k.device).wait_event(event)
                self.copied = [None if e is event else e for e in self.copied]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class FormationRing:
    """offload_access: direct with a side stream: one layer's new blocks are formed into device slots
    (`RingSlots`, shared by the device's layers), then copied to the pinned store by the side stream (a DMA,
    next to the compute stream's work), instead of the formation kernel writing them into the store over
    the bus (43 us per execution block and layer of a Mistral-7B prefill: the bus's bandwidth, 22 of a
    chunk's 335 ms of kernels). The slot of block id is id % size; lookups read blocks lo <= id < hi from
    here (their copy may be under way) and older ones from the store. A prefill call ends with `release`:
    its blocks' copies start, in one batch, and the ring holds nothing any more (the slots go to the next
    layer); the next call's `settle` makes the compute stream wait for those copies before it reads the
    store. A slot is written again only after the copy that read it (`RingSlots.wait_for_copies`); a call
    forming more blocks than there are slots copies the unsent ones first."""

    def __init__(self, slots: RingSlots, stream: "torch.cuda.Stream | None", check: bool = True):
        self.slots = slots
        slots.users.add(self)
        self.size = slots.k.shape[0]
        self.check = check  # the ops' argument checks
        self.stream = stream  # None (a CPU): the copies run right away
        self.lo = self.hi = 0  # blocks [lo, hi) are in their slots
        self._last: "torch.cuda.Event | None" = None  # the event of this ring's last copy batch
        self._unsent: list[tuple[int, int, int]] = []  # (first block, slot, count) formed, not yet copied
        self._store: "BlockStore | None" = None

    def blocks(self) -> tuple | None:
        """(ring_k, ring_v, lo, hi) for the ops' `ring` argument, or None while it holds no block."""
        return (self.slots.k, self.slots.v, self.lo, self.hi) if self.hi > self.lo else None

    def form(self, ops, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, repr_topk: int,
             store: "BlockStore", new: slice) -> None:
        """`ops.form_blocks` of the store's claimed slots `new` (keys/values (Hkv, n, bs, D), scores (Hkv, n,
        bs)) into ring slots, representatives into the store; their K/V are copied to the store later."""
        first, n = new.start, new.stop - new.start
        # the new slots hold blocks not copied yet (runs join, so the list holds a few entries)
        if sum(count for _, _, count in self._unsent) + n > self.size:
            self.flush()
        segments, done = [], 0  # (first block index, slot, count): two where the slots wrap around
        while done < n:
            slot = (first + done) % self.size
            count = min(n - done, self.size - slot)
            segments.append((done, slot, count))
            done += count
        if self.stream is not None:  # slots still being copied from (by this or another layer's ring)
            for _, slot, count in segments:
                self.slots.wait_for_copies(slot, count)
        d = self.slots.k.shape[3]
        for j, slot, count in segments:  # representatives (count, Hr, D): per KV or per query head
            ops.form_blocks(keys[:, j : j + count], values[:, j : j + count], scores[:, j : j + count], repr_topk,
                            self.slots.k[slot : slot + count], self.slots.v[slot : slot + count],
                            store.repr[first + j : first + j + count].view(count, -1, d), check=self.check)
        self.lo = max(self.lo if first == self.hi else first, first + n - self.size)
        self.hi = first + n
        for j, slot, count in segments:  # a run continuing the last unsent one joins it: one copy per run
            if self._unsent and self._unsent[-1][0] + self._unsent[-1][2] == first + j and (
                    self._unsent[-1][1] + self._unsent[-1][2] == slot):
                block, start, before = self._unsent[-1]
                self._unsent[-1] = (block, start, before + count)
            else:
                self._unsent.append((first + j, slot, count))
        self._store = store

    def flush(self) -> None:
        """Start the copies of the blocks formed since the last flush to the store, on the side stream (after
        the work queued so far on the current stream, which formed them)."""
        if not self._unsent:
            return
        unsent, self._unsent = self._unsent, []
        current = torch.cuda.current_stream(self.slots.k.device) if self.stream is not None else None
        if current is not None:
            self.stream.wait_stream(current)
        store, slots = self._store, self.slots
        with torch.cuda.stream(self.stream):  # a no-op without a stream
            for first, slot, count in unsent:
                blocks = slice(first, first + count)
                store.k[blocks].copy_(slots.k[slot : slot + count], non_blocking=True)
                store.v[blocks].copy_(slots.v[slot : slot + count], non_blocking=True)
        if current is not None:
            self._last = self.stream.record_event()
            for _, slot, count in unsent:
                slots.copied[slot : slot + count] = [self._last] * count

    def release(self) -> None:
        """The end of a prefill call: the copies of its blocks start, and the ring holds no block any more
        (its slots may be written by another layer's ring before this layer's next call)."""
        self.flush()
        self.lo = self.hi = 0

    def settle(self) -> None:
        """Every block formed so far copied to the store, as far as the current stream is concerned (it waits
        for the copies)."""
        self.flush()
        if self._last is not None:
            torch.cuda.current_stream(self.slots.k.device).wait_event(self._last)
            self._last = None

    def nbytes(self) -> int:
        """This ring's share of its shared slots."""
        return self.slots.nbytes() // max(len(self.slots.users), 1)

    def clear(self) -> None:
        """Forget the blocks held (the store's contents were replaced: what was not copied yet is dropped)."""
        self._unsent = []
        self.settle()
        self.lo = self.hi = 0
