"""Prefix snapshots kept in RAM: the memory after chosen prefixes of earlier prompts, so that a request which
starts with one continues from there (regenerate, an edited last message, a new chat on the same document).

Owns: the entries (token ids -> CacheSnapshot), the longest-prefix match, the byte budget
(`contexts.ram_mib`, least recently used out first) and the accounting behind it. Snapshots of one
conversation share its memory blocks and most of its window (inf_llm/memory/snapshot.py), so the budget
counts distinct storage, and only what the live conversation does not hold anyway.
Must not know: threads (the worker thread alone calls it), HTTP, files.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from inf_llm.adapter import InfLLMCache
from inf_llm.adapter.hf import CacheSnapshot, storage_sizes

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PrefixEntry:
    """One kept snapshot: the memory after `ids`. `context_id`: a document's (kept until it is deleted or
    evicted; it can be loaded again from disk). `wide`: read with the whole conversation in the window
    (full_attention_tokens), which only a prompt that stays within it may continue."""

    ids: tuple[int, ...]
    snapshot: CacheSnapshot = field(repr=False)
    wide: bool
    context_id: str | None = None
    last_used: int = 0

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def array(self) -> np.ndarray:
        return np.asarray(self.ids, dtype=np.int64)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (vectorized: prompts are tens of thousands of tokens)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


class PrefixCache:
    """Snapshots by token prefix, under `budget_bytes` of memory beyond the live conversation's."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: list[PrefixEntry] = []
        self._clock = itertools.count(1)
        self.hits = 0
        self.evicted = 0
        # the worker changes the entries; a listing or a deletion from another thread takes this lock too
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def longest(self, ids: tuple[int, ...], usable: Callable[[PrefixEntry], bool], leave: int = 1
                ) -> PrefixEntry | None:
        """The longest usable entry whose ids are a prefix of `ids` leaving at least `leave` tokens to feed."""
        best = None
        with self._lock:
            for entry in self.entries:
                n = entry.tokens
                # the last token first: a cheap test that rules out most entries before comparing all of them
                if (0 < n <= len(ids) - leave and (best is None or n > best.tokens) and ids[n - 1] == entry.ids[-1]
                        and ids[:n] == entry.ids and usable(entry)):
                    best = entry
        return best

    def of_context(self, context_id: str) -> PrefixEntry | None:
        with self._lock:
            return next((e for e in self.entries if e.context_id == context_id), None)

    def snapshot_entries(self) -> list[PrefixEntry]:
        """A copy of the entries (another thread may list them while the worker changes them)."""
        with self._lock:
            return list(self.entries)

    def longest_shared(self, ids: tuple[int, ...]) -> int:
        """The longest prefix `ids` shares with any entry (where an earlier prompt diverged from this one)."""
        entries = self.snapshot_entries()
        if not entries:
            return 0
        mine = np.asarray(ids, dtype=np.int64)
        return max(common_prefix(mine, e.array) for e in entries)

    def add(self, ids: Sequence[int], snapshot: CacheSnapshot, wide: bool, context_id: str | None = None
            ) -> PrefixEntry:
        """Keep `snapshot` as the memory after `ids` (replacing an entry with the same ids)."""
        ids = tuple(ids)
        with self._lock:
            for old in [e for e in self.entries if e.ids == ids]:
                context_id = context_id or old.context_id
                self.entries.remove(old)
            entry = PrefixEntry(ids, snapshot, wide, context_id, next(self._clock))
            self.entries.append(entry)
        return entry

    def touch(self, entry: PrefixEntry) -> None:
        entry.last_used = next(self._clock)
        self.hits += 1

    def remove(self, predicate: Callable[[PrefixEntry], bool]) -> int:
        with self._lock:
            gone = [e for e in self.entries if predicate(e)]
            for entry in gone:
                self.entries.remove(entry)
        return len(gone)

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()

    # --- bytes ------------------------------------------------------------------------------------
    def nbytes(self, live: InfLLMCache | None = None, entries: Iterable[PrefixEntry] | None = None) -> int:
        """Distinct bytes the entries keep alive, not counting storage the live cache holds anyway."""
        own = storage_sizes(live.tensors()) if live is not None else {}
        entries = self.snapshot_entries() if entries is None else entries
        kept = storage_sizes(t for e in entries for t in e.snapshot.tensors())
        return sum(n for key, n in kept.items() if key not in own)

    def evict(self, live: InfLLMCache | None = None, keep: PrefixEntry | None = None) -> None:
        """Least recently used entries out until the rest fit the budget (`keep` stays). Each entry's storage is
        measured once and counted per user, so dropping one subtracts what only it kept alive."""
        own = storage_sizes(live.tensors()) if live is not None else {}
        entries = self.snapshot_entries()
        sizes = {id(e): storage_sizes(e.snapshot.tensors()) for e in entries}
        users: Counter = Counter(key for each in sizes.values() for key in each if key not in own)
        nbytes = {key: n for each in sizes.values() for key, n in each.items()}
        total = sum(nbytes[key] for key in users)
        gone = set()
        for victim in sorted((e for e in entries if e is not keep), key=lambda e: e.last_used):
            if total <= self.budget_bytes:
                break
            gone.add(victim)
            for key in sizes[id(victim)]:
                if key in users:
                    users[key] -= 1
                    if users[key] == 0:
                        total -= nbytes[key]
            log.info("prefix cache: dropped the snapshot of %d tokens (budget %d MiB)", victim.tokens,
                     self.budget_bytes >> 20)
        if gone:
            self.evicted += self.remove(lambda e: e in gone)
