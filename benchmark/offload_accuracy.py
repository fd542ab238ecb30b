"""Accuracy cost of compressed host blocks (`model.offload_dtype`): the same long text read with offloaded
blocks stored in the model dtype and in fp8 / int8, in lockstep, comparing the next-token distributions
at every position from `--score-from` on (KL divergence, top-1 agreement, largest log-probability change).

    python -m benchmark.offload_accuracy --tokens 16384 --out benchmark/results/offload-accuracy.json

Text: the project's own documentation by default (natural prose, about 20K SmolLM2 tokens), or `--text`.
Every variant runs with `model.offload=true`, so only the storage of the blocks differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmark.common import Agreement, load_for_eval
from inf_llm.adapter import InfLLMCache, cache_kwargs

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEXTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmark" / "README.md"]


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="config file (default: the served SmolLM2 config)")
    p.add_argument("--override", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config dotlist override, repeatable")
    p.add_argument("--codecs", default="fp8,int8", help="offload_dtype values compared with the model dtype")
    p.add_argument("--tokens", type=int, default=16384, help="tokens of text read")
    p.add_argument("--score-from", type=int, default=4096, help="first position scored (memory blocks exist)")
    p.add_argument("--text", type=Path, action="append", default=None, help="text file(s) to read")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not 0 < args.score_from < args.tokens:
        p.error(f"--score-from must be inside (0, --tokens={args.tokens}), got {args.score_from}")
    return args


def _text_ids(tokenizer, files: list[Path], tokens: int) -> torch.Tensor:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"--text: no such file: {', '.join(missing)}")
    ids = tokenizer("\n\n".join(f.read_text(encoding="utf-8") for f in files)).input_ids
    if len(ids) < tokens:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --tokens={tokens}: add --text files")
    return torch.tensor([ids[:tokens]])


@torch.inference_mode()
def compare(model, cfg, ids: torch.Tensor, codecs: list[str], score_from: int) -> dict[str, dict]:
    """Feed `ids` chunk by chunk to one cache per variant; accumulate per-position statistics."""
    names = ["model dtype", *codecs]
    caches = []
    for codec in [None, *codecs]:
        model.infllm.cfg = cfg.model.model_copy(update={"offload_dtype": codec})  # read when the memory is made
        cache = InfLLMCache(model, offload=True)
        model(ids[:, :1], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))  # makes the memory
        caches.append(cache)
    model.infllm.cfg = cfg.model
    sums = {n: Agreement() for n in codecs}
    a, total = 1, ids.shape[1]
    while a < total:
        b = min((a // cfg.chunk_size + 1) * cfg.chunk_size, total)
        keep = max(0, b - max(a, score_from))
        logps = []
        for cache in caches:
            out = model(ids[:, a:b], use_cache=True, logits_to_keep=max(keep, 1), **cache_kwargs(model, cache))
            logps.append(torch.log_softmax(out.logits[0, -keep:].float(), dim=-1) if keep else None)
        if keep:
            base = logps[0]
            for name, logp in zip(codecs, logps[1:]):
                sums[name].add(base, logp)
        a = b
    results = {}
    for name, cache in zip(names, caches):
        host = sum(st.host_bytes for st in cache.stats())
        row = {"host_bytes": host}
        if name in sums:
            row.update(sums[name].as_dict())
        results[name] = row
    return results


def table(results: dict[str, dict]) -> str:
    base = results["model dtype"]["host_bytes"]
    lines = ["| blocks stored as | host memory | vs model dtype | mean KL (nats) | top-1 agreement | max |Δ log p| |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "mean_kl" not in r:
            lines.append(f"| {name} | {r['host_bytes'] / 2**20:,.1f} MiB | 1.00 | - | - | - |")
            continue
        lines.append(f"| {name} | {r['host_bytes'] / 2**20:,.1f} MiB | {r['host_bytes'] / base:.2f} | "
                     f"{r['mean_kl']:.2e} | {100 * r['top1_agreement']:.2f}% | {r['max_abs_logprob_diff']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    model, tokenizer, cfg = load_for_eval(args.config, args.overrides)
    ids = _text_ids(tokenizer, args.text or DEFAULT_TEXTS, args.tokens).to(model.device)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    results = compare(model, cfg, ids, codecs, args.score_from)
    print(f"{cfg.model.path} ({model.dtype}), {args.tokens} tokens, positions {args.score_from}..{args.tokens - 1} "
          f"scored, memory n_local={cfg.model.n_local} block_size={cfg.model.block_size} topk={cfg.model.topk}")
    print(table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"tokens": args.tokens, "score_from": args.score_from,
                                        "model": cfg.model.path, "dtype": str(model.dtype),
                                        "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
