"""Host memory for offloaded blocks, allocated once and lent to one conversation at a time
(`model.host_pool_tokens`).

Page-locking host memory is slow: measured on an H200 host, the stores' pinned allocations ran at about
1.6 GB/s and took 1.9 s of a 3.2 s prefill step (benchmark/figures/gpu-h200-pinned-allocation/); a 128K-token
Mistral-7B store is 16 GiB. A store that allocates as it grows pays that on every long request. Like vLLM's
swap space, the pool allocates each layer's host tensors once, the first time a cache needs them, and lends
them to the next cache when the previous one is gone; a second cache alive at the same time (a clone) gets
none and allocates its own. Knows nothing of attention or transformers.
"""

from __future__ import annotations

import threading

import torch

from inf_llm.memory.buffers import StorageSpec, synchronize_devices


class HostBlockPool:
    """Per-layer host tensors for `tokens` tokens of offloaded blocks, lent whole to one cache at a time."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self._storage: dict[int, tuple[StorageSpec, dict[str, torch.Tensor]]] = {}
        self._lent = False
        self._lock = threading.Lock()

    def lend(self) -> "HostPoolLease | None":
        """The pool for one cache, or None while another cache holds it. Call `HostPoolLease.give_back`
        when the cache is discarded."""
        with self._lock:
            if self._lent:
                return None
            self._lent = True
        synchronize_devices()  # the previous borrower's copies (side stream) and kernels may still touch them
        return HostPoolLease(self)

    def nbytes(self) -> int:
        return sum(t.nbytes for _, tensors in self._storage.values() for t in tensors.values())

    def _storage_for(self, layer: int, spec: StorageSpec) -> dict[str, torch.Tensor]:
        held = self._storage.get(layer)
        if held is None or held[0] != spec:  # first use, or the layer's dtype/device/codec changed
            held = (spec, spec.allocate(-(-self.tokens // spec.block_size)))
            self._storage[layer] = held
        return held[1]

    def _give_back(self) -> None:
        with self._lock:
            self._lent = False


class HostPoolLease:
    """One cache's use of the pool: `storage(layer)` is what that layer's BlockStore starts from."""

    def __init__(self, pool: HostBlockPool):
        self._pool = pool
        self._returned = False

    def storage(self, layer: int):
        """A `host_storage` callable for layer `layer`'s BlockStore."""
        return lambda spec: self._pool._storage_for(layer, spec)

    def nbytes(self) -> int:
        """Host memory the pool holds (allocated once; what this cache may use of it)."""
        return self._pool.nbytes()

    def give_back(self) -> None:
        if not self._returned:
            self._returned = True
            self._pool._give_back()
