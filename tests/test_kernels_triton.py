"""Triton attention ops (`inf_llm.kernels.triton`, imported through its old path `triton_attn`) against the
torch reference, which is the spec.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (`tests/triton_interpreter.py`:
`TRITON_INTERPRET=1` set only around the import of triton_attn and while this module's tests run; nothing
leaks into other test modules). Triton's own objects keep what they built, which is harmless: only this
module and test_fused_elementwise.py use triton, both this way. CPU sizes are tiny (the interpreter runs each
program in numpy); the Mistral-sized variants are marked `gpu` and run only where a GPU is present
(`pytest -m gpu`).

Accuracy rule (STYLE.md): against the float32 reference, a kernel's error must be at most about twice the
torch reference's own error at the same precision (plus a small floor for when that error is ~0).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from inf_llm.kernels import reference
from tests.triton_interpreter import DEVICE, INTERPRET, import_kernels, triton_interpreter_env  # noqa: F401

triton_attn = import_kernels("inf_llm.kernels.triton_attn")
# the package's modules, built by that import (under the interpreter on CPU), for their private entry points
attention = importlib.import_module("inf_llm.kernels.triton.attention")
common = importlib.import_module("inf_llm.kernels.triton.common")

# Floors under the 2x-reference rule: float32 is checked near 1e-5 absolute; 16-bit outputs against their
# rounding (ulp(1) is 2**-10 for fp16 and 2**-7 for bf16).
OUT_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
LSE_FLOOR = 1e-5  # lse is float32 in every op; the dots are exact products summed in fp32
SCORES_RTOL = 1e-5  # window_key_scores: both sides compute q.k in fp32 on the same values


def _rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def _qkv(b, hkv, group, lq, lk, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = _rand(b, hkv * group, lq, d, dtype=dtype, gen=gen)  # (B, Hq, Lq, D)
    k = _rand(b, hkv, lk, d, dtype=dtype, gen=gen)  # (B, Hkv, Lk, D)
    v = _rand(b, hkv, lk, d, dtype=dtype, gen=gen)
    return q, k, v


def _max_err(x: torch.Tensor, gold: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.float() - gold.float()).abs().max().item()


def _check_attention(got, ref, gold, dtype):
    """got/ref/gold are (out, lse): got from Triton, ref from the reference at dtype, gold at float32."""
    (out, lse), (r_out, r_lse), (g_out, g_lse) = got, ref, gold
    assert out.dtype == dtype and out.shape == g_out.shape
    assert lse.dtype == torch.float32 and lse.shape == g_lse.shape
    empty = torch.isneginf(g_lse)  # (B, Hq, Lq): rows with no visible key
    assert torch.equal(torch.isneginf(lse), empty), "fully masked rows must have lse -inf, the others finite"
    assert torch.isfinite(lse[~empty]).all()
    assert (out[empty] == 0).all(), "fully masked rows must have out 0"
    assert torch.isfinite(out.float()).all()
    err, r_err = _max_err(out, g_out), _max_err(r_out, g_out)
    assert err <= 2 * r_err + OUT_FLOOR[dtype], f"out error {err:.3g} vs reference {r_err:.3g}"
    fin = ~empty
    l_err, rl_err = _max_err(lse[fin], g_lse[fin]), _max_err(r_lse[fin], g_lse[fin])
    assert l_err <= 2 * rl_err + LSE_FLOOR, f"lse error {l_err:.3g} vs reference {rl_err:.3g}"
    return err, l_err


def _f32(*ts):
    return [t.float() for t in ts]


# ---------------------------------------------------------------------------------------------------------
# windowed_attention

# (batch, kv heads, group, Lq, Lk, D, q_offset, window)
WINDOW_CASES = [
    pytest.param(1, 1, 1, 1, 1, 64, 0, 1, id="single-key"),
    pytest.param(1, 2, 3, 7, 50, 64, 43, 16, id="g3-window-inside"),
    pytest.param(1, 2, 4, 1, 77, 128, 76, None, id="decode-g4-nowindow"),
    pytest.param(1, 2, 4, 1, 77, 128, 76, 77, id="decode-window-eq-lk"),
    pytest.param(2, 1, 1, 37, 37, 64, 0, None, id="causal-square-b2"),
    pytest.param(1, 2, 3, 13, 70, 64, 57, 1, id="window-1"),
    pytest.param(1, 1, 4, 9, 40, 64, 100, 30, id="queries-past-keys-masked"),
    pytest.param(1, 1, 1, 21, 33, 128, -10, 8, id="negative-offset-masked"),
    pytest.param(1, 1, 3, 5, 150, 64, 1000, 2000, id="window-ge-lk-large-offset"),
    pytest.param(1, 2, 1, 19, 64, 16, 45, 17, id="d16-lk-multiple-of-tile"),
    pytest.param(1, 1, 2, 6, 20, 32, 14, 0, id="window-0-all-masked"),
]


@pytest.mark.parametrize("b,hkv,group,lq,lk,d,q_offset,window", WINDOW_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_windowed_attention(b, hkv, group, lq, lk, d, q_offset, window, dtype):
    q, k, v = _qkv(b, hkv, group, lq, lk, d, dtype, seed=lq * 131 + lk)
    kw = dict(scale=1 / math.sqrt(d), q_offset=q_offset, window=window)
    got = triton_attn.windowed_attention(q, k, v, **kw)
    ref = reference.windowed_attention(q, k, v, **kw)
    gold = reference.windowed_attention(*_f32(q, k, v), **kw)
    _check_attention(got, ref, gold, dtype)


@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_windowed_attention_split_keys(num_splits, dtype):
    """The flash-decoding path: key range split over programs, merged by the combine kernel; 7 splits over
    5 key tiles leaves some splits empty (their partial must count as nothing)."""
    q, k, v = _qkv(1, 2, 4, 2, 75, 64, dtype, seed=num_splits)
    kw = dict(scale=0.125, q_offset=73, window=60)
    window = common.check_window(73, 60, 2)[1]
    got = attention._attention(
        q, k, v, scale=0.125, mode=attention._MODE_WINDOW, q_offset=73, window=window, num_splits=num_splits
    )
    _check_attention(got, reference.windowed_attention(q, k, v, **kw),
                     reference.windowed_attention(*_f32(q, k, v), **kw), dtype)


TOKEN_MAJOR_CASES = [WINDOW_CASES[1], WINDOW_CASES[2], WINDOW_CASES[4]]


@pytest.mark.parametrize("b,hkv,group,lq,lk,d,q_offset,window", TOKEN_MAJOR_CASES)
def test_windowed_attention_token_major_out(b, hkv, group, lq, lk, d, q_offset, window):
    """token_major_out: the same bits, stored so that out.transpose(1, 2) (what transformers reshapes the
    attention output from) is contiguous; a decode-sized call (the split path) keeps its usual storage."""
    q, k, v = _qkv(b, hkv, group, lq, lk, d, torch.bfloat16, seed=lq * 7 + lk)
    kw = dict(scale=1 / math.sqrt(d), q_offset=q_offset, window=window)
    for ops in (triton_attn, reference):
        out, lse = ops.windowed_attention(q, k, v, **kw)
        out_t, lse_t = ops.windowed_attention(q, k, v, **kw, token_major_out=True)
        assert torch.equal(out_t, out) and torch.equal(lse_t, lse)
        assert out_t.transpose(1, 2).is_contiguous() or (ops is triton_attn and lq == 1), ops.__name__


def test_windowed_attention_strided_inputs():
    """q/k/v as (B, L, H, D) buffers viewed as (B, H, L, D), as a model's projections give them."""
    gen = torch.Generator().manual_seed(3)
    q = _rand(1, 11, 4, 64, dtype=torch.float32, gen=gen).transpose(1, 2)  # (B, Hq, Lq, D) strided
    k = _rand(1, 29, 2, 64, dtype=torch.float32, gen=gen).transpose(1, 2)
    v = _rand(1, 29, 2, 64, dtype=torch.float32, gen=gen).transpose(1, 2)
    kw = dict(scale=0.125, q_offset=18, window=9)
    got = triton_attn.windowed_attention(q, k, v, **kw)
    gold = reference.windowed_attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    _check_attention(got, gold, gold, torch.float32)


def test_empty_inputs():
    q, k, v = _qkv(1, 2, 2, 3, 0, 64, torch.float16)
    out, lse = triton_attn.windowed_attention(q, k, v, scale=0.1, q_offset=0, window=4)
    assert (out == 0).all() and torch.isneginf(lse).all()
    q0 = q[:, :, :0]
    visible = torch.zeros(0, dtype=torch.long, device=DEVICE)
    out, lse = triton_attn.prefix_attention(q0, k, v, scale=0.1, visible=visible)
    assert out.shape == (1, 4, 0, 64) and lse.shape == (1, 4, 0)


# ---------------------------------------------------------------------------------------------------------
# prefix_attention

# (batch, kv heads, group, Lq, Lk, D, visible counts or None for random)
PREFIX_CASES = [
    pytest.param(1, 2, 3, 7, 50, 64, [0, 50, 3, 17, 100, -2, 33], id="g3-zero-all-over-negative"),
    pytest.param(1, 2, 4, 1, 90, 128, [90], id="decode-all"),
    pytest.param(1, 1, 4, 1, 90, 128, [0], id="decode-none"),
    pytest.param(2, 1, 1, 40, 45, 64, None, id="random-b2"),
    pytest.param(1, 2, 1, 33, 66, 64, "ramp", id="ramp"),
    pytest.param(1, 1, 3, 9, 31, 32, [31] * 9, id="all-visible"),
]


def _visible(spec, lq, lk, seed):
    if spec is None:
        return torch.randint(0, lk + 1, (lq,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    if spec == "ramp":
        return torch.arange(lq, device=DEVICE) * lk // lq + 1
    return torch.tensor(spec, dtype=torch.long, device=DEVICE)


@pytest.mark.parametrize("b,hkv,group,lq,lk,d,vis", PREFIX_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_prefix_attention(b, hkv, group, lq, lk, d, vis, dtype):
    q, k, v = _qkv(b, hkv, group, lq, lk, d, dtype, seed=lq * 7 + lk)
    visible = _visible(vis, lq, lk, seed=lk)
    got = triton_attn.prefix_attention(q, k, v, scale=1 / math.sqrt(d), visible=visible)
    ref = reference.prefix_attention(q, k, v, scale=1 / math.sqrt(d), visible=visible)
    gold = reference.prefix_attention(*_f32(q, k, v), scale=1 / math.sqrt(d), visible=visible)
    _check_attention(got, ref, gold, dtype)


def test_prefix_attention_int32_visible_and_splits():
    """int32 counts are accepted; the split path clamps counts the same way."""
    q, k, v = _qkv(1, 2, 4, 3, 70, 64, torch.float32, seed=5)
    visible = torch.tensor([70, 0, 41], dtype=torch.int32, device=DEVICE)
    got = attention._attention(q, k, v, scale=0.125, mode=attention._MODE_PREFIX, visible=visible, num_splits=3)
    gold = reference.prefix_attention(q, k, v, scale=0.125, visible=visible.long())
    _check_attention(got, gold, gold, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# merge_partials


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_partials(dtype):
    gen = torch.Generator().manual_seed(11)
    b, h, seq, d = 2, 3, 21, 64
    out_a, out_b = _rand(b, h, seq, d, dtype=dtype, gen=gen), _rand(b, h, seq, d, dtype=dtype, gen=gen)
    lse_a = _rand(b, h, seq, dtype=torch.float32, gen=gen) * 4
    lse_b = _rand(b, h, seq, dtype=torch.float32, gen=gen) * 4
    lse_a[0, 0, :5] = -math.inf  # a empty
    lse_b[0, 1, :5] = -math.inf  # b empty
    lse_a[1, 2, 3:9] = -math.inf  # both empty
    lse_b[1, 2, 3:9] = -math.inf
    out_a[1, 2, 3:9] = 0
    out_b[1, 2, 3:9] = 0
    got = triton_attn.merge_partials(out_a, lse_a, out_b, lse_b)
    ref = reference.merge_partials(out_a, lse_a, out_b, lse_b)
    gold = reference.merge_partials(out_a.float(), lse_a, out_b.float(), lse_b)
    _check_attention(got, ref, gold, dtype)


def test_merge_partials_strided_and_mixed_dtype():
    """Strided views (B, L, H, D) -> (B, H, L, D), out_b in another dtype, D not a power of two."""
    gen = torch.Generator().manual_seed(12)
    out_a = _rand(1, 9, 2, 48, dtype=torch.float16, gen=gen).transpose(1, 2)
    out_b = _rand(1, 9, 2, 48, dtype=torch.float32, gen=gen).transpose(1, 2)
    lse_a = _rand(1, 9, 2, dtype=torch.float32, gen=gen).transpose(1, 2)
    lse_b = _rand(1, 9, 2, dtype=torch.float32, gen=gen).transpose(1, 2)
    out, lse = triton_attn.merge_partials(out_a, lse_a, out_b, lse_b)
    r_out, r_lse = reference.merge_partials(out_a, lse_a, out_b, lse_b)
    g_out, g_lse = reference.merge_partials(out_a.float(), lse_a, out_b, lse_b)
    _check_attention((out, lse), (r_out, r_lse), (g_out, g_lse), torch.float16)


# ---------------------------------------------------------------------------------------------------------
# window_key_scores

SCORE_CASES = [
    pytest.param(1, 2, 3, 7, 50, 64, 43, 16, id="g3-window-inside"),
    pytest.param(1, 2, 4, 1, 77, 128, 76, None, id="decode-g4"),
    pytest.param(2, 1, 1, 37, 37, 64, 0, None, id="causal-b2"),
    pytest.param(1, 2, 3, 13, 70, 64, 57, 1, id="window-1"),
    pytest.param(1, 1, 4, 9, 40, 64, 100, 30, id="queries-past-keys"),
    pytest.param(1, 1, 1, 21, 33, 128, -10, 8, id="negative-offset"),
    # several row tiles per key tile: interior (unmasked) tiles between the band's masked edges
    pytest.param(1, 2, 2, 64, 130, 32, 66, 40, id="band-interior-tiles"),
    pytest.param(1, 1, 4, 40, 200, 32, 160, 100, id="long-window-g4"),
]


@pytest.mark.parametrize("b,hkv,group,lq,lk,d,q_offset,window", SCORE_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_window_key_scores(b, hkv, group, lq, lk, d, q_offset, window, dtype):
    q, k, v = _qkv(b, hkv, group, lq, lk, d, dtype, seed=lq + lk)
    scale = 1 / math.sqrt(d)
    # The final lse of a two-stage step: the local window merged with a (made-up) global partial; some rows
    # get -inf (they saw nothing anywhere) to check they contribute nothing.
    _, lse = reference.windowed_attention(*_f32(q, k, v), scale=scale, q_offset=q_offset, window=window)
    gen = torch.Generator().manual_seed(1)
    lse = torch.logaddexp(lse, _rand(*lse.shape, dtype=torch.float32, gen=gen))
    lse[..., ::4] = torch.where(torch.isneginf(lse[..., ::4]), lse[..., ::4], -math.inf)
    got = triton_attn.window_key_scores(q, k, scale=scale, q_offset=q_offset, window=window, lse=lse)
    gold = reference.window_key_scores(*_f32(q, k), scale=scale, q_offset=q_offset, window=window, lse=lse)
    ref = reference.window_key_scores(q, k, scale=scale, q_offset=q_offset, window=window, lse=lse)
    assert got.dtype == torch.float32 and got.shape == (b, hkv, lk)
    tol = 2 * _max_err(ref, gold) + SCORES_RTOL * max(1.0, gold.abs().max().item())
    assert _max_err(got, gold) <= tol
    # `into`: added to running scores in place, through a strided view (the memory's score buffer)
    running = _rand(b, hkv, lk + 9, dtype=torch.float32, gen=gen)
    before = running.clone()
    returned = triton_attn.window_key_scores(q, k, scale=scale, q_offset=q_offset, window=window, lse=lse,
                                             into=running[..., 4 : 4 + lk])
    assert returned.data_ptr() == running[..., 4:].data_ptr()
    assert _max_err(running[..., 4 : 4 + lk], before[..., 4 : 4 + lk] + gold) <= tol + 1e-5
    assert torch.equal(running[..., :4], before[..., :4]) and torch.equal(running[..., 4 + lk :], before[..., 4 + lk :])


# ---------------------------------------------------------------------------------------------------------
# validation: bad input is a ValueError with a message, never an assert or a kernel crash


def _good():
    return _qkv(1, 2, 2, 3, 5, 64, torch.float32)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v: (q[0], k, v), "dimensions"),
        (lambda q, k, v: (q, k, v[:, :, :4]), "shapes differ"),
        (lambda q, k, v: (q, k.half(), v.half()), "dtype"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), "float16, bfloat16 or float32"),
        (lambda q, k, v: (q[:, :3], k, v), "multiple of KV heads"),
        (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), "head dim"),
        (lambda q, k, v: (q, k[..., :32], v[..., :32]), "disagree"),
        (lambda q, k, v: (q, k.mT.contiguous().mT, v), "contiguous"),
        (lambda q, k, v: (q.tolist(), k, v), "torch.Tensor"),
    ],
)
def test_bad_qkv_raises(mutate, match):
    q, k, v = mutate(*_good())
    with pytest.raises(ValueError, match=match):
        triton_attn.windowed_attention(q, k, v, scale=0.1, q_offset=0, window=None)


def test_bad_scalars_raise():
    q, k, v = _good()
    with pytest.raises(ValueError, match="scale"):
        triton_attn.windowed_attention(q, k, v, scale=float("nan"), q_offset=0, window=None)
    with pytest.raises(ValueError, match="q_offset"):
        triton_attn.windowed_attention(q, k, v, scale=0.1, q_offset=1.5, window=None)
    with pytest.raises(ValueError, match="window"):
        triton_attn.windowed_attention(q, k, v, scale=0.1, q_offset=0, window="4")
    with pytest.raises(ValueError, match="visible"):
        triton_attn.prefix_attention(q, k, v, scale=0.1, visible=torch.ones(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="integer"):
        triton_attn.prefix_attention(q, k, v, scale=0.1, visible=torch.ones(3, device=DEVICE))
    lse = torch.zeros(1, 4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="lse"):
        triton_attn.window_key_scores(q, k, scale=0.1, q_offset=0, window=None, lse=lse[:, :2])
    with pytest.raises(ValueError, match="shape"):
        triton_attn.merge_partials(q, lse, q[:, :2], lse)


# ---------------------------------------------------------------------------------------------------------
# global_stage_into (the device path's global stage: blocks read in place, merged into the local partial)

# (kv heads, group, Lq, D, sinks, store blocks, block size, selected, remainder, rem_offset, per-head ids)
GLOBAL_CASES = [
    pytest.param(2, 4, 9, 64, 5, 7, 8, 3, 13, -4, False, id="g4-odd-sinks-partial-tile-blocks"),
    pytest.param(2, 3, 17, 32, 16, 6, 16, 4, 0, 0, False, id="g3-whole-tile-blocks-no-remainder"),
    pytest.param(3, 1, 5, 64, 0, 5, 8, 2, 40, 3, True, id="mha-perhead-no-sinks"),
    pytest.param(1, 2, 6, 16, 4, 3, 8, 0, 9, -7, False, id="no-blocks-early-rows-see-nothing"),
    pytest.param(2, 2, 1, 64, 3, 9, 8, 5, 21, 21, False, id="single-query"),
]


def _global_inputs(hkv, group, lq, d, sinks, n_blocks, bs, k, rem, per_head, dtype, seed=3):
    gen = torch.Generator().manual_seed(seed)
    q = _rand(hkv * group, lq, d, dtype=dtype, gen=gen)
    sink_k, sink_v = _rand(hkv, sinks, d, dtype=dtype, gen=gen), _rand(hkv, sinks, d, dtype=dtype, gen=gen)
    store_k = _rand(n_blocks, hkv, bs, d, dtype=dtype, gen=gen)
    store_v = _rand(n_blocks, hkv, bs, d, dtype=dtype, gen=gen)
    ids = torch.stack([torch.randperm(n_blocks, generator=gen)[:k] for _ in range(hkv if per_head else 1)])
    rem_k, rem_v = _rand(hkv, rem, d, dtype=dtype, gen=gen), _rand(hkv, rem, d, dtype=dtype, gen=gen)
    out = _rand(hkv * group, lq, d, dtype=dtype, gen=gen)  # a local partial: some rows empty (out 0, lse -inf)
    lse = torch.randn(hkv * group, lq, generator=gen).to(DEVICE)
    lse[:, ::3] = float("-inf")
    out[:, ::3] = 0
    return q, out, lse, sink_k, sink_v, store_k, store_v, ids.to(DEVICE), rem_k, rem_v


@pytest.mark.parametrize("hkv,group,lq,d,sinks,n_blocks,bs,k,rem,rem_offset,per_head", GLOBAL_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_global_stage_into(hkv, group, lq, d, sinks, n_blocks, bs, k, rem, rem_offset, per_head, dtype):
    """In-place global stage + merge equals the reference (prefix attention over the gathered keys, then
    merge_partials), for partial and whole key tiles, per-head ids, empty parts and empty rows."""
    inputs = _global_inputs(hkv, group, lq, d, sinks, n_blocks, bs, k, rem, per_head, dtype)
    results = {}
    for name, op, cast in (("got", triton_attn.global_stage_into, dtype), ("ref", reference.global_stage_into, dtype),
                           ("gold", reference.global_stage_into, torch.float32)):
        q, out, lse, sink_k, sink_v, store_k, store_v, ids, rem_k, rem_v = (
            t.clone() if t.dtype in (torch.int64, torch.float32) and t.dim() <= 2 else t.to(cast) for t in inputs
        )
        out, lse = out.clone(), lse.clone()
        op(q, out, lse, sink_k, sink_v, store_k, store_v, ids, rem_k, rem_v, rem_offset=rem_offset,
           scale=1 / math.sqrt(d))
        results[name] = (out, lse)
    _check_attention(results["got"], results["ref"], results["gold"], dtype)


def test_global_stage_into_rejects_bad_inputs():
    q, out, lse, sink_k, sink_v, store_k, store_v, ids, rem_k, rem_v = _global_inputs(
        2, 2, 4, 16, 2, 3, 8, 2, 5, False, torch.float32)
    with pytest.raises(ValueError, match="block_ids"):
        triton_attn.global_stage_into(q, out, lse, sink_k, sink_v, store_k, store_v, ids.float(), rem_k, rem_v,
                                      rem_offset=0, scale=0.25)
    with pytest.raises(ValueError, match="store_k"):
        triton_attn.global_stage_into(q, out, lse, sink_k, sink_v, store_k[:, :1], store_v[:, :1], ids, rem_k,
                                      rem_v, rem_offset=0, scale=0.25)
    with pytest.raises(ValueError, match="rem_k"):
        triton_attn.global_stage_into(q, out, lse, sink_k, sink_v, store_k, store_v, ids, rem_k.bfloat16(), rem_v,
                                      rem_offset=0, scale=0.25)


@pytest.mark.parametrize("perhead", [False, True])
@pytest.mark.parametrize("access", ["device", "direct"])
def test_memory_device_path_with_triton_ops_matches_host_path(perhead, access):
    """ContextMemory's device path on the Triton ops (one global_stage_into per execution block, ids on the
    device; `direct`: blocks fetched from the offloaded store by gather_blocks first) against its host path on
    the torch ops: same outputs, same lookups, prefill and decode steps."""
    from inf_llm.config import ModelConfig
    from inf_llm.memory import ContextMemory, RotaryTable

    d, hq, hkv, n = 16, 4, 2, 160
    cfg = ModelConfig(type="inf-llm", n_init=4, n_local=32, block_size=8, topk=3, repr_topk=2, exc_block_size=16,
                      max_cached_block=64, perhead=perhead, offload_access="direct" if access == "direct" else "cache",
                      pin_memory=access == "direct")
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(h, n, d, generator=gen).to(DEVICE) for h in (hq, hkv, hkv))
    inv_freq = (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).to(DEVICE)
    host_cfg = cfg.model_copy(update={"offload_access": "cache"})
    # on a GPU, `direct` reads the pinned host store from the kernel, with a side stream as the adapter gives it
    # (the formation ring and the prefetch need one there; on a CPU they run inline)
    stream = torch.cuda.Stream() if DEVICE.type == "cuda" and access == "direct" else None
    memories = [
        ContextMemory(cfg, RotaryTable(inv_freq, d), hq, hkv, d, torch.float32, DEVICE, triton_attn,
                      offload=access == "direct", device_lookup=True, copy_stream=stream),
        ContextMemory(host_cfg, RotaryTable(inv_freq, d), hq, hkv, d, torch.float32, DEVICE, reference,
                      offload=False, device_lookup=False),
    ]
    assert (memories[0].cache is None) and memories[0]._direct == (access == "direct")
    # as on a GPU, the per-execution-block ops without their argument checks (with perhead: with them)
    memories[0]._check_ops = perhead
    outs, lookups = [[], []], [[], []]
    for a, b in ((0, 70), (70, 71), (71, 72), (72, n)):
        for i, memory in enumerate(memories):
            outs[i].append(memory.process(q[:, a:b], k[:, a:b], v[:, a:b], 1 / math.sqrt(d)))
            lookups[i].extend(memory.retrieved_last)
    assert memories[0].device_lookup and not memories[1].device_lookup
    torch.testing.assert_close(torch.cat(outs[0], dim=1), torch.cat(outs[1], dim=1), rtol=1e-4, atol=1e-5)
    # the prefill's output stored token-major: the adapter's (1, L, Hq, D) view of it is contiguous
    assert outs[0][0].transpose(0, 1).is_contiguous()
    assert lookups[0] == lookups[1] and len(lookups[0]) > 5
    assert memories[0].retrieval_counts == memories[1].retrieval_counts
    # direct: prefill blocks were formed through the formation ring, and its copies reached the store
    assert (memories[0].ring is not None) == (access == "direct" and not perhead)
    memories[0].settle_copies()
    count = memories[1].store.count
    assert memories[0].store.count == count
    assert torch.equal(memories[0].store.k[:count].to(DEVICE), memories[1].store.k[:count])
    assert torch.equal(memories[0].store.v[:count].to(DEVICE), memories[1].store.v[:count])


@pytest.mark.parametrize("codec", ["fp8", "int8"])
def test_direct_memory_with_a_codec_matches_host_path(codec):
    """offload_dtype with offload_access: direct: blocks stored as codes in the (pinned) store, decoded by the
    kernels on their way into the device cache; the same outputs, lookups and store contents as the host
    path with the same codec (`offload_access: cache`, torch ops), prefill and decode steps."""
    from inf_llm.config import ModelConfig
    from inf_llm.memory import ContextMemory, RotaryTable

    d, hq, hkv, n = 16, 4, 2, 160
    cfg = ModelConfig(type="inf-llm", n_init=4, n_local=32, block_size=8, topk=3, repr_topk=2, exc_block_size=16,
                      max_cached_block=64, offload_access="direct", pin_memory=True, offload_dtype=codec)
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(h, n, d, generator=gen).to(DEVICE) for h in (hq, hkv, hkv))
    inv_freq = (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).to(DEVICE)
    stream = torch.cuda.Stream() if DEVICE.type == "cuda" else None
    direct = ContextMemory(cfg, RotaryTable(inv_freq, d), hq, hkv, d, torch.float32, DEVICE, triton_attn,
                           offload=True, device_lookup=True, copy_stream=stream)
    host = ContextMemory(cfg.model_copy(update={"offload_access": "cache"}), RotaryTable(inv_freq, d), hq, hkv, d,
                         torch.float32, DEVICE, reference, offload=True, device_lookup=False)
    assert direct._direct and direct.ring is None and direct.store.codec is not None
    direct._check_ops = True
    outs, lookups = [[], []], [[], []]
    for a, b in ((0, 70), (70, 71), (71, 72), (72, n)):
        for i, memory in enumerate((direct, host)):
            outs[i].append(memory.process(q[:, a:b], k[:, a:b], v[:, a:b], 1 / math.sqrt(d)))
            lookups[i].extend(memory.retrieved_last)
    torch.testing.assert_close(torch.cat(outs[0], dim=1), torch.cat(outs[1], dim=1), rtol=1e-4, atol=1e-5)
    assert lookups[0] == lookups[1] and len(lookups[0]) > 5
    assert direct.ring is None  # a store of codes is formed through the codec, not the formation ring
    count = host.store.count
    assert direct.store.count == count and direct.device_cache.counters[2] > 0  # misses decoded by the kernel
    for name in ("k", "v", "k_scale", "v_scale"):
        assert torch.equal(getattr(direct.store, name)[:count].cpu(), getattr(host.store, name)[:count].cpu()), name


def test_direct_layers_sharing_ring_slots_match_host_path():
    """Two layers' direct memories whose formation rings share four slots (a call forms more blocks than
    that: it copies mid-call; each call hands the slots to the other layer): each layer's outputs, lookups
    and store equal its host path's."""
    from inf_llm.config import ModelConfig
    from inf_llm.memory import ContextMemory, RotaryTable
    from inf_llm.memory.block_cache import RingSlots

    d, hq, hkv, n = 16, 4, 2, 160
    cfg = ModelConfig(type="inf-llm", n_init=4, n_local=32, block_size=8, topk=3, repr_topk=2, exc_block_size=16,
                      max_cached_block=4, offload_access="direct", pin_memory=True)
    host_cfg = cfg.model_copy(update={"offload_access": "cache"})
    inv_freq = (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).to(DEVICE)
    slots = RingSlots((hkv, cfg.block_size, d), torch.float32, DEVICE, 4)
    stream = torch.cuda.Stream() if DEVICE.type == "cuda" else None
    layers = []
    for seed in (12, 13):
        gen = torch.Generator().manual_seed(seed)
        qkv = [torch.randn(h, n, d, generator=gen).to(DEVICE) for h in (hq, hkv, hkv)]
        direct = ContextMemory(cfg, RotaryTable(inv_freq, d), hq, hkv, d, torch.float32, DEVICE, triton_attn,
                               offload=True, device_lookup=True, copy_stream=stream, ring_slots=lambda *spec: slots)
        host = ContextMemory(host_cfg, RotaryTable(inv_freq, d), hq, hkv, d, torch.float32, DEVICE, reference,
                             offload=False, device_lookup=False)
        layers.append((qkv, direct, host))
    for a, b in ((0, 110), (110, 111), (111, 112), (112, n)):
        for (q, k, v), direct, host in layers:
            outs = [m.process(q[:, a:b], k[:, a:b], v[:, a:b], 1 / math.sqrt(d)) for m in (direct, host)]
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
            assert direct.retrieved_last == host.retrieved_last
    for _, direct, host in layers:
        assert direct.ring is not None and direct.ring.slots is slots
        direct.settle_copies()
        count = host.store.count
        assert direct.store.count == count > 4
        assert torch.equal(direct.store.k[:count].to(DEVICE), host.store.k[:count])
        assert torch.equal(direct.store.v[:count].to(DEVICE), host.store.v[:count])


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("block_size", [8, 24])
@pytest.mark.parametrize("pinned", [False, pytest.param(True, marks=pytest.mark.skipif(INTERPRET, reason="GPU"))])
def test_gather_blocks_into_strided_slots(per_head, block_size, pinned):
    """The selected store blocks land in (K, Hkv, bs, D) slots of a staging-like buffer, as the reference;
    on a GPU also from a pinned host store (read by the kernel over the bus)."""
    gen = torch.Generator().manual_seed(5)
    hkv, d, n_blocks, k = 3, 32, 7, 4
    src_k = _rand(n_blocks, hkv, block_size, d, dtype=torch.bfloat16, gen=gen)
    src_v = _rand(n_blocks, hkv, block_size, d, dtype=torch.bfloat16, gen=gen)
    if pinned:
        src_k, src_v = src_k.cpu().pin_memory(), src_v.cpu().pin_memory()
    ids = torch.stack([torch.randperm(n_blocks, generator=gen)[:k] for _ in range(hkv if per_head else 1)])
    ids = ids.to(DEVICE)
    results = []
    for op in (triton_attn.gather_blocks, reference.gather_blocks):
        staging_k = torch.zeros(hkv, 5 + k * block_size, d, dtype=torch.bfloat16, device=DEVICE)  # [5 sinks | slots]
        staging_v = torch.zeros_like(staging_k)
        slots = [x[:, 5:].view(hkv, k, block_size, d).transpose(0, 1) for x in (staging_k, staging_v)]
        op(src_k, src_v, ids, *slots)
        results.append((staging_k, staging_v))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][0][1, 5 : 5 + block_size].cpu(), src_k[ids[1 if per_head else 0, 0], 1].cpu())
    assert (results[0][0][:, :5] == 0).all()


@pytest.mark.parametrize("block_size", [8, 24, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pinned", [False, pytest.param(True, marks=pytest.mark.skipif(INTERPRET, reason="GPU"))])
def test_form_blocks_writes_store_slots_and_representatives(block_size, dtype, pinned):
    """New blocks from tail-like strided views: K/V copied into the store slots exactly, representatives the
    reference's (the mean of the repr_topk best-scored keys, float32); ties resolve to a valid choice. On a
    GPU also into a pinned host store (offload_access: direct: the kernel writes it over the bus)."""
    gen = torch.Generator().manual_seed(8)
    hkv, n, d, repr_topk = 3, 2, 32, 4
    tail_k = _rand(hkv, 7 + n * block_size, d, dtype=dtype, gen=gen)  # 7 tokens before the new blocks
    tail_v = _rand(hkv, 7 + n * block_size, d, dtype=dtype, gen=gen)
    score = torch.rand(hkv, 7 + n * block_size, generator=gen).to(DEVICE)
    score[0, 7:10] = 5.0  # a tie at the top of head 0's first block
    keys, values = (x[:, 7:].unflatten(1, (n, block_size)) for x in (tail_k, tail_v))
    scores = score[:, 7:].unflatten(1, (n, block_size))
    results = []
    for op in (triton_attn.form_blocks, reference.form_blocks):
        store_k = torch.zeros(5, hkv, block_size, d, dtype=dtype, device=DEVICE)
        store_v, store_repr = torch.zeros_like(store_k), torch.zeros(5, hkv * d, device=DEVICE)
        if pinned and op is triton_attn.form_blocks:
            store_k, store_v = store_k.cpu().pin_memory(), store_v.cpu().pin_memory()
        op(keys, values, scores, repr_topk, store_k[1 : 1 + n], store_v[1 : 1 + n],
           store_repr[1 : 1 + n].view(n, hkv, d))
        results.append((store_k, store_v, store_repr))
    (got_k, got_v, got_r), (ref_k, ref_v, ref_r) = results
    if pinned:
        torch.cuda.synchronize()  # the kernel's writes to host memory, before the host reads them
        got_k, got_v = got_k.to(DEVICE), got_v.to(DEVICE)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
    assert torch.equal(got_k[1:3].transpose(0, 1).cpu(), keys.cpu()) and (got_k[0] == 0).all()
    torch.testing.assert_close(got_r, ref_r, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="repr_topk"):
        triton_attn.form_blocks(keys, values, scores, block_size + 1, store_k[1 : 1 + n], store_v[1 : 1 + n],
                                store_repr[1 : 1 + n].view(n, hkv, d))


@pytest.mark.parametrize("codec", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pinned", [False, pytest.param(True, marks=pytest.mark.skipif(INTERPRET, reason="GPU"))])
def test_form_blocks_encodes_codes_as_the_codec_does(codec, dtype, pinned, hkv=3, n=2, block_size=40, d=64):
    """offload_dtype with offload_access: direct: the formation kernel writes codes and scales bit for bit as
    the codec's torch encoding (`BlockCodec.encode`), over magnitudes from subnormal codes to 100, an all-zero
    key channel and value token (scale: float32's tiny), odd block sizes; bad scales are refused."""
    from inf_llm.memory.compression import BlockCodec

    gen = torch.Generator().manual_seed(21)
    codec = BlockCodec.of(codec)
    spread = torch.logspace(-4, 2, d)  # per channel: most of a key's magnitude in a few channels
    tail_k = (_rand(hkv, 5 + n * block_size, d, dtype=FP32, gen=gen) * spread.to(DEVICE)).to(dtype)
    tail_v = (_rand(hkv, 5 + n * block_size, d, dtype=FP32, gen=gen) * 3).to(dtype)
    tail_k[0, 5:, 7] = 0
    tail_v[1, 5 + block_size + 3] = 0
    keys, values = (x[:, 5:].unflatten(1, (n, block_size)) for x in (tail_k, tail_v))  # strided, as the tail's
    scores = torch.rand(hkv, n, block_size, generator=gen).to(DEVICE)
    host = torch.device("cpu") if pinned else DEVICE
    store_k = torch.zeros(n + 1, hkv, block_size, d, dtype=codec.storage_dtype, device=host)
    store_v = torch.zeros_like(store_k)
    k_scale, v_scale = torch.zeros(n + 1, hkv, 1, d, device=host), torch.zeros(n + 1, hkv, block_size, 1, device=host)
    if pinned:
        store_k, store_v, k_scale, v_scale = (t.pin_memory() for t in (store_k, store_v, k_scale, v_scale))
    repr_ = torch.zeros(n, hkv, d, device=DEVICE)
    triton_attn.form_blocks(keys, values, scores, 4, store_k[1:], store_v[1:], repr_,
                            scales=(k_scale[1:], v_scale[1:]))
    if pinned:
        torch.cuda.synchronize()  # the kernel's writes to host memory, before the host reads them
    for got, scale, x, is_keys in ((store_k, k_scale, keys, True), (store_v, v_scale, values, False)):
        want, want_scale = codec.encode(x.transpose(0, 1), keys=is_keys)
        assert torch.equal(got[1:].view(torch.uint8).to(DEVICE), want.view(torch.uint8))
        assert torch.equal(scale[1:].to(DEVICE), want_scale)
        assert (got[0].view(torch.uint8) == 0).all() and (scale[0] == 0).all()  # nothing outside the slots
    assert (k_scale[1, 0, 0, 7] == torch.finfo(torch.float32).tiny).item()
    assert (v_scale[2, 1, 3, 0] == torch.finfo(torch.float32).tiny).item()
    want_repr = torch.zeros_like(repr_)
    reference.form_blocks(keys, values, scores, 4, store_k[1:].clone(), store_v[1:].clone(), want_repr,
                          scales=(k_scale[1:].clone(), v_scale[1:].clone()))
    torch.testing.assert_close(repr_, want_repr, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="v_scale must be"):
        triton_attn.form_blocks(keys, values, scores, 4, store_k[1:], store_v[1:], repr_,
                                scales=(k_scale[1:], v_scale[1:, :, :1]))
    with pytest.raises(ValueError, match="differs from the keys"):  # codes without their scales
        triton_attn.form_blocks(keys, values, scores, 4, store_k[1:], store_v[1:], repr_)


@pytest.mark.parametrize("one_angle", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rotate_matches_reference_on_a_transposed_view(one_angle, dtype, h=3, length=37, d=32):
    """RoPE in one launch on transformers' layout (q as a transposed (H, L, D) view), per-row angles or one
    angle for all rows, odd length: bit-identical to the torch rotation in 16-bit dtypes (the fast path's
    lookups must see the same rotated queries as the torch path's), within rounding in float32."""
    from inf_llm.memory import RotaryTable

    gen = torch.Generator().manual_seed(4)
    x = (_rand(length, h, d, dtype=torch.float32, gen=gen) * 8).to(dtype).transpose(0, 1)  # (H, L, D), strided
    rope = RotaryTable((1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).to(DEVICE), d)
    start, rows = 1000, 1 if one_angle else length
    got = triton_attn.rotate(x, *rope.cos_sin(start, start + rows, dtype))
    ref = reference.rotate(x, *rope.cos_sin(start, start + rows, dtype))
    assert got.shape == (h, length, d) and got.dtype == dtype and got.is_contiguous()
    if dtype == torch.float32:  # the compiler may fuse a product into the sum (one rounding less)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    else:
        assert torch.equal(got, ref), (got.float() - ref.float()).abs().max()
    with pytest.raises(ValueError, match="cos"):
        triton_attn.rotate(x, *rope.cos_sin(0, 2, dtype))
    # into slots of a larger buffer (the tail's rotated keys): the same values, nothing around them touched
    for ops in (triton_attn, reference):
        buf = torch.zeros(h, length + 5, d, dtype=dtype, device=DEVICE)
        assert ops.rotate(x, *rope.cos_sin(start, start + rows, dtype), out=buf[:, 2 : 2 + length]) is not None
        if dtype == torch.float32:
            torch.testing.assert_close(buf[:, 2 : 2 + length], ref, rtol=1e-6, atol=1e-5)
        else:
            assert torch.equal(buf[:, 2 : 2 + length], ref)
        assert not buf[:, :2].any() and not buf[:, 2 + length :].any()
    other = torch.float16 if dtype != torch.float16 else torch.float32
    with pytest.raises(ValueError, match="out"):
        triton_attn.rotate(x, *rope.cos_sin(start, start + rows, dtype), out=buf[:, :length].to(other))


@pytest.mark.parametrize("hsel, x, k, first, n", [
    (1, 48, 4, 10, 10),  # no new block: the earlier top is returned as a top-k
    (1, 48, 4, 10, 17),  # one tile of new blocks; X below one 64-wide tile
    (3, 16, 3, 5, 300),  # several heads (perhead) and several tiles of new blocks
    (1, 200, 16, 40, 90),  # X above one tile and not a power of two (SmolLM2: 3 KV heads x 64)
])
def test_refine_topk_equals_a_full_top_k(hsel, x, k, first, n):
    """The batched lookup's refinement (earlier top-k of blocks [0, first) plus the blocks formed since)
    selects what one top-k over all n blocks selects; the Triton op and the reference agree."""
    _check_refine_topk(hsel, x, k, first, n)


def _check_refine_topk(hsel, x, k, first, n):
    gen = torch.Generator().manual_seed(first + n)
    query = _rand(hsel, x, dtype=torch.float32, gen=gen)
    reprs = _rand(n, hsel * x, dtype=torch.float32, gen=gen)
    full = torch.einsum("hx,nhx->hn", query, reprs.view(n, hsel, x))  # (Hsel, n)
    values, indices = full[:, :first].topk(k, dim=-1)
    want = full.topk(k, dim=-1).indices.sort(dim=-1).values
    for ops in (reference, triton_attn):
        got = ops.refine_topk(values, indices, query, reprs, first, k)
        assert got.shape == (hsel, k) and got.dtype == torch.int64
        assert torch.equal(got.sort(dim=-1).values, want), ops.__name__
    with pytest.raises(ValueError, match="k must be"):
        triton_attn.refine_topk(values, indices, query, reprs, first, k + n - first + 1)
    with pytest.raises(ValueError, match="reprs"):
        triton_attn.refine_topk(values, indices, query, reprs[:, 1:], first, k)


def _check_cache_blocks(n_blocks, hkv, block_size, d, n_slots, k, steps, pinned=False, seed=0):
    """A run of selections through the device LRU cache: the Triton op and the reference make the same
    slot choices and bookkeeping, every selected block is then in its slot, and hits are not re-read."""
    gen = torch.Generator().manual_seed(seed)
    src_k = _rand(n_blocks, hkv, block_size, d, dtype=torch.bfloat16, gen=gen)
    src_v = _rand(n_blocks, hkv, block_size, d, dtype=torch.bfloat16, gen=gen)
    if pinned:
        src_k, src_v = src_k.cpu().pin_memory(), src_v.cpu().pin_memory()

    def empty_cache():
        cache = torch.zeros(2, n_slots, hkv, block_size, d, dtype=torch.bfloat16, device=DEVICE)
        tags = torch.full((n_slots,), -1, dtype=torch.int64, device=DEVICE)
        return [cache[0], cache[1], tags, tags.clone(), torch.zeros(4, dtype=torch.int64, device=DEVICE)]

    caches = {ops: empty_cache() for ops in (triton_attn, reference)}
    for step in range(steps):
        # mostly from a few "hot" blocks (hits), now and then from all of them (misses, evictions)
        pool = n_blocks if step % 4 == 0 else min(n_blocks, k + 3)
        ids = torch.randperm(pool, generator=gen)[:k][None].to(DEVICE)
        slots = {ops: ops.cache_blocks(src_k, src_v, ids, *state) for ops, state in caches.items()}
        assert torch.equal(slots[triton_attn], slots[reference]), step
        for got, want in zip(caches[triton_attn], caches[reference]):
            assert torch.equal(got, want), step
        cache_k, cache_v, tags = caches[triton_attn][:3]
        assert torch.equal(tags[slots[triton_attn][0]], ids[0])
        assert torch.equal(cache_k[slots[triton_attn][0]].cpu(), src_k[ids[0].cpu()].cpu())
        assert torch.equal(cache_v[slots[triton_attn][0]].cpu(), src_v[ids[0].cpu()].cpu())
    clock, requested, misses, _ = caches[triton_attn][4].tolist()
    assert clock == steps and requested == steps * k and 0 < misses < requested


def _check_refine_and_cache(n_blocks, hkv, block_size, d, n_slots, k, x, steps, pinned=False, seed=0):
    """A run of lookups that refine an earlier top-k with new blocks and make the result resident in one
    step: the Triton op and the reference find the same ids in the same order, make the same slot choices
    and bookkeeping, and every id found is then in its slot."""
    gen = torch.Generator().manual_seed(seed)
    src_k = _rand(n_blocks, hkv, block_size, d, dtype=torch.bfloat16, gen=gen)
    src_v = _rand(n_blocks, hkv, block_size, d, dtype=torch.bfloat16, gen=gen)
    if pinned:
        src_k, src_v = src_k.cpu().pin_memory(), src_v.cpu().pin_memory()
    reprs = _rand(n_blocks, x, dtype=torch.float32, gen=gen)
    caches = {}
    for ops in (triton_attn, reference):
        cache = torch.zeros(2, n_slots, hkv, block_size, d, dtype=torch.bfloat16, device=DEVICE)
        tags = torch.full((n_slots,), -1, dtype=torch.int64, device=DEVICE)
        caches[ops] = [cache[0], cache[1], tags, tags.clone(), torch.zeros(4, dtype=torch.int64, device=DEVICE)]
    for step in range(steps):
        query = _rand(1, x, dtype=torch.float32, gen=gen)
        first = int(torch.randint(k, n_blocks + 1, (1,), generator=gen))  # blocks scored earlier
        values, indices = (query @ reprs[:first].T).topk(k, dim=-1)
        found = {ops: ops.refine_and_cache(values, indices, query, reprs, first, k, src_k, src_v, *state)
                 for ops, state in caches.items()}
        (ids, slots), (want_ids, want_slots) = found[triton_attn], found[reference]
        assert ids.shape == slots.shape == (1, k) and ids.dtype == slots.dtype == torch.int64
        assert torch.equal(ids, want_ids) and torch.equal(slots, want_slots), step
        assert torch.equal(ids.sort().values, (query @ reprs.T).topk(k).indices.sort().values), step
        for got, want in zip(caches[triton_attn], caches[reference]):
            assert torch.equal(got, want), step
        cache_k, cache_v, tags = caches[triton_attn][:3]
        assert torch.equal(tags[slots[0]], ids[0])
        assert torch.equal(cache_k[slots[0]].cpu(), src_k[ids[0].cpu()].cpu())
        assert torch.equal(cache_v[slots[0]].cpu(), src_v[ids[0].cpu()].cpu())
    clock, requested, misses, _ = caches[triton_attn][4].tolist()
    assert clock == steps and requested == steps * k and 0 < misses < requested
    with pytest.raises(ValueError, match="shared top-k"):
        triton_attn.refine_and_cache(values.expand(2, -1), indices.expand(2, -1), query.expand(2, -1),
                                     reprs.repeat(1, 2), first, k, src_k, src_v, *caches[triton_attn])
    small = [t[: k - 1] for t in caches[triton_attn][:4]] + caches[triton_attn][4:]  # fewer slots than k
    with pytest.raises(ValueError, match="slots"):
        triton_attn.refine_and_cache(values, indices, query, reprs, first, k, src_k, src_v, *small)


@pytest.mark.parametrize("pinned", [False, pytest.param(True, marks=pytest.mark.skipif(INTERPRET, reason="GPU"))])
def test_cache_blocks_reads_the_newest_blocks_from_the_formation_ring(pinned):
    """`ring` (ring_k, ring_v, lo, hi): blocks lo <= id < hi are read from ring slot id % R, older ones from
    the store (here the store's copies of the ring's blocks are still zeros: their copy "is under way"),
    through cache_blocks, its prefetch and refine_and_cache, in both backends."""
    gen = torch.Generator().manual_seed(8)
    n_blocks, hkv, bs, d, ring_size, lo, hi = 20, 2, 8, 16, 4, 15, 19
    blocks_k = _rand(n_blocks, hkv, bs, d, dtype=torch.bfloat16, gen=gen)
    blocks_v = _rand(n_blocks, hkv, bs, d, dtype=torch.bfloat16, gen=gen)
    ring_k = torch.zeros(ring_size, hkv, bs, d, dtype=torch.bfloat16, device=DEVICE)
    ring_v = torch.zeros_like(ring_k)
    for b in range(lo, hi):
        ring_k[b % ring_size], ring_v[b % ring_size] = blocks_k[b], blocks_v[b]
    store_k, store_v = blocks_k.clone(), blocks_v.clone()
    store_k[lo:hi], store_v[lo:hi] = 0, 0
    if pinned:
        store_k, store_v = store_k.cpu().pin_memory(), store_v.cpu().pin_memory()
    ring = (ring_k, ring_v, lo, hi)
    reprs = _rand(n_blocks, 8, dtype=torch.float32, gen=gen)
    query = _rand(1, 8, dtype=torch.float32, gen=gen)
    values, indices = (query @ reprs[:10].T).topk(3, dim=-1)
    for ops in (triton_attn, reference):
        cache_k = torch.zeros(6, hkv, bs, d, dtype=torch.bfloat16, device=DEVICE)
        cache_v = torch.zeros_like(cache_k)
        tags = torch.full((6,), -1, dtype=torch.int64, device=DEVICE)
        state = [cache_k, cache_v, tags, tags.clone(), torch.zeros(4, dtype=torch.int64, device=DEVICE)]
        ids = torch.tensor([[3, 16, 18, 14]], device=DEVICE)  # two from the ring, two (14 just below) from the store
        slots = ops.cache_blocks(store_k, store_v, ids, *state, ring=ring)
        assert torch.equal(cache_k[slots[0]].cpu(), blocks_k[ids[0]].cpu()), ops.__name__
        assert torch.equal(cache_v[slots[0]].cpu(), blocks_v[ids[0]].cpu()), ops.__name__
        ops.cache_blocks(store_k, store_v, torch.tensor([[15, 15, 2]], device=DEVICE), *state, prefetch=True, ring=ring)
        found, slots = ops.refine_and_cache(values, indices, query, reprs, 10, 3, store_k, store_v, *state, ring=ring)
        assert torch.equal(cache_k[slots[0]].cpu(), blocks_k[found[0]].cpu()), ops.__name__
        assert torch.equal(state[2][slots[0]], found[0])
    with pytest.raises(ValueError, match="ring blocks"):
        triton_attn.cache_blocks(store_k, store_v, ids, *state, ring=(ring_k, ring_v, 10, 19))
    with pytest.raises(ValueError, match="ring_k"):
        triton_attn.cache_blocks(store_k, store_v, ids, *state, ring=(ring_k[:, :1], ring_v, lo, hi))


@pytest.mark.parametrize("codec_name", ["fp8", "int8"])
@pytest.mark.parametrize("pinned", [False, pytest.param(True, marks=pytest.mark.skipif(INTERPRET, reason="GPU"))])
def test_cache_blocks_decodes_a_store_of_codes(codec_name, pinned):
    """`scales`: the store holds an `offload_dtype` store's codes (keys scaled per channel, values per token);
    cache_blocks, its prefetch and refine_and_cache decode the misses into the cache exactly as
    `BlockCodec.decode_into` does, in both backends, with the same bookkeeping. Bad scales are refused."""
    from inf_llm.memory.compression import BlockCodec

    codec = BlockCodec.of(codec_name)
    gen = torch.Generator().manual_seed(5)
    n_blocks, hkv, bs, d = 20, 2, 24, 16  # 24 tokens: the interpreter's tiles of 16 cross a block's end
    blocks_k = _rand(n_blocks, hkv, bs, d, dtype=torch.bfloat16, gen=gen) * 3
    blocks_v = _rand(n_blocks, hkv, bs, d, dtype=torch.bfloat16, gen=gen)
    (codes_k, scale_k), (codes_v, scale_v) = codec.encode(blocks_k, keys=True), codec.encode(blocks_v, keys=False)
    if pinned:
        codes_k, codes_v, scale_k, scale_v = (t.cpu().pin_memory() for t in (codes_k, codes_v, scale_k, scale_v))
    scales = (scale_k, scale_v)
    want_k, want_v = torch.empty_like(blocks_k), torch.empty_like(blocks_v)
    codec.decode_into(want_k, codes_k.to(DEVICE), scale_k.to(DEVICE))
    codec.decode_into(want_v, codes_v.to(DEVICE), scale_v.to(DEVICE))
    reprs = _rand(n_blocks, 8, dtype=torch.float32, gen=gen)
    query = _rand(1, 8, dtype=torch.float32, gen=gen)
    values, indices = (query @ reprs[:10].T).topk(3, dim=-1)
    states = {}
    for ops in (triton_attn, reference):
        cache = torch.zeros(2, 6, hkv, bs, d, dtype=torch.bfloat16, device=DEVICE)
        tags = torch.full((6,), -1, dtype=torch.int64, device=DEVICE)
        state = states[ops] = [cache[0], cache[1], tags, tags.clone(), torch.zeros(4, dtype=torch.int64, device=DEVICE)]
        ids = torch.tensor([[3, 16, 18, 14]], device=DEVICE)
        slots = ops.cache_blocks(codes_k, codes_v, ids, *state, scales=scales)
        assert torch.equal(state[0][slots[0]], want_k[ids[0]]), ops.__name__
        assert torch.equal(state[1][slots[0]], want_v[ids[0]]), ops.__name__
        ops.cache_blocks(codes_k, codes_v, torch.tensor([[15, 15, 2]], device=DEVICE), *state, prefetch=True,
                         scales=scales)
        found, slots = ops.refine_and_cache(values, indices, query, reprs, 10, 3, codes_k, codes_v, *state,
                                            scales=scales)
        assert torch.equal(state[0][slots[0]], want_k[found[0]]), ops.__name__
        assert torch.equal(state[1][slots[0]], want_v[found[0]]), ops.__name__
    for got, want in zip(states[triton_attn], states[reference]):
        assert torch.equal(got, want)
    state = states[triton_attn]
    with pytest.raises(ValueError, match="v_scale"):
        triton_attn.cache_blocks(codes_k, codes_v, ids, *state, scales=(scale_k, scale_k))
    with pytest.raises(ValueError, match="codes"):
        triton_attn.cache_blocks(blocks_k, blocks_v, ids, *state, scales=scales)
    with pytest.raises(ValueError, match="ring and scales"):
        triton_attn.cache_blocks(codes_k, codes_v, ids, *state, scales=scales, ring=(state[0], state[1], 0, 1))


def test_refine_and_cache_matches_refine_topk_then_cache_blocks():
    """offload_access: direct's lookup of an execution block with blocks formed since its batch: refined and
    made resident in one program (plus the misses' copy)."""
    _check_refine_and_cache(40, 2, 8, 16, 12, 5, 24, steps=10)


@pytest.mark.parametrize("n_blocks, n_slots, k", [(30, 6, 4), (50, 16, 16), (9, 32, 5)])
def test_cache_blocks_keeps_hits_and_evicts_the_least_recently_used(n_blocks, n_slots, k):
    """offload_access: direct's device cache (bookkeeping on the device): as the reference, step by step;
    a cache exactly as large as a selection (16 of 16) and one larger than the store."""
    _check_cache_blocks(n_blocks, 2, 8, 16, n_slots, k, steps=12, seed=n_blocks)


def test_cache_blocks_prefetch_skips_repeats_and_stops_when_the_slots_are_taken():
    """Prefetch (a whole call's selections, ahead of its lookups): repeated ids are read once, ids beyond the
    free slots are left out (slot -1), hits are refreshed; Triton and the reference agree."""
    gen = torch.Generator().manual_seed(3)
    src = _rand(20, 2, 8, 16, dtype=torch.bfloat16, gen=gen)
    results = []
    for ops in (triton_attn, reference):
        cache = torch.zeros(2, 4, 2, 8, 16, dtype=torch.bfloat16, device=DEVICE)
        tags = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
        state = (cache[0], cache[1], tags, tags.clone(), torch.zeros(4, dtype=torch.int64, device=DEVICE))
        ops.cache_blocks(src, src, torch.tensor([[9]], device=DEVICE), *state)  # 9 cached by a lookup
        slots = ops.cache_blocks(src, src, torch.tensor([[3, 9, 3, 5, 7, 11, 12]], device=DEVICE), *state,
                                 prefetch=True)
        results.append((slots, *state))
        # 9 hits slot 0; 3, 5, 7 take the three free slots; the repeat of 3 and 11, 12 are left out
        assert slots[0].tolist() == [1, 0, -1, 2, 3, -1, -1]
        assert state[2].tolist() == [9, 3, 5, 7] and state[4].tolist() == [2, 1, 1, 3]
        assert torch.equal(state[0][1].cpu(), src[3].cpu())
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_cache_blocks_lru_order_and_errors():
    """Empty slots first, then the least recently used; a slot a hit holds is never taken. Bad shapes and
    a cache smaller than the selection are refused."""
    src = torch.arange(8, dtype=torch.float32, device=DEVICE).view(8, 1, 1, 1).expand(8, 1, 1, 16).contiguous()
    cache = torch.zeros(3, 1, 1, 16, device=DEVICE)
    tags = torch.full((3,), -1, dtype=torch.int64, device=DEVICE)
    stamps, counters = tags.clone(), torch.zeros(4, dtype=torch.int64, device=DEVICE)
    state = (cache, cache.clone(), tags, stamps, counters)

    def fetch(*ids):
        return triton_attn.cache_blocks(src, src, torch.tensor([ids], device=DEVICE), *state)[0].tolist()

    assert fetch(5, 6) == [0, 1]  # empty slots in order
    assert fetch(7) == [2]
    assert fetch(6, 0) == [1, 0]  # 6 stays; 0 takes the oldest (5's slot 0)
    assert fetch(1, 7) == [0, 2]  # 7 hits slot 2; 1 takes slot 0 (0 and 6 were used together: the lower slot)
    assert tags.tolist() == [1, 6, 7] and counters.tolist() == [4, 7, 5, 0]  # clock, requested, misses, prefetched
    assert state[0][:, 0, 0, 0].tolist() == [1.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="slots"):
        triton_attn.cache_blocks(src, src, torch.arange(4, device=DEVICE)[None], *state)
    with pytest.raises(ValueError, match="counters"):
        triton_attn.cache_blocks(src, src, torch.tensor([[1]], device=DEVICE), *state[:4], counters[:2])
    with pytest.raises(ValueError, match=r"\(1, K\)"):
        triton_attn.cache_blocks(src, src, torch.tensor([[1], [2]], device=DEVICE), *state)


@pytest.mark.parametrize("hkv, group, d, n_loc, n_glb, bias, dtype", [
    (2, 4, 16, 37, 21, True, torch.float32),  # odd lengths, hidden global slots
    (3, 3, 64, 50, 0, False, torch.bfloat16),  # no global keys yet; group 3
    (1, 1, 32, 16, 33, True, torch.float16),
    (2, 2, 16, 100, 70, True, torch.bfloat16),  # strided window keys (below)
])
def test_decode_attention_matches_reference(hkv, group, d, n_loc, n_glb, bias, dtype):
    """The decoding query's two stages in one softmax (key splits, then their combine with the window keys'
    received probabilities): as the torch op, to float32 rounding (16-bit outputs: 1 ulp)."""
    _check_decode_attention(hkv, group, d, n_loc, n_glb, bias, dtype, seed=n_loc)


def _check_decode_attention(hkv, group, d, n_loc, n_glb, bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * group
    q_loc = _rand(hq, d, dtype=dtype, gen=gen)
    q_glb = _rand(hq, d, dtype=torch.float32, gen=gen)  # the static step's: in the representatives' dtype
    k_loc = _rand(hkv, n_loc + 7, d, dtype=dtype, gen=gen)[:, 3 : 3 + n_loc]  # a view, as of the tail
    v_loc = _rand(hkv, n_loc, d, dtype=dtype, gen=gen)
    k_glb, v_glb = (_rand(hkv, n_glb, d, dtype=dtype, gen=gen) for _ in range(2))
    global_bias = None
    if bias:
        global_bias = torch.zeros(n_glb, device=DEVICE)
        global_bias[-5:] = float("-inf")  # remainder slots past the live ones
    want = reference.decode_attention(q_loc, k_loc, v_loc, q_glb, k_glb, v_glb, scale=0.3, global_bias=global_bias)
    got = triton_attn.decode_attention(q_loc, k_loc, v_loc, q_glb, k_glb, v_glb, scale=0.3, global_bias=global_bias)
    for name, g, w in zip(("out", "lse", "received"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="global_bias"):
        triton_attn.decode_attention(q_loc, k_loc, v_loc, q_glb, k_glb, v_glb, scale=0.3,
                                     global_bias=torch.zeros(n_glb + 1, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_reads_the_window_at_a_device_offset(dtype):
    """`window=(start, length)` over whole key buffers (the offset a tensor, as a replayed graph has it) equals
    the call on the window's slice, in both backends; `received_into` gets the probabilities added at the
    window's rows and nowhere else."""
    gen = torch.Generator().manual_seed(21)
    hkv, group, d, rows, start, length, n_glb = 2, 3, 32, 90, 17, 40, 24
    q_loc, q_glb = _rand(hkv * group, d, dtype=dtype, gen=gen), _rand(hkv * group, d, dtype=torch.float32, gen=gen)
    k_buf, v_buf = (_rand(hkv, rows, d, dtype=dtype, gen=gen) for _ in range(2))
    k_glb, v_glb = (_rand(hkv, n_glb, d, dtype=dtype, gen=gen) for _ in range(2))
    offset = torch.tensor([start], device=DEVICE)
    for ops in (reference, triton_attn):
        sliced = ops.decode_attention(q_loc, k_buf[:, start : start + length], v_buf[:, start : start + length],
                                      q_glb, k_glb, v_glb, scale=0.3)
        scores = torch.rand(hkv, rows, generator=gen).to(DEVICE)
        before = scores.clone()
        out, lse, received = ops.decode_attention(q_loc, k_buf, v_buf, q_glb, k_glb, v_glb, scale=0.3,
                                                  window=(offset, length), received_into=scores)
        torch.testing.assert_close(out, sliced[0], rtol=0, atol=0)
        torch.testing.assert_close(lse, sliced[1], rtol=0, atol=0)
        assert received is scores
        torch.testing.assert_close(scores[:, start : start + length], before[:, start : start + length] + sliced[2],
                                   rtol=1e-6, atol=1e-7)
        assert torch.equal(scores[:, :start], before[:, :start]) and torch.equal(scores[:, start + length :],
                                                                                  before[:, start + length :])
        fresh = ops.decode_attention(q_loc, k_buf, v_buf, q_glb, k_glb, v_glb, scale=0.3, window=(offset, length))
        assert fresh[2].shape == (hkv, length)
        torch.testing.assert_close(fresh[2], sliced[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="window start"):
        triton_attn.decode_attention(q_loc, k_buf, v_buf, q_glb, k_glb, v_glb, scale=0.3, window=(start, length))
    with pytest.raises(ValueError, match="window length"):
        triton_attn.decode_attention(q_loc, k_buf, v_buf, q_glb, k_glb, v_glb, scale=0.3, window=(offset, rows + 1))
    with pytest.raises(ValueError, match="received_into"):
        triton_attn.decode_attention(q_loc, k_buf, v_buf, q_glb, k_glb, v_glb, scale=0.3, window=(offset, length),
                                     received_into=torch.zeros(hkv, length, device=DEVICE))


@pytest.mark.parametrize("block_size, live", [(16, 5), (24, 0), (8, 8)])
def test_decode_attention_reads_blocks_by_id_and_the_remainder_where_they_lie(block_size, live):
    """`blocks` (a store and the selected ids) and `remainder` (rows at a device offset, the first `live`
    seen) as global keys after k_glb: as the call on those keys gathered into one buffer with the unseen
    remainder rows biased out, in both backends (block sizes below, at and across a tile)."""
    gen = torch.Generator().manual_seed(block_size + live)
    hkv, group, d, n_sink, n_store, rows, start = 2, 4, 32, 4, 9, 60, 13
    dtype = torch.bfloat16
    q_loc, q_glb = _rand(hkv * group, d, dtype=dtype, gen=gen), _rand(hkv * group, d, dtype=torch.float32, gen=gen)
    k_loc, v_loc = (_rand(hkv, 40, d, dtype=dtype, gen=gen) for _ in range(2))
    sink_k, sink_v = (_rand(hkv, n_sink, d, dtype=dtype, gen=gen) for _ in range(2))
    store_k, store_v = (_rand(n_store, hkv, block_size, d, dtype=dtype, gen=gen) for _ in range(2))
    rem_k, rem_v = (_rand(hkv, rows, d, dtype=dtype, gen=gen) for _ in range(2))
    ids = torch.tensor([[7, 2, 5]], device=DEVICE)
    slots = block_size
    joined_k = torch.cat((sink_k, store_k[ids[0]].transpose(0, 1).reshape(hkv, -1, d), rem_k[:, start : start + slots]),
                         dim=1)
    joined_v = torch.cat((sink_v, store_v[ids[0]].transpose(0, 1).reshape(hkv, -1, d), rem_v[:, start : start + slots]),
                         dim=1)
    bias = torch.zeros(joined_k.shape[1], device=DEVICE)
    bias[n_sink + 3 * block_size + live :] = float("-inf")
    at, seen = torch.tensor([start], device=DEVICE), torch.tensor([live], device=DEVICE)
    for ops in (reference, triton_attn):
        want = ops.decode_attention(q_loc, k_loc, v_loc, q_glb, joined_k, joined_v, scale=0.3, global_bias=bias)
        got = ops.decode_attention(q_loc, k_loc, v_loc, q_glb, sink_k, sink_v, scale=0.3,
                                   blocks=(store_k, store_v, ids), remainder=(rem_k, rem_v, at, slots, seen))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block ids"):
        triton_attn.decode_attention(q_loc, k_loc, v_loc, q_glb, sink_k, sink_v, scale=0.3,
                                     blocks=(store_k, store_v, ids.expand(2, -1)))
    with pytest.raises(ValueError, match="remainder live count"):
        triton_attn.decode_attention(q_loc, k_loc, v_loc, q_glb, sink_k, sink_v, scale=0.3,
                                     remainder=(rem_k, rem_v, at, slots, live))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_prologue_matches_reference(dtype, hq=6, hkv=2, d=32, cap=20):
    """The static decode step's rotation and tail writes in one launch: the rotated query, and the tail's
    column `write` (k, v, rotated k, score zeroed) as the torch ops leave them, bit-identical in 16-bit dtypes;
    nothing else in the tail touched."""
    from inf_llm.memory import RotaryTable

    gen = torch.Generator().manual_seed(31)
    q = (_rand(hq, 1, d, dtype=torch.float32, gen=gen) * 8).to(dtype)
    k, v = ((_rand(hkv, 1, d, dtype=torch.float32, gen=gen) * 8).to(dtype) for _ in range(2))
    cos, sin = RotaryTable((1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).to(DEVICE), d).cos_sin(0, 300, dtype)
    angle, write = torch.tensor([217], device=DEVICE), torch.tensor([11], device=DEVICE)
    tails = _rand(3, hkv, cap, d, dtype=dtype, gen=gen)
    score = torch.rand(hkv, cap, generator=gen).to(DEVICE)
    results = []
    for ops in (reference, triton_attn):
        bufs = [t.clone() for t in tails] + [score.clone()]
        results.append((ops.decode_prologue(q, k, v, cos, sin, angle, write, *bufs), *bufs))
    for got, want in zip(*results):
        if dtype == torch.float32:  # the compiler may fuse a product into the sum (one rounding less)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
        else:
            assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    _, tail_k, tail_v, _, tail_score = results[1]
    assert torch.equal(tail_k[:, 11], k[:, 0]) and torch.equal(tail_v[:, 11], v[:, 0])
    assert torch.equal(tail_score[:, 11], torch.zeros(hkv, device=DEVICE))
    others = [c for c in range(cap) if c != 11]
    assert torch.equal(tail_k[:, others], tails[0][:, others]) and torch.equal(tail_score[:, others], score[:, others])
    with pytest.raises(ValueError, match="write"):
        triton_attn.decode_prologue(q, k, v, cos, sin, angle, 11, *[t.clone() for t in tails], score.clone())


@pytest.mark.parametrize("variant", ["device", "direct-fp8"])
def test_static_decode_step_on_the_triton_ops_equals_the_ordinary_step(variant):
    """The fixed-shape decode step (window read at a device offset, its scores added in place) on the Triton
    ops against the ordinary decode step on the same ops: the same outputs, lookups and window scores; with
    blocks on the device, and stored as fp8 codes read through the device cache (offload_access: direct)."""
    from inf_llm.config import ModelConfig
    from inf_llm.memory import ContextMemory, RotaryTable
    from inf_llm.memory.static_step import StaticDecodeStep

    d, hq, hkv, n, prefill = 16, 4, 2, 150, 100
    direct = variant == "direct-fp8"
    extra = dict(offload_access="direct", pin_memory=True, offload_dtype="fp8", max_cached_block=64) if direct else {}
    cfg = ModelConfig(type="inf-llm", n_init=4, n_local=32, block_size=8, topk=3, repr_topk=2, exc_block_size=8,
                      **extra)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).to(DEVICE)
    ordinary, static = (ContextMemory(cfg, RotaryTable(inv_freq, d), hq, hkv, d, torch.float32, DEVICE, triton_attn,
                                      offload=direct, device_lookup=True) for _ in range(2))
    assert static.store.codec is not None if direct else static.store.codec is None
    gen = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(h, n, d, generator=gen).to(DEVICE) for h in (hq, hkv, hkv))
    for memory in (ordinary, static):
        memory.process(q[:, :prefill], k[:, :prefill], v[:, :prefill], 0.25)
    step, planned = StaticDecodeStep(static), 0
    for p in range(prefill, n):
        want = ordinary.process(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], 0.25)
        plan = step.plan()
        if plan is None:
            got = static.process(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], 0.25)
        else:
            planned += 1
            step.args.copy_(torch.tensor(plan))
            got = step.run(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], 0.25)
            step.advance()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert static.retrieved_last == ordinary.retrieved_last
    assert planned > 20
    first, end = ordinary.tail.first_pos, ordinary.tail.end_pos
    torch.testing.assert_close(static.tail.scores(first, end), ordinary.tail.scores(first, end), rtol=1e-5, atol=1e-6)


def test_reexports_match_reference():
    """Callers may take the mask helpers and the torch-only op from either backend module."""
    for name in ("window_mask", "prefix_mask", "masked_attention", "NEG_INF"):
        assert getattr(triton_attn, name) is getattr(reference, name)
    for name in ("windowed_attention", "prefix_attention", "merge_partials", "window_key_scores", "global_stage_into",
                 "gather_blocks", "form_blocks", "rotate", "refine_topk", "cache_blocks"):
        assert name in triton_attn.__all__


# ---------------------------------------------------------------------------------------------------------
# GPU sizes (Mistral-7B heads: Hq 32, Hkv 8, D 128); also D 64 and other group ratios

needs_gpu = pytest.mark.skipif(INTERPRET, reason="needs a GPU (interpreter is too slow at these sizes)")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# Every case in bf16 (the served dtype); fp16 and fp32 on the cheaper ones (each new shape/dtype on the GPU
# costs a compile and, for prefill sizes, an autotuning pass).
GPU_WINDOW_CASES = [
    pytest.param(1, 8, 4, 512, 4608, 128, 4096, 4096, BF16, id="prefill-exec-block-bf16"),
    pytest.param(1, 8, 4, 1, 4096, 128, 4095, 4096, BF16, id="decode-local-bf16"),
    pytest.param(1, 8, 4, 1, 4096, 128, 4095, 4096, FP16, id="decode-local-fp16"),
    pytest.param(1, 8, 4, 1, 4096, 128, 4095, 4096, FP32, id="decode-local-fp32"),
    pytest.param(2, 4, 3, 333, 1500, 64, 1167, 1000, BF16, id="d64-g3-odd-bf16"),
    pytest.param(2, 4, 3, 333, 1500, 64, 1167, 1000, FP32, id="d64-g3-odd-fp32"),
    pytest.param(1, 8, 1, 257, 257, 128, 0, None, BF16, id="causal-g1-bf16"),
    pytest.param(1, 8, 1, 257, 257, 128, 0, None, FP16, id="causal-g1-fp16"),
    pytest.param(1, 2, 4, 7, 5000, 64, 4990, 4096, BF16, id="short-chunk-split-bf16"),
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("b,hkv,group,lq,lk,d,q_offset,window,dtype", GPU_WINDOW_CASES)
def test_windowed_attention_gpu(b, hkv, group, lq, lk, d, q_offset, window, dtype):
    test_windowed_attention(b, hkv, group, lq, lk, d, q_offset, window, dtype)


@pytest.mark.gpu
@needs_gpu
def test_windowed_attention_token_major_out_gpu():
    """The Mistral-7B local stage's shape (the tuned launch) with token_major_out."""
    test_windowed_attention_token_major_out(1, 8, 4, 512, 4608, 128, 4096, 4096)


GPU_PREFIX_CASES = [
    pytest.param(1, 8, 4, 512, 2176 + 300, 128, "global", BF16, id="prefill-global-bf16"),
    pytest.param(1, 8, 4, 1, 2176, 128, [2176], BF16, id="decode-global-bf16"),
    pytest.param(1, 8, 4, 1, 2176, 128, [2176], FP32, id="decode-global-fp32"),
    pytest.param(1, 4, 3, 100, 999, 64, None, BF16, id="d64-g3-random-bf16"),
    pytest.param(1, 4, 3, 100, 999, 64, None, FP16, id="d64-g3-random-fp16"),
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("b,hkv,group,lq,lk,d,vis,dtype", GPU_PREFIX_CASES)
def test_prefix_attention_gpu(b, hkv, group, lq, lk, d, vis, dtype):
    if vis == "global":  # blocks + init all visible, then a growing part of the remainder
        vis = (2176 + torch.arange(lq) * 300 // lq).tolist()
    test_prefix_attention(b, hkv, group, lq, lk, d, vis, dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("hsel, x, k, first, n", [(1, 1024, 16, 900, 964), (8, 128, 16, 4000, 4003),
                                                 (1, 1024, 16, 4000, 4000)])
def test_refine_topk_gpu(hsel, x, k, first, n):
    """Mistral-7B lookups (8 KV heads x 128, or per head): ~1K and ~4K blocks, up to 64 formed since."""
    _check_refine_topk(hsel, x, k, first, n)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_decode_attention_gpu(dtype):
    """The static decode step's shapes for Mistral-7B: a 4096-key window, 128 sinks + 16 blocks of 128 + 128
    remainder slots (the last hidden), 32 query heads on 8 KV heads of 128; and a D 64 group-3 case."""
    _check_decode_attention(8, 4, 128, 4096, 128 + 16 * 128 + 128, True, dtype, seed=1)
    _check_decode_attention(4, 3, 64, 1000, 300, False, dtype, seed=2)


@pytest.mark.gpu
@needs_gpu
def test_form_blocks_into_pinned_host_memory_gpu():
    """offload_access: direct forms blocks straight into the pinned host store."""
    test_form_blocks_writes_store_slots_and_representatives(128, BF16, True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("codec", ["fp8", "int8"])
def test_form_blocks_encodes_codes_gpu(codec):
    """Mistral-7B blocks (8 KV heads x 128 tokens x 128, bf16) encoded by the formation kernel into pinned host
    memory, bit for bit as the codec's torch ops encode them on the GPU."""
    test_form_blocks_encodes_codes_as_the_codec_does(codec, BF16, True, hkv=8, n=16, block_size=128, d=128)


@pytest.mark.gpu
@needs_gpu
def test_cache_blocks_gpu():
    """Mistral-7B blocks (8 KV heads x 128 tokens x 128) read from a pinned host store into a 32-slot cache
    by 16-block selections."""
    _check_cache_blocks(300, 8, 128, 128, 32, 16, steps=20, pinned=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("codec", ["fp8", "int8"])
def test_direct_memory_with_a_codec_gpu(codec):
    """offload_dtype with offload_access: direct on a GPU: codes in pinned host memory, decoded by the gather
    kernel on its way into the device cache (and the static decode step over them)."""
    test_cache_blocks_decodes_a_store_of_codes(codec, pinned=True)
    test_direct_memory_with_a_codec_matches_host_path(codec)
    if codec == "fp8":
        test_static_decode_step_on_the_triton_ops_equals_the_ordinary_step("direct-fp8")


@pytest.mark.gpu
@needs_gpu
def test_refine_and_cache_gpu():
    """Mistral-7B: lookup vectors of 8 KV heads x 128, ~1K blocks, 16 selected into 192 slots, pinned store."""
    _check_refine_and_cache(1000, 8, 128, 128, 192, 16, 1024, steps=30, pinned=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("one_angle", [False, True])
def test_rotate_gpu(one_angle):
    """Bit-identity with the torch rotation where it matters, on the GPU (the compiler must not fuse a
    product into the sum): Mistral-7B's 32 heads of 128, a prefill chunk of 8191 rows, bf16."""
    test_rotate_matches_reference_on_a_transposed_view(one_angle, BF16, h=32, length=8191, d=128)


@pytest.mark.gpu
@needs_gpu
def test_window_key_scores_gpu():
    test_window_key_scores(1, 8, 4, 512, 4608, 128, 4096, 4096, BF16)
    test_window_key_scores(1, 4, 3, 77, 900, 64, 850, 300, FP32)


@pytest.mark.gpu
@needs_gpu
def test_global_stage_into_gpu():
    """One execution block at Mistral-7B's shape: 512 queries, 128 sinks, 16 of 40 blocks of 128, a
    remainder of 300 of which the rows see a growing prefix; and a D 64 fp16 case with per-head ids."""
    test_global_stage_into(8, 4, 512, 128, 128, 40, 128, 16, 300, -200, False, BF16)
    test_global_stage_into(4, 3, 100, 64, 16, 9, 64, 5, 70, 3, True, FP16)


@pytest.mark.gpu
@needs_gpu
def test_decode_ops_capture_in_cuda_graph():
    """The decode ops launch without host syncs, so a CUDA graph can replay them."""
    q, k, v = _qkv(1, 8, 4, 1, 4096, 128, torch.bfloat16)
    visible = torch.tensor([2000], device=DEVICE)

    def step():
        o1, l1 = triton_attn.windowed_attention(q, k, v, scale=0.088, q_offset=4095, window=4096)
        o2, l2 = triton_attn.prefix_attention(q, k[:, :, :2176], v[:, :, :2176], scale=0.088, visible=visible)
        return triton_attn.merge_partials(o1, l1, o2, l2)

    expected = step()  # also compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])


@pytest.mark.gpu
@needs_gpu
def test_static_decode_step_ops_replay_in_a_cuda_graph():
    """The static decode step's ops with every per-step value on the device (the prologue's angle and write
    column, the window's and the remainder's offsets, the remainder's live count, the block ids), captured
    once and replayed with new values: each replay equals an eager call with those values."""
    from inf_llm.memory import RotaryTable

    gen = torch.Generator().manual_seed(41)
    hkv, group, d, cap, n_local, bs, n_store, topk = 8, 4, 128, 6000, 4096, 128, 40, 16
    q, k, v = (_rand(h, 1, d, dtype=BF16, gen=gen) for h in (hkv * group, hkv, hkv))
    q_glb = _rand(hkv * group, d, dtype=torch.float32, gen=gen)
    cos, sin = RotaryTable((1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).to(DEVICE), d).cos_sin(0, 5000, BF16)
    sink_k, sink_v = (_rand(hkv, 128, d, dtype=BF16, gen=gen) for _ in range(2))
    store_k, store_v = (_rand(n_store, hkv, bs, d, dtype=BF16, gen=gen) for _ in range(2))
    tail = [_rand(hkv, cap, d, dtype=BF16, gen=gen) for _ in range(3)] + [torch.zeros(hkv, cap, device=DEVICE)]
    args = torch.zeros(6, dtype=torch.int64, device=DEVICE)  # write, window, remainder, live, angle, and spare

    def step(values, buffers):
        write, window, rem, live, angle, ids = values
        tail_k, tail_v, tail_k_rot, score = buffers
        q_loc = triton_attn.decode_prologue(q, k, v, cos, sin, angle, write, tail_k, tail_v, tail_k_rot, score)
        return triton_attn.decode_attention(
            q_loc[:, 0], tail_k_rot, tail_v, q_glb, sink_k, sink_v, scale=0.088, window=(window, n_local),
            received_into=score, blocks=(store_k, store_v, ids), remainder=(tail_k, tail_v, rem, bs, live))[:2]

    ids = torch.randperm(n_store, generator=gen)[:topk].to(DEVICE)[None]
    device_values = (args[0:1], args[1:2], args[2:3], args[3:4], args[4:5], ids)
    graph_buffers = [t.clone() for t in tail]
    args.copy_(torch.tensor([4300, 205, 77, 0, 10, 0]))
    step(device_values, graph_buffers)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(device_values, graph_buffers)
    for values in ([4301, 206, 78, 5, 11, 0], [4400, 305, 170, 100, 999, 0]):
        args.copy_(torch.tensor(values))
        ids.copy_(torch.randperm(n_store, generator=gen)[:topk].to(DEVICE)[None])
        eager_buffers = [t.clone() for t in graph_buffers]
        expected = step(tuple(torch.tensor([x], device=DEVICE) for x in values[:5]) + (ids.clone(),), eager_buffers)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])
        for got, want in zip(graph_buffers, eager_buffers):
            assert torch.equal(got, want)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q", *([] if INTERPRET else ["-m", "gpu"])]))
