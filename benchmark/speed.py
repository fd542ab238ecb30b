"""Speed benchmark: prefill tokens/s, decode ms/token and memory of InfLLM against StreamingLLM and plain full
attention, on one device, with a random-weight model built from a config shape (default Mistral-7B).

    python benchmark/speed.py --out benchmark/results/speed.json                       # GPU, all rows
    python benchmark/speed.py --rows inf-llm-fattn,origin-sdpa --lengths 131072          # a subset
    python benchmark/speed.py --shape tiny --lengths 512,1024 --rows inf-llm-torch,stream-llm,origin-sdpa \
        --device cpu --dtype float32                                                    # CPU smoke

Rows (see docs/speed.md):
  inf-llm-fattn  type inf-llm, Triton kernels (fattn true, pinned host blocks, side copy stream: as the
                 original's mistral-inf-llm-fattn preset); needs CUDA
  inf-llm-torch  type inf-llm, torch reference kernels (fattn false)
  stream-llm     type stream-llm (sinks + local window); fattn true on CUDA, false on CPU
  origin-sdpa    the UNPATCHED model: transformers' sdpa attention and its DynamicCache (full attention)
  origin-sdpa-1pass  the same, the whole prompt in one forward (no chunks: SDPA's causal flash kernel
                 instead of a masked one; full attention's fastest prefill, while its activations fit)
Memory settings come from --config (default config/mistral-inf-llm.yaml, the original Mistral preset) plus
--set overrides; `model.type` and `model.fattn` are set by the row. Decode steps of inf-llm rows on CUDA
replay as CUDA graphs (`model.decode_graph`, as in the server; `--set model.decode_graph=false`: eager).

For each row x length, with the same seeded input ids for every row: chunked prefill of all tokens but the
last (`chunk_size` per forward, logits_to_keep=1), then greedy decode (feeding the last prompt token first):
warm-up steps, then timed steps. A row first runs an untimed warm-up (a short prefill and a few decode steps
on a throwaway cache) so Triton compilation and autotuning, cuBLAS and allocator warm-up are not timed.
Progress is printed (flushed) as it goes and the JSON is rewritten after every measurement, so a run cut
short keeps what it measured. Knows nothing of HTTP, tokenizers or the engine's worker.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmark/speed.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inf_llm.adapter import InfLLMCache, cache_kwargs, patch_model, unpatch_model  # noqa: E402
from inf_llm.config import InfLLMConfig, load_config  # noqa: E402
from inf_llm.engine.pacing import ChunkPacer  # noqa: E402
from inf_llm.engine.worker import freeze_long_lived_objects  # noqa: E402
from inf_llm.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "config" / "mistral-inf-llm.yaml"
DEFAULT_OUT = REPO / "benchmark" / "results" / "speed.json"
GIB = 1024**3
# Mistral-7B-Instruct-v0.2's RoPE base (the preset's `base` too); speed does not depend on it.
MISTRAL_ROPE_THETA = 1e6
# Larger than any prompt we time, so no model code path ever clamps or warns about positions.
MAX_POSITIONS = 1 << 22
# Row warm-up prefill: two default chunks reach past n_init + n_local, so blocks form and lookups run.
DEFAULT_WARMUP_PREFILL = 16384
# Default prefill budget of one row x length: a row too slow for it (the torch path at 512K) is extrapolated.
DEFAULT_MAX_SECONDS = 240.0
# Seconds between prefill progress lines (the first and the last chunk always print).
PROGRESS_EVERY_S = 15.0

SHAPES: dict[str, dict] = {
    # Mistral-7B(-Instruct-v0.2): 7.2B parameters, 14.5 GB in bf16.
    "mistral-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    ),
    # SmolLM2-135M(-Instruct), the default served model: for memory sizing without the GGUF file.
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    ),
    # CPU smoke: 2 layers, head_dim 64, GQA 2.
    "tiny": dict(
        vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    ),
}
# Memory settings a shape applies before --set: the tiny shape scales the Mistral preset down so that a
# 512-token smoke run leaves the local window, forms blocks and retrieves them (the preset's 4K window would
# make every inf-llm row plain local attention at smoke lengths).
SHAPE_MEMORY: dict[str, list[str]] = {
    "mistral-7b": [],
    "smollm2-135m": [],
    "tiny": [
        "model.full_attention_tokens=null", "model.n_init=16", "model.n_local=128", "model.topk=4",
        "model.block_size=16", "model.repr_topk=2", "model.max_cached_block=8", "model.exc_block_size=32", "chunk_size=128",
    ],
}


@dataclass(frozen=True)
class RowSpec:
    """One benchmarked configuration."""

    name: str
    memory_type: str | None  # None: the unpatched model (origin-sdpa)
    fattn: bool | None  # None: Triton on CUDA, torch on CPU
    defaults: tuple[str, ...] = ()  # config overrides of the row, applied before --set
    needs_cuda: bool = False
    whole_prompt: bool = False  # prefill in one forward instead of chunk_size pieces


ROWS: dict[str, RowSpec] = {
    r.name: r
    for r in (
        RowSpec("inf-llm-fattn", "inf-llm", True, ("model.pin_memory=true", "model.async_global_stream=true"),
                needs_cuda=True),
        RowSpec("inf-llm-torch", "inf-llm", False),
        RowSpec("stream-llm", "stream-llm", None),
        RowSpec("origin-sdpa", None, None),
        RowSpec("origin-sdpa-1pass", None, None, whole_prompt=True),
    )
}
# Keys a row decides; --set may not change them.
ROW_KEYS = ("model.type", "model.fattn")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Result:
    """One row x length. `status`: ok | est (prefill stopped by the budget) | oom | skipped | error."""

    row: str
    tokens: int
    status: str = "ok"
    note: str = ""
    prefill_tokens: int = 0  # tokens actually prefilled (tokens - 1 when complete)
    prefill_seconds: float | None = None
    prefill_tok_s: float | None = None  # (tokens - 1) / prefill seconds; extrapolated when status is est
    prefill_measured_tok_s: float | None = None  # prefill_tokens / prefill_seconds
    # per chunk, the time between the ends of consecutive chunks on the GPU's timeline (CUDA events; on a CPU
    # the host's clock): the chunk's GPU time, plus any time the GPU waited for the host
    chunk_seconds: list[float] = field(default_factory=list)
    # per chunk, the host's time to issue it (until the forward returned; the host then waits for the chunk
    # before). Near chunk_seconds when the host is the bound; profile_prefill.py's walls tell the sides apart
    chunk_issue_seconds: list[float] = field(default_factory=list)
    decode_context: int | None = None  # tokens in the cache when the timed decode started
    decode_ms_per_token: float | None = None
    decode_ms_median: float | None = None
    decode_ms_steps: list[float] = field(default_factory=list)
    peak_gpu_bytes_above_weights: int | None = None
    peak_gpu_reserved_bytes: int | None = None
    # host memory the row used: its RSS growth, plus the pinned pool lent to its cache (model.host_pool_tokens:
    # allocated once, at the warm-up, so not in the growth); the two parts below
    host_bytes: int | None = None
    host_rss_growth_bytes: int | None = None
    host_pool_bytes: int | None = None
    memory_stats: dict | None = None  # InfLLMCache.stats() summed over layers (inf-llm rows)
    decode_graph: dict | None = None  # DecodeGraphStats of the decode (replayed/eager steps), when graphed
    config: dict | None = None


def _say(msg: str) -> None:
    print(msg, flush=True)


def _parse_length(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="mistral-7b", help="model shape (random weights)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--lengths", default="32768,131072,524288", help="prompt lengths in tokens (32k, 1m also ok)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="memory settings (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable, e.g. --set model.topk=32 --set chunk_size=4096")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the input ids")
    p.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps (mean reported)")
    p.add_argument("--decode-warmup", type=int, default=4, help="untimed decode steps before the timed ones")
    p.add_argument("--warmup-prefill", type=int, default=DEFAULT_WARMUP_PREFILL,
                   help="tokens of the untimed per-row warm-up prefill, one short like the timed ones (0: none)")
    p.add_argument("--max-seconds-per-row", type=float, default=DEFAULT_MAX_SECONDS,
                   help="prefill budget per row x length; a prefill projected to exceed it stops early and\n"
                        "its tokens/s is reported as an estimate ('est')")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (rewritten after every measurement)")
    p.add_argument("--fail-fast", action="store_true",
                   help="re-raise an error in a row instead of recording it and going on with the next")
    p.add_argument("--sync-per-chunk", action="store_true",
                   help="wait for every prefill chunk before issuing the next (the engine does not): for A/B "
                        "comparisons with the paced prefill, and with results measured that way")
    p.add_argument("--no-gc-freeze", action="store_true",
                   help="leave the objects alive after the model is built to Python's cyclic garbage collector\n"
                        "(default: frozen, as the engine does: inf_llm.engine.worker.freeze_long_lived_objects)")
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; valid rows: {', '.join(ROWS)}")
    try:
        args.lengths = sorted({_parse_length(x) for x in args.lengths.split(",") if x.strip()})
    except ValueError:
        p.error(f"--lengths must be a comma list of token counts, got {args.lengths!r}")
    if not args.lengths or min(args.lengths) < 2:
        p.error("--lengths: every length must be at least 2 (all tokens but the last are prefilled)")
    for item in args.overrides:
        if item.split("=", 1)[0].strip() in ROW_KEYS:
            p.error(f"--set {item}: {' and '.join(ROW_KEYS)} are set by each row; choose rows with --rows")
    if args.decode_tokens < 1 or args.decode_warmup < 0 or args.warmup_prefill < 0:
        p.error("--decode-tokens must be >= 1, --decode-warmup and --warmup-prefill >= 0")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    return args


# ----------------------------------------------------------------------------------------------- environment
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(device: torch.device) -> dict:
    import transformers

    env = {
        "device": str(device),
        "device_name": _cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "triton": _version("triton"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["device_memory_gib"] = round(props.total_memory / GIB, 1)
    return env


def _rss_bytes() -> int:
    """Resident set size of this process (psutil if installed, else /proc/self/status)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return psutil.Process().memory_info().rss
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the resident set size: no psutil and no VmRSS in /proc/self/status")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Return freed memory: device blocks, and cached pinned host blocks, so that the next measurement's
    RSS delta counts the pinned memory it allocates instead of reusing the previous row's."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        host_empty_cache = getattr(torch._C, "_host_emptyCache", None)  # private; no public API in torch 2.11
        if host_empty_cache is not None:
            host_empty_cache()


# ----------------------------------------------------------------------------------------------------- model
def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Random-weight MistralForCausalLM of `shape`, created directly on `device` in `dtype`.

    Parameters are allocated on the device (no CPU copy of 7B parameters) and initialised in place by
    transformers' own init (normal, std = initializer_range 0.02; RMSNorm weights 1), seeded.
    """
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(
        **SHAPES[shape], sliding_window=None, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": MISTRAL_ROPE_THETA},
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def row_config(spec: RowSpec, args: argparse.Namespace, device: torch.device) -> InfLLMConfig:
    overrides = [*SHAPE_MEMORY[args.shape], *spec.defaults, *args.overrides]
    if spec.memory_type is not None:
        fattn = spec.fattn if spec.fattn is not None else device.type == "cuda"
        overrides += [f"model.type={spec.memory_type}", f"model.fattn={str(fattn).lower()}"]
    return load_config(args.config, overrides)


def _make_cache(model: torch.nn.Module, spec: RowSpec):
    if spec.memory_type is not None:
        return InfLLMCache(model)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _summed_stats(cache) -> dict | None:
    if not isinstance(cache, InfLLMCache):
        return None
    stats = cache.stats()
    if not stats:
        return None
    return {
        "blocks_per_layer": stats[0].blocks,
        "cache_hits": sum(s.cache_hits for s in stats),
        "cache_misses": sum(s.cache_misses for s in stats),
        "cache_prefetched": sum(s.cache_prefetched for s in stats),
        "device_bytes": sum(s.device_bytes for s in stats),
        "host_bytes": sum(s.host_bytes for s in stats),
    }


# ---------------------------------------------------------------------------------------------------- timing
@dataclass
class PrefillRun:
    tokens: int  # tokens fed
    seconds: float
    chunk_seconds: list[float]
    chunk_issue_seconds: list[float]
    complete: bool
    projected_seconds: float  # the whole prefill: measured when complete, else extrapolated


def prefill(model, cache, ids: torch.Tensor, chunk: int, budget_s: float | None, settle: int, label: str,
            progress: Callable[[int], None] | None = None, sync_per_chunk: bool = False) -> PrefillRun:
    """Feed ids (1, T) in chunks of `chunk`, paced as the engine paces them (`inf_llm.engine.pacing`): the
    host issues a chunk while the GPU runs the one before, and waits for that one only. A sync after every
    chunk (`sync_per_chunk`) drains the GPU's queue at each chunk boundary: a chunk whose host work outlasts
    its GPU work leaves the GPU idle although the host was ahead the chunk before.

    Chunk times are those of the GPU's timeline (events between consecutive chunk ends). Budget guard: once
    `settle` tokens are done (past the first chunk and past the local window, where the per-chunk cost is
    representative), the prefill stops when the whole prefill, extrapolated at the last finished chunk's
    rate, would exceed `budget_s`; it also stops when `budget_s` has passed. The extrapolation is optimistic
    where later chunks cost more (full attention). `progress(tokens_done)` is called after every finished
    chunk; without it nothing is printed (warm-up). `sync_per_chunk`: wait for each chunk right after issuing
    it (for the A/B against the pacing).
    """
    device = ids.device
    total = ids.shape[1]
    kw = cache_kwargs(model, cache)
    issue_s: list[float] = []
    _sync(device)
    pacer = ChunkPacer(device, timed=True)
    start = last_print = time.perf_counter()
    issued = 0
    while issued < total:
        end = min(total, issued + chunk)
        t0 = time.perf_counter()
        out = model(ids[:, issued:end], **kw, use_cache=True, logits_to_keep=1)
        issue_s.append(time.perf_counter() - t0)
        del out
        issued = end
        done = pacer.issued(end)  # waits for the chunk before this one
        if sync_per_chunk:
            done = pacer.drain()
        if done is None or progress is None:
            continue
        now = time.perf_counter()
        elapsed = now - start
        progress(done)
        if last_print == start or now - last_print >= PROGRESS_EVERY_S:
            _say(f"  [{label}] prefill {done}/{total} tokens, {elapsed:.1f}s, {done / elapsed:,.0f} tok/s")
            last_print = now
        if budget_s is not None and issued < total:
            finished = pacer.seconds()
            rate = chunk / finished[-1]  # tokens/s of the last finished chunk (a whole one: more were issued)
            projected = elapsed + (total - done) / rate
            if (done >= settle and projected > budget_s) or elapsed >= budget_s:
                pacer.drain()
                elapsed = time.perf_counter() - start
                _say(f"  [{label}] stopping prefill at {issued}/{total} tokens after {elapsed:.1f}s: whole "
                     f"prefill projected at {projected:.0f}s > budget {budget_s:g}s")
                return PrefillRun(issued, elapsed, pacer.seconds(), issue_s, False,
                                  elapsed + (total - issued) / rate)
    pacer.drain()
    elapsed = time.perf_counter() - start
    if progress is not None:
        progress(total)
        _say(f"  [{label}] prefill {total}/{total} tokens, {elapsed:.1f}s, {total / elapsed:,.0f} tok/s")
    return PrefillRun(issued, elapsed, pacer.seconds(), issue_s, True, elapsed)


def decoder(model, cache) -> Callable[[torch.Tensor], torch.Tensor]:
    """token (1, 1) -> next-token logits (1, vocab), as generate() steps: through the patched model's
    CUDA-graph runner where `model.decode_graph` allows it (inf-llm rows on CUDA), else eager forwards."""
    kw = cache_kwargs(model, cache)
    return lambda token: model(token, **kw, use_cache=True, logits_to_keep=1).logits[:, -1]


def decode(step: Callable[[torch.Tensor], torch.Tensor], first: torch.Tensor, warmup: int, steps: int) -> list[float]:
    """Greedy decode: feed `first` (1, 1), then each argmax; returns ms of each of the `steps` timed steps.

    No host sync inside the loop: the next token stays on the device, and on CUDA each step is timed by a
    pair of events read once at the end.
    """
    device = first.device
    token = first
    for _ in range(warmup):
        token = step(token).argmax(-1, keepdim=True)
    _sync(device)
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            token = step(token).argmax(-1, keepdim=True)
            events[i + 1].record()
        torch.cuda.synchronize(device)  # the one sync: read all step times
        return [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        token = step(token).argmax(-1, keepdim=True)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(model, spec: RowSpec, cfg: InfLLMConfig, chunk: int, ids: torch.Tensor, length: int,
            args: argparse.Namespace, weights_bytes: int, res: Result) -> None:
    """Fill `res` for one row x length: prefill ids[:, :length-1], then decode from ids[:, length-1]."""
    device = ids.device
    label = f"{spec.name} @ {length}"
    chunk = length - 1 if spec.whole_prompt else chunk
    cache = _make_cache(model, spec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = _rss_bytes()
    settle = chunk + (cfg.model.n_init + cfg.model.n_local if spec.memory_type is not None else 0)
    settle = max(settle, 2 * chunk)
    with torch.inference_mode():
        run = prefill(model, cache, ids[:, : length - 1], chunk, args.max_seconds_per_row, settle, label,
                      progress=lambda tokens: setattr(res, "prefill_tokens", tokens),
                      sync_per_chunk=args.sync_per_chunk)
        done = run.tokens
        res.prefill_tokens, res.prefill_seconds, res.chunk_seconds = done, run.seconds, run.chunk_seconds
        res.chunk_issue_seconds = run.chunk_issue_seconds
        res.prefill_measured_tok_s = done / run.seconds
        res.prefill_tok_s = (length - 1) / run.projected_seconds
        # decode from the token after what was prefilled (the prompt's last token when complete)
        res.decode_context = done + args.decode_warmup
        if not run.complete:
            res.status = "est"
            res.note = (f"prefill stopped at {done} tokens ({done / run.seconds:,.0f} tok/s so far, whole "
                        f"extrapolated); decode at {res.decode_context}")
        after_prefill = _summed_stats(cache)  # untimed: between the prefill's last sync and the decode
        steps = decode(decoder(model, cache), ids[:, done : done + 1], args.decode_warmup, args.decode_tokens)
        runner = getattr(cache, "decode_graph", None)
        if runner is not None:
            res.decode_graph = {**asdict(runner.stats), "disabled": runner.disabled_reason}
    expected = done + args.decode_warmup + args.decode_tokens
    if cache.get_seq_length() != expected:  # the cache was bypassed: the numbers would be meaningless
        raise RuntimeError(f"cache holds {cache.get_seq_length()} tokens after the run, expected {expected}")
    res.decode_ms_steps = steps
    res.decode_ms_per_token = sum(steps) / len(steps)
    res.decode_ms_median = sorted(steps)[len(steps) // 2]
    res.host_rss_growth_bytes = _rss_bytes() - rss0
    lease = getattr(cache, "host_lease", None)
    res.host_pool_bytes = lease.nbytes() if lease is not None else 0
    res.host_bytes = res.host_rss_growth_bytes + res.host_pool_bytes
    if device.type == "cuda":
        res.peak_gpu_bytes_above_weights = torch.cuda.max_memory_allocated(device) - weights_bytes
        res.peak_gpu_reserved_bytes = torch.cuda.max_memory_reserved(device)
    res.memory_stats = _summed_stats(cache)
    if res.memory_stats is not None and after_prefill is not None:  # the decode steps' own share
        for key in ("cache_hits", "cache_misses"):
            res.memory_stats[f"decode_{key}"] = res.memory_stats[key] - after_prefill[key]
    del cache


def warm_up(model, spec: RowSpec, chunk: int, ids: torch.Tensor, args: argparse.Namespace) -> None:
    """Untimed: a short prefill and a few decode steps on a throwaway cache (compile, autotune, allocator).

    The prefill is one token short of --warmup-prefill, as the timed prefill is of its length: its last
    chunk then has the odd length of the timed one's, whose kernel variants would otherwise compile inside
    the timed prefill (seconds on a fresh GPU machine)."""
    n = min(args.warmup_prefill, ids.shape[1]) - 1
    if n <= 0:
        return
    chunk = n if spec.whole_prompt else chunk
    t0 = time.perf_counter()
    cache = _make_cache(model, spec)
    with torch.inference_mode():
        prefill(model, cache, ids[:, :n], chunk, None, 0, spec.name)
        # enough steps for a capture and replays (the first steps after a prefill may form a block)
        decode(decoder(model, cache), ids[:, n : n + 1], 0, max(2, args.decode_warmup))
    _sync(ids.device)
    del cache
    _say(f"  [{spec.name}] warm-up ({n} tokens + decode) {time.perf_counter() - t0:.1f}s")


# ----------------------------------------------------------------------------------------------------- report
def _gib(n: int | None) -> float | None:
    return None if n is None else n / GIB


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _summary(r: Result) -> str:
    return (f"prefill {_fmt(r.prefill_tok_s, ',.0f')} tok/s{' (est)' if r.status == 'est' else ''}, "
            f"decode {_fmt(r.decode_ms_per_token, '.1f')} ms/token (median {_fmt(r.decode_ms_median, '.1f')}) at "
            f"{r.decode_context} tokens, peak GPU above weights "
            f"{_fmt(_gib(r.peak_gpu_bytes_above_weights), '.2f', 'n/a')} GiB, "
            f"host {_fmt(_gib(r.host_bytes), '.2f')} GiB{_cache_note(r)}{_graph_note(r)}")


def _cache_note(r: Result) -> str:
    """The block cache's hit share (offloaded rows): prefill and decode together, and decode alone."""
    m = r.memory_stats or {}
    looked_up = m.get("cache_hits", 0) + m.get("cache_misses", 0)
    if not looked_up:
        return ""
    decoded = m.get("decode_cache_hits", 0) + m.get("decode_cache_misses", 0)
    decode = f", decode {m['decode_cache_hits'] / decoded:.1%} of {decoded:,}" if decoded else ""
    prefetched = f", {m['cache_prefetched']:,} prefetched" if m.get("cache_prefetched") else ""
    return f"; block cache hits {m['cache_hits'] / looked_up:.1%} of {looked_up:,}{decode}{prefetched}"


def _graph_note(r: Result) -> str:
    g = r.decode_graph
    if not g:
        return ""
    if g["disabled"]:
        return f"; CUDA graph off: {g['disabled']}"
    return f"; CUDA graph: {g['replayed']} replayed, {g['eager'] + g['static_eager']} eager, {g['captures']} captures"


def table(results: list[Result]) -> str:
    head = (f"{'row':<14} {'tokens':>8} {'prefill tok/s':>14} {'decode ms/tok':>14} {'peak GPU GiB>w':>15} "
            f"{'host GiB':>9}  note")
    lines = [head, "-" * len(head)]
    for r in results:
        if r.status in ("ok", "est"):
            pre = _fmt(r.prefill_tok_s, ",.0f") + (" est" if r.status == "est" else "")
            dec = _fmt(r.decode_ms_per_token, ".1f")
            gpu = _fmt(_gib(r.peak_gpu_bytes_above_weights), ".2f", "n/a")
            host = _fmt(_gib(r.host_bytes), ".2f")
            note = r.note
        else:
            pre = dec = gpu = host = "OOM" if r.status == "oom" else "-"
            note = f"{r.status}: {r.note}" if r.note else r.status
        lines.append(f"{r.row:<14} {r.tokens:>8} {pre:>14} {dec:>14} {gpu:>15} {host:>9}  {note}")
    return "\n".join(lines)


def write_json(path: Path, header: dict, results: list[Result]) -> None:
    """Rewrite the whole file (atomically) so a run cut short leaves valid JSON with what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**header, "results": [asdict(r) for r in results]}, indent=1))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------- main
def _describe(name: str, spec: RowSpec, cfg: InfLLMConfig) -> tuple[str, dict]:
    if spec.memory_type is None:
        chunking = "the whole prompt in one forward" if spec.whole_prompt else f"chunk_size {cfg.chunk_size}"
        return (f"unpatched model, sdpa attention + DynamicCache, {chunking}",
                {"attention": "sdpa", "cache": "DynamicCache",
                 "chunk_size": None if spec.whole_prompt else cfg.chunk_size})
    m = cfg.model
    text = (f"type {m.type.value}, fattn {m.fattn}, n_init {m.n_init}, n_local {m.n_local}, topk {m.topk}, "
            f"block_size {m.block_size}, repr_topk {m.repr_topk}, max_cached_block {m.max_cached_block}, "
            f"exc_block_size {m.exc_block_size}, chunk_size {cfg.chunk_size}, pin_memory {m.pin_memory}, "
            f"async_global_stream {m.async_global_stream}")
    return text, {**m.model_dump(mode="json"), "chunk_size": cfg.chunk_size}


def run_row(model, spec: RowSpec, cfg: InfLLMConfig, ids: torch.Tensor, args: argparse.Namespace,
            weights_bytes: int, results: list[Result], save: Callable[[], None]) -> None:
    """Warm up, then measure every length; after an OOM or an error the larger lengths are skipped."""
    device = ids.device
    name, chunk = spec.name, cfg.chunk_size
    text, cfg_dump = _describe(name, spec, cfg)
    _say(f"\n== {name}: {text}")
    if spec.needs_cuda and device.type != "cuda":
        _say(f"  [{name}] skipped: needs CUDA (the Triton kernels run on a GPU; device is {device})")
        results.extend(Result(name, n, status="skipped", note="needs CUDA", config=cfg_dump) for n in args.lengths)
        save()
        return
    if spec.memory_type is not None:
        patch_model(model, cfg.model)
    else:
        unpatch_model(model, "sdpa")
    failed_at: str | None = None
    try:
        warm_up(model, spec, chunk, ids, args)
    except torch.cuda.OutOfMemoryError:
        failed_at = "OOM in warm-up"
    except Exception:  # noqa: BLE001 - shown and recorded so the other rows still run; --fail-fast re-raises
        if args.fail_fast:
            raise
        _say(traceback.format_exc())
        failed_at = "error in warm-up"
    _free(device)
    for length in args.lengths:
        res = Result(name, length, config=cfg_dump)
        results.append(res)
        if failed_at is not None:
            res.status, res.note = "skipped", failed_at
            _say(f"  [{name} @ {length}] skipped ({failed_at})")
            save()
            continue
        _say(f"-- {name} @ {length} tokens")
        try:
            measure(model, spec, cfg, chunk, ids, length, args, weights_bytes, res)
        except torch.cuda.OutOfMemoryError as exc:
            stage = "decode" if res.decode_context is not None else "prefill"
            res.status, res.note = "oom", f"in {stage} after {res.prefill_tokens} tokens: {str(exc).splitlines()[0]}"
        except Exception as exc:  # noqa: BLE001 - shown and recorded so the other rows still run
            if args.fail_fast:
                raise
            _say(traceback.format_exc())
            res.status, res.note = "error", f"{type(exc).__name__}: {exc}"[:300]
        # freed outside the except blocks, where the traceback no longer pins the failed pass's tensors
        _free(device)
        if res.status in ("oom", "error"):
            failed_at = f"{res.status.upper()} at {length}"
            _say(f"  [{name} @ {length}] {res.status.upper()}: {res.note}")
        else:
            _say(f"  [{name} @ {length}] {_summary(res)}")
        save()


def main(argv=None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if device.type == "cuda":
        if device.index is None:  # set_device and the memory counters want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    env = _environment(device)
    _say(f"device {env['device_name']} ({device}); torch {env['torch']} (CUDA {env['torch_cuda']}), "
         f"transformers {env['transformers']}, triton {env['triton']}, python {env['python']}")
    try:  # a bad --config or --set fails here, before the model is built
        configs = {name: row_config(ROWS[name], args, device) for name in args.rows}
    except ConfigError as exc:
        raise SystemExit(f"speed.py: {exc}") from None

    t0 = time.perf_counter()
    rss_before_model = _rss_bytes()
    model = build_model(args.shape, device, DTYPES[args.dtype], args.seed)
    _sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        weights_bytes = torch.cuda.memory_allocated(device)
    else:
        weights_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    _say(f"model {args.shape}: {n_params / 1e9:.2f}B parameters, {weights_bytes / GIB:.2f} GiB on {device} "
         f"({args.dtype}), built in {time.perf_counter() - t0:.1f}s")
    if not args.no_gc_freeze:
        freeze_long_lived_objects()

    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (1, max(args.lengths)), generator=gen).to(device)  # all rows

    header = {
        "env": env,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shape": {"name": args.shape, **SHAPES[args.shape], "parameters": n_params},
        "weights_bytes": weights_bytes,
        "host_bytes_model": _rss_bytes() - rss_before_model,
    }
    results: list[Result] = []
    for name in args.rows:
        run_row(model, ROWS[name], configs[name], ids, args, weights_bytes, results,
                lambda: write_json(args.out, header, results))

    _say(f"\n{env['device_name']} ({device}), {args.shape} {args.dtype}, torch {env['torch']}, "
         f"transformers {env['transformers']}, triton {env['triton']}")
    _say(table(results))
    write_json(args.out, header, results)
    _say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
