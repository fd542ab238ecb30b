"""`model.block_score: attention`: a lookup scores each memory block by the attention mass its keys would take
from the execution block's mean query (per query head, log-sum-exp over the block's keys, summed over heads)
instead of by its representative. Checked against the float64 dense reference on every host-side storage and
lookup path, decode steps and the fixed-shape decode step, sessions, a real model, and refused where nothing
implements it.
"""

from __future__ import annotations

import pytest
import torch

from inf_llm.adapter import InfLLMCache
from inf_llm.config import load_config
from inf_llm.errors import ConfigError, SessionStateError
from inf_llm.memory.static_step import StaticDecodeStep
from tests.dense_reference import default_scale
from tests.models import build_tiny_model
from tests.test_adapter import SMALL, forward, patched
from tests.test_memory import D, make_memory, random_qkv
from tests.test_released_retrieval import CALLS, EXC, HKV, HQ, PATHS, N, decode_tokens, reference_run, run


@pytest.mark.parametrize("lookup_heads", ["kv", "query"])
@pytest.mark.parametrize("path", [path for path in PATHS if path != "direct"])
def test_every_path_matches_the_dense_reference(path, lookup_heads):
    """Outputs and selections equal the float64 one-query-at-a-time reference, on every storage and lookup
    path (batched and refined lookups included), calls ending mid execution block, decode steps between."""
    q, k, v = random_qkv(N, hq=HQ, hkv=HKV, seed=41)
    sizes = CALLS["odd_calls"]
    options = {"block_score": "attention", "lookup_heads": lookup_heads}
    memory = make_memory("inf-llm", hq=HQ, hkv=HKV, exc_block_size=EXC, block_score_refresh=1, **PATHS[path],
                         **options)
    got, selections = run(memory, q, k, v, sizes)
    want, want_selections = reference_run(q, k, v, sizes, **options)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    assert selections == want_selections and len(selections) > 10


def test_it_selects_other_blocks_than_the_representatives():
    """The two scores disagree on random keys (else the option would change nothing)."""
    q, k, v = random_qkv(N, hq=HQ, hkv=HKV, seed=42)
    by_repr, by_attention = (make_memory("inf-llm", hq=HQ, hkv=HKV, block_score=score)
                             for score in ("representative", "attention"))
    out_repr, sel_repr = run(by_repr, q, k, v, [N])
    out_attention, sel_attention = run(by_attention, q, k, v, [N])
    assert len(sel_repr) == len(sel_attention) > 10
    assert sum(a != b for a, b in zip(sel_repr, sel_attention)) >= 3
    assert not torch.allclose(out_repr, out_attention)


def test_a_block_with_one_key_the_query_seeks_is_found():
    """One stored key aligned with the question's query, among keys that all resemble each other: its block
    ranks first by attention mass; by representatives (the mean of the keys the window attended most) it
    need not, since the window never attended that key."""
    gen = torch.Generator().manual_seed(43)
    n = 200
    q, k, v = random_qkv(n, hq=HQ, hkv=HKV, seed=43)
    k = 0.1 * k + torch.randn(HKV, 1, D, generator=gen, dtype=k.dtype)  # similar keys everywhere
    memory = make_memory("inf-llm", hq=HQ, hkv=HKV, block_score="attention")
    memory.process(q[:, : n - 1], k[:, : n - 1], v[:, : n - 1], default_scale(D))
    lookup = memory.lookup
    block = 5
    start = memory.store.start_pos[block]
    query = q[:, n - 1 :]
    target = lookup.rope.rotate_at(query, lookup.global_query_pos)[:, 0]  # (Hq, D) at the global angle
    stored = memory.store.k[block]  # (Hkv, bs, D)
    stored[:, 3] = 4 * target.view(HKV, HQ // HKV, D).sum(1) / target.norm()
    scores = lookup.block_scores(lookup.query_vector(query), 0, memory.store.count)
    assert scores.shape == (1, memory.store.count)
    assert scores[0].argmax().item() == block, start


@pytest.mark.parametrize("path", ["host", "device"])
def test_decode_steps_between_refreshes_score_the_candidates_only(path):
    """block_score_refresh 4: every 4th decode step selects what scoring every block selects; the steps
    between select the top-k, by the same scores, among the 4 * topk best blocks of the last full scoring and
    the blocks formed since."""
    n, prefill, refresh = 400, 120, 4
    q, k, v = random_qkv(n, hq=HQ, hkv=HKV, seed=45)
    scale = default_scale(D)
    options = {"hq": HQ, "hkv": HKV, "block_score": "attention", **PATHS[path]}
    memory = make_memory("inf-llm", block_score_refresh=refresh, **options)
    exact = make_memory("inf-llm", block_score_refresh=1, **options)
    for m in (memory, exact):
        m.process(q[:, :prefill], k[:, :prefill], v[:, :prefill], scale)
    topk = exact.cfg.topk
    pool, cover, differed = [], 0, 0
    for step, p in enumerate(range(prefill, n)):
        token = (q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1])
        lookup = exact.lookup
        count = exact.store.count  # the blocks this step's lookup sees
        scores = lookup.block_scores(lookup.query_vector(token[0]), 0, count)[0]
        memory.process(*token, scale)
        exact.process(*token, scale)
        got, want = memory.retrieved_last[-1], exact.retrieved_last[-1]
        if step % refresh == 0:
            assert got == want
            pool, cover = scores.topk(min(count, 4 * topk)).indices.tolist(), count
        else:
            pool, cover = pool + list(range(cover, count)), count
            assert sorted(memory.lookup.candidates.tolist()) == sorted(pool)
            assert got == sorted(torch.tensor(pool)[scores[pool].topk(topk).indices].tolist())
            differed += got != want
    assert differed > 0  # the candidates are not every block


def test_static_decode_step_looks_up_as_the_ordinary_step():
    """The fixed-shape decode step (CUDA graphs; eager on a CPU) selects and attends what the ordinary one does."""
    n, prefill = 260, 100
    q, k, v = random_qkv(n, hq=HQ, hkv=HKV, seed=44)
    scale = default_scale(D)

    def decode(static: bool):
        memory = make_memory("inf-llm", hq=HQ, hkv=HKV, device_lookup=True, block_score="attention",
                             block_score_refresh=1)
        outs, lookups, planned = decode_tokens(memory, StaticDecodeStep(memory) if static else None, q, k, v,
                                               prefill, scale)
        return torch.cat(outs, 1), lookups, planned

    want, want_lookups, _ = decode(False)
    got, lookups, planned = decode(True)
    assert planned > 100 and lookups == want_lookups
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("other", ["fattn", "faiss", "perhead"])
def test_what_cannot_do_it_is_refused_at_load(other):
    with pytest.raises(ConfigError, match=rf"block_score: attention does not work with model.{other}"):
        load_config(None, ["model.block_score=attention", f"model.{other}=true"])
    with pytest.raises(ConfigError, match="block_score"):
        load_config(None, ["model.block_score=keys"])


def test_direct_access_is_refused_at_load():
    """direct keeps new blocks' keys in its formation ring and the rest across the bus: an attention lookup
    would read keys that are not there yet."""
    with pytest.raises(ConfigError, match="block_score: attention does not work with model.offload_access: direct"):
        load_config(None, ["model.block_score=attention", "model.offload_access=direct"])
    load_config(None, ["model.block_score=attention", "model.offload_access=cache"])


def test_a_real_model_changes_and_its_saved_session_keeps_the_score(tmp_path):
    """Through a real GQA model: the option changes the logits once blocks are retrieved, a saved session
    continues identically, and a config with the other score refuses it by name."""
    model = build_tiny_model("qwen2", seed=5)
    ids = torch.randint(3, 300, (1, 320), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL):
        by_repr = forward(model, ids, InfLLMCache(model))
    with torch.no_grad(), patched(model, type="inf-llm", block_score="attention", **SMALL):
        cache = InfLLMCache(model)
        first = forward(model, ids[:, :192], cache)
        cache.save(tmp_path / "doc.pt")
        second = forward(model, ids[:, 192:], cache)
        assert (torch.cat([first, second], 1) - by_repr).abs().max() > 1e-3
        restored = InfLLMCache.load(tmp_path / "doc.pt", model)
        torch.testing.assert_close(forward(model, ids[:, 192:], restored), second, rtol=0, atol=1e-5)
    with torch.no_grad(), patched(model, type="inf-llm", **SMALL), pytest.raises(SessionStateError,
                                                                                  match="block_score"):
        InfLLMCache.load(tmp_path / "doc.pt", model)
