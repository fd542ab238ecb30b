"""The block cache's eviction strategies (inf_llm.memory.eviction) and the config rule that refuses a strategy
offload_access: direct cannot honour."""

import pytest
import torch

from inf_llm.config import CacheStrategy, ModelConfig, load_config
from inf_llm.errors import ConfigError
from inf_llm.memory.block_cache import BlockCache
from inf_llm.memory.buffers import BlockStore
from inf_llm.memory.eviction import Eviction, FifoEviction, ScoreEviction, eviction_of

CPU = torch.device("cpu")


def evictions(strategy: Eviction, sequence: list[int], capacity: int, feedback: dict[int, float]) -> list[int]:
    """The blocks `strategy` evicts while `sequence` is selected one block per tick from a cache of `capacity`,
    each selection then receiving `feedback[block]` (a stand-in for BlockCache.fetch's bookkeeping)."""
    priorities: dict[int, float] = {}
    evicted = []
    for tick, block in enumerate(sequence, start=1):
        if block not in priorities and len(priorities) == capacity:
            victim = strategy.victim(priorities, {block})
            del priorities[victim]
            evicted.append(victim)
        priorities[block] = strategy.selected(priorities.get(block), tick)
        if strategy.uses_scores:
            strategy.received(priorities, [block], [feedback.get(block, 0.0)])
    return evicted


SEQUENCE = [0, 1, 2, 0, 3, 1, 4, 0]


def test_lru_evicts_the_least_recently_selected():
    assert evictions(Eviction(), SEQUENCE, 3, {}) == [1, 2, 0, 3]


def test_fifo_evicts_the_first_loaded_however_used():
    assert evictions(FifoEviction(), SEQUENCE, 3, {}) == [0, 1, 2]


def test_lru_s_evicts_the_lowest_decayed_score():
    """Block 0 receives most attention and stays, although LRU evicts it."""
    assert evictions(ScoreEviction(0.5), SEQUENCE, 3, {0: 1.0, 1: 0.2, 2: 0.15, 3: 0.3}) == [1, 2, 3]


def test_lru_s_decays_every_resident_score():
    strategy = ScoreEviction(0.5)
    priorities = {1: 4.0, 2: 1.0}
    strategy.received(priorities, [2, 7], [3.0, 9.0])  # block 7 is not resident: ignored
    assert priorities == {1: 2.0, 2: 3.5}


@pytest.mark.parametrize("strategy, kind", [(CacheStrategy.LRU, Eviction), (CacheStrategy.FIFO, FifoEviction),
                                            (CacheStrategy.LRU_S, ScoreEviction)])
def test_each_cache_strategy_has_its_object(strategy, kind):
    chosen = eviction_of(strategy, 0.25)
    assert type(chosen) is kind and chosen.strategy is strategy
    assert chosen.uses_scores == (strategy is CacheStrategy.LRU_S)


@pytest.mark.parametrize("strategy", list(CacheStrategy))
def test_block_cache_with_each_strategy_keeps_a_lookups_blocks_and_copies_them(strategy):
    """BlockCache.fetch and add_scores through the strategy: the blocks of a lookup are never evicted by it,
    the slots hold the blocks' K/V, and hits and misses are counted."""
    blocks = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    store = BlockStore(1, 2, 2, torch.float32, CPU, CPU, pin_memory=False)
    store.add_many(blocks, blocks, torch.zeros(6, 2), list(range(0, 12, 2)))
    cache = BlockCache(3, strategy, 0.1, (1, 2, 2), torch.float32, CPU)
    assert cache.uses_scores == (strategy is CacheStrategy.LRU_S)
    for lookup in ([0, 1], [1, 2], [3, 4], [0, 4, 5]):
        slots = cache.fetch(lookup, store)
        cache.add_scores(lookup, [float(b) for b in lookup])  # ignored unless LRU-S
        assert set(lookup) <= set(cache.slot_of)
        for block, slot in zip(lookup, slots):
            assert torch.equal(cache.k[slot], blocks[block]) and torch.equal(cache.v[slot], blocks[block])
    assert cache.hits + cache.misses == 9 and cache.hits == 2  # block 1 of the second lookup, 4 of the last
    cache.clear()
    assert not cache.slot_of and not cache.priority


@pytest.mark.parametrize("strategy", ["fifo", "lru-s"])
def test_a_strategy_direct_access_cannot_honour_is_refused(tmp_path, strategy):
    """offload_access: direct evicts LRU in its kernel: fifo or lru-s there was silently LRU."""
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model:\n  offload_access: direct\n  pin_memory: true\n  cache_strategy: {strategy}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    for part in (f"model.cache_strategy: {strategy}", "model.offload_access: direct", "set cache_strategy: lru",
                 "offload_access: cache"):
        assert part in message
    with pytest.raises(ValueError, match="cache_strategy"):
        ModelConfig(offload_access="direct", pin_memory=True, cache_strategy=strategy)
    assert ModelConfig(offload_access="cache", cache_strategy=strategy).cache_strategy is CacheStrategy(strategy)
    assert ModelConfig(offload_access="direct", pin_memory=True).cache_strategy is CacheStrategy.LRU
