"""The fixed-shape decode step (`StaticDecodeStep`) and its runner (`DecodeGraph`) on CPU, where the static
step runs eagerly: the same outputs, lookups and retrieval counts as the ordinary decode path, step by step,
across block formations, window re-rotations and buffer growth. (Capture and replay: tests/test_gpu_agreement.)
"""

from __future__ import annotations

import pytest
import torch

from inf_llm.adapter import InfLLMCache, cache_kwargs
from inf_llm.adapter.decode_graph import DecodeGraph
from inf_llm.errors import GenerationCancelled
from inf_llm.memory.static_step import StaticDecodeStep
from tests.dense_reference import default_scale
from tests.models import build_tiny_model
from tests.test_adapter import SMALL, forward, patched
from tests.test_memory import D, make_memory, random_qkv


def test_static_step_equals_the_ordinary_decode_step():
    """Two memories fed the same tokens: one decodes through `process`, the other through the static step
    whenever it plans one; outputs, tail, lookups and counts stay equal (float64: to rounding)."""
    n, prefill = 400, 100
    q, k, v = random_qkv(n, seed=5)
    ordinary, static = (make_memory("inf-llm", device_lookup=True) for _ in range(2))
    step = StaticDecodeStep(static)
    scale = default_scale(D)
    for memory in (ordinary, static):
        memory.process(q[:, :prefill], k[:, :prefill], v[:, :prefill], scale)
    planned = 0
    for p in range(prefill, n):
        want = ordinary.process(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], scale)
        plan = step.plan()
        if plan is None:
            got = static.process(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], scale)
        else:
            planned += 1
            step.args.copy_(torch.tensor(plan))
            got = step.run(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], scale)
            step.advance()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert static.retrieved_last == ordinary.retrieved_last
        assert static.seen == ordinary.seen and static.tail.first_pos == ordinary.tail.first_pos
    assert planned > 200  # a block forms every 8 tokens and the window re-rotates every 32: the rest is static
    assert static.retrieval_counts == ordinary.retrieval_counts
    window = slice(ordinary.tail.first_pos, ordinary.tail.end_pos)
    torch.testing.assert_close(static.tail.scores(window.start, window.stop),
                               ordinary.tail.scores(window.start, window.stop), rtol=0, atol=1e-6)


def test_static_step_after_a_session_is_loaded_into_the_same_buffers():
    """After both memories load another sequence's state (other sinks, blocks and window in the same buffers),
    the static step's outputs still equal the ordinary step's: nothing it reads was staged before."""
    n, prefill = 220, 100
    q, k, v = random_qkv(n, seed=6)
    q2, k2, v2 = random_qkv(n, seed=7)
    ordinary, static, other = (make_memory("inf-llm", device_lookup=True) for _ in range(3))
    step = StaticDecodeStep(static)
    scale = default_scale(D)
    for memory in (ordinary, static):
        memory.process(q[:, :prefill], k[:, :prefill], v[:, :prefill], scale)
    other.process(q2[:, :prefill], k2[:, :prefill], v2[:, :prefill], scale)
    planned = 0
    for p in range(prefill, n):
        if p == prefill + 60:  # another conversation's state, into the same buffers
            saved = other.state()
            for memory in (ordinary, static):
                memory.load_state(saved)
            q, k, v = q2, k2, v2
        want = ordinary.process(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], scale)
        plan = step.plan()
        if plan is None:
            got = static.process(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], scale)
        else:
            planned += p > prefill + 60
            step.args.copy_(torch.tensor(plan))
            got = step.run(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], scale)
            step.advance()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert planned > 50


@pytest.mark.parametrize("kind, overrides, device_lookup", [
    ("inf-llm", {"perhead": True}, True),  # per-head top-k
    ("inf-llm", {"dense_decoding": True}, True),
    ("inf-llm", {}, False),  # the host path: lookups read on the host
    ("stream-llm", {}, True),  # no blocks
])
def test_memories_without_a_static_step_are_refused(kind, overrides, device_lookup):
    memory = make_memory(kind, device_lookup=device_lookup, **overrides)
    assert not StaticDecodeStep.supports(memory)
    with pytest.raises(ValueError, match="static decode step"):
        StaticDecodeStep(memory)


def test_decode_graph_matches_eager_decoding_through_transformers():
    """The runner through a real model: logits, lookups and counts of 220 steps equal plain forwards; steps
    that form blocks or re-rotate the window take the ordinary forward, the rest the static path."""
    model = build_tiny_model("llama", seed=9)
    ids = torch.randint(3, 300, (1, 420), generator=torch.Generator().manual_seed(10))
    results = []
    for graphed in (False, True):
        # offload_access: direct puts a CPU memory on the device path (lookups by id), which the step needs
        with torch.no_grad(), patched(model, type="inf-llm", offload_access="direct", pin_memory=True, **SMALL):
            cache = InfLLMCache(model, offload=True)
            forward(model, ids[:, :200], cache, chunk=64)
            step = DecodeGraph(model, cache)
            logits, lookups = [], []
            for p in range(200, 420):
                token = ids[:, p : p + 1]
                if graphed:
                    logits.append(step(token))
                else:
                    kw = cache_kwargs(model, cache)
                    logits.append(model(token, **kw, use_cache=True, logits_to_keep=1).logits[:, -1])
                lookups.append([layer.memory.retrieved_last for layer in cache.layers])
            counts = [layer.memory.retrieval_counts for layer in cache.layers]
            results.append((torch.cat(logits), lookups, counts, cache.get_seq_length(), step.stats))
    stats = results[1][4]
    assert stats.static_eager > 150 and stats.eager > 20 and stats.replayed == 0  # no graphs without CUDA
    assert results[0][1:4] == results[1][1:4]
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-5)


def test_decode_graph_checks_cancellation_before_each_step():
    model = build_tiny_model("llama", seed=9)
    ids = torch.randint(3, 300, (1, 150), generator=torch.Generator().manual_seed(10))
    with torch.no_grad(), patched(model, type="inf-llm", offload_access="direct", pin_memory=True, **SMALL):
        cache = InfLLMCache(model, offload=True)
        forward(model, ids[:, :140], cache, chunk=64)
        step = DecodeGraph(model, cache)
        step(ids[:, 140:141])
        cache.should_stop = lambda: True
        with pytest.raises(GenerationCancelled):
            step(ids[:, 141:142])
        assert cache.is_consistent() and cache.get_seq_length() == 141


def test_generate_decodes_through_the_cache_runner_with_the_same_tokens():
    """patch_model routes generate()'s one-token forwards through a DecodeGraph kept on the cache (here
    `decode_graph: true` on CPU: the fixed-shape step eagerly); the greedy tokens equal plain decoding, the
    forward keeps its signature (generate inspects it) and unpatch_model restores the model's own forward."""
    import inspect

    from inf_llm.adapter import unpatch_model

    model = build_tiny_model("llama", seed=9)
    ids = torch.randint(3, 300, (1, 200), generator=torch.Generator().manual_seed(10))
    outputs, runners = [], []
    for graph in (False, True):
        with torch.no_grad(), patched(model, type="inf-llm", offload_access="direct", pin_memory=True,
                                      decode_graph=graph, **SMALL):
            assert "logits_to_keep" in inspect.signature(model.forward).parameters
            cache = InfLLMCache(model, offload=True)
            outputs.append(model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=60, do_sample=False,
                                          pad_token_id=0))
            runners.append(cache.decode_graph)
    assert runners[0] is None and runners[1] is not None
    assert runners[1].stats.static_eager > 30 and runners[1].stats.eager > 0
    assert torch.equal(outputs[0], outputs[1])
    unpatch_model(model)
    assert "forward" not in vars(model)
