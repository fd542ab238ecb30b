"""Kernel benchmark: each Triton attention op (`inf_llm.kernels.triton_attn`) against its torch reference at
the sizes one InfLLM layer step has for a Mistral-7B-shaped model (Hq 32, Hkv 8, D 128, bf16).

    python -m benchmark.kernels_bench --out artifacts/kernels_bench.json          # on a GPU
    python -m benchmark.kernels_bench --smoke --out /tmp/kernels_smoke.json       # CPU, Triton interpreter

Cases (defaults; every size is a flag):
- prefill local:  windowed_attention, one exec block of Lq 512 over Lk 4608 keys, window 4096
  (queries at positions 4096..4607); then window_key_scores on the same shapes.
- prefill global: prefix_attention, Lq 512 over topk*block_size + n_init + remainder keys
  (16*128 + 128 + 384); query i sees the blocks and sinks and a growing part of the remainder.
- merge of the two partials (B, Hq, 512, D).
- prefill global in place: global_stage_into (the device path's global stage: sinks, topk blocks read by id
  from a store, the remainder, merged into the local partial); each call first copies the 4 MB local
  partial back.
- decode: one query over 4096 local keys and 2176 global keys, and their merge; "decode step" is the three
  ops together, the attention cost of one layer per token.
- layer: transformers' RMSNorm and SiLU-and-multiply over a prefill chunk (8192 x 4096 and 8192 x 14336),
  the fused kernels of `model.fused_elementwise` against the torch expressions of the stock modules.
Times are medians of `triton.testing.do_bench` (CUDA events, eager: at these sizes the Python launch cost of
an op, tens of microseconds, can exceed its GPU time, so eager numbers move with the host CPU) and, for the
Triton ops, of `do_bench_cudagraph` (CUDA-graph replay: the GPU time alone). TFLOP/s and GB/s use the
graph time where there is one. The reference column is the torch path (`inf_llm.kernels.reference`,
explicit float32 softmax on GPU; it cannot be captured: it syncs on fully masked rows). The smoke run uses
tiny sizes and wall clock, only to show the script works end to end.

Prints a table and writes JSON (--out). Knows nothing of models or memory: tensors in, timings out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMOKE_REPS = 1  # wall-clock repetitions in the interpreter: only proves the script runs


@dataclass
class Row:
    """One timed op: Triton vs reference on the same inputs."""

    case: str
    op: str
    shape: str
    triton_ms: float
    reference_ms: float
    speedup: float
    out_err: float  # max |triton - reference| of the output (same dtype)
    lse_err: float  # max |triton - reference| of lse over finite entries (nan for ops without lse)
    tflops: float  # useful attention FLOP/s (4 * D per visible query-key pair and head), nan if n/a
    gbps: float  # K/V (and Q/out) bytes touched once / time, nan if n/a
    graph_ms: float = float("nan")  # CUDA-graph replay of the Triton op: GPU time without Python launch cost


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, Triton interpreter on CPU if no GPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=32, help="Hq (Mistral-7B: 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="Hkv (Mistral-7B: 8)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--exec-block", type=int, default=512, help="exc_block_size: queries per prefill step")
    p.add_argument("--n-local", type=int, default=4096, help="local window")
    p.add_argument("--n-init", type=int, default=128, help="initial (sink) tokens")
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--remainder", type=int, default=384, help="global-stage keys after blocks and sinks")
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk (rows of the elementwise layer ops)")
    p.add_argument("--intermediate", type=int, default=14336, help="MLP width (Mistral-7B: 14336)")
    args = p.parse_args(argv)
    if args.smoke:
        args.q_heads, args.kv_heads, args.head_dim = 4, 2, 64
        args.exec_block, args.n_local, args.n_init = 8, 24, 4
        args.topk, args.block_size, args.remainder = 2, 8, 5
        args.chunk, args.intermediate = 64, 384
    return args


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(SMOKE_REPS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _graph_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    import triton.testing

    fn()  # compile and choose configs outside the capture
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(b)
    return (a.float()[fin] - b.float()[fin]).abs().max().item() if bool(fin.any()) else 0.0  # host sync: bench


def main(argv=None) -> int:
    args = _parse(argv)
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    device = accel if accel is not None else torch.device("cpu")
    if device.type == "cpu":
        if not args.smoke:
            raise SystemExit("no GPU found: the full benchmark needs one (use --smoke to check the script on CPU)")
        # Must be set before triton_attn defines its kernels (and stays set while they launch).
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    from inf_llm.kernels import reference, triton_attn

    dtype = DTYPES[args.dtype]
    b, hq, hkv, d = args.batch, args.q_heads, args.kv_heads, args.head_dim
    lq = args.exec_block
    scale = 1 / math.sqrt(d)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    elem = torch.finfo(dtype).bits // 8
    rows: list[Row] = []

    def add(case, op, shape, tri_fn, ref_fn, pairs=None, kv_bytes=None):
        got, want = tri_fn(), ref_fn()
        if isinstance(got, tuple):
            out_err, lse_err = _max_err(got[0], want[0]), _max_err(got[1], want[1])
        else:
            out_err, lse_err = _max_err(got, want), float("nan")
        t_ms, r_ms, g_ms = _time_ms(tri_fn, device), _time_ms(ref_fn, device), _graph_ms(tri_fn, device)
        gpu_ms = t_ms if math.isnan(g_ms) else g_ms
        rows.append(Row(
            case=case, op=op, shape=shape, triton_ms=t_ms, reference_ms=r_ms, speedup=r_ms / t_ms,
            out_err=out_err, lse_err=lse_err,
            tflops=(4 * d * pairs * b * hq / (gpu_ms * 1e-3) / 1e12) if pairs is not None else float("nan"),
            gbps=(kv_bytes / (gpu_ms * 1e-3) / 1e9) if kv_bytes is not None else float("nan"),
            graph_ms=g_ms,
        ))

    # ---- prefill, local stage: one exec block at the end of the window
    lk_local = args.n_local + lq
    q = rand(b, hq, lq, d)  # (B, Hq, Lq, D)
    k, v = rand(b, hkv, lk_local, d), rand(b, hkv, lk_local, d)  # (B, Hkv, Lk, D)
    kw = dict(scale=scale, q_offset=args.n_local, window=args.n_local)
    pairs = int(reference.window_mask(lq, lk_local, args.n_local, args.n_local, torch.device("cpu")).sum())
    shape = f"Lq {lq} Lk {lk_local} window {args.n_local}"
    add("prefill local", "windowed_attention", shape,
        lambda: triton_attn.windowed_attention(q, k, v, **kw), lambda: reference.windowed_attention(q, k, v, **kw),
        pairs=pairs)
    _, lse_local = reference.windowed_attention(q, k, v, **kw)
    add("prefill local", "window_key_scores", shape,
        lambda: triton_attn.window_key_scores(q, k, lse=lse_local, **kw),
        lambda: reference.window_key_scores(q, k, lse=lse_local, **kw),
        pairs=pairs // 2)  # one dot per pair: half the attention FLOPs

    # ---- prefill, global stage: retrieved blocks + sinks, then a growing part of the remainder
    n_fixed = args.topk * args.block_size + args.n_init
    lk_global = n_fixed + args.remainder
    kg, vg = rand(b, hkv, lk_global, d), rand(b, hkv, lk_global, d)
    visible = n_fixed + torch.arange(lq, device=device) * args.remainder // lq  # (Lq,)
    pairs = int(visible.sum())  # host sync: bench set-up
    add("prefill global", "prefix_attention", f"Lq {lq} Lk {lk_global}",
        lambda: triton_attn.prefix_attention(q, kg, vg, scale=scale, visible=visible),
        lambda: reference.prefix_attention(q, kg, vg, scale=scale, visible=visible),
        pairs=pairs)
    oa, la = reference.windowed_attention(q, k, v, **kw)
    ob, lb = reference.prefix_attention(q, kg, vg, scale=scale, visible=visible)
    add("prefill merge", "merge_partials", f"(B, Hq, {lq}, D)",
        lambda: triton_attn.merge_partials(oa, la, ob, lb), lambda: reference.merge_partials(oa, la, ob, lb),
        kv_bytes=3 * oa.numel() * elem + 3 * la.numel() * 4)

    # ---- prefill, global stage in place (the device path): sinks + topk blocks read from a store by id +
    # the remainder, merged into the local partial
    n_store = max(4 * args.topk, 64)
    store_k = rand(n_store, hkv, args.block_size, d)  # (N, Hkv, block_size, D)
    store_v = rand(n_store, hkv, args.block_size, d)
    ids = torch.randperm(n_store, generator=gen)[: args.topk].to(device)[None]  # (1, topk)
    sink_k, sink_v = kg[0, :, : args.n_init], vg[0, :, : args.n_init]
    rem_k, rem_v = kg[0, :, n_fixed:], vg[0, :, n_fixed:]
    base_out, base_lse = oa[0].clone(), la[0].clone()
    work_out, work_lse = base_out.clone(), base_lse.clone()

    def global_in_place(ops):
        def run():  # from the same local partial every time (a 4 MB copy: a few microseconds)
            work_out.copy_(base_out)
            work_lse.copy_(base_lse)
            ops.global_stage_into(q[0], work_out, work_lse, sink_k, sink_v, store_k, store_v, ids, rem_k, rem_v,
                                  rem_offset=-(lq - args.remainder), scale=scale)
            return work_out.clone(), work_lse.clone()
        return run

    rem_pairs = sum(min(max(i - (lq - args.remainder), 0), args.remainder) for i in range(lq))
    add("prefill global", "global_stage_into", f"Lq {lq} Lk {lk_global}",
        global_in_place(triton_attn), global_in_place(reference), pairs=lq * n_fixed + rem_pairs)

    # ---- decode: one query, local window + retrieved global keys
    qd = rand(b, hq, 1, d)
    kd, vd = rand(b, hkv, args.n_local, d), rand(b, hkv, args.n_local, d)
    kdg, vdg = rand(b, hkv, n_fixed, d), rand(b, hkv, n_fixed, d)
    vis_d = torch.tensor([n_fixed], device=device)
    kwd = dict(scale=scale, q_offset=args.n_local - 1, window=args.n_local)
    kv_local = 2 * kd.numel() * elem
    kv_global = 2 * kdg.numel() * elem
    add("decode local", "windowed_attention", f"Lq 1 Lk {args.n_local}",
        lambda: triton_attn.windowed_attention(qd, kd, vd, **kwd),
        lambda: reference.windowed_attention(qd, kd, vd, **kwd),
        pairs=args.n_local, kv_bytes=kv_local)
    add("decode global", "prefix_attention", f"Lq 1 Lk {n_fixed}",
        lambda: triton_attn.prefix_attention(qd, kdg, vdg, scale=scale, visible=vis_d),
        lambda: reference.prefix_attention(qd, kdg, vdg, scale=scale, visible=vis_d),
        pairs=n_fixed, kv_bytes=kv_global)
    oda, lda = reference.windowed_attention(qd, kd, vd, **kwd)
    odb, ldb = reference.prefix_attention(qd, kdg, vdg, scale=scale, visible=vis_d)
    add("decode merge", "merge_partials", "(B, Hq, 1, D)",
        lambda: triton_attn.merge_partials(oda, lda, odb, ldb), lambda: reference.merge_partials(oda, lda, odb, ldb))

    def decode_step(ops):
        o1, l1 = ops.windowed_attention(qd, kd, vd, **kwd)
        o2, l2 = ops.prefix_attention(qd, kdg, vdg, scale=scale, visible=vis_d)
        return ops.merge_partials(o1, l1, o2, l2)

    add("decode step", "local+global+merge", f"Lk {args.n_local} + {n_fixed}",
        lambda: decode_step(triton_attn), lambda: decode_step(reference),
        pairs=args.n_local + n_fixed, kv_bytes=kv_local + kv_global)

    # ---- transformers' elementwise layer ops of a prefill chunk (model.fused_elementwise) against the torch
    # expressions the stock modules compute
    from inf_llm.kernels import triton_elementwise

    hidden = hq * d
    xs, norm_w = rand(args.chunk, hidden), rand(hidden)

    def torch_rms_norm():
        h = xs.float()
        return norm_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(xs.dtype)

    add("layer", "rms_norm", f"{args.chunk} x {hidden}", lambda: triton_elementwise.rms_norm(xs, norm_w, 1e-5),
        torch_rms_norm, kv_bytes=2 * xs.numel() * elem)
    gate, up = rand(args.chunk, args.intermediate), rand(args.chunk, args.intermediate)
    add("layer", "silu_mul", f"{args.chunk} x {args.intermediate}", lambda: triton_elementwise.silu_mul(gate, up),
        lambda: torch.nn.functional.silu(gate) * up, kv_bytes=3 * gate.numel() * elem)

    # The configs the autotuner chose, per key (diagnostics: private attributes of the Triton autotuner).
    tuned = {
        name: {str(key): str(cfg) for key, cfg in getattr(kernel, "cache", {}).items()}
        for name, kernel in (("attention", triton_attn._attn_fwd_tuned),
                             ("window_key_scores", triton_attn._window_key_scores_tuned))
    }
    _report(rows, args, device, triton.__version__, tuned)
    return 0


def _report(rows: list[Row], args, device: torch.device, triton_version: str, tuned: dict) -> None:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.machine()}), Triton interpreter"
    header = f"{'case':<15} {'op':<19} {'shape':<27} {'triton ms':>10} {'ref ms':>9} {'speedup':>8} " \
             f"{'graph ms':>9} {'TFLOP/s':>8} {'GB/s':>7} {'out err':>8} {'lse err':>8}"
    print(f"device: {name}; dtype {args.dtype}; Hq {args.q_heads} Hkv {args.kv_heads} D {args.head_dim}; "
          f"torch {torch.__version__}, triton {triton_version}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.case:<15} {r.op:<19} {r.shape:<27} {r.triton_ms:>10.4f} {r.reference_ms:>9.4f} {r.speedup:>7.1f}x "
              f"{r.graph_ms:>9.4f} {r.tflops:>8.1f} {r.gbps:>7.0f} {r.out_err:>8.1e} {r.lse_err:>8.1e}")
    result = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "dtype": args.dtype,
        "smoke": args.smoke,
        "shape": {k: getattr(args, k) for k in ("batch", "q_heads", "kv_heads", "head_dim", "exec_block", "n_local",
                                                 "n_init", "topk", "block_size", "remainder")},
        "tuned_configs": tuned,
        "rows": [{k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in asdict(r).items()}
                 for r in rows],  # NaN (not applicable) as JSON null
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, chosen in tuned.items():
        for key, cfg in chosen.items():
            print(f"autotuned {name} {key}: {cfg}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
