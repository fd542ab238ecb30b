"""Where a CPU decode step and a prefill chunk of the served model spend their time, per layer.

    python benchmark/profile_cpu.py                                  # the served config, 2K and 8K contexts
    python benchmark/profile_cpu.py --contexts 32768 --set model.dtype=float32 --out /tmp/profile.json

Loads the served config (SmolLM2-135M, InfLLM) as the engine does, reads a document of each context length
in chunks, then profiles (torch.profiler) the last prefill chunk and `--steps` greedy decode steps through
`model.generate`, as the engine decodes. Time is sorted into what a layer does:

  linear      the projections (q, k, v, o, gate, up, down) and the vocabulary projection (one per step)
  attention   the memory's attention ops (inf_llm.kernels.reference: decode_attention, windowed_attention...)
  memory      the rest of the attention layer: rotary embedding, lookups, block formation, cache writes
  norm / mlp  RMSNorm and the MLP's activation and product
  other ops   torch ops outside those (embedding, sampling, generate's logits processing)
  python      wall time not inside any torch op (module calls, generate's loop, the memory's Python)

The profiler itself adds a few microseconds per op: the table gives the profiled split and, beside it, the
unprofiled wall time per step (the number to compare across runs). Prints a table, writes JSON with `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmark/profile_cpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inf_llm import openmp  # noqa: E402  (before torch: bounded OpenMP spinning, as the server)

openmp.configure()

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from benchmark.common import load_for_eval, prefill_chunks  # noqa: E402
from benchmark.serving_speed import document  # noqa: E402
from inf_llm.adapter import InfLLMCache, cache_kwargs  # noqa: E402
from inf_llm.kernels import ops as ops_protocol  # noqa: E402
from inf_llm.kernels import reference  # noqa: E402

CATEGORIES = ("linear", "attention", "memory", "norm", "mlp", "other ops", "python")
# record_function scopes: module classes by the end of their name, and the memory's ops by name
_SCOPE = {"Linear": "linear", "RMSNorm": "norm", "MLP": "mlp", "Attention": "layer attention"}
# an op's category by its innermost scope (None: outside every scope)
_CATEGORY_OF_SCOPE = {"linear": "linear", "norm": "norm", "mlp": "mlp", "attention op": "attention",
                      "layer attention": "memory", None: "other ops"}


def _scope_of(module) -> str | None:
    name = type(module).__name__
    for suffix, scope in _SCOPE.items():
        if name.endswith(suffix):
            return scope
    return None


@contextlib.contextmanager
def scoped(model):
    """Every module of a known kind and every op of the torch backend inside a named profiler range."""
    handles, saved = [], {}

    def pre(module, args, kwargs):
        module._profile_scope = torch.autograd.profiler.record_function(f"scope::{module._profile_kind}")
        module._profile_scope.__enter__()

    def post(module, args, kwargs, out):
        module._profile_scope.__exit__(None, None, None)

    for m in model.modules():
        kind = _scope_of(m)
        if kind is not None:
            m._profile_kind = kind
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
    for name in _protocol_ops():
        fn = getattr(reference, name)
        saved[name] = fn

        def wrapped(*a, _fn=fn, **kw):
            with torch.autograd.profiler.record_function("scope::attention op"):
                return _fn(*a, **kw)

        setattr(reference, name, wrapped)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for name, fn in saved.items():
            setattr(reference, name, fn)


def _protocol_ops() -> list[str]:
    return [n for n in vars(ops_protocol.Ops) if not n.startswith("_") and callable(getattr(reference, n, None))]


def split(prof, wall_s: float, n_layers: int, units: int) -> dict:
    """Milliseconds per unit (a step or a chunk) in each category, from the profiler's event tree."""
    totals = defaultdict(float)
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    scopes = [e for e in events if e.name.startswith("scope::")]
    ops = [e for e in events if not e.name.startswith("scope::") and not e.name.startswith("ProfilerStep")]

    # one sweep in time order (one thread, ranges nest): the open scopes are a stack, and an op is timed
    # only when no other op encloses it (its children are inside its own time)
    timeline = sorted(scopes + ops, key=lambda e: (e.time_range.start, -e.time_range.end))
    open_scopes, op_end, op_us = [], -1, 0.0
    for e in timeline:
        while open_scopes and open_scopes[-1].time_range.end <= e.time_range.start:
            open_scopes.pop()
        if e.name.startswith("scope::"):
            open_scopes.append(e)
        elif e.time_range.start >= op_end:
            op_end = e.time_range.end
            us = e.time_range.elapsed_us()
            op_us += us
            scope = open_scopes[-1].name[len("scope::"):] if open_scopes else None
            totals[_CATEGORY_OF_SCOPE[scope]] += us
    totals["python"] = max(wall_s * 1e6 - op_us, 0.0)
    per_unit = {c: totals[c] / 1e3 / units for c in CATEGORIES}
    return {
        "ms_per_unit": per_unit,
        "ms_per_unit_per_layer": {c: v / n_layers for c, v in per_unit.items()},
        "profiled_ms_per_unit": wall_s * 1e3 / units,
    }


@torch.inference_mode()
def profile_context(model, tokenizer, cfg, n_tokens: int, steps: int) -> dict:
    ids = tokenizer(document(tokenizer, n_tokens), add_special_tokens=True)["input_ids"][:n_tokens]
    x = torch.tensor([ids], dtype=torch.long)
    n_layers = model.config.num_hidden_layers
    cache = InfLLMCache(model)
    cache.plan(n_tokens)  # as the engine plans a prompt (full_attention_tokens)
    last = max((n_tokens - 1) // cfg.chunk_size * cfg.chunk_size, 0)
    if last == n_tokens - 1:
        last -= cfg.chunk_size
    prefill_chunks(model, cfg, cache, x, 0, last)  # the memory before the last chunk, for the profiled chunk

    prefilled = cache.clone()  # after the timed chunk: the state the decode steps start from
    t = time.perf_counter()
    prefill_chunks(model, cfg, prefilled, x, last, n_tokens - 1)
    chunk_s = time.perf_counter() - t
    chunk_tokens = n_tokens - 1 - last
    twin = cache.clone()
    with scoped(model), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        prefill_chunks(model, cfg, twin, x, last, n_tokens - 1)
        profiled_s = time.perf_counter() - t
    prefill = split(prof, profiled_s, n_layers, 1)
    prefill.update(chunk_tokens=chunk_tokens, wall_ms_per_unit=chunk_s * 1e3,
                   tokens_per_s=chunk_tokens / chunk_s)

    gen = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1,
                           temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.eos_token_id)

    def decode(c):
        t0 = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen, **cache_kwargs(model, c))
        return time.perf_counter() - t0

    # the first generate call feeds the prompt's last token: warm, then time whole calls of `steps` steps
    decode(prefilled.clone())
    decode_s = min(decode(prefilled.clone()) for _ in range(2))
    twin = prefilled.clone()
    with scoped(model), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled_s = decode(twin)
    step = split(prof, profiled_s, n_layers, steps)
    step.update(wall_ms_per_unit=decode_s * 1e3 / steps, tokens_per_s=steps / decode_s)
    return {"context": n_tokens, "prefill_chunk": prefill, "decode_step": step}


def table(results: list[dict]) -> str:
    head = "| what | wall ms | profiled ms | " + " | ".join(CATEGORIES) + " |"
    lines = [head, "|" + "---|" * (3 + len(CATEGORIES))]
    for r in results:
        for part, label in (("prefill_chunk", "prefill chunk"), ("decode_step", "decode step")):
            d = r[part]
            extra = f" ({d['chunk_tokens']} tokens)" if part == "prefill_chunk" else ""
            cells = " | ".join(f"{d['ms_per_unit'][c]:.1f}" for c in CATEGORIES)
            lines.append(f"| {label} at {r['context']}{extra} | {d['wall_ms_per_unit']:.1f} | "
                         f"{d['profiled_ms_per_unit']:.1f} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="config file (default: the served config)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (dotlist)")
    p.add_argument("--contexts", default="2048,8192", help="comma-separated context lengths in tokens")
    p.add_argument("--steps", type=int, default=32, help="decode steps profiled (and timed)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        p.error(f"--contexts must be comma-separated integers, got {args.contexts!r}")
    if any(n < 2 for n in contexts):
        p.error(f"--contexts must be at least 2 tokens each (a prefill chunk and a token to decode), got {contexts}")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    model, tokenizer, cfg = load_for_eval(args.config, args.set)
    results = []
    for n in contexts:
        results.append(profile_context(model, tokenizer, cfg, n, args.steps))
        print(table(results[-1:]), flush=True)
    print(table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype),
                "overrides": args.set, "capability": torch.backends.cpu.get_cpu_capability()}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
