"""The Triton backend: fused GPU versions of `inf_llm.kernels.reference`, the ops of `inf_llm.kernels.ops.Ops`
with the same signatures and semantics (every op returns what its namesake there returns, up to
floating-point rounding). Which backend a memory uses is `inf_llm.kernels.get_backend`'s choice.

One module per op family, each with its kernels and their validate-allocate-launch wrappers:

- `attention`: `windowed_attention`, `prefix_attention`, `merge_partials` (flash attention, key splits);
- `global_stage`: `global_stage_into` (the device path's global stage, merged in place);
- `scoring`: `window_key_scores` (the local stage's per-key probability mass);
- `block_cache`: `gather_blocks`, `cache_blocks`, `refine_topk`, `refine_and_cache` (selected blocks to the
  device, the device cache's LRU bookkeeping, the lookup's top-k refinement);
- `formation`: `form_blocks` (new blocks into the store, fp8/int8 encoding included);
- `rope`: `rotate`;
- `decode`: `decode_prologue`, `decode_attention` (the decode step, CUDA-graph capturable);
- `elementwise`: `rms_norm`, `silu_mul` (layer ops of `model.fused_elementwise`, not in the ops protocol);
- `common`: what two or more of them share (jit helpers, host helpers, validators, `INTERPRETED`).

Siblings import only `common` (and `inf_llm.kernels.launcher` / `reference`), never each other. The ops
launch their kernels through `DirectLauncher`s (`inf_llm.kernels.launcher`): Triton's own path costs ~20 us
more host time per launch, and a prefill chunk makes thousands.

No op syncs the device with the host: `visible` counts are read on the device (out-of-range counts are
clamped there, not checked on the host) and every launch decision uses shapes and Python ints only, so the
decode ops can be captured in a CUDA graph.

On CPU the ops run under the Triton interpreter (`TRITON_INTERPRET=1` set when this package is imported and
while its kernels launch), which is how CI tests them. The `INTERPRETER` constexpr works around the Triton
3.6 interpreter's defects (bf16 `tl.dot`, truncating bf16 casts, tensor-bounded `range`, and tl.max & co.
being compiled-only when triton was imported first), leaving the GPU code unchanged; docs/kernels.md lists
them.
"""

from __future__ import annotations

from inf_llm.kernels.reference import NEG_INF, masked_attention, prefix_mask, window_mask
from inf_llm.kernels.triton.attention import LOCAL_STAGE_ROWS, merge_partials, prefix_attention, windowed_attention
from inf_llm.kernels.triton.block_cache import cache_blocks, gather_blocks, refine_and_cache, refine_topk
from inf_llm.kernels.triton.decode import decode_attention, decode_prologue
from inf_llm.kernels.triton.formation import form_blocks
from inf_llm.kernels.triton.global_stage import global_stage_into
from inf_llm.kernels.triton.rope import rotate
from inf_llm.kernels.triton.scoring import window_key_scores

__all__ = [
    "LOCAL_STAGE_ROWS",
    "NEG_INF",
    "cache_blocks",
    "decode_attention",
    "decode_prologue",
    "form_blocks",
    "gather_blocks",
    "global_stage_into",
    "masked_attention",
    "merge_partials",
    "prefix_attention",
    "prefix_mask",
    "refine_and_cache",
    "refine_topk",
    "rotate",
    "window_key_scores",
    "window_mask",
    "windowed_attention",
]
