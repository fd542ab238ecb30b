"""The transformers integration: identity with stock attention, chunking and session invariances,
introspection, cancellation, and real retrieval with SmolLM2."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from inf_llm.adapter import InfLLMCache, cache_kwargs, patch_model, unpatch_model
from inf_llm.config import ModelConfig
from inf_llm.errors import GenerationCancelled, SessionStateError, UnsupportedModelError
from tests.models import FAMILIES, build_tiny_model

TYPES = ["inf-llm", "stream-llm", "infinite-lm", "origin"]
# Small memory settings so that 100s of tokens span many blocks.
SMALL = dict(n_init=4, n_local=64, block_size=8, topk=3, repr_topk=2, exc_block_size=16, max_cached_block=8)


@contextlib.contextmanager
def patched(model, **cfg):
    patch_model(model, ModelConfig(**cfg))
    try:
        yield model
    finally:
        unpatch_model(model)


def forward(model, ids, cache, chunk: int | None = None) -> torch.Tensor:
    chunk = chunk or ids.shape[1]
    outs = [model(ids[:, a : a + chunk], **cache_kwargs(model, cache), use_cache=True).logits
            for a in range(0, ids.shape[1], chunk)]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", TYPES)
def test_identity_with_stock_attention_while_inside_the_window(family, kind):
    """While nothing has left the local window, every type equals stock full attention (fp32)."""
    model = build_tiny_model(family, seed=1)
    ids = torch.randint(3, 300, (1, 52), generator=torch.Generator().manual_seed(2))  # 52 + 8 new <= n_local
    with torch.no_grad():
        stock = model(ids).logits
        stock_gen = model.generate(ids, max_new_tokens=8, do_sample=False)
        with patched(model, type=kind, **SMALL):
            ours = forward(model, ids, InfLLMCache(model))
            chunked = forward(model, ids, InfLLMCache(model), chunk=16)
            gen = model.generate(ids, **cache_kwargs(model, InfLLMCache(model)), max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked, stock, rtol=0, atol=1e-5)
    assert torch.equal(gen, stock_gen)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_rotation_is_skipped_and_real_rotations_are_not(family):
    """Patching wraps the modeling module's apply_rotary_pos_emb: it hands back q and k themselves for
    IdentityRotary's cos (no passes over them), and an unpatched model in the same process still rotates."""
    model = build_tiny_model(family, seed=1)
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    attention = next(m for m in model.modules() if hasattr(m, "q_proj"))
    with torch.no_grad():
        stock = model(ids).logits
        with patched(model, type="inf-llm", **SMALL):
            apply = sys.modules[type(attention).__module__].apply_rotary_pos_emb
            q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
            cos, sin = model.model.rotary_emb(q, torch.arange(5)[None])
            got_q, got_k = apply(q, k, cos, sin)
            assert got_q is q and got_k is k
            real_q, _ = apply(q, k, torch.ones_like(cos), torch.zeros_like(sin))  # not marked: computed
            assert real_q is not q and torch.equal(real_q, q)
        assert sys.modules[type(attention).__module__].apply_rotary_pos_emb is apply  # stays wrapped
        after = model(ids).logits
    assert torch.equal(after, stock)


def test_identity_smollm2(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    ids = tok("Explain in two sentences why the sky is blue, then name three colours.", return_tensors="pt").input_ids
    with torch.no_grad():
        stock = model(ids).logits
        for kind in TYPES:
            with patched(model, type=kind, n_init=4, n_local=256, exc_block_size=64):
                ours = forward(model, ids, InfLLMCache(model))
            torch.testing.assert_close(ours, stock, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["inf-llm", "stream-llm", "infinite-lm"])
def test_long_input_chunking_invariance(kind):
    """Prompt chunk sizes that are multiples of exc_block_size give the same logits over many blocks."""
    model = build_tiny_model("llama", seed=3)
    ids = torch.randint(3, 300, (1, 400), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), patched(model, type=kind, **SMALL):
        whole = forward(model, ids, InfLLMCache(model))
        by_32 = forward(model, ids, InfLLMCache(model), chunk=32)
        by_128 = forward(model, ids, InfLLMCache(model), chunk=128)
    torch.testing.assert_close(by_32, whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_128, whole, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        origin_diff = (model(ids).logits - whole).abs().max().item()
    assert origin_diff > 1e-3  # tokens did leave the window: this input exercises the memory


def test_session_turns_equal_concatenation_and_survive_save_load(tmp_path):
    """Turn 2 fed after turn 1 equals the concatenation fed at once; a saved state continues identically."""
    model = build_tiny_model("qwen2", seed=5)
    ids = torch.randint(3, 300, (1, 320), generator=torch.Generator().manual_seed(6))
    turn1, turn2 = ids[:, :192], ids[:, 192:]  # turn 1 ends on an execution-block boundary
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        at_once = forward(model, ids, InfLLMCache(model))
        cache = InfLLMCache(model)
        first = forward(model, turn1, cache)
        cache.save(tmp_path / "doc.pt")
        twin = cache.clone()
        second = forward(model, turn2, cache)
        torch.testing.assert_close(torch.cat([first, second], 1), at_once, rtol=1e-4, atol=1e-4)
        restored = InfLLMCache.load(tmp_path / "doc.pt", model)
        assert restored.get_seq_length() == 192
        torch.testing.assert_close(forward(model, turn2, restored), second, rtol=0, atol=1e-5)
        torch.testing.assert_close(forward(model, turn2, twin), second, rtol=0, atol=1e-5)
    with torch.no_grad(), patched(model, type="inf-llm", **{**SMALL, "n_local": 32}):
        with pytest.raises(SessionStateError, match="n_local"):
            InfLLMCache.load(tmp_path / "doc.pt", model)


def _direct_against_cache_path(tmp_path, runs, check_direct) -> None:
    """Each of `runs` ((name, offload, overrides) for offload_access direct, then its reference) through
    transformers: a 240-token prefill in chunks of 64, then 10 single-token steps; `check_direct(cache)` on
    the direct run, whose saved state must then continue identically. Both runs give the same logits and
    lookups."""
    model = build_tiny_model("llama", seed=9)
    ids = torch.randint(3, 300, (1, 260), generator=torch.Generator().manual_seed(10))
    results = []
    for name, offload, overrides in runs:
        with torch.no_grad(), patched(model, type="inf-llm", pin_memory=True, **overrides, **SMALL):
            cache = InfLLMCache(model, offload=offload)
            logits = [forward(model, ids[:, :240], cache, chunk=64)]
            logits += [forward(model, ids[:, p : p + 1], cache) for p in range(240, 250)]
            lookups = [layer.memory.retrieved_last for layer in cache.layers]
            if overrides["offload_access"] == "direct":
                check_direct(cache)
                cache.save(tmp_path / f"{name}.pt")
                continued = forward(model, ids[:, 250:], cache)
                restored = InfLLMCache.load(tmp_path / f"{name}.pt", model, offload=True)
                torch.testing.assert_close(forward(model, ids[:, 250:], restored), continued, rtol=0, atol=1e-5)
        results.append((torch.cat(logits, dim=1), lookups))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    assert results[0][1] == results[1][1]


def test_direct_offload_access_through_the_model_and_a_saved_session(tmp_path):
    """offload_access: direct through transformers (blocks offloaded, fetched by id on the device path) gives
    the logits and lookups of the blocks-on-the-device default, token by token too, and its saved state
    continues identically."""

    def check(cache):
        assert all(layer.memory.cache is None and layer.memory.device_lookup for layer in cache.layers)
        # the layers' formation rings share one set of slots (RingSlots, from the patch state)
        assert len({id(layer.memory.ring.slots) for layer in cache.layers}) == 1

    _direct_against_cache_path(tmp_path, [("direct", True, {"offload_access": "direct"}),
                                          ("device", False, {"offload_access": "cache"})], check)


def test_direct_offload_access_with_a_codec_through_the_model_and_a_saved_session(tmp_path):
    """offload_access: direct with offload_dtype: fp8 through transformers (a host pool of codes, decoded into
    the device cache) gives the logits and lookups of offload_access: cache with the same codec, and its saved
    state continues identically."""

    def check(cache):
        assert all(layer.memory.device_cache is not None and layer.memory.store.codec is not None
                   and layer.memory.ring is None for layer in cache.layers)

    fp8 = {"offload_dtype": "fp8", "host_pool_tokens": 512}
    _direct_against_cache_path(tmp_path, [("direct-fp8", True, {"offload_access": "direct", **fp8}),
                                          ("cache-fp8", True, {"offload_access": "cache", **fp8})], check)


def test_host_pool_is_lent_to_one_cache_at_a_time_and_reused():
    """host_pool_tokens: offloaded stores start from the pool's host tensors (no allocation per request); a
    cache alive at the same time, or a clone, allocates its own; a store outgrowing the pool grows as usual;
    the answers are those of the default allocation."""
    model = build_tiny_model("llama", seed=11)
    ids = torch.randint(3, 300, (1, 200), generator=torch.Generator().manual_seed(12))
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        want = forward(model, ids, InfLLMCache(model, offload=True), chunk=64)
    with torch.no_grad(), patched(model, type="inf-llm", host_pool_tokens=64, **SMALL):  # 8 blocks; ~16 form
        pool = model.infllm.host_pool
        first = InfLLMCache(model, offload=True)
        forward(model, ids[:, :120], first, chunk=64)
        pooled = [layer.memory.store.k.data_ptr() for layer in first.layers]
        assert pooled == [pool._storage[i][1]["k"].data_ptr() for i in range(len(first.layers))]
        assert first.layers[0].memory.store.count == 6  # (120 - 64 - 4) // 8, inside the pool's 8 blocks
        store = first.layers[0].memory.store
        assert first.host_lease.nbytes() == pool.nbytes() == len(first.layers) * (store.k.nbytes + store.v.nbytes)
        second = InfLLMCache(model, offload=True)  # while `first` lives: no pool
        twin = first.clone()
        assert second.host_lease is None and twin.host_lease is None
        forward(model, ids[:, :120], second, chunk=64)
        assert second.layers[0].memory.store.k.data_ptr() not in pooled
        del first, second, twin
        third = InfLLMCache(model, offload=True)  # the pool is free again: same host tensors, no allocation
        got = forward(model, ids, third, chunk=64)
        assert third.layers[0].memory.store.count > 8  # outgrew the pool
        fourth = InfLLMCache(model, offload=True)
        assert fourth.host_lease is None
        del third
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert pool.nbytes() > 0 and InfLLMCache(model, offload=True).host_lease is not None


def test_introspection_reports_blocks_ranges_and_bytes():
    model = build_tiny_model("mistral", seed=7)
    ids = torch.randint(3, 300, (1, 300), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        cache = InfLLMCache(model)
        forward(model, ids[:, :299], cache)
        cache.reset_retrieval_counts()
        forward(model, ids[:, 299:], cache)
        stats = cache.stats()
        summary = cache.retrieval_summary()
    assert len(stats) == 2
    assert stats[0].blocks == (300 - 64 - 4) // 8
    assert stats[0].retrieved_last and len(stats[0].retrieved_last[0]) == 3
    assert stats[0].host_bytes > 0 and stats[0].device_bytes == 0  # CPU: everything is host memory
    assert summary and all(end - start == 8 and count >= 1 for start, end, count in summary)
    assert sum(count for *_, count in summary) == 2 * 3  # 2 layers x 3 blocks for one decode lookup


def test_cancellation_between_layers_leaves_an_inconsistent_cache():
    model = build_tiny_model("llama", seed=9)
    ids = torch.randint(3, 300, (1, 50))
    calls = []
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        cache = InfLLMCache(model)
        cache.should_stop = lambda: (calls.append(1), len(calls) > 1)[1]  # stop before the second layer
        with pytest.raises(GenerationCancelled):
            forward(model, ids, cache)
        assert not cache.is_consistent()
        with pytest.raises(SessionStateError):
            cache.state_dict()


def test_cache_without_patch_and_batches_are_refused():
    model = build_tiny_model("llama", seed=10)
    with pytest.raises(UnsupportedModelError, match="patch_model"):
        InfLLMCache(model)
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        with pytest.raises(UnsupportedModelError, match="batch size"):
            forward(model, torch.randint(3, 300, (2, 10)), InfLLMCache(model))


# ------------------------------------------------------------------------------------- real retrieval
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
RETRIEVAL = dict(n_init=64, n_local=256, block_size=32, repr_topk=4, topk=8, exc_block_size=64, max_cached_block=16)


def passkey_ids(tok, n_tokens: int, depth: float, key: int) -> torch.Tensor:
    reps = n_tokens // 25
    before, after = NOISE * int(reps * depth), NOISE * (reps - int(reps * depth))
    text = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n\n" + before
            + f"The pass key is {key}. Remember it. {key} is the pass key. " + after + "\n\nWhat is the pass key?")
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    answer_prefix = tok(" The pass key is", add_special_tokens=False, return_tensors="pt").input_ids
    return torch.cat([ids, answer_prefix], dim=1)


def answer(model, tok, ids, kind: str) -> str:
    with torch.inference_mode(), patched(model, type=kind, **RETRIEVAL):
        cache = InfLLMCache(model)
        for a in range(0, ids.shape[1] - 1, 512):
            model(ids[:, a : min(a + 512, ids.shape[1] - 1)], **cache_kwargs(model, cache), use_cache=True,
                  logits_to_keep=1)
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=7, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_real_retrieval_passkey_smollm2(smollm2):
    """inf-llm finds a passkey ~3K tokens back with a 256-token window at 10/50/90% depth; stream-llm,
    which keeps only sinks and window, does not; origin (full attention) finds it inside 1K tokens."""
    model, tok = smollm2.model, smollm2.tokenizer
    for depth in (0.1, 0.5, 0.9):
        key = 58213 + int(depth * 100)
        ids = passkey_ids(tok, 3000, depth, key)
        assert ids.shape[1] > 2900
        assert str(key) in answer(model, tok, ids, "inf-llm"), depth
    far = passkey_ids(tok, 3000, 0.5, 41207)
    assert "41207" not in answer(model, tok, far, "stream-llm")
    near = passkey_ids(tok, 1000, 0.5, 36911)
    assert "36911" in answer(model, tok, near, "origin")


def test_cancelled_decode_step_keeps_the_cache_consistent():
    """Regression: a stop during decoding used to fire between layers and throw the memory away."""
    model = build_tiny_model("llama", seed=11)
    ids = torch.randint(3, 300, (1, 40))
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        cache = InfLLMCache(model)
        forward(model, ids, cache)
        calls = []
        cache.should_stop = lambda: (calls.append(1), len(calls) > 1)[1]  # would stop before layer 1
        forward(model, ids[:, :1], cache)  # a decode step: checked before layer 0 only
        assert cache.is_consistent() and cache.get_seq_length() == 41
        with pytest.raises(GenerationCancelled):
            forward(model, ids[:, :1], cache)
        assert cache.is_consistent() and cache.get_seq_length() == 41
