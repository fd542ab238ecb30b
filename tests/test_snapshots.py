"""Prefix snapshots of the memory (InfLLMCache.snapshot / restore, inf_llm/memory/snapshot.py): a
conversation continued from a snapshot is bit-identical to one that never left it, blocks are shared (not
copied) between snapshots, and a snapshot survives the store being rewound below its blocks.

Tiny real models in float32 with a small memory, so that a few hundred tokens form many blocks. Snapshots
are taken at multiples of exc_block_size (as the engine takes them): a lookup serves one execution block,
so a prefill split elsewhere would look up differently from one that was not split.
"""

from __future__ import annotations

import pytest
import torch

from inf_llm.adapter import InfLLMCache, cache_kwargs
from inf_llm.adapter.hf import storage_sizes
from tests.models import build_tiny_model
from tests.test_adapter import SMALL, patched

TYPES = ["inf-llm", "stream-llm", "infinite-lm", "origin"]


def unique_bytes(tensors) -> int:
    return sum(storage_sizes(tensors).values())


def ids_of(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def feed(model, cache: InfLLMCache, ids: torch.Tensor, chunk: int = 48) -> torch.Tensor:
    """Logits of the last position after feeding `ids` in chunks."""
    out = None
    for a in range(0, ids.shape[1], chunk):
        out = model(ids[:, a : a + chunk], **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
    return out


def greedy(model, cache: InfLLMCache, ids: torch.Tensor, n: int = 12) -> list[int]:
    """Feed `ids`, then decode `n` tokens greedily one at a time (the memory's decode step)."""
    logits = feed(model, cache, ids)
    out = []
    for _ in range(n):
        token = int(logits.argmax(-1))
        out.append(token)
        logits = model(torch.tensor([[token]]), **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
    return out


@pytest.mark.parametrize("kind", TYPES)
def test_a_question_from_a_snapshot_equals_the_uninterrupted_conversation(kind):
    """doc -> snapshot -> question A answered -> restore -> question B gives bit for bit what doc + B gives
    without any snapshot (same chunk boundaries), and restoring again gives A's answer again."""
    model = build_tiny_model("llama", seed=3)
    doc, qa, qb = ids_of(304, 1), ids_of(40, 2), ids_of(37, 3)
    with torch.no_grad(), patched(model, type=kind, **SMALL):
        reference = InfLLMCache(model)
        feed(model, reference, doc)
        answer_b = greedy(model, reference, qb)
        reference_a = InfLLMCache(model)
        feed(model, reference_a, doc)
        answer_a = greedy(model, reference_a, qa)

        cache = InfLLMCache(model)
        feed(model, cache, doc)
        snap = cache.snapshot()
        assert greedy(model, cache, qa) == answer_a
        cache.restore(snap)
        assert cache.get_seq_length() == doc.shape[1]
        assert greedy(model, cache, qb) == answer_b
        cache.restore(snap)
        assert greedy(model, cache, qa) == answer_a


def test_restored_logits_are_bit_identical_in_float32():
    """Not only the greedy tokens: every logit of the continuation equals the uninterrupted one exactly."""
    model = build_tiny_model("qwen2", seed=4)
    doc, q = ids_of(256, 5), ids_of(50, 6)
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        reference = InfLLMCache(model)
        feed(model, reference, doc)
        expected = feed(model, reference, q)
        cache = InfLLMCache(model)
        feed(model, cache, doc)
        snap = cache.snapshot()
        feed(model, cache, ids_of(90, 7))  # another conversation forms more blocks past the snapshot
        cache.restore(snap)
        got = feed(model, cache, q)
    assert torch.equal(got, expected)


def test_a_snapshot_keeps_its_blocks_when_the_store_is_rewound_below_them():
    """Branch A's snapshot (after doc + A) still continues exactly after branch B rewound the store to the
    doc and overwrote A's blocks: A's own blocks were copied out before they were dropped. Bit for bit
    against the same reads without snapshots; within float32 rounding of doc + A read in one pass."""
    model = build_tiny_model("mistral", seed=5)
    doc, qa, qb, more = ids_of(208, 8), ids_of(80, 9), ids_of(80, 10), ids_of(30, 11)
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        reference = InfLLMCache(model)
        feed(model, reference, doc)
        feed(model, reference, qa)
        expected = feed(model, reference, more)
        one_pass = InfLLMCache(model)
        feed(model, one_pass, torch.cat([doc, qa], 1))
        torch.testing.assert_close(feed(model, one_pass, more), expected, rtol=0, atol=1e-4)

        cache = InfLLMCache(model)
        feed(model, cache, doc)
        snap_doc = cache.snapshot()
        feed(model, cache, qa)
        snap_a = cache.snapshot(parent=snap_doc)
        blocks_a = cache.layers[0].memory.store.count
        assert blocks_a > snap_doc.layers[0].blocks.count  # A formed blocks of its own
        cache.restore(snap_doc)
        feed(model, cache, qb)  # B writes over the store slots A's blocks had
        assert snap_a.layers[0].blocks.private  # A kept a copy of exactly its divergent blocks
        assert snap_a.layers[0].blocks.blocks == blocks_a
        cache.restore(snap_a)
        assert cache.layers[0].memory.store.count == blocks_a
        got = feed(model, cache, more)
    assert torch.equal(got, expected)


def test_snapshots_of_one_document_share_its_blocks_and_window():
    """Twenty questions' snapshots on one document cost less than the document's snapshot again: blocks
    are read in place and each question's window shares the document's positions."""
    model = build_tiny_model("llama", seed=6)
    doc = ids_of(1200, 12)
    with torch.no_grad(), patched(model, type="inf-llm", **{**SMALL, "n_local": 256}):
        cache = InfLLMCache(model)
        feed(model, cache, doc, chunk=256)
        snap_doc = cache.snapshot()
        one = unique_bytes(snap_doc.tensors())
        questions = []
        for i in range(20):
            cache.restore(snap_doc)
            feed(model, cache, ids_of(12, 100 + i))
            questions.append(cache.snapshot(parent=snap_doc))
        everything = unique_bytes([t for s in [snap_doc, *questions] for t in s.tensors()])
    assert everything < 2 * one, (everything, one)


def test_a_snapshot_saved_as_a_state_dict_loads_into_a_new_cache_and_continues_identically():
    """CacheSnapshot.state_dict() is the state_dict the cache had at that point: a new cache loaded from it
    continues bit for bit (this is how a document memory is saved to disk)."""
    model = build_tiny_model("llama", seed=7)
    doc, q = ids_of(240, 13), ids_of(33, 14)
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        cache = InfLLMCache(model)
        feed(model, cache, doc)
        snap = cache.snapshot()
        expected = feed(model, cache, q)
        feed(model, cache, ids_of(60, 15))
        loaded = InfLLMCache(model)
        loaded.load_state_dict(snap.state_dict())
        loaded.materialize(model)
        assert loaded.get_seq_length() == doc.shape[1]
        again = loaded.snapshot()  # materialized: a snapshot can be taken before any forward
        got = feed(model, loaded, q)
        loaded.restore(again)
        twice = feed(model, loaded, q)
    assert torch.equal(got, expected) and torch.equal(twice, expected)


def test_restore_refuses_a_snapshot_of_another_cache():
    model = build_tiny_model("llama", seed=8)
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        a, b = InfLLMCache(model), InfLLMCache(model)
        feed(model, a, ids_of(100, 16))
        feed(model, b, ids_of(100, 17))
        with pytest.raises(ValueError, match="cache it was taken from"):
            b.restore(a.snapshot())


def test_trim_gives_back_unused_block_capacity_and_the_memory_continues_identically():
    model = build_tiny_model("llama", seed=9)
    doc, q = ids_of(1200, 18), ids_of(40, 19)
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        reference = InfLLMCache(model)
        feed(model, reference, doc)
        expected = feed(model, reference, q)
        cache = InfLLMCache(model)
        feed(model, cache, doc)
        store = cache.layers[0].memory.store
        before = store.k.shape[0]
        cache.trim(spare_blocks=4)
        assert store.k.shape[0] == store.count + 4 < before
        got = feed(model, cache, q)
    assert torch.equal(got, expected)
