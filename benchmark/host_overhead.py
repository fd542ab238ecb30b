"""Host time of the fast path's prefill glue, measured on a CPU: ContextMemory's execution-block loop and
the Triton ops' wrappers (validation, argument packing) with every kernel launch replaced by a no-op.

Triton's own launcher and the kernels are left out (they need a GPU), so this isolates the Python this
project owns, which a slow host CPU turns into the prefill's bound (docs/speed.md, "Host or GPU"). The shape is
the Mistral preset's execution-block structure (chunks of 8192, execution blocks of 512, window 4096, top-16
of blocks of 128) with tiny heads, so that the torch ops around the loop cost next to nothing.

    python -m benchmark.host_overhead --out benchmark/results/host-overhead.json

Prints microseconds per execution block (median over the timed chunks) and per chunk-layer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _stub_kernels(triton_attn) -> None:
    """Every Triton kernel of the module launches nothing (the ops launch through their `DirectLauncher`s);
    refine_topk and refine_and_cache (whose ids drive the counts) validate and 'launch' as usual, then
    return the batch's ids."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    from inf_llm.kernels.launcher import DirectLauncher

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    import importlib
    import pkgutil

    from inf_llm.kernels import triton as package

    # the ops look their launchers up in their family's module (inf_llm.kernels.triton.*), not in this one
    families = [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    for module in (triton_attn, *families):
        for name in dir(module):
            if isinstance(getattr(module, name), (InterpretedFunction, Autotuner, DirectLauncher)):
                setattr(module, name, _NoLaunch())
    refine = triton_attn.refine_topk

    def refine_returning_the_batch(values, indices, query, reprs, first, k, **kwargs):
        refine(values, indices, query, reprs, first, k, **kwargs)
        return indices[:, :k]

    triton_attn.refine_topk = refine_returning_the_batch
    refine_and_cache = triton_attn.refine_and_cache

    def refine_and_cache_returning_the_batch(values, indices, query, reprs, first, k, *cache, **kwargs):
        _, slots = refine_and_cache(values, indices, query, reprs, first, k, *cache, **kwargs)
        return indices[:, :k], slots

    triton_attn.refine_and_cache = refine_and_cache_returning_the_batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=8, help="timed prefill chunks (after 3 untimed)")
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--direct", action="store_true",
                   help="offload_access: direct (blocks in host memory, the device cache, the formation ring)")
    p.add_argument("--offload-dtype", choices=["fp8", "int8"], default=None,
                   help="with --direct: a store of codes (offload_dtype), decoded on the way into the device cache")
    p.add_argument("--check", action="store_true",
                   help="with the ops' argument checks (as on a CPU; a GPU's context memory skips them)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print the N functions with the most own time over the timed chunks (cProfile)")
    args = p.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1"  # the wrappers accept CPU tensors only under the interpreter
    import torch

    torch.set_num_threads(1)  # the glue, not the tiny tensor ops, is what is measured
    from inf_llm.config import ModelConfig
    from inf_llm.kernels import triton_attn
    from inf_llm.memory import ContextMemory, RotaryTable

    _stub_kernels(triton_attn)
    d, hq, hkv = 16, 4, 1
    cfg = ModelConfig(type="inf-llm", n_init=128, n_local=4096, block_size=128, topk=16, repr_topk=4,
                      exc_block_size=512, max_cached_block=192,
                      offload_dtype=args.offload_dtype,
                      **({"offload_access": "direct", "async_global_stream": True} if args.direct else {}))
    rope = RotaryTable(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)), d)
    memory = ContextMemory(cfg, rope, hq, hkv, d, torch.bfloat16, torch.device("cpu"), triton_attn,
                           offload=args.direct, device_lookup=True)
    memory._check_ops = args.check  # the GPU path's setting unless asked
    gen = torch.Generator().manual_seed(0)

    def qkv():  # transformers' layout: (H, L, D) views of (L, H, D)
        return [torch.randn(args.chunk, h, d, generator=gen).bfloat16().transpose(0, 1) for h in (hq, hkv, hkv)]

    for _ in range(3):  # past the window: blocks form and lookups run in every execution block
        memory.process(*qkv(), 0.25)
    seconds = []
    inputs = [qkv() for _ in range(args.chunks)]
    for q, k, v in inputs:
        t0 = time.perf_counter()
        memory.process(q, k, v, 0.25)
        seconds.append(time.perf_counter() - t0)
    if args.profile:  # separate chunks: the timings above carry no profiler overhead
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        for q, k, v in [qkv() for _ in range(args.chunks)]:
            profiler.runcall(memory.process, q, k, v, 0.25)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    per_call = statistics.median(seconds)
    exec_blocks = args.chunk // cfg.exc_block_size
    result = {"chunk": args.chunk, "execution_blocks_per_chunk": exec_blocks,
              "chunk_layer_ms": [round(s * 1e3, 3) for s in seconds], "median_chunk_layer_ms": per_call * 1e3,
              "us_per_execution_block": per_call / exec_blocks * 1e6, "torch": torch.__version__}
    print(f"host glue per chunk-layer: median {per_call * 1e3:.2f} ms ({', '.join(f'{s * 1e3:.2f}' for s in seconds)})"
          f"; {result['us_per_execution_block']:.0f} us per execution block; x32 layers = "
          f"{per_call * 32 * 1e3:.0f} ms per chunk of a Mistral-7B")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
