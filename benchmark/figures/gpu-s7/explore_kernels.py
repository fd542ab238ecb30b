"""Ran on the H200 at 247b41f plus exploration hooks (KEY_SCORES_OPTIONS, GLOBAL_STAGE_TILES) removed after the
choice. Exploration: window_key_scores and global_stage_into variants at the exec-block shape."""
import itertools
import json
import math
import os

import torch
import triton
import triton.testing

from inf_llm.kernels import reference
from inf_llm.kernels import triton_attn as ta

dev = torch.device("cuda")
torch.manual_seed(0)
hq, hkv, d, lq, n_local = 32, 8, 128, 512, 4096
lk = n_local + lq
scale = 1 / math.sqrt(d)
q = torch.randn(1, hq, lq, d, device=dev).bfloat16()
k = torch.randn(1, hkv, lk, d, device=dev).bfloat16()
v = torch.randn(1, hkv, lk, d, device=dev).bfloat16()
_, lse = reference.windowed_attention(q, k, v, scale=scale, q_offset=n_local, window=n_local)
gold = reference.window_key_scores(q.float(), k.float(), scale=scale, q_offset=n_local, window=n_local, lse=lse)
out = torch.zeros(1, hkv, lk, device=dev)
res = {"scores": [], "global": []}
args = (q, k, lse, out, *q.stride()[:3], *k.stride()[:3], *lse.stride(), *out.stride()[:2], hkv, lq, lk, n_local,
        n_local, scale * ta._LOG2E, 2048)
for (bm, bn, w, st), defer, skip in itertools.product(
        [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 2), (64, 64, 4, 2),
         (32, 64, 4, 3), (64, 32, 4, 3)], [False, True], [False, True]):
    def run():
        ta._window_key_scores_kernel[(triton.cdiv(lk, bn), hkv)](
            *args, GROUP=4, HEAD_DIM=d, DOT_PRECISION=None, INTERPRETER=False, ACCUMULATE=False,
            DEFER_SUM=defer, SKIP_INTERIOR_MASKS=skip, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    try:
        run()
        err = (out - gold).abs().max().item() / gold.abs().max().item()
        ms = triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median")
    except Exception as exc:  # noqa: BLE001
        ms, err = float("nan"), repr(exc)[:80]
    row = dict(cfg=(bm, bn, w, st), defer=defer, skip=skip, us=ms * 1e3, rel_err=err)
    res["scores"].append(row)
    print("scores", row, flush=True)

n_store, topk, bs, n_init, rem = 64, 16, 128, 128, 384
store_k = torch.randn(n_store, hkv, bs, d, device=dev).bfloat16()
store_v = torch.randn(n_store, hkv, bs, d, device=dev).bfloat16()
ids = torch.randperm(n_store)[:topk].to(dev)[None]
sink_k, sink_v = k[0, :, :n_init], v[0, :, :n_init]
rem_k, rem_v = k[0, :, 1000:1000 + rem], v[0, :, 1000:1000 + rem]
o0, l0 = reference.windowed_attention(q, k, v, scale=scale, q_offset=n_local, window=n_local)
o0, l0 = o0[0].clone(), l0[0].clone()
wo, wl = o0.clone(), l0.clone()
ro, rl = o0.clone(), l0.clone()
reference.global_stage_into(q[0], ro, rl, sink_k, sink_v, store_k, store_v, ids, rem_k, rem_v, rem_offset=-(lq - rem),
                            scale=scale)
for bm, bn, w, st in [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 2), (128, 64, 8, 3),
                      (64, 128, 4, 2), (64, 128, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3)]:
    ta.GLOBAL_STAGE_TILES.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    def run():
        wo.copy_(o0)
        wl.copy_(l0)
        ta.global_stage_into(q[0], wo, wl, sink_k, sink_v, store_k, store_v, ids, rem_k, rem_v,
                             rem_offset=-(lq - rem), scale=scale)
    try:
        run()
        err = (wo.float() - ro.float()).abs().max().item()
        ms = triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median")
    except Exception as exc:  # noqa: BLE001
        ms, err = float("nan"), repr(exc)[:80]
    row = dict(cfg=(bm, bn, w, st), us=ms * 1e3, err=err)
    res["global"].append(row)
    print("global", row, flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "explore.json"), "w"), indent=1)
