"""Retrieval as the released InfLLM code does it, behind `model.lookup_heads` and `model.remainder_visibility`,
against the float64 dense reference's re-derivation of the released rule (tests/dense_reference.py), on a GQA
layer of 4 query / 2 KV heads: every storage and lookup path, several execution blocks per call, blocks formed
mid-call, decode steps. Also: the options change what they should (GQA) and nothing else (MHA), sessions and
the static decode step keep working, and the combinations nothing implements are refused with both keys named.
"""

from __future__ import annotations

import math

import pytest
import torch

from inf_llm.adapter import InfLLMCache, patch_model, unpatch_model
from inf_llm.config import ModelConfig, load_config
from inf_llm.errors import ConfigError, SessionStateError
from inf_llm.kernels import reference
from inf_llm.memory import ContextMemory, RotaryTable
from inf_llm.memory.static_step import StaticDecodeStep
from tests.dense_reference import default_inv_freq, default_scale, dense_layer, exec_blocks
from tests.models import build_tiny_model
from tests.test_adapter import SMALL, forward, patched
from tests.test_memory import D, make_memory, random_qkv
from tests.triton_interpreter import DEVICE, import_kernels, triton_interpreter_env  # noqa: F401

triton_attn = import_kernels("inf_llm.kernels.triton_attn")

HQ, HKV = 4, 2
N = 150
EXC = 8
SETTINGS = dict(n_init=4, n_local=32, block_size=8, topk=3, repr_topk=2)  # make_memory's, for the reference
# where blocks live and how lookups select them (docs/ARCHITECTURE.md, "Context memory paths")
PATHS = {
    "host": dict(),  # blocks in CPU memory, exact top-k on the host, staged
    "device": dict(device_lookup=True),  # ids on the device, batched lookups refined, global_stage_into
    "cache": dict(offload=True, max_cached_block=64),  # offloaded through the block cache
    "chunk_topk_calc": dict(offload=True, max_cached_block=64, chunk_topk_calc=16),  # batched host lookups
    "direct": dict(offload=True, offload_access="direct", pin_memory=True),  # device cache, formation ring
}
CALLS = {
    "one_call": [N],
    "odd_calls": [13, 50, 7, 1, 1, N - 72],  # calls ending mid execution block, decode steps in between
    "prefill_then_decode": [N - 12] + [1] * 12,
}


def run(memory: ContextMemory, q, k, v, sizes: list[int]) -> tuple[torch.Tensor, list[list[int]]]:
    """Feed `sizes` tokens per call; the outputs and every execution block's selection."""
    outs, selections, pos = [], [], 0
    for size in sizes:
        outs.append(memory.process(q[:, pos : pos + size], k[:, pos : pos + size], v[:, pos : pos + size],
                                   default_scale(D)))
        selections.extend(memory.retrieved_last)
        pos += size
    return torch.cat(outs, dim=1), selections


def reference_run(q, k, v, sizes: list[int], **options) -> tuple[torch.Tensor, list[list[int]]]:
    return dense_layer(q, k, v, kind="inf-llm", **SETTINGS, blocks=exec_blocks(sizes, EXC),
                       inv_freq=default_inv_freq(D), scale=default_scale(D), **options)


@pytest.mark.parametrize("remainder_visibility", ["exact", "released"])
@pytest.mark.parametrize("lookup_heads", ["kv", "query"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_matches_the_released_rule_of_the_dense_reference(path, lookup_heads, remainder_visibility):
    """Outputs and selected blocks equal the float64 one-query-at-a-time reference of each rule, on every
    storage and lookup path, calls that end mid execution block, decode steps in between."""
    q, k, v = random_qkv(N, hq=HQ, hkv=HKV, seed=21)
    sizes = CALLS["odd_calls"]
    options = dict(lookup_heads=lookup_heads, remainder_visibility=remainder_visibility)
    memory = make_memory("inf-llm", hq=HQ, hkv=HKV, exc_block_size=EXC, **PATHS[path], **options)
    got, selections = run(memory, q, k, v, sizes)
    want, want_selections = reference_run(q, k, v, sizes, **options)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    assert selections == want_selections and len(selections) > 10
    assert memory.tail.score.shape[0] == (HQ if lookup_heads == "query" else HKV)
    assert memory.store.repr.shape[1] == (HQ if lookup_heads == "query" else HKV) * D


@pytest.mark.parametrize("calls", list(CALLS))
def test_both_released_options_together_for_any_call_split(calls):
    q, k, v = random_qkv(N, hq=HQ, hkv=HKV, seed=22)
    options = dict(lookup_heads="query", remainder_visibility="released")
    memory = make_memory("inf-llm", hq=HQ, hkv=HKV, exc_block_size=EXC, **options)
    got, selections = run(memory, q, k, v, CALLS[calls])
    want, want_selections = reference_run(q, k, v, CALLS[calls], **options)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    assert selections == want_selections


@pytest.mark.parametrize("lookup_heads", ["kv", "query"])
@pytest.mark.parametrize("path", ["host", "device", "cache", "direct"])
def test_perhead_matches_the_dense_reference(path, lookup_heads):
    """perhead: each KV head (kv) or each query head (query, as the released code's perhead) retrieves its own
    top-k and attends it; the selections merge the heads'."""
    q, k, v = random_qkv(N, hq=HQ, hkv=HKV, seed=23)
    sizes = CALLS["odd_calls"]
    options = dict(perhead=True, lookup_heads=lookup_heads)
    memory = make_memory("inf-llm", hq=HQ, hkv=HKV, exc_block_size=EXC, **options, **PATHS[path])
    got, selections = run(memory, q, k, v, sizes)
    want, want_selections = reference_run(q, k, v, sizes, **options)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    assert selections == want_selections
    assert any(len(ids) > SETTINGS["topk"] for ids in selections)  # the heads chose different blocks
    # per query head: its own K/V copy (the released code's repeat_kv), a representative per query head
    assert memory.store.k.shape[1] == (HQ if lookup_heads == "query" else HKV)


def test_lookup_heads_query_selects_other_blocks_with_gqa_and_the_same_without():
    """With GQA the per-query-head rule (representatives from each query head's own scores, sum_h q_h . r_h)
    selects other blocks than the per-KV-head one; without GQA both are the same computation."""
    q, k, v = random_qkv(N, hq=HQ, hkv=HKV, seed=24)
    per_kv, per_query = (make_memory("inf-llm", hq=HQ, hkv=HKV, lookup_heads=heads) for heads in ("kv", "query"))
    out_kv, sel_kv = run(per_kv, q, k, v, [N])
    out_query, sel_query = run(per_query, q, k, v, [N])
    assert len(sel_kv) == len(sel_query) > 10
    assert sum(a != b for a, b in zip(sel_kv, sel_query)) >= 3
    assert not torch.allclose(out_kv, out_query)
    q, k, v = random_qkv(N, hq=HQ, hkv=HQ, seed=24)  # MHA
    per_kv, per_query = (make_memory("inf-llm", hq=HQ, hkv=HQ, lookup_heads=heads) for heads in ("kv", "query"))
    out_kv, sel_kv = run(per_kv, q, k, v, CALLS["odd_calls"])
    out_query, sel_query = run(per_query, q, k, v, CALLS["odd_calls"])
    assert sel_kv == sel_query
    assert torch.equal(out_kv, out_query)


def test_released_remainder_visibility_changes_prefill_only():
    """The released rule shows early queries of an execution block remainder keys inside their own window:
    prefill outputs change, a decode step (one query: it sees the whole remainder either way) does not."""
    q, k, v = random_qkv(N, hq=HQ, hkv=HKV, seed=25)
    outs = {}
    for visibility in ("exact", "released"):
        memory = make_memory("inf-llm", hq=HQ, hkv=HKV, exc_block_size=EXC, remainder_visibility=visibility)
        outs[visibility] = run(memory, q, k, v, [1] * N)[0], run(
            make_memory("inf-llm", hq=HQ, hkv=HKV, exc_block_size=EXC, remainder_visibility=visibility),
            q, k, v, [N])[0]
    torch.testing.assert_close(outs["exact"][0], outs["released"][0], rtol=0, atol=0)  # token by token
    assert (outs["exact"][1] - outs["released"][1]).abs().max() > 1e-3  # one prefill call


def test_session_state_with_per_query_head_scores_continues_identically():
    """state()/load_state() carry the (Hq, L) scores and (N, Hq * D) representatives: the loaded memory
    continues as the one that saved it."""
    q, k, v = random_qkv(200, hq=HQ, hkv=HKV, seed=26)
    options = dict(hq=HQ, hkv=HKV, lookup_heads="query", remainder_visibility="released")
    a = make_memory("inf-llm", **options)
    run(a, q[:, :120], k[:, :120], v[:, :120], [120])
    state = a.state()
    assert state["tail"]["score"].shape[0] == HQ and state["store"]["repr"].shape[1] == HQ * D
    b = make_memory("inf-llm", **options)
    b.load_state(state)
    rest = (q[:, 120:], k[:, 120:], v[:, 120:])
    got_a, sel_a = run(a, *rest, [30, 1, 1, 48])
    got_b, sel_b = run(b, *rest, [30, 1, 1, 48])
    torch.testing.assert_close(got_a, got_b, rtol=0, atol=0)
    assert sel_a == sel_b


def decode_tokens(memory: ContextMemory, step: StaticDecodeStep | None, q, k, v, prefill: int, scale: float
                  ) -> tuple[list, list, int]:
    """Prefill `prefill` tokens, then the rest one at a time: through `step` whenever it plans one (None:
    never). Returns the outputs, each step's lookups, and how many steps the static step ran."""
    memory.process(q[:, :prefill], k[:, :prefill], v[:, :prefill], scale)
    outs, lookups, static = [], [], 0
    for p in range(prefill, q.shape[1]):
        token = (q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1])
        plan = step.plan() if step is not None else None
        if plan is not None:
            step.args.copy_(torch.tensor(plan))
            outs.append(step.run(*token, scale))
            step.advance()
        else:
            outs.append(memory.process(*token, scale))
        static += plan is not None
        lookups.append(memory.retrieved_last)
    return outs, lookups, static


def test_static_decode_step_with_per_query_head_scores():
    """The fixed-shape decode step (CUDA graphs; eager on a CPU) scores, looks up and adds each query head's
    received probabilities as the ordinary step does."""
    n, prefill = 300, 100
    q, k, v = random_qkv(n, hq=HQ, hkv=HKV, seed=27)
    scale = default_scale(D)

    def decode(step: StaticDecodeStep | None) -> tuple[ContextMemory, list, list, int]:
        memory = step.memory if step is not None else make_memory("inf-llm", hq=HQ, hkv=HKV, device_lookup=True,
                                                                    lookup_heads="query")
        return memory, *decode_tokens(memory, step, q, k, v, prefill, scale)

    ordinary, want, want_lookups, _ = decode(None)
    static, got, lookups, planned = decode(StaticDecodeStep(
        make_memory("inf-llm", hq=HQ, hkv=HKV, device_lookup=True, lookup_heads="query")))
    assert planned > 100 and lookups == want_lookups
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), rtol=0, atol=1e-6)
    window = (ordinary.tail.first_pos, ordinary.tail.end_pos)
    assert static.tail.scores(*window).shape[0] == HQ
    torch.testing.assert_close(static.tail.scores(*window), ordinary.tail.scores(*window), rtol=0, atol=1e-6)
    torch.testing.assert_close(static.store.representatives(), ordinary.store.representatives(), rtol=0, atol=1e-6)


def test_per_query_head_ops_equal_the_per_kv_ops_expanded_to_the_query_heads():
    """The ops' per-query-head forms (a (Hq, ...) score buffer or representative output) equal the per-KV
    ops on K expanded to the query heads (the released code's `from_group_kv`), where a group is one head."""
    g = torch.Generator().manual_seed(28)
    hq, hkv, lq, lk, scale = 6, 2, 5, 12, default_scale(D)
    q = torch.randn(1, hq, lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, hkv, lk, D, generator=g, dtype=torch.float64)
    lse = torch.randn(1, hq, lq, generator=g, dtype=torch.float64).float() + 3
    expanded = k.repeat_interleave(hq // hkv, dim=1)  # (1, Hq, Lk, D)
    window = dict(scale=scale, q_offset=lk - lq, window=8, lse=lse)
    per_query = reference.window_key_scores(q, k, into=torch.zeros(1, hq, lk, dtype=torch.float32), **window)
    torch.testing.assert_close(per_query, reference.window_key_scores(q, expanded, **window))
    keys = torch.randn(hkv, 3, 8, D, generator=g, dtype=torch.float64)  # (Hkv, n, bs, D)
    scores = torch.rand(hq, 3, 8, generator=g, dtype=torch.float64)
    got = reference.block_representatives(keys, scores, 2, torch.float64)  # (n, Hq, D)
    want = reference.block_representatives(keys.repeat_interleave(hq // hkv, dim=0), scores, 2, torch.float64)
    assert got.shape == (3, hq, D)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # one decoding query: each query head's received probability (Hq, Ll) sums to the per-KV one (Hkv, Ll)
    q_loc, q_glb = (torch.randn(hq, D, generator=g, dtype=torch.float64) for _ in range(2))
    k_loc, v_loc, k_glb, v_glb = (torch.randn(hkv, 9, D, generator=g, dtype=torch.float64) for _ in range(4))
    out, lse_d, received = reference.decode_attention(q_loc, k_loc, v_loc, q_glb, k_glb, v_glb, scale=scale)
    into = torch.zeros(hq, 9, dtype=torch.float32)
    out_q, lse_q, received_q = reference.decode_attention(q_loc, k_loc, v_loc, q_glb, k_glb, v_glb, scale=scale,
                                                          received_into=into)
    assert received_q is into and torch.equal(out, out_q) and torch.equal(lse_d, lse_q)
    torch.testing.assert_close(received_q.view(hkv, hq // hkv, 9).sum(1), received)


@pytest.mark.parametrize("other", ["fattn", "faiss"])
def test_lookup_heads_query_with_what_cannot_do_it_is_refused_at_load(other):
    with pytest.raises(ConfigError, match=rf"lookup_heads: query does not work with model.{other}"):
        load_config(None, ["model.lookup_heads=query", f"model.{other}=true"])
    load_config(None, ["model.lookup_heads=query", "model.perhead=true", "model.remainder_visibility=released"])


def test_perhead_block_cache_too_small_for_every_kv_heads_topk_is_refused():
    """perhead with the block cache: up to Hkv * topk distinct blocks per lookup must fit max_cached_block
    (before, a lookup that spread that far failed part-way through a request). Refused when the memory is
    made and when a model is patched, naming both keys and the head count; blocks on the device need no cache."""
    with pytest.raises(ConfigError, match=r"model.topk \(3\).*2 KV heads.*max_cached_block is 5"):
        make_memory("inf-llm", hq=HQ, hkv=HKV, perhead=True, offload=True, max_cached_block=5)
    make_memory("inf-llm", hq=HQ, hkv=HKV, perhead=True, offload=True, max_cached_block=6)
    with pytest.raises(ConfigError, match=r"4 query heads: up to 12"):  # each query head its own top-k
        make_memory("inf-llm", hq=HQ, hkv=HKV, perhead=True, lookup_heads="query", offload=True, max_cached_block=6)
    make_memory("inf-llm", hq=HQ, hkv=HKV, perhead=True, offload=False, max_cached_block=5)
    model = build_tiny_model("llama", seed=1)
    kv_heads = model.config.num_key_value_heads
    cfg = ModelConfig(type="inf-llm", perhead=True, topk=3, max_cached_block=3 * kv_heads - 1, offload=True)
    with pytest.raises(ConfigError, match="max_cached_block"):
        patch_model(model, cfg)
    assert not hasattr(model, "infllm")
    patch_model(model, cfg.model_copy(update={"max_cached_block": 3 * kv_heads}))
    unpatch_model(model)



def test_saved_session_keeps_its_lookup_heads(tmp_path):
    """Through a real GQA model (4 query / 2 KV heads): the option changes the logits once blocks are
    retrieved, a saved per-query-head session continues identically, and a config with other lookup heads
    refuses it by name (its scores and representatives have other shapes)."""
    model = build_tiny_model("qwen2", seed=5)
    ids = torch.randint(3, 300, (1, 320), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        per_kv = forward(model, ids, InfLLMCache(model))
    with torch.no_grad(), patched(model, type="inf-llm", lookup_heads="query", **SMALL):
        cache = InfLLMCache(model)
        first = forward(model, ids[:, :192], cache)
        cache.save(tmp_path / "doc.pt")
        second = forward(model, ids[:, 192:], cache)
        assert (torch.cat([first, second], 1) - per_kv).abs().max() > 1e-3
        restored = InfLLMCache.load(tmp_path / "doc.pt", model)
        torch.testing.assert_close(forward(model, ids[:, 192:], restored), second, rtol=0, atol=1e-5)
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL), pytest.raises(SessionStateError, match="lookup"):
        InfLLMCache.load(tmp_path / "doc.pt", model)


def test_triton_ops_refuse_per_query_head_scores_and_run_the_released_remainder():
    """The Triton kernels score keys, form blocks and decode per KV head: a per-query-head memory on them is
    refused. The released remainder needs no kernel change (`global_stage_into` sees a clamped prefix of the
    remainder per row, here all of it): the device path on the Triton ops equals the host path on the torch
    ops, prefill and decode steps."""
    d, n = 16, 120
    cfg = ModelConfig(type="inf-llm", n_init=4, n_local=32, block_size=8, topk=3, repr_topk=2, exc_block_size=16,
                      max_cached_block=64, remainder_visibility="released")
    inv_freq = default_inv_freq(d).to(DEVICE)
    with pytest.raises(ConfigError, match="lookup_heads: query.*fattn"):
        ContextMemory(cfg.model_copy(update={"lookup_heads": "query"}), RotaryTable(inv_freq, d), HQ, HKV, d,
                      torch.float32, DEVICE, triton_attn)
    gen = torch.Generator().manual_seed(29)
    q, k, v = (torch.randn(h, n, d, generator=gen).to(DEVICE) for h in (HQ, HKV, HKV))
    memories = [
        ContextMemory(cfg, RotaryTable(inv_freq, d), HQ, HKV, d, torch.float32, DEVICE, triton_attn,
                      offload=False, device_lookup=True),
        ContextMemory(cfg, RotaryTable(inv_freq, d), HQ, HKV, d, torch.float32, DEVICE, reference,
                      offload=False, device_lookup=False),
    ]
    outs = [[], []]
    for a, b in ((0, 70), (70, 71), (71, n)):
        for i, memory in enumerate(memories):
            outs[i].append(memory.process(q[:, a:b], k[:, a:b], v[:, a:b], 1 / math.sqrt(d)))
    torch.testing.assert_close(torch.cat(outs[0], dim=1), torch.cat(outs[1], dim=1), rtol=1e-4, atol=1e-5)
