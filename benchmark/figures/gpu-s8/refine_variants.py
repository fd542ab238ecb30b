"""Session 8 exploration: refine_topk (the batched lookup's per-execution-block refinement) with its best K
kept by one bitonic sort or by K arg-max steps, against the lookup it replaced (a GEMV over every block and a
torch top-k), at the Mistral-7B shape (8 KV heads x 128 = 1024 per lookup vector, top-16). CUDA-graph
replay times (GPU time alone). Ran at commit 2467c4a (refine-variants.json); the sort variant and its
`_REFINE_BY_SORT` switch were removed after it. From the repository root:
python benchmark/figures/gpu-s8/refine_variants.py OUT.json
"""

import json
import sys

import torch
import triton

sys.path.insert(0, ".")
from inf_llm.kernels import reference, triton_attn  # noqa: E402

gen = torch.Generator().manual_seed(0)
results = []
for known, new in ((1000, 4), (1000, 32), (1000, 64), (4000, 64)):
    n = known + new
    query = torch.randn(1, 1024, generator=gen).cuda()
    reprs = torch.randn(n, 1024, generator=gen).cuda()
    values, indices = (reprs[:known] @ query[0]).unsqueeze(0).topk(16, dim=-1)
    row = {"known": known, "new": new}
    for sort in (True, False):
        triton_attn._REFINE_BY_SORT = sort
        fn = lambda: triton_attn.refine_topk(values, indices, query, reprs, known, 16)  # noqa: E731
        want = set(reference.refine_topk(values, indices, query, reprs, known, 16)[0].tolist())
        assert set(fn()[0].tolist()) == want
        row["sort_us" if sort else "argmax_us"] = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
    row["gemv_topk_us"] = triton.testing.do_bench_cudagraph(
        lambda: torch.mv(reprs, query[0]).topk(16).indices, rep=50) * 1e3  # noqa: E731
    row["torch_refine_us"] = triton.testing.do_bench_cudagraph(
        lambda: reference.refine_topk(values, indices, query, reprs, known, 16), rep=50) * 1e3  # noqa: E731
    results.append(row)
    print(row, flush=True)
if len(sys.argv) > 1:
    json.dump(results, open(sys.argv[1], "w"), indent=1)
