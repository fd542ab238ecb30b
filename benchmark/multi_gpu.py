"""Several GPUs of one host: a model split over GPUs with `device_map: auto`, and the evaluation runner sharded
over ranks with torchrun. Random weights (speed does not depend on them), saved once as a transformers folder
so that both go through the real loading code (`inf_llm.engine.loading.load_model`).

    python -m benchmark.multi_gpu save-model --out /tmp/m7b                      # Mistral-7B shape, bf16
    python -m benchmark.multi_gpu device-map --model /tmp/m7b --max-gpu-memory 9GiB --tokens 32768
    python -m benchmark.multi_gpu make-data --out /tmp/data --examples 16 --length 16k
    torchrun --nproc-per-node 2 -m benchmark.run_eval predict --data-dir /tmp/data --tasks passkey ...

`device-map` prefills and decodes the same ids twice: the model on one GPU, then split over every visible GPU
(accelerate's `device_map: auto` under a per-GPU memory cap, so a 14.5 GB model spreads over two cards as a
model too large for one would), and prints a table (JSON with `--out-json`).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.speed import DEFAULT_CONFIG, SHAPES, build_model  # noqa: E402
from inf_llm.adapter import InfLLMCache, cache_kwargs, patch_model  # noqa: E402
from inf_llm.config import load_config  # noqa: E402
from inf_llm.engine.loading import load_model  # noqa: E402

GIB = 1024**3


def _tokenizer():
    # The byte-level test tokenizer: the benchmarks feed token ids, a tokenizer only has to exist.
    from tests.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


def save_model(args: argparse.Namespace) -> None:
    model = build_model(args.shape, torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16, 0)
    model.save_pretrained(args.out)
    _tokenizer().save_pretrained(args.out)
    print(f"saved random-weight {args.shape} to {args.out}")


def make_data(args: argparse.Namespace) -> None:
    """InfiniteBench-format passkey examples of about `length` tokens (byte-level tokenizer)."""
    from benchmark.passkey import parse_length
    from benchmark.synthetic import make_example, prompt_measurer

    tokenizer = _tokenizer()
    length = parse_length(args.length)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "passkey.jsonl", "w", encoding="utf-8") as f:
        for i in range(args.examples):
            example = make_example("passkey", length, (i % 5) / 4, i, prompt_measurer(tokenizer, "passkey", None))
            f.write(json.dumps({**example.to_infinitebench(), "id": i}) + "\n")
    print(f"wrote {args.examples} passkey examples of {length} tokens to {out}")


def _sync_all() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def _measure(model, chunk: int, ids: torch.Tensor, decode_steps: int) -> dict:
    cache = InfLLMCache(model)
    kw = cache_kwargs(model, cache)
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)
    with torch.inference_mode():
        _sync_all()
        t0 = time.perf_counter()
        for a in range(0, ids.shape[1] - 1, chunk):
            model(ids[:, a : min(a + chunk, ids.shape[1] - 1)], use_cache=True, logits_to_keep=1, **kw)
        _sync_all()
        prefill_s = time.perf_counter() - t0
        token = ids[:, -1:]
        times = []
        for step in range(decode_steps + 4):
            t0 = time.perf_counter()
            token = model(token, use_cache=True, logits_to_keep=1, **kw).logits[:, -1].argmax(-1, keepdim=True)
            token = token.to(ids.device)
            _sync_all()
            if step >= 4:  # warm-up steps untimed
                times.append((time.perf_counter() - t0) * 1e3)
    return {
        "prefill_tok_s": (ids.shape[1] - 1) / prefill_s,
        "decode_ms_per_token": sum(times) / len(times),
        "peak_gib_per_gpu": [round(torch.cuda.max_memory_allocated(i) / GIB, 2) for i in range(torch.cuda.device_count())],
    }


def device_map_run(args: argparse.Namespace) -> None:
    rows = []
    base = [f"model.path={args.model}", "model.type=inf-llm", "model.fattn=true", *args.overrides]
    ids = None
    for label, extra in (
        ("1 GPU", ["model.device=cuda:0"]),
        (f"{torch.cuda.device_count()} GPUs, device_map auto", ["model.device_map=auto",
                                                                f"model.max_gpu_memory={args.max_gpu_memory}"]),
    ):
        cfg = load_config(DEFAULT_CONFIG, [*base, *extra])
        loaded = load_model(cfg)
        model = patch_model(loaded.model, cfg.model)
        placement = getattr(model, "hf_device_map", None)
        devices = sorted({str(d) for d in placement.values()}) if placement else [str(model.device)]
        if ids is None:
            ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (1, args.tokens),
                                generator=torch.Generator().manual_seed(0))
        first = model.get_input_embeddings().weight.device
        _measure(model, cfg.chunk_size, ids[:, : 2 * cfg.chunk_size].to(first), 2)  # warm-up: compile, tune
        result = _measure(model, cfg.chunk_size, ids.to(first), args.decode_tokens)
        layers_per_device = {}
        if placement:
            for name, dev in placement.items():
                layers_per_device[str(dev)] = layers_per_device.get(str(dev), 0) + ("layers." in name)
        rows.append({"setup": label, "devices": devices, "layers_per_device": layers_per_device, **result})
        print(json.dumps(rows[-1]), flush=True)
        del model, loaded
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\n{args.shape}, bf16, {args.tokens} prompt tokens, {torch.cuda.get_device_name(0)}")
    print(f"{'setup':<34} {'prefill tok/s':>13} {'decode ms/tok':>13}  peak GiB per GPU")
    for r in rows:
        print(f"{r['setup']:<34} {r['prefill_tok_s']:>13,.0f} {r['decode_ms_per_token']:>13.1f}  {r['peak_gib_per_gpu']}")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"shape": args.shape, "tokens": args.tokens, "rows": rows}, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save-model")
    s.add_argument("--shape", default="mistral-7b", choices=sorted(SHAPES))
    s.add_argument("--out", required=True)
    d = sub.add_parser("make-data")
    d.add_argument("--out", required=True)
    d.add_argument("--examples", type=int, default=16)
    d.add_argument("--length", default="16k")
    m = sub.add_parser("device-map")
    m.add_argument("--model", required=True)
    m.add_argument("--shape", default="mistral-7b", choices=sorted(SHAPES))
    m.add_argument("--max-gpu-memory", default="9GiB")
    m.add_argument("--tokens", type=int, default=32768)
    m.add_argument("--decode-tokens", type=int, default=32)
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    m.add_argument("--out-json", default=None)
    args = p.parse_args(argv)
    {"save-model": save_model, "make-data": make_data, "device-map": device_map_run}[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
