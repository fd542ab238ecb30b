"""Compile every Triton kernel of inf_llm for an NVIDIA H100 (sm_90) on a machine without a GPU.

Triton ships ptxas, so its whole compiler runs on a CPU. The interpreter that the CPU tests use runs kernels
in numpy and accepts code the compiler refuses; this catches that before GPU time is spent. One launch
configuration per kernel (and per code variant), as the ops launch them for a Mistral-7B layer: bf16, head
dim 128, GQA 4, the tile sizes the wrappers pick.

    python scripts/compile_kernels.py            # prints one line per kernel; exit 1 if any fails

Must run without TRITON_INTERPRET (kernels defined under it are not compilable).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# pointer parameters start with a capital letter, scalars with a small one (the kernels' naming rule); these
# scalars are floats, the others int32 (their specialisation does not change what compiles)
FLOAT_SCALARS = {"qk_scale", "scale", "eps"}
F32, BF16, I64 = "*fp32", "*bf16", "*i64"
D, G = 128, 4  # Mistral-7B: head dim 128, 32 query heads over 8 KV heads

# (kernel, pointer dtypes other than bf16, constexprs, compile options)
CASES = [
    ("_attn_fwd_kernel", {"Lse": F32, "Visible": F32},
     dict(GROUP=G, HEAD_DIM=D, MODE=0, DOT_PRECISION=None, INTERPRETER=False, OUT_TOKEN_MAJOR=True, BLOCK_M=64,
          BLOCK_N=64),
     dict(num_warps=4, num_stages=3)),
    ("_attn_fwd_kernel", {"Out": F32, "Lse": F32, "Visible": I64},  # the split (decode-sized) path, prefix mode
     dict(GROUP=G, HEAD_DIM=D, MODE=1, DOT_PRECISION=None, INTERPRETER=False, OUT_TOKEN_MAJOR=False, BLOCK_M=16,
          BLOCK_N=64),
     dict(num_warps=4, num_stages=3)),
    ("_combine_splits_kernel", {"Ws": F32, "WsLse": F32, "Lse": F32},
     dict(NUM_SPLITS=4, HEAD_DIM=D, BLOCK_R=16, INTERPRETER=False), {}),
    ("_merge_kernel", {"LseA": F32, "LseB": F32, "Lse": F32}, dict(BLOCK_D=D, BLOCK_R=16, INTERPRETER=False), {}),
    ("_window_key_scores_kernel", {"Lse": F32, "Out": F32},
     dict(GROUP=G, HEAD_DIM=D, DOT_PRECISION=None, INTERPRETER=False, ACCUMULATE=True, BLOCK_M=128, BLOCK_N=64),
     dict(num_warps=4, num_stages=3)),
    ("_global_stage_kernel", {"Lse": F32, "Ids": I64},
     dict(PER_HEAD=False, MASK_BLOCKS=False, GROUP=G, HEAD_DIM=D, DOT_PRECISION=None, INTERPRETER=False,
          BLOCK_M=64, BLOCK_N=64),
     dict(num_warps=4, num_stages=2)),
    # the ordinary decode step's call (no window offset; the blocks' and remainder's pointers are placeholders:
    # k_glb) and the static step's (window, blocks and remainder where they lie)
    ("_decode_attn_kernel", {"QGlb": F32, "Bias": F32, "PartO": F32, "PartM": F32, "PartL": F32, "WinS": F32,
                             "LocStart": F32},
     dict(GROUP=G, BLOCK_G=16, HEAD_DIM=D, BLOCK_N=64, HAS_BIAS=True, HAS_START=False, INTERPRETER=False), {}),
    ("_decode_attn_kernel", {"QGlb": F32, "Bias": F32, "PartO": F32, "PartM": F32, "PartL": F32, "WinS": F32,
                             "LocStart": I64, "BlockIds": I64, "RemStart": I64, "RemLive": I64},
     dict(GROUP=G, BLOCK_G=16, HEAD_DIM=D, BLOCK_N=64, HAS_BIAS=False, HAS_START=True, INTERPRETER=False), {}),
    *[("_decode_combine_kernel", {"PartO": F32, "PartM": F32, "PartL": F32, "WinS": F32, "Lse": F32,
                                  "Received": F32, "LocStart": I64},
       dict(GROUP=G, BLOCK_G=16, HEAD_DIM=D, BLOCK_N=64, HAS_START=start, ACCUMULATE=start, INTERPRETER=False), {})
      for start in (False, True)],
    ("_gather_blocks_kernel", {"Ids": I64, "DstRows": I64},
     dict(PER_HEAD=False, INDIRECT=True, HEAD_DIM=D, BLOCK_SIZE=128, BLOCK_T=32, RING=True, CODEC=False,
          INTERPRETER=False), {}),
    # offload_dtype: fp8 with offload_access: direct: codes decoded on the way into the device cache
    ("_gather_blocks_kernel", {"SrcK": "*fp8e4nv", "SrcV": "*fp8e4nv", "Ids": I64, "DstRows": I64, "ScaleK": F32,
                               "ScaleV": F32},
     dict(PER_HEAD=False, INDIRECT=True, HEAD_DIM=D, BLOCK_SIZE=128, BLOCK_T=32, RING=False, CODEC=True,
          INTERPRETER=False), {}),
    *[("_cache_assign_kernel", dict.fromkeys(("Ids", "Tags", "Stamps", "Counters", "Slots", "Fill"), I64),
       dict(K=k, BLOCK_K=k, BLOCK_C=256, PREFETCH=prefetch, INTERPRETER=False), {"num_warps": warps})
      for k, prefetch, warps in ((16, False, 4), (256, True, 16))],
    ("_form_blocks_kernel", {"Score": F32, "Repr": F32},
     dict(HEAD_DIM=D, BLOCK_SIZE=128, BLOCK_P2=128, REPR_TOPK=4, BLOCK_T=32, CODEC=False, MAX_CODE=0.0,
          INTERPRETER=False), {}),
    # offload_dtype fp8 / int8 with offload_access: direct: blocks encoded as they form
    *[("_form_blocks_kernel", {"Score": F32, "Repr": F32, "DstK": code, "DstV": code, "ScaleK": F32, "ScaleV": F32},
       dict(HEAD_DIM=D, BLOCK_SIZE=128, BLOCK_P2=128, REPR_TOPK=4, BLOCK_T=32, CODEC=True, MAX_CODE=max_code,
            INTERPRETER=False), {})
      for code, max_code in (("*fp8e4nv", 448.0), ("*i8", 127.0))],
    ("_refine_topk_kernel", {"Values": F32, "Query": F32, "Reprs": F32,
                             **dict.fromkeys(("Indices", "Out", "Tags", "Stamps", "Counters", "Slots", "Fill"), I64)},
     dict(X=8 * D, K=16, KP=16, BLOCK_C=128, BLOCK_X=64, CACHE=True, BLOCK_K=16, BLOCK_S=256, INTERPRETER=False),
     {"num_warps": 4}),
    ("_rotate_kernel", {}, dict(HALF=D // 2, ONE_ROW=False, BLOCK_L=64, INTERPRETER=False), {}),
    ("_decode_prologue_kernel", {"Angle": I64, "Write": I64, "TailScore": F32}, dict(HALF=D // 2, INTERPRETER=False),
     {}),
    ("_rms_norm_kernel", {}, dict(BLOCK=4096, INTERPRETER=False), {}),
    ("_silu_mul_kernel", {}, dict(BLOCK=1024, INTERPRETER=False), {}),
]


def signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name[0].isupper():
            sig[name] = pointers.get(name, BF16)
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    missing = set(constexprs) ^ {p.name for p in fn.params if p.is_constexpr}
    if missing:
        raise ValueError(f"{fn.__name__}: constexprs {sorted(missing)} missing or unknown")
    return sig


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: kernels defined under the interpreter cannot be compiled", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from inf_llm.kernels import triton_attn, triton_elementwise

    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for name, pointers, constexprs, options in CASES:
        fn = getattr(triton_attn, name, None) or getattr(triton_elementwise, name)
        t0 = time.perf_counter()
        try:
            source = ASTSource(fn=fn, signature=signature(fn, pointers, constexprs), constexprs=constexprs)
            kernel = triton.compile(source, target=target, options=options)
            result = f"ok, {len(kernel.asm['cubin']):,} bytes of cubin"
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the others still compile
            failed += 1
            result = f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        variant = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k != "INTERPRETER")
        print(f"{name} ({variant}): {result} [{time.perf_counter() - t0:.1f} s]", flush=True)
    print(f"{len(CASES) - failed} of {len(CASES)} compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
