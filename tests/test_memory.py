"""ContextMemory against the dense float64 reference, plus memory invariants (no transformers here)."""

from __future__ import annotations

import gc
import itertools
import zlib

import pytest
import torch
from pydantic import ValidationError

from inf_llm.config import CacheStrategy, MemoryType, ModelConfig
from inf_llm.errors import ConfigError
from inf_llm.kernels import reference
from inf_llm.memory import ContextMemory, RotaryTable
from inf_llm.memory.block_cache import BlockCache
from inf_llm.memory.buffers import BlockStore, TokenBuffer
from inf_llm.memory.compression import BlockCodec
from tests.dense_reference import default_inv_freq, default_scale, dense_layer, exec_blocks

D = 16


def make_memory(kind: str, hq=6, hkv=2, dtype=torch.float64, offload=False, device_lookup=None,
                **overrides) -> ContextMemory:
    # a memory made directly gets no auto resolution (patch_model's): its placement keys are set here
    params = dict(type=kind, n_init=4, n_local=32, block_size=8, topk=3, repr_topk=2, exc_block_size=8,
                  max_cached_block=6, offload_access="cache", pin_memory=False)
    params.update(overrides)
    cfg = ModelConfig(**params)
    rope = RotaryTable(default_inv_freq(D), D)
    return ContextMemory(cfg, rope, hq, hkv, D, dtype, torch.device("cpu"), reference, offload=offload,
                         device_lookup=device_lookup)


def feed(memory: ContextMemory, q, k, v, call_sizes: list[int]) -> torch.Tensor:
    outs, pos = [], 0
    for size in call_sizes:
        outs.append(memory.process(q[:, pos : pos + size], k[:, pos : pos + size], v[:, pos : pos + size],
                                   default_scale(D)))
        pos += size
    return torch.cat(outs, dim=1)


def random_qkv(n: int, hq=6, hkv=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, n, D, generator=g, dtype=dtype)
    k = torch.randn(hkv, n, D, generator=g, dtype=dtype)
    v = torch.randn(hkv, n, D, generator=g, dtype=dtype)
    return q, k, v


CALL_PATTERNS = {
    "one_call": lambda n: [n],
    "chunks_of_32": lambda n: [32] * (n // 32) + ([n % 32] if n % 32 else []),
    "prefill_then_decode": lambda n: [n - 12] + [1] * 12,
    "odd_calls": lambda n: [13, 50, 7, 1, 1, n - 72],
    "token_by_token": lambda n: [1] * n,  # every step through the single-query decode path
}


@pytest.mark.parametrize("kind", ["inf-llm", "stream-llm", "infinite-lm", "origin"])
@pytest.mark.parametrize("pattern", list(CALL_PATTERNS))
@pytest.mark.parametrize("exc", [8, 16])
def test_engine_matches_dense_reference(kind, pattern, exc):
    """Outputs and retrieved blocks equal the float64 one-query-at-a-time reference, spanning many blocks."""
    n = 150
    # zlib.crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), and so did the inputs
    q, k, v = random_qkv(n, seed=zlib.crc32(f"{kind}/{pattern}/{exc}".encode()) % 1000)
    sizes = CALL_PATTERNS[pattern](n)
    memory = make_memory(kind, exc_block_size=exc)
    selections = []
    outs, pos = [], 0
    for size in sizes:
        outs.append(memory.process(q[:, pos : pos + size], k[:, pos : pos + size], v[:, pos : pos + size],
                                   default_scale(D)))
        selections.extend(memory.retrieved_last)
        pos += size
    got = torch.cat(outs, dim=1)
    want, want_sel = dense_layer(
        q, k, v, kind=kind, n_init=4, n_local=32, block_size=8, topk=3, repr_topk=2,
        blocks=exec_blocks(sizes, None if kind == "origin" else exc), inv_freq=default_inv_freq(D),
        scale=default_scale(D),
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    if kind == "inf-llm":
        assert selections == want_sel
        assert memory.store.count == (n - 32 - 4) // 8


@pytest.mark.parametrize("pattern", ["odd_calls", "token_by_token"])
def test_bfloat16_memory_follows_the_reference(pattern):
    """A bf16 memory (the served dtype on CPUs with bf16) stays within bf16 rounding of the float64
    reference, decode steps that restage some or most block slots included."""
    n, topk = 220, 6  # 6 of ~20 blocks: decode steps restage a few slots, some steps most of them
    q, k, v = (t.to(torch.bfloat16) for t in random_qkv(n, seed=7))
    memory = make_memory("inf-llm", dtype=torch.bfloat16, topk=topk)
    got = feed(memory, q, k, v, CALL_PATTERNS[pattern](n))
    assert got.dtype == torch.bfloat16 and memory.store.k.dtype == torch.bfloat16
    want, _ = dense_layer(
        q.double(), k.double(), v.double(), kind="inf-llm", n_init=4, n_local=32, block_size=8, topk=topk,
        repr_topk=2, blocks=exec_blocks(CALL_PATTERNS[pattern](n), 8), inv_freq=default_inv_freq(D),
        scale=default_scale(D),
    )
    torch.testing.assert_close(got.double(), want, rtol=0, atol=0.05)


@pytest.mark.parametrize("global_keys", [0, 40])
def test_decode_attention_op_equals_the_two_stage_ops(global_keys):
    """The single-query op = windowed + prefix attention merged by log-sum-exp, plus the window key scores."""
    g = torch.Generator().manual_seed(global_keys)
    hq, hkv, n_window, scale = 6, 2, 24, default_scale(D)
    q_loc, q_glb = (torch.randn(hq, D, generator=g, dtype=torch.float64) for _ in range(2))
    k_loc, v_loc = (torch.randn(hkv, n_window, D, generator=g, dtype=torch.float64) for _ in range(2))
    k_glb, v_glb = (torch.randn(hkv, global_keys, D, generator=g, dtype=torch.float64) for _ in range(2))
    out, lse, received = reference.decode_attention(q_loc, k_loc, v_loc, q_glb, k_glb, v_glb, scale=scale)
    loc, loc_lse = reference.windowed_attention(q_loc[None, :, None], k_loc[None], v_loc[None], scale=scale,
                                                q_offset=n_window - 1, window=n_window)
    glb, glb_lse = reference.prefix_attention(q_glb[None, :, None], k_glb[None], v_glb[None], scale=scale,
                                              visible=torch.tensor([global_keys]))
    want, want_lse = reference.merge_partials(loc, loc_lse, glb, glb_lse)
    want_received = reference.window_key_scores(q_loc[None, :, None], k_loc[None], scale=scale,
                                                q_offset=n_window - 1, window=n_window, lse=want_lse)
    tol = dict(rtol=1e-5, atol=1e-6)  # both compute in float32, in different orders
    torch.testing.assert_close(out, want[0, :, 0], **tol)
    torch.testing.assert_close(lse, want_lse[0, :, 0], **tol)
    torch.testing.assert_close(received, want_received[0], **tol)


def test_gqa_ratios_and_mha():
    for hq, hkv in [(4, 4), (8, 2), (3, 1)]:
        q, k, v = random_qkv(90, hq=hq, hkv=hkv, seed=hq)
        memory = make_memory("inf-llm", hq=hq, hkv=hkv)
        got = feed(memory, q, k, v, [90])
        want, _ = dense_layer(q, k, v, kind="inf-llm", n_init=4, n_local=32, block_size=8, topk=3, repr_topk=2,
                              blocks=exec_blocks([90], 8), inv_freq=default_inv_freq(D), scale=default_scale(D))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_prompt_chunking_invariance_float32():
    """Feeding the prompt in different chunk sizes (multiples of exc_block_size) gives the same output."""
    q, k, v = random_qkv(256, dtype=torch.float32)
    a = feed(make_memory("inf-llm", dtype=torch.float32), q, k, v, [256])
    b = feed(make_memory("inf-llm", dtype=torch.float32), q, k, v, [64, 64, 128])
    c = feed(make_memory("inf-llm", dtype=torch.float32), q, k, v, [8] * 32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_chunk_topk_calc_same_retrieval():
    """Batched host lookups (the offload path: ids go to the host) select what per-block lookups select."""
    q, k, v = random_qkv(300, seed=3)
    plain = make_memory("inf-llm", offload=True, max_cached_block=64)
    batched = make_memory("inf-llm", offload=True, max_cached_block=64, chunk_topk_calc=32)
    out_a = plain.process(q, k, v, default_scale(D))
    out_b = batched.process(q, k, v, default_scale(D))
    assert plain.retrieved_last == batched.retrieved_last
    assert len(plain.retrieved_last) > 10
    torch.testing.assert_close(out_a, out_b)


@pytest.mark.parametrize("perhead", [False, True])
def test_device_lookup_path_matches_host_path(perhead):
    """Blocks on the compute device: ids stay on the device (no host sync), same selection, counts, output."""
    q, k, v = random_qkv(300, seed=4)
    device = make_memory("inf-llm", perhead=perhead, device_lookup=True)  # on a CPU only when asked
    host = make_memory("inf-llm", perhead=perhead, offload=True, max_cached_block=64)
    assert device.device_lookup and not host.device_lookup
    # 70 decode steps: more lookups than the device path counts at once (COUNT_BATCH), so its counts are
    # added in batches and when read
    outs = [feed(m, q, k, v, [100, 1, 99] + [1] * 70 + [30]) for m in (device, host)]
    # the device path attends the blocks in score order, the host path in id order: the ops' float32
    # sums differ in rounding only
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=2e-6)
    assert device.retrieved_last == host.retrieved_last and len(device.retrieved_last) > 3
    assert device.retrieval_counts == host.retrieval_counts and sum(device.retrieval_counts.values()) > 10
    device.reset_retrieval_counts()
    assert device.retrieval_counts == {}


@pytest.mark.parametrize("perhead", [False, True])
def test_direct_offload_access_matches_the_block_cache(perhead):
    """offload_access: direct (the selected blocks fetched from the host store by id on the device, through a
    device-bookkept cache, no host sync) attends the same blocks as the block cache path, prefill and decode
    steps."""
    q, k, v = random_qkv(300, seed=6)
    direct = make_memory("inf-llm", perhead=perhead, offload=True, offload_access="direct", pin_memory=True)
    cached = make_memory("inf-llm", perhead=perhead, offload=True, max_cached_block=64)
    assert direct.device_lookup and direct.cache is None and not cached.device_lookup
    outs = [feed(m, q, k, v, [100, 1, 99, 1, 1, 98]) for m in (direct, cached)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=2e-6)  # score vs id order: float32 sums
    assert direct.retrieved_last == cached.retrieved_last and len(direct.retrieved_last) > 3
    assert direct.retrieval_counts == cached.retrieval_counts
    stats = direct.stats()
    if perhead:  # each head's own blocks: fetched into fresh slots every time, no cache
        assert direct.device_cache is None and stats.cache_hits == stats.cache_misses == 0
    else:  # a shared selection: the device cache of max_cached_block slots (on a CPU: host bytes)
        assert direct.device_cache.k.shape[0] == 6 and stats.cache_hits > 0 and stats.cache_misses > 0
        assert stats.cache_prefetched > 0  # multi-block calls read their batch's blocks ahead
        assert stats.host_bytes >= direct.device_cache.nbytes() + direct.store.nbytes()[0]


def test_direct_device_cache_is_emptied_when_a_session_is_loaded():
    """A loaded state replaces the store's blocks: the device cache must not serve the old ones."""
    q, k, v = random_qkv(200, seed=7)
    q2, k2, v2 = random_qkv(200, seed=8)
    direct = [make_memory("inf-llm", offload=True, offload_access="direct", pin_memory=True) for _ in range(3)]
    feed(direct[0], q, k, v, [200])
    feed(direct[1], q2, k2, v2, [200])
    direct[0].load_state(direct[1].state())  # its cache holds blocks of the first input
    direct[2].load_state(direct[1].state())  # a fresh cache
    step = [m.process(q[:, :1], k[:, :1], v[:, :1], default_scale(D)) for m in direct]
    torch.testing.assert_close(step[0], step[2], rtol=0, atol=0)
    torch.testing.assert_close(step[1], step[2], rtol=1e-12, atol=1e-12)


def test_perhead_retrieval_differs_per_head_and_matches_single_head_when_one_kv_head():
    """perhead: each KV head looks up its own top-k blocks. Each head of a perhead memory gives the output and
    the blocks of a one-head memory fed that head alone; here the two heads pick different blocks, and
    retrieved_last is their union. A shared lookup (perhead off) attends otherwise. With one KV head, perhead
    changes nothing."""
    q, k, v = random_qkv(200, hq=2, hkv=2, seed=5)
    ph = make_memory("inf-llm", hq=2, hkv=2, perhead=True)
    out = ph.process(q, k, v, default_scale(D))  # (2, 200, D)
    own = []
    for h in range(2):
        alone = make_memory("inf-llm", hq=1, hkv=1)
        torch.testing.assert_close(out[h : h + 1], alone.process(q[h : h + 1], k[h : h + 1], v[h : h + 1],
                                                                 default_scale(D)), rtol=1e-6, atol=1e-6)
        own.append(alone.retrieved_last)
    assert own[0] != own[1]
    assert ph.retrieved_last == [sorted(set(a) | set(b)) for a, b in zip(*own)]
    shared = make_memory("inf-llm", hq=2, hkv=2).process(q, k, v, default_scale(D))
    assert (shared - out).abs().max() > 1e-3
    q, k, v = random_qkv(200, hq=2, hkv=1, seed=6)
    a = make_memory("inf-llm", hq=2, hkv=1, perhead=True)
    b = make_memory("inf-llm", hq=2, hkv=1)
    torch.testing.assert_close(a.process(q, k, v, default_scale(D)), b.process(q, k, v, default_scale(D)))


def test_dense_decoding_attends_all_blocks():
    q, k, v = random_qkv(160, seed=7)
    memory = make_memory("inf-llm", dense_decoding=True)
    memory.process(q[:, :159], k[:, :159], v[:, :159], default_scale(D))
    memory.process(q[:, 159:], k[:, 159:], v[:, 159:], default_scale(D))
    assert memory.retrieved_last == [list(range(memory.store.count))]


def test_offloaded_block_cache_gives_same_output_and_counts_hits():
    """The bounded block cache (offload path, exercised on CPU) changes where blocks live, not results."""
    q, k, v = random_qkv(300, seed=8)
    plain = feed(make_memory("inf-llm"), q, k, v, [300])
    for strategy in ["lru", "fifo", "lru-s"]:
        memory = make_memory("inf-llm", offload=True, cache_strategy=strategy, max_cached_block=4)
        # same keys, maybe another order inside the softmax: equal up to summation order
        torch.testing.assert_close(feed(memory, q, k, v, [300]), plain, rtol=1e-6, atol=1e-6)
        stats = memory.stats()
        assert stats.cache_hits + stats.cache_misses > 0
        assert len(memory.cache.slot_of) <= 4


@pytest.mark.parametrize(("codec", "bound"), [("fp8", 2**-4), ("int8", 0.5 / 127)])
def test_block_codec_error_is_bounded_per_scale_group(codec, bound):
    """Keys: scale per channel over a block's tokens; values: per token. |x - decoded| <= bound * group amax
    (e4m3: 3 mantissa bits, half an ulp = 2^-4 relative; int8: half a step)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 8, D, generator=g) * torch.logspace(-2, 2, D)  # channels of very different sizes
    c = BlockCodec.of(codec)
    for keys, axis in ((True, 2), (False, 3)):
        codes, scale = c.encode(x, keys=keys)
        assert codes.dtype == c.storage_dtype and scale.shape == (5, 2, *c.scale_shape((2, 8, D), keys)[1:])
        decoded = torch.empty_like(x)
        c.decode_into(decoded, codes, scale)
        amax = x.abs().amax(dim=axis, keepdim=True)
        assert bool(((x - decoded).abs() <= bound * amax + 1e-6).all())
    # per-channel key scales keep small channels accurate; one scale per block would round them to zero
    codes, scale = c.encode(x, keys=True)
    decoded = torch.empty_like(x)
    c.decode_into(decoded, codes, scale)
    small = x[..., :4]
    assert float((decoded[..., :4] - small).abs().max()) < 0.1 * float(small.abs().max())


@pytest.mark.parametrize("codec", ["fp8", "int8"])
def test_compressed_offload_keeps_retrieval_and_halves_host_bytes(codec):
    q, k, v = random_qkv(300, seed=9, dtype=torch.float32)
    plain = make_memory("inf-llm", dtype=torch.float32, offload=True, max_cached_block=8)
    packed = make_memory("inf-llm", dtype=torch.float32, offload=True, max_cached_block=8, offload_dtype=codec)
    selections = []
    outs = []
    for memory in (plain, packed):
        outs.append(feed(memory, q, k, v, [100, 1, 99, 100]))
        selections.append(memory.retrieved_last)
    assert selections[0] == selections[1]  # lookups read the representatives, which are not compressed
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0.1)  # only the attended K/V are rounded
    assert not torch.equal(outs[1], outs[0])
    # float32 -> 1-byte codes plus float32 scales (heavy at this toy size: 8-token blocks of 16 channels)
    assert plain.store.nbytes()[0] > 2.5 * packed.store.nbytes()[0]
    state = packed.state()["store"]  # sessions are saved decoded, loadable under any offload setting
    assert state["k"].dtype == torch.float32 and state["k"].shape == plain.state()["store"]["k"].shape


def test_offload_dtype_without_offloading_is_refused():
    with pytest.raises(ConfigError, match=r"offload_dtype='fp8' compresses offloaded blocks.*model\.offload=true"):
        make_memory("inf-llm", offload=False, offload_dtype="fp8")


@pytest.mark.parametrize("strategy", [CacheStrategy.LRU, CacheStrategy.FIFO, CacheStrategy.LRU_S])
def test_block_cache_eviction_order(strategy):
    blocks = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    cpu = torch.device("cpu")
    store = BlockStore(1, 2, 2, torch.float32, cpu, cpu, pin_memory=False)
    store.add_many(blocks, blocks, torch.zeros(6, 2), list(range(0, 12, 2)))
    cache = BlockCache(2, strategy, 0.1, (1, 2, 2), torch.float32, cpu)
    cache.fetch([0], store)
    cache.fetch([1], store)
    cache.add_scores([1], [5.0])
    cache.fetch([0], store)  # block 0 used again (lru: now newest; fifo: still oldest)
    cache.add_scores([0], [0.01])
    cache.fetch([2], store)  # evicts one
    resident = set(cache.slot_of)
    expected = {CacheStrategy.LRU: {0, 2}, CacheStrategy.FIFO: {1, 2}, CacheStrategy.LRU_S: {1, 2}}[strategy]
    assert resident == expected
    slot = cache.slot_of[2]
    assert torch.equal(cache.k[slot], blocks[2])
    assert cache.misses == 3 and cache.hits == 1


def test_token_buffer_grows_and_compacts_without_losing_data():
    buf = TokenBuffer(2, 4, torch.float32, torch.device("cpu"), with_scores=True)
    data = torch.arange(2 * 3000 * 4, dtype=torch.float32).view(2, 3000, 4)
    for i in range(0, 3000, 100):
        buf.append(data[:, i : i + 100], data[:, i : i + 100])
        if buf.length > 300:
            buf.drop_front(buf.length - 300)
    assert buf.first_pos == 2700 and buf.length == 300
    assert torch.equal(buf.keys(2700, 3000), data[:, 2700:])
    assert buf.k.shape[1] <= 1024  # bounded by what is live, not by what passed through


def test_token_buffer_holds_about_what_a_prefill_needs_and_compacts_in_place():
    """The window (n_local) plus a chunk: the capacity stays within 1.125x of it, rounded to 64 (doubling
    held 32K positions per layer for the 12.3K a Mistral-7B prefill needs), and compacting keeps the
    tensors (a captured decode graph reads them by address). Decoding after it neither grows nor loses."""
    buf = TokenBuffer(1, 4, torch.float32, torch.device("cpu"), with_scores=True)
    n_local, block, chunk, pos = 4096, 128, 8192, 0
    data = torch.randn(1, 16 * chunk + 3000, 4)

    def keep_window():
        behind = (pos - n_local - buf.first_pos) // block  # blocks formed behind the window
        if behind > 0:
            buf.drop_front(behind * block)

    for _ in range(16):
        buf.append(data[:, pos : pos + chunk], data[:, pos : pos + chunk])
        pos += chunk
        keep_window()
        if pos == 3 * chunk:
            pointer = buf.k.data_ptr()
    needed = n_local + block + chunk
    assert buf.k.shape[1] <= -(-(needed * 9 // 8) // 64) * 64 and buf.k.shape[1] % 64 == 0
    assert buf.k.data_ptr() == pointer  # compacted in place since the third chunk
    for _ in range(3000):
        buf.append(data[:, pos : pos + 1], data[:, pos : pos + 1])
        pos += 1
        keep_window()
    assert buf.k.data_ptr() == pointer
    assert torch.equal(buf.keys(buf.first_pos, pos), data[:, buf.first_pos : pos])


@pytest.mark.parametrize("kind", ["inf-llm", "stream-llm", "infinite-lm"])
def test_window_and_sink_invariants(kind):
    q, k, v = random_qkv(400, seed=9)
    memory = make_memory(kind)
    feed(memory, q, k, v, [400])
    stats = memory.stats()
    assert stats.init_tokens == 4
    assert torch.equal(memory.init_k[:, :4], k[:, :4].to(memory.dtype))
    assert 32 <= stats.window_tokens < 32 + 8 + 8
    if kind == "inf-llm":
        assert stats.blocks == (400 - 32 - 4) // 8
        assert memory.block_range(0) == (4, 12)
    else:
        assert stats.blocks == 0 and stats.window_tokens == 32


def test_memory_state_roundtrip_continues_identically():
    q, k, v = random_qkv(200, seed=10)
    a = make_memory("inf-llm")
    a.process(q[:, :120], k[:, :120], v[:, :120], default_scale(D))
    b = make_memory("inf-llm")
    b.load_state(a.state())
    torch.testing.assert_close(
        a.process(q[:, 120:], k[:, 120:], v[:, 120:], default_scale(D)),
        b.process(q[:, 120:], k[:, 120:], v[:, 120:], default_scale(D)),
    )


def test_faiss_requested_but_missing_names_the_package():
    try:
        import faiss  # noqa: F401
    except ImportError:
        from inf_llm.errors import MissingDependencyError

        with pytest.raises(MissingDependencyError, match="faiss-cpu"):
            make_memory("inf-llm", faiss=True)
    else:
        q, k, v = random_qkv(300, seed=11)
        plain, indexed = make_memory("inf-llm"), make_memory("inf-llm", faiss=True)
        plain.process(q, k, v, default_scale(D))
        indexed.process(q, k, v, default_scale(D))
        assert plain.retrieved_last == indexed.retrieved_last


def test_every_memory_type_is_a_policy_of_its_own():
    """Each model.type the config accepts builds a memory, and no two attend alike past the window (a type
    mapped onto another's policy would); a name outside the enum is refused."""
    q, k, v = random_qkv(120, seed=9)
    outs = {t: make_memory(t.value).process(q, k, v, default_scale(D)) for t in MemoryType}
    for a, b in itertools.combinations(MemoryType, 2):
        assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)
    with pytest.raises(ValidationError):
        ModelConfig(type="streaming-llm")


def test_local_stage_in_pieces_matches_one_launch(monkeypatch):
    """The local stage runs in pieces of the ops' LOCAL_STAGE_ROWS queries (default: one execution block):
    any piece size gives the result of one call over the whole input."""
    q, k, v = random_qkv(300, seed=9)
    monkeypatch.setattr(reference, "LOCAL_STAGE_ROWS", 10**6)
    whole = feed(make_memory("inf-llm"), q, k, v, [300])
    for rows in (37, None):
        monkeypatch.setattr(reference, "LOCAL_STAGE_ROWS", rows)
        pieces = feed(make_memory("inf-llm"), q, k, v, [300])
        torch.testing.assert_close(pieces, whole, rtol=1e-6, atol=1e-6)  # lse is float32: rounding only


@pytest.mark.parametrize("sizes", [(3, 3, 2), (1, 4, 4, 1, 3), (4, 4, 4, 4)])
def test_formation_ring_holds_the_newest_blocks_and_copies_every_block_to_the_store(sizes):
    """FormationRing (direct with a side stream; here a CPU, copies inline): after each formation the newest
    blocks are in their slots (id % size) and [lo, hi) names them; copies start when the slots are full
    (never after a slot was written again: formations larger than the free slots flush first) or at
    release(), which also empties the ring; settle() lands them all."""
    from inf_llm.memory.block_cache import FormationRing, RingSlots

    hkv, bs, d, size = 2, 4, 8, 4
    gen = torch.Generator().manual_seed(5)
    store = BlockStore(hkv, bs, d, torch.float32, torch.device("cpu"), torch.device("cpu"), pin_memory=False)
    ring = FormationRing(RingSlots((hkv, bs, d), torch.float32, torch.device("cpu"), size), None)
    formed_k = []
    for n in sizes:
        keys, values = torch.randn(2, hkv, n, bs, d, generator=gen)
        scores = torch.rand(hkv, n, bs, generator=gen)
        first = store.count
        ring.form(reference, keys, values, scores, 2, store, store.claim(n, [0] * n))
        formed_k += list(keys.transpose(0, 1))
        assert ring.hi == store.count and ring.lo == max(0, store.count - size)
        for b in range(max(first, ring.lo), ring.hi):
            assert torch.equal(ring.slots.k[b % size], formed_k[b])
    ring.settle()
    assert torch.equal(store.k[: store.count], torch.stack(formed_k))
    assert ring.blocks()[2:] == (ring.lo, ring.hi)
    ring.release()
    assert ring.blocks() is None
    ring.clear()
    assert ring.blocks() is None


def test_formation_rings_of_two_layers_share_slots_and_each_store_gets_its_own_blocks():
    """Two layers' rings on one RingSlots, taking turns as layers do (each call ends with release()): every
    block reaches its own layer's store, though the other layer wrote the same slots in between."""
    from inf_llm.memory.block_cache import FormationRing, RingSlots

    hkv, bs, d = 2, 4, 8
    gen = torch.Generator().manual_seed(6)
    slots = RingSlots((hkv, bs, d), torch.float32, torch.device("cpu"), 4)
    layers = []
    for _ in range(2):
        store = BlockStore(hkv, bs, d, torch.float32, torch.device("cpu"), torch.device("cpu"), pin_memory=False)
        layers.append((FormationRing(slots, None), store, []))
    for call in range(3):
        for ring, store, formed in layers:
            for n in (2, 1, 3)[call:]:
                keys, values = torch.randn(2, hkv, n, bs, d, generator=gen)
                ring.form(reference, keys, values, torch.rand(hkv, n, bs, generator=gen), 2, store,
                          store.claim(n, [0] * n))
                formed += list(zip(keys.transpose(0, 1), values.transpose(0, 1)))
            ring.release()
            assert ring.blocks() is None
    for ring, store, formed in layers:
        ring.settle()
        assert torch.equal(store.k[: store.count], torch.stack([k for k, _ in formed]))
        assert torch.equal(store.v[: store.count], torch.stack([v for _, v in formed]))
    assert layers[0][0].nbytes() == slots.nbytes() // 2  # each of the two rings reports its share
    del layers[1:], ring, store, formed  # (the loop's names held the second layer's too)
    gc.collect()
    assert layers[0][0].nbytes() == slots.nbytes()  # a discarded layer's ring no longer counts
