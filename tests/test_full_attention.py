"""model.full_attention_tokens: plain full attention while a conversation fits, the configured memory past it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inf_llm.adapter import InfLLMCache
from inf_llm.errors import UnsupportedModelError
from tests.dense_reference import default_inv_freq, default_scale, rotate
from tests.models import build_tiny_model
from tests.test_adapter import SMALL, forward, patched
from tests.test_memory import CALL_PATTERNS, D, feed, make_memory, random_qkv

LIMIT = 100  # tokens of full attention in the memory-level tests (n_local there is 32)


@pytest.mark.parametrize("pattern", ["one_call", "chunks_of_32", "prefill_then_decode", "token_by_token"])
@pytest.mark.parametrize("kind", ["inf-llm", "stream-llm", "infinite-lm"])
def test_within_the_limit_every_memory_is_full_attention(kind, pattern):
    q, k, v = random_qkv(LIMIT, seed=21)
    full = feed(make_memory(kind, full_attention_tokens=LIMIT), q, k, v, CALL_PATTERNS[pattern](LIMIT))
    origin = feed(make_memory("origin"), q, k, v, [LIMIT])
    plain = feed(make_memory(kind), q, k, v, [LIMIT])
    torch.testing.assert_close(full, origin, rtol=0, atol=1e-6)  # (RoPE tables are float32)
    assert (plain - origin).abs().max() > 1e-3  # without the option, tokens did leave the 32-token window


def test_a_planned_prompt_past_the_limit_reads_as_without_the_option():
    q, k, v = random_qkv(300, seed=22)
    calls = [96, 96, 96] + [1] * 12
    planned, plain = make_memory("inf-llm", full_attention_tokens=LIMIT), make_memory("inf-llm")
    planned.plan(300)
    assert not planned.wide
    assert torch.equal(feed(planned, q, k, v, calls), feed(plain, q, k, v, calls))
    assert planned.stats() == plain.stats()


@pytest.mark.parametrize("calls", [[90] + [1] * 60, [64, 64, 22]], ids=["decode-crosses", "prefill-crosses"])
def test_crossing_the_limit_narrows_the_window_and_keeps_the_past_as_blocks(calls):
    n = sum(calls)
    q, k, v = random_qkv(n, seed=23)
    memory = make_memory("inf-llm", full_attention_tokens=LIMIT)
    out = feed(memory, q, k, v, calls)
    origin = feed(make_memory("origin"), q, k, v, [n])
    first = calls[0]  # the first call fits the limit: plain attention
    torch.testing.assert_close(out[:, :first], origin[:, :first], rtol=0, atol=1e-6)  # (RoPE tables are float32)
    assert not memory.wide
    stats = memory.stats()
    assert stats.init_tokens == 4
    assert torch.equal(memory.init_k[:, :4], k[:, :4])
    assert 32 <= stats.window_tokens < 32 + 8 + 8
    assert stats.blocks == (n - stats.window_tokens - 4) // 8 and memory.block_range(0) == (4, 12)
    assert (out[:, -1] - origin[:, -1]).abs().max() > 1e-3  # the last queries read through the memory


def test_a_session_saved_while_wide_continues_identically_across_the_limit():
    q, k, v = random_qkv(160, seed=24)
    a = make_memory("inf-llm", full_attention_tokens=LIMIT)
    a.process(q[:, :80], k[:, :80], v[:, :80], default_scale(D))
    b = make_memory("inf-llm", full_attention_tokens=LIMIT)
    b.load_state(a.state())
    assert b.wide
    rest = [1] * 30 + [50]
    torch.testing.assert_close(feed(a, q[:, 80:], k[:, 80:], v[:, 80:], rest),
                               feed(b, q[:, 80:], k[:, 80:], v[:, 80:], rest), rtol=0, atol=0)
    # the same state; the bytes may differ (a loaded store is sized to its blocks, a grown one doubled)
    same = [dataclasses.replace(m.stats(), host_bytes=0, device_bytes=0) for m in (a, b)]
    assert not b.wide and same[0] == same[1]


@pytest.mark.parametrize("pattern", ["one_call", "chunks_of_32", "prefill_then_decode"])
def test_a_wide_window_scores_each_key_by_the_queries_of_the_configured_window(pattern):
    """While the window is wide, a key's score is the probability full attention gives it, summed over the
    queries of the configured window (n_local 32) after it and over its group's query heads: what the blocks
    it forms on narrowing would have been scored by without the option."""
    n, n_local, group = 90, 32, 3
    q, k, v = random_qkv(n, seed=26)
    memory = make_memory("inf-llm", full_attention_tokens=LIMIT)
    feed(memory, q, k, v, CALL_PATTERNS[pattern](n))
    assert memory.wide
    positions = torch.arange(n)
    q_rot, k_rot = rotate(q, default_inv_freq(D), positions), rotate(k, default_inv_freq(D), positions)
    scores = q_rot.view(2, group, n, D) @ k_rot[:, None].transpose(-1, -2) * default_scale(D)  # (Hkv, G, i, j)
    causal = positions[None, :] <= positions[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # full attention's
    near = causal & (positions[:, None] - positions[None, :] < n_local)
    expected = (probs * near).sum(dim=(1, 2))  # (Hkv, j)
    first = memory.tail.first_pos
    torch.testing.assert_close(memory.tail.scores(first, n), expected[:, first:].float(), rtol=1e-5, atol=1e-6)


def test_a_limit_within_the_window_changes_nothing():
    q, k, v = random_qkv(200, seed=25)
    assert torch.equal(feed(make_memory("inf-llm", full_attention_tokens=20), q, k, v, [200]),
                       feed(make_memory("inf-llm"), q, k, v, [200]))


def test_auto_is_the_models_native_context_and_a_model_reads_as_stock_within_it():
    model = build_tiny_model("llama", seed=5, max_position_embeddings=160)
    ids = torch.randint(3, 300, (1, 150), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        stock = model(ids).logits
        with patched(model, type="inf-llm", full_attention_tokens="auto", **SMALL):
            assert model.infllm.cfg.full_attention_tokens == 160
            ours = forward(model, ids, InfLLMCache(model), chunk=48)
            planned = InfLLMCache(model)
            planned.plan(400)  # a prompt past the limit: the configured memory from its first token
            narrow = forward(model, ids, planned, chunk=48)
        with patched(model, type="inf-llm", **SMALL):
            plain = forward(model, ids, InfLLMCache(model), chunk=48)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    assert torch.equal(narrow, plain)
    assert (plain - stock).abs().max() > 1e-3


def test_auto_without_a_native_context_is_refused():
    model = build_tiny_model("llama", seed=5)
    model.config.max_position_embeddings = 0  # (a config without a native context)
    with pytest.raises(UnsupportedModelError, match="full_attention_tokens"):
        with patched(model, type="inf-llm", full_attention_tokens="auto", **SMALL):
            pass
