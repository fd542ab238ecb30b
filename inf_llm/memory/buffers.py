"""Preallocated storage for the context memory: no `torch.cat` per chunk.

- `TokenBuffer`: K/V (and per-token scores) of consecutive positions, appended at the back and dropped at
  the front (the local window plus the remainder). Grows by doubling; compacts in place when the dropped
  front is large, so memory stays bounded by what is live.
- `BlockStore`: the memory blocks (K/V of `block_size` tokens each, plus one representative vector per
  block), in growing-by-doubling tensors, on the host when offloading (compressed with `offload_dtype`).
- `BlockShare`: a prefix snapshot's claim on a store's first blocks (shared, copied only on divergence).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from inf_llm.memory.compression import BlockCodec

# Smallest allocation of a buffer, in tokens (or blocks): avoids many tiny regrowths at the start.
MIN_CAPACITY = 256


def _grown(old: torch.Tensor, dim: int, capacity: int, used: slice) -> torch.Tensor:
    shape = list(old.shape)
    shape[dim] = capacity
    # empty, not zeros: only the copied part is ever read before being written (zero-filling a doubled
    # host store cost 1.2 s per 32K tokens of a 7B model)
    new = torch.empty(shape, dtype=old.dtype, device=old.device, pin_memory=old.is_pinned())
    index = [slice(None)] * old.dim()
    index[dim] = slice(0, used.stop - used.start)
    src = [slice(None)] * old.dim()
    src[dim] = used
    new[tuple(index)] = old[tuple(src)]
    return new


def representative_dtype(dtype: torch.dtype) -> torch.dtype:
    """Representative keys and lookup vectors: float32, or wider for float64 models. Every lookup scores all
    representatives, and converting N of them per lookup cost more than the scoring itself when decoding a
    long context on a CPU."""
    return torch.promote_types(dtype, torch.float32)


def _release_cached_pinned_memory() -> None:
    """Hand outgrown pinned buffers back to the OS. torch's caching host allocator keeps freed page-locked
    memory for reuse, so a pinned store growing by doubling held about twice its size (an 8.9 GB fp8 store
    at 128K tokens: 15.5 GiB of process RSS). Blocks still used by a pending copy are kept by the allocator."""
    empty = getattr(torch._C, "_accelerator_emptyHostCache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available():
        empty()


def synchronize_devices() -> None:
    """Wait for every GPU's queued work (whichever GPU a layer runs on); nothing to do without CUDA."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            torch.cuda.synchronize(device)


def _wait_for_device_access(storage: torch.Tensor) -> None:
    """Before the host touches pinned store memory: the device may still be writing it (asynchronous
    copies of new blocks) or reading it (offload_access: direct gathers blocks from it in a kernel,
    which the caching host allocator does not track). Rare (growth, saving), so a stream sync is cheap."""
    if storage.is_pinned():
        synchronize_devices()


class TokenBuffer:
    """K/V of the positions [first_pos, first_pos + length), stored as (H, capacity, D); with scores, a
    per-position score of each of `score_heads` heads (H by default: one per KV head; the query heads with
    `lookup_heads: query`), (score_heads, capacity)."""

    def __init__(self, num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, with_scores: bool,
                 score_heads: int | None = None):
        self.k = torch.zeros(num_heads, MIN_CAPACITY, head_dim, dtype=dtype, device=device)  # (Hkv, cap, D)
        self.v = torch.zeros_like(self.k)
        # Keys rotated to (position - rotation base), kept next to the raw keys so a decode step rotates
        # one key, not the whole window (the memory owns the base and re-fills this when it moves).
        self.k_rot = torch.zeros_like(self.k)
        score_heads = num_heads if score_heads is None else score_heads
        self.score = torch.zeros(score_heads, MIN_CAPACITY, dtype=torch.float32, device=device) if with_scores else None
        self.offset = 0  # index of first_pos inside the tensors
        self.length = 0
        self.first_pos = 0

    @property
    def end_pos(self) -> int:
        return self.first_pos + self.length

    def _reserve(self, extra: int) -> None:
        """Room for `extra` more positions at the back. The live part moves to the front of the same tensors
        when that makes room with some to spare (their addresses stay, so captured decode graphs stay valid);
        otherwise the tensors grow to 1.125x what is needed. Doubling held 32K positions per layer for a
        prefill that needs 12.3K (the window, a chunk and the remainder): 6 GiB of a Mistral-7B's 7.9 GiB
        above the weights in the flat-memory configuration."""
        capacity = self.k.shape[1]
        needed = self.length + extra
        if self.offset + needed <= capacity:
            return
        if needed + needed // 16 <= capacity:  # compact: each copy of the live part buys >= length/16 appends
            self._compact()
            return
        # a multiple of 64: the capacity is a stride of the score buffer, and Triton specializes (compiles
        # another variant) on strides that are not multiples of 16
        capacity = -(-(needed + needed // 8) // 64) * 64
        live = slice(self.offset, self.offset + self.length)
        self.k = _grown(self.k, 1, capacity, live)
        self.v = _grown(self.v, 1, capacity, live)
        self.k_rot = _grown(self.k_rot, 1, capacity, live)
        if self.score is not None:
            self.score = _grown(self.score, 1, capacity, live)
        self.offset = 0

    def _compact(self) -> None:
        """Move the live positions to the front of the tensors, in place."""
        n, at = self.length, self.offset
        for t in (self.k, self.v, self.k_rot, self.score):
            if t is not None and n:
                src = t[:, at : at + n]
                t[:, :n].copy_(src if at >= n else src.clone())  # overlapping ranges go through a copy
        self.offset = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, k_rot: torch.Tensor | None = None) -> None:
        """k, v (and optionally rotated k): (H, L, D) for positions end_pos .. end_pos+L-1."""
        n = k.shape[1]
        self._reserve(n)
        at = self.offset + self.length
        self.k[:, at : at + n].copy_(k)
        self.v[:, at : at + n].copy_(v)
        if k_rot is not None:
            self.k_rot[:, at : at + n].copy_(k_rot)
        if self.score is not None:
            self.score[:, at : at + n].zero_()
        self.length += n

    def _index(self, start_pos: int, end_pos: int) -> slice:
        if not (self.first_pos <= start_pos <= end_pos <= self.end_pos):
            raise IndexError(f"positions [{start_pos}, {end_pos}) outside [{self.first_pos}, {self.end_pos})")
        return slice(self.offset + start_pos - self.first_pos, self.offset + end_pos - self.first_pos)

    def keys(self, start_pos: int, end_pos: int) -> torch.Tensor:
        return self.k[:, self._index(start_pos, end_pos)]

    def rotated_keys(self, start_pos: int, end_pos: int) -> torch.Tensor:
        return self.k_rot[:, self._index(start_pos, end_pos)]

    def values(self, start_pos: int, end_pos: int) -> torch.Tensor:
        return self.v[:, self._index(start_pos, end_pos)]

    def scores(self, start_pos: int, end_pos: int) -> torch.Tensor:
        assert self.score is not None
        return self.score[:, self._index(start_pos, end_pos)]

    def drop_front(self, n: int) -> None:
        assert 0 <= n <= self.length
        self.offset += n
        self.first_pos += n
        self.length -= n

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.k_rot, self.score) if t is not None]

    def nbytes(self) -> int:
        total = self.k.nbytes + self.v.nbytes + self.k_rot.nbytes
        return total + (self.score.nbytes if self.score is not None else 0)

    def state(self) -> dict:
        live = slice(self.offset, self.offset + self.length)
        state = {"k": self.k[:, live].clone(), "v": self.v[:, live].clone(), "first_pos": self.first_pos}
        if self.score is not None:
            state["score"] = self.score[:, live].clone()
        return state

    def load_state(self, state: dict) -> None:
        self.restore(int(state["first_pos"]), [(state["k"], state["v"])], state.get("score"))

    def restore(self, first_pos: int, pieces: list[tuple[torch.Tensor, torch.Tensor]],
                score: torch.Tensor | None) -> None:
        """Hold positions [first_pos, ...) again: the K/V `pieces` in order (raw keys; the caller re-rotates)
        and their scores."""
        self.offset, self.length, self.first_pos = 0, 0, first_pos
        for k, v in pieces:
            self.append(k.to(self.k.device, self.k.dtype), v.to(self.v.device, self.v.dtype))
        if self.score is not None and score is not None:
            self.score[:, : self.length].copy_(score)


@dataclass(frozen=True)
class StorageSpec:
    """What a BlockStore keeps on its storage device: K/V blocks (N, Hkv, block_size, D) in the model dtype,
    or with a codec their codes plus float32 scales; pinned when `pin`."""

    num_heads: int
    block_size: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    pin: bool
    codec: BlockCodec | None

    def allocate(self, capacity: int) -> dict[str, torch.Tensor]:
        """Tensors for `capacity` blocks: empty, not zeros (only blocks below the store's count are ever
        read, and zero-filling GBs of host memory took seconds)."""
        block = (self.num_heads, self.block_size, self.head_dim)
        storage = self.codec.storage_dtype if self.codec is not None else self.dtype
        new = {name: torch.empty(capacity, *block, dtype=storage, device=self.device, pin_memory=self.pin)
               for name in ("k", "v")}
        if self.codec is not None:
            for name, keys in (("k_scale", True), ("v_scale", False)):
                shape = self.codec.scale_shape(block, keys=keys)
                new[name] = torch.empty(capacity, *shape, device=self.device, pin_memory=self.pin)
        return new


class BlockStore:
    """Memory blocks: keys/values (N, Hkv, block_size, D) and representatives (N, Hr * D), Hr = `repr_heads`
    (Hkv by default; the query heads with `lookup_heads: query`).

    K/V live on `storage_device` (the host when offloading, pinned if asked), in the model dtype or, with a
    `codec`, compressed (fp8/int8 codes plus float32 scales); representatives (float32 at least) live on the
    compute device because every lookup reads all of them.
    """

    def __init__(
        self,
        num_heads: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        storage_device: torch.device,
        compute_device: torch.device,
        pin_memory: bool,
        codec: BlockCodec | None = None,
        host_storage: Callable[[StorageSpec], dict[str, torch.Tensor]] | None = None,
        repr_heads: int | None = None,
    ):
        """`host_storage`: where a host-side store takes its first tensors from (a `HostBlockPool`'s lent
        storage, reused by every conversation) instead of allocating them; beyond their capacity the store
        grows as usual. `repr_heads`: heads of a representative (default `num_heads`)."""
        pin = pin_memory and storage_device.type == "cpu" and torch.cuda.is_available()
        self.dtype, self.codec = dtype, codec
        spec = StorageSpec(num_heads, block_size, head_dim, dtype, storage_device, pin, codec)
        lent = host_storage is not None and storage_device.type == "cpu"
        self._lent = lent  # tensors of a host pool: always written in place, never replaced
        tensors = host_storage(spec) if lent else spec.allocate(MIN_CAPACITY // 8)
        self.k, self.v = tensors["k"], tensors["v"]
        self.k_scale, self.v_scale = tensors.get("k_scale"), tensors.get("v_scale")
        cap = self.k.shape[0]
        repr_width = (num_heads if repr_heads is None else repr_heads) * head_dim
        self.repr = torch.zeros(cap, repr_width, dtype=representative_dtype(dtype), device=compute_device)
        self.start_pos: list[int] = []  # absolute position of each block's first token
        self.count = 0
        self._shares: weakref.WeakSet[BlockShare] = weakref.WeakSet()  # prefix snapshots reading these blocks

    def _tensors(self) -> list[str]:
        return ["k", "v", "repr"] + (["k_scale", "v_scale"] if self.codec is not None else [])

    def scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(k_scale, v_scale) of a store of codes, for the ops' `scales` argument; None without a codec."""
        return (self.k_scale, self.v_scale) if self.codec is not None else None

    def _reserve(self, extra: int, exact: bool = False) -> None:
        if self.count + extra <= self.k.shape[0] and not exact:
            return
        cap = self.count + extra if exact else max(2 * self.k.shape[0], self.count + extra)
        used = slice(0, self.count)
        pinned = self.k.is_pinned()
        _wait_for_device_access(self.k)  # the host copies the old buffers: let queued writes and reads end
        for name in self._tensors():
            setattr(self, name, _grown(getattr(self, name), 0, cap, used))
        if pinned:
            _release_cached_pinned_memory()

    def add_many(self, k: torch.Tensor, v: torch.Tensor, representatives: torch.Tensor, start_pos: list[int]) -> None:
        """k, v (n, Hkv, block_size, D); representatives (n, Hr * D) or (n, Hr, D) (may be strided: copied
        in place, not reshaped first); start_pos: first position of each."""
        new = self.claim(k.shape[0], start_pos)
        if self.codec is not None:  # encoded where k/v are (the compute device): half the bytes cross over
            k, k_scale = self.codec.encode(k, keys=True)
            v, v_scale = self.codec.encode(v, keys=False)
            self.k_scale[new].copy_(k_scale, non_blocking=True)
            self.v_scale[new].copy_(v_scale, non_blocking=True)
        self.k[new].copy_(k, non_blocking=True)
        self.v[new].copy_(v, non_blocking=True)
        self.repr[new].view(representatives.shape).copy_(representatives)

    def claim(self, n: int, start_pos: list[int]) -> slice:
        """Slots for n new blocks starting at `start_pos`, counted as stored: the caller fills k, v and repr
        at the returned slice (`add_many`, or a fused op writing them in place)."""
        self._reserve(n)
        new = slice(self.count, self.count + n)
        self.start_pos.extend(start_pos)
        self.count += n
        return new

    def copy_block(self, block: int, dst_k: torch.Tensor, dst_v: torch.Tensor) -> None:
        """Block `block`'s K/V into dst_k/dst_v (Hkv, block_size, D) in the model dtype, on their device
        (asynchronous from pinned memory; decoded on the destination device)."""
        if self.codec is None:
            dst_k.copy_(self.k[block], non_blocking=True)
            dst_v.copy_(self.v[block], non_blocking=True)
            return
        device = dst_k.device
        for dst, codes, scale in ((dst_k, self.k, self.k_scale), (dst_v, self.v, self.v_scale)):
            self.codec.decode_into(dst, codes[block].to(device, non_blocking=True),
                                   scale[block].to(device, non_blocking=True))

    def read(self, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of blocks [first, last) in the model dtype, on the storage device."""
        if self.codec is None:
            return self.k[first:last], self.v[first:last]
        k = torch.empty(self.k[first:last].shape, dtype=self.dtype, device=self.k.device)
        v = torch.empty_like(k)
        self.codec.decode_into(k, self.k[first:last], self.k_scale[first:last])
        self.codec.decode_into(v, self.v[first:last], self.v_scale[first:last])
        return k, v

    def representatives(self) -> torch.Tensor:
        return self.repr[: self.count]  # (N, Hr * D)

    def nbytes(self) -> tuple[int, int]:
        """(storage bytes, compute-device bytes)."""
        storage = self.k.nbytes + self.v.nbytes
        if self.codec is not None:
            storage += self.k_scale.nbytes + self.v_scale.nbytes
        return storage, self.repr.nbytes

    def trim(self, spare: int) -> None:
        """Capacity for `spare` more blocks only (a document kept for many questions: growth by doubling left
        up to twice its blocks allocated). Not for host-pool or pinned storage, which is reused as it is."""
        if not self._lent and not self.k.is_pinned() and self.k.shape[0] > self.count + spare:
            self._reserve(spare, exact=True)

    # --- prefix snapshots -------------------------------------------------------------------------------
    def share(self) -> "BlockShare":
        """The blocks stored now, for a snapshot: no copy while this store keeps them (see `rewind`)."""
        share = BlockShare(self, self.count)
        self._shares.add(share)
        return share

    def rewind(self, share: "BlockShare") -> None:
        """Continue from `share`'s blocks: drop the blocks after its shared part (every other share that reads
        them first gets a private copy of just those), then append its private blocks. Blocks never change
        once stored, so the shared part needs no copy at all."""
        if share.store is not self:
            raise ValueError("a block share can only rewind the store it was taken from")
        n = share.count
        for other in list(self._shares):
            if other is not share and other.count > n:
                other.keep_private(n)
        self.count = n
        del self.start_pos[n:]
        for chunk in share.private:
            self.append_raw(chunk)
        share.private, share.count = [], self.count

    def raw(self, first: int, last: int) -> dict:
        """Copies of blocks [first, last) as stored (codes and scales with a codec) plus their positions."""
        _wait_for_device_access(self.k)  # pending copies of the latest blocks into the store
        chunk = {name: getattr(self, name)[first:last].clone() for name in self._tensors()}
        chunk["start_pos"] = list(self.start_pos[first:last])
        return chunk

    def append_raw(self, chunk: dict) -> None:
        """Append blocks copied by `raw` (exactly as they were: no re-encoding)."""
        new = self.claim(len(chunk["start_pos"]), chunk["start_pos"])
        _wait_for_device_access(self.k)
        for name in self._tensors():
            getattr(self, name)[new].copy_(chunk[name])

    def storages(self) -> list[torch.Tensor]:
        """The tensors holding this store's bytes (for byte accounting shared between snapshots)."""
        return [getattr(self, name) for name in self._tensors()]

    def state(self) -> dict:
        """Saved in the model dtype, whatever the codec: a saved session loads under any offload setting."""
        _wait_for_device_access(self.k)  # pending device-to-host copies of the latest blocks
        n = self.count
        k, v = self.read(0, n)
        return {"k": k.clone(), "v": v.clone(), "repr": self.repr[:n].clone(), "start_pos": list(self.start_pos)}

    def load_state(self, state: dict) -> None:
        _wait_for_device_access(self.k)  # queued device reads and writes of the old blocks end first
        for other in list(self._shares):  # snapshots of the blocks about to be replaced keep their own copy
            if other.count > 0:
                other.keep_private(0)
        self.count = 0
        self.start_pos = []
        k, v, reprs = state["k"], state["v"], state["repr"]
        n = len(state["start_pos"])
        if (self.codec is None and not self._lent and not self.k.is_pinned() and k.dtype == self.k.dtype
                and k.device == self.k.device and k.is_contiguous() and v.is_contiguous()
                and k.shape[1:] == self.k.shape[1:]
                and reprs.dtype == self.repr.dtype and reprs.device == self.repr.device):
            # the loaded tensors become the store (no second copy of a document read from disk). Rows past its
            # n blocks are room the caller handed over to grow into in place; without them the store is full,
            # and the next block grows it into new tensors, never writing into what the caller holds
            self.k, self.v, self.repr = k, v, reprs.contiguous()
            self.count, self.start_pos = n, list(state["start_pos"])
            return
        self.add_many(k[:n], v[:n], reprs[:n].to(self.repr.device), list(state["start_pos"]))


class BlockShare:
    """A prefix snapshot's blocks: the first `count` blocks of `store` (read in place) followed by `private`
    copies (chunks of `BlockStore.raw`) of blocks the store no longer holds because it was rewound below them."""

    def __init__(self, store: BlockStore, count: int):
        self.store, self.count = store, count
        self.private: list[dict] = []

    @property
    def blocks(self) -> int:
        return self.count + sum(len(chunk["start_pos"]) for chunk in self.private)

    def keep_private(self, n: int) -> None:
        """The store is about to drop its blocks from `n` on: copy the ones this share reads."""
        self.private.insert(0, self.store.raw(n, self.count))
        self.count = n

    def private_tensors(self) -> list[torch.Tensor]:
        return [t for chunk in self.private for name, t in chunk.items() if name != "start_pos"]

    def read_all(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """(k, v, representatives, start_pos) of every block, K/V in the model dtype (to save a snapshot)."""
        store = self.store
        _wait_for_device_access(store.k)
        k, v = store.read(0, self.count)
        ks, vs, reprs = [k.clone()], [v.clone()], [store.repr[: self.count].clone()]
        starts = list(store.start_pos[: self.count])
        for chunk in self.private:
            if store.codec is None:
                ck, cv = chunk["k"], chunk["v"]
            else:
                ck = torch.empty(chunk["k"].shape, dtype=store.dtype, device=chunk["k"].device)
                cv = torch.empty_like(ck)
                store.codec.decode_into(ck, chunk["k"], chunk["k_scale"])
                store.codec.decode_into(cv, chunk["v"], chunk["v_scale"])
            ks.append(ck)
            vs.append(cv)
            reprs.append(chunk["repr"])
            starts.extend(chunk["start_pos"])
        return torch.cat(ks), torch.cat(vs), torch.cat(reprs), starts
