"""Eviction strategies of the host-bookkept block cache (`BlockCache`, offload_access: cache): LRU, FIFO, LRU-S.

A strategy keeps nothing itself: it says which priority a selected block gets, how attention feedback
changes the priorities, and which block goes when a slot is needed (the lowest priority, the lower block
id among equals). A new strategy is a class here, a `CacheStrategy` value and a test. The device-bookkept
cache of offload_access: direct is LRU in its kernel (`ops.cache_blocks`); the config refuses other
strategies there.
Knows nothing of tensors, blocks' contents or attention.
"""

from __future__ import annotations

from inf_llm.config import CacheStrategy


class Eviction:
    """LRU: a selected block's priority is the lookup's tick, so the least recently selected goes first."""

    strategy = CacheStrategy.LRU
    # the cache's user reports the attention probability each selected block received (`received`)
    uses_scores = False

    def selected(self, priority: float | None, tick: int) -> float:
        """The priority of a block selected at lookup `tick`; `priority` is None when it was just loaded."""
        return tick

    def received(self, priorities: dict[int, float], block_ids: list[int], scores: list[float]) -> None:
        """Attention feedback of one execution block's selected blocks (only if `uses_scores`)."""

    def victim(self, priorities: dict[int, float], protected: set[int]) -> int:
        """The resident block to evict: the lowest priority not in `protected` (the lookup's own blocks)."""
        candidates = [b for b in priorities if b not in protected]
        return min(candidates, key=lambda b: (priorities[b], b))


class FifoEviction(Eviction):
    """FIFO: a block's priority is its load tick, so the block loaded first goes first, however used."""

    strategy = CacheStrategy.FIFO

    def selected(self, priority: float | None, tick: int) -> float:
        return tick if priority is None else priority


class ScoreEviction(Eviction):
    """LRU-S (the paper's): a block's priority is the attention it received, decayed by `score_decay` at every
    execution block that reports feedback; a selected block restarts from what it receives now."""

    strategy = CacheStrategy.LRU_S
    uses_scores = True

    def __init__(self, score_decay: float):
        self.score_decay = score_decay

    def selected(self, priority: float | None, tick: int) -> float:
        return 0.0

    def received(self, priorities: dict[int, float], block_ids: list[int], scores: list[float]) -> None:
        for block in priorities:
            priorities[block] *= self.score_decay
        for block, score in zip(block_ids, scores):
            if block in priorities:
                priorities[block] += score


def eviction_of(strategy: CacheStrategy, score_decay: float) -> Eviction:
    """The strategy object of a config's `cache_strategy` (`score_decay`: LRU-S only)."""
    strategy = CacheStrategy(strategy)
    if strategy is CacheStrategy.LRU_S:
        return ScoreEviction(score_decay)
    return FifoEviction() if strategy is CacheStrategy.FIFO else Eviction()
