"""The served default beside what a CPU user would try instead, same machine, same run, same token ids:
plain transformers (full attention, SDPA, one forward, greedy loop) and llama-cpp-python on the same GGUF.

    python benchmark/cpu_peers.py                                    # 2K / 8K / 32K, 32 decoded tokens each
    python benchmark/cpu_peers.py --contexts 2048,8192 --set model.dtype=float32 --out /tmp/peers.json

Each row reads a document of that many tokens (benchmark/serving_speed.py's varied prose) and decodes
`--decode` greedy tokens (never stopping early):
  inf_llm        the served config through the engine's path (chunked prefill, `model.generate` decode)
  transformers   the same weights unpatched and as loaded (full attention, SDPA, `F.linear`: no prepacked or
                 fp16 weights), one forward over the prompt, then a greedy loop over its KV cache; skipped
                 for prompts past the model's native context (8192 for SmolLM2)
  llama.cpp      llama-cpp-python on the GGUF the default model ships (its own Q4_1 weights, llama.cpp's
                 kernels), `--threads` threads; skipped with a message where llama_cpp cannot be imported
                 (it has no wheel on PyPI: `scripts/install_llama_cpp.sh` builds one, about 15 min on 2 cores)
Prints a table and writes JSON (rewritten after every row).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmark/cpu_peers.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inf_llm import openmp  # noqa: E402  (before torch: bounded OpenMP spinning, as the server)

openmp.configure()

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from benchmark.common import generate_greedy  # noqa: E402
from benchmark.serving_speed import document  # noqa: E402
from inf_llm.adapter import patch_model  # noqa: E402
from inf_llm.config import default_config_path, load_config  # noqa: E402
from inf_llm.engine.loading import load_model  # noqa: E402

SYSTEMS = ("inf_llm", "transformers", "llama.cpp")


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(default_config_path()), help="config file (default: the served one)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. model.dtype=float32")
    p.add_argument("--contexts", default="2048,8192,32768", help="comma-separated context lengths (tokens)")
    p.add_argument("--decode", type=int, default=32, help="greedy tokens decoded at each context")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        args.context_list = [int(x) for x in args.contexts.split(",") if x.strip()]
    except ValueError:
        p.error(f"--contexts: comma-separated integers, got {args.contexts!r}")
    if not args.context_list or min(args.context_list) < 16:
        p.error(f"--contexts: at least one length, each at least 16 tokens, got {args.contexts!r}")
    if args.decode < 1:
        p.error(f"--decode must be at least 1, got {args.decode}")
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.system_list if s not in SYSTEMS]
    if unknown or not args.system_list:
        p.error(f"--systems: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SYSTEMS)}")
    return args


def _row(prefill_tokens: int, prefill_s: float, decoded: int, decode_s: float, **extra) -> dict:
    return {"prefill_tokens": prefill_tokens, "prefill_tokens_per_s": round(prefill_tokens / prefill_s, 1),
            "decode_tokens": decoded, "decode_tokens_per_s": round(decoded / decode_s, 2), **extra}


def run_inf_llm(model, tokenizer, cfg, ids: list[int], decode: int) -> dict:
    never = [model.config.vocab_size + 1]  # a stop id no step can produce: exactly `decode` tokens
    _, stats = generate_greedy(model, tokenizer, cfg, ids, decode, stop_token_ids=never)
    return _row(stats.prefill_tokens, stats.prefill_seconds, stats.new_tokens, stats.decode_seconds)


@torch.inference_mode()
def run_transformers(model, ids: list[int], decode: int) -> dict:
    input_ids = torch.tensor([ids])
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    logits = model(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    prefill_s = time.perf_counter() - start
    token = logits[0, -1].argmax().view(1, 1)
    start = time.perf_counter()
    for _ in range(decode - 1):  # the prompt's forward gave the first token
        token = model(token, past_key_values=cache, use_cache=True).logits[0, -1].argmax().view(1, 1)
    decode_s = time.perf_counter() - start
    return _row(len(ids), prefill_s, decode - 1, decode_s)


def run_llama_cpp(llm, ids: list[int], decode: int) -> dict:
    llm.reset()
    start = time.perf_counter()
    steps = llm.generate(ids, top_k=1, temp=0.0, reset=True)
    next(steps)  # the prompt's evaluation and the first token
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode - 1):
        next(steps)
    decode_s = time.perf_counter() - start
    steps.close()
    return _row(len(ids), prefill_s, decode - 1, decode_s)


def _llama(gguf: Path | None, n_ctx: int, threads: int):
    """A llama-cpp-python model of the served GGUF, or the reason there is none."""
    if gguf is None:
        return None, "the served model is not a GGUF file"
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        return None, f"llama_cpp not importable ({exc}); build it with scripts/install_llama_cpp.sh"
    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    return llm, None


def table(report: dict) -> str:
    lines = ["| context | system | prefill tok/s | decode tok/s |", "|---|---|---|---|"]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['context']} | {r['system']} | skipped: {r['skipped']} | |")
        else:
            lines.append(f"| {r['context']} | {r['system']} | {r['prefill_tokens_per_s']:.1f} | "
                         f"{r['decode_tokens_per_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    cfg = load_config(args.config, args.set)
    threads = args.threads or torch.get_num_threads()
    report = {"config": args.config, "overrides": args.set, "model": cfg.model.path, "decode": args.decode,
              "torch_threads": torch.get_num_threads(), "llama_cpp_threads": threads, "cpu_count": os.cpu_count(),
              "platform": platform.platform(), "processor": _cpu_name(), "rows": []}

    def record(row: dict) -> None:
        report["rows"].append(row)
        print(row, flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))

    loaded = load_model(cfg)
    report.update(dtype=str(loaded.dtype).removeprefix("torch."), linear=loaded.linear)
    tokenizer, gguf = loaded.tokenizer, loaded.source.gguf_path
    native = getattr(loaded.model.config, "max_position_embeddings", None)
    # stock transformers: the same weights without this project's repacking of the linear layers
    stock = cfg.model_copy(update={"model": cfg.model.model_copy(update={"cpu_packed_linear": False,
                                                                           "cpu_fp16_weights": False})})
    plain = load_model(stock).model if "transformers" in args.system_list else None
    ours = patch_model(loaded.model, cfg.model) if "inf_llm" in args.system_list else None
    llm, no_llama = (None, None)
    if "llama.cpp" in args.system_list:
        llm, no_llama = _llama(gguf, max(args.context_list) + args.decode + 8, threads)
    for n in args.context_list:
        ids = tokenizer(document(tokenizer, n), add_special_tokens=False)["input_ids"][:n]
        for system in args.system_list:
            base = {"context": n, "system": system}
            if system == "inf_llm":
                record({**base, **run_inf_llm(ours, tokenizer, cfg, ids, args.decode)})
            elif system == "transformers":
                if native is not None and n > native:
                    record({**base, "skipped": f"beyond the model's native context ({native})"})
                else:
                    record({**base, **run_transformers(plain, ids, args.decode)})
            elif llm is None:
                record({**base, "skipped": no_llama})
            else:
                record({**base, **run_llama_cpp(llm, ids, args.decode)})
    print(table(report))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
