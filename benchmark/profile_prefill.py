"""Where does prefill time go? cProfile (host) and torch.profiler (kernels) of InfLLM's chunked prefill on a
random-weight model (the shapes of benchmark/speed.py), for finding the next bottleneck of the GPU path.

    python -m benchmark.profile_prefill --tokens 32768 --offload auto --set model.pin_memory=true
    python -m benchmark.profile_prefill --shape tiny --device cpu --dtype float32 --tokens 2048

Prints the host functions by own time and the device kernels by total time; `--out DIR` also writes
them (and a Chrome trace of one chunk) there.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import gc
import io
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.autograd import DeviceType

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.speed import DEFAULT_CONFIG, DTYPES, SHAPE_MEMORY, build_model  # noqa: E402
from inf_llm.adapter import InfLLMCache, cache_kwargs, patch_model  # noqa: E402
from inf_llm.config import load_config  # noqa: E402
from inf_llm.engine.worker import freeze_long_lived_objects  # noqa: E402


def _feed(model, cache, ids: torch.Tensor, start: int, end: int, chunk: int) -> None:
    kw = cache_kwargs(model, cache)
    for a in range(start, end, chunk):
        model(ids[:, a : min(a + chunk, end)], use_cache=True, logits_to_keep=1, **kw)


# the text of torch's sync-debug warning (c10/cuda: warn_or_error_on_sync)
_SYNC_WARNING = "called a synchronizing CUDA operation"


def _watch_syncs(on: bool) -> None:
    """Warn at every operation that makes the host wait for the GPU (torch's sync debug mode), or stop."""
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn" if on else "default")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--tokens", type=int, default=32768, help="prefill tokens profiled (after the warm-up)")
    p.add_argument("--warmup", type=int, default=16384, help="prefill tokens before profiling starts")
    p.add_argument("--type", default="inf-llm")
    p.add_argument("--fattn", choices=("true", "false"), default="true")
    p.add_argument("--offload", choices=("auto", "on", "off"), default="auto", help="host blocks (auto: on GPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--walls-only", action="store_true", help="only the timed chunks: no cProfile, no torch.profiler")
    p.add_argument("--sync-debug", action="store_true",
                   help="with --walls-only: also list the operations that made the host wait for the GPU during the "
                        "timed chunks (torch.cuda.set_sync_debug_mode), by where they were called")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cfg = load_config(
        DEFAULT_CONFIG,
        [*SHAPE_MEMORY[args.shape], f"model.type={args.type}", f"model.fattn={args.fattn}", *args.overrides],
    )
    model = patch_model(build_model(args.shape, device, DTYPES[args.dtype], 0), cfg.model)
    freeze_long_lived_objects()  # as the engine and speed.py do: no full collection rescans them mid-chunk
    offload = {"auto": None, "on": True, "off": False}[args.offload]
    total = args.warmup + args.tokens
    # one more chunk for the torch.profiler pass (a whole prefill chunk, not a single token)
    ids = torch.randint(0, model.config.vocab_size, (1, total + cfg.chunk_size), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    report = io.StringIO()

    with torch.inference_mode():
        cache = InfLLMCache(model, offload=offload)
        _feed(model, cache, ids, 0, args.warmup, cfg.chunk_size)
        sync()
        # wall time per chunk without any profiler: compared below with the kernels' busy time of a chunk,
        # it says whether the GPU waits for the host (wall well above busy) or the host for the GPU
        # host: until the chunk's forward returns (its kernels queued, not run); wall: until they finished
        walls, hosts = [], []
        watch = args.sync_debug and device.type == "cuda"
        with warnings.catch_warnings(record=True) if watch else contextlib.nullcontext([]) as recorded:
            if watch:
                warnings.simplefilter("always")
            for a in range(args.warmup, total, cfg.chunk_size):
                _watch_syncs(watch)
                t0 = time.perf_counter()
                _feed(model, cache, ids, a, min(a + cfg.chunk_size, total), cfg.chunk_size)
                hosts.append(time.perf_counter() - t0)
                _watch_syncs(False)  # the timing's own sync is not one of them
                sync()
                walls.append(time.perf_counter() - t0)
        print(f"{args.type} fattn={args.fattn} offload={args.offload} {args.overrides}: per chunk of "
              f"{cfg.chunk_size}: wall {', '.join(f'{w * 1e3:.1f}' for w in walls)} ms; host (queued) "
              f"{', '.join(f'{h * 1e3:.1f}' for h in hosts)} ms", file=report)
        # torch's warning at each synchronizing operation, by where it was called (not its notice that the mode
        # is a prototype); any other warning recorded meanwhile is shown as usual
        waits = [w for w in recorded if _SYNC_WARNING in str(w.message)]
        for w in recorded:
            if w not in waits:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        if args.sync_debug:  # where the host waited for the GPU inside the timed forwards
            places = collections.Counter(f"{w.filename}:{w.lineno}: {w.message}" for w in waits)
            print(f"host waits for the GPU in the timed chunks: {sum(places.values())}", file=report)
            for place, n in places.most_common(20):
                print(f"  {n:6d}  {place}", file=report)
        if args.walls_only:
            print(report.getvalue())
            return 0
        del cache  # before the next one is made: a host pool is lent to one cache at a time
        gc.collect()
        cache = InfLLMCache(model, offload=offload)  # the cProfile pass repeats the same positions
        _feed(model, cache, ids, 0, args.warmup, cfg.chunk_size)
        sync()
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        _feed(model, cache, ids, args.warmup, total, cfg.chunk_size)
        sync()
        profiler.disable()
        seconds = time.perf_counter() - t0
        print(f"{args.type} fattn={args.fattn} offload={args.offload} {args.overrides}: {args.tokens} tokens "
              f"after {args.warmup} in {seconds:.2f} s = {args.tokens / seconds:,.0f} tokens/s", file=report)
        stats = pstats.Stats(profiler, stream=report)
        stats.sort_stats("tottime").print_stats(args.top)

        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            _feed(model, cache, ids, total, total + cfg.chunk_size, cfg.chunk_size)
            sync()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        # kernels of one chunk, s (device-side events only: a CPU op's device time repeats its kernels')
        kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        print(f"wall per chunk without profilers: {', '.join(f'{w * 1e3:.1f}' for w in walls)} ms; "
              f"kernel time of one chunk: {busy * 1e3:.1f} ms", file=report)
        print(prof.key_averages().table(sort_by=sort, row_limit=args.top), file=report)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.out / "chunk_trace.json"))
    print(report.getvalue())
    if args.out:
        (args.out / f"profile-{args.type}-{args.offload}.txt").write_text(report.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
