"""Accuracy cost of the CPU's faster weight formats: the same text read by the served model in float32 and
with each variant's linear layers, in lockstep, comparing the next-token distributions at every position
(KL divergence, top-1 agreement, largest log-probability change), for the prefill (chunks of many rows)
and for decode steps (one row per product, teacher-forced on the same text).

    python benchmark/linear_accuracy.py --tokens 4096 --decode 128 --out /tmp/linear-accuracy.json

Variants (`--variants`):
  fp16-weights   `model.cpu_fp16_weights: true`: weights rounded to fp16, products in float32 (fbgemm)
  bfloat16       `model.dtype: bfloat16`: what a CPU with native bf16 runs (slow where bf16 is emulated)
  int8-dynamic   weights int8 per output channel, activations quantized to 7 bits per call (torch's
                 fbgemm dynamic int8 linear): measured here, not offered as a setting (see docs/speed.md)

Text: the project's own documentation (natural prose), as `benchmark/offload_accuracy.py` reads it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inf_llm import openmp  # noqa: E402  (before torch: bounded OpenMP spinning, as the server)

openmp.configure()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmark.common import Agreement, load_for_eval  # noqa: E402
from benchmark.offload_accuracy import DEFAULT_TEXTS, _text_ids  # noqa: E402
from inf_llm.adapter import InfLLMCache, cache_kwargs  # noqa: E402
from inf_llm.engine.packed_linear import cpu_linear_layers, replace_submodule  # noqa: E402

BASE = ["model.dtype=float32", "model.cpu_fp16_weights=false"]
VARIANTS = {
    "fp16-weights": ["model.dtype=float32", "model.cpu_fp16_weights=true"],
    "bfloat16": ["model.dtype=bfloat16"],
    "int8-dynamic": BASE,  # then quantized here (`_quantize_int8`)
}


class _DynamicInt8Linear(nn.Module):
    """torch's fbgemm dynamic int8 linear: int8 weights (a scale per output channel), activations quantized
    per call with one scale (7 bits: AVX2's int16 pair sums saturate with 8)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny).double()
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated (in favour of torchao)
            warnings.simplefilter("ignore", UserWarning)
            qw = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.int64), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qw, None if linear.bias is None else linear.bias.detach())
        self.shape = (linear.in_features, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.shape[0]), self.packed, True)
        return out.view(*x.shape[:-1], self.shape[1])


def _quantize_int8(model: nn.Module) -> None:
    for name, linear in cpu_linear_layers(model, torch.float32):
        replace_submodule(model, name, _DynamicInt8Linear(linear))


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="config file (default: the served SmolLM2 config)")
    p.add_argument("--variants", default="fp16-weights,bfloat16,int8-dynamic",
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of text prefilled (every position scored)")
    p.add_argument("--decode", type=int, default=128, help="single-token steps after the prefill (scored)")
    p.add_argument("--text", type=Path, action="append", default=None, help="text file(s) to read")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.variant_names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_names if v not in VARIANTS]
    if unknown or not args.variant_names:
        p.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if args.tokens < 2 or args.decode < 0:
        p.error(f"--tokens must be at least 2 and --decode at least 0, got {args.tokens} and {args.decode}")
    return args


@torch.inference_mode()
def _read(model, cfg, ids: torch.Tensor, prefill: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log-probabilities of every prefilled position (one tensor per chunk) and of each decode step."""
    cache = InfLLMCache(model)
    kw = cache_kwargs(model, cache)
    chunks, steps = [], []
    for a in range(0, prefill, cfg.chunk_size):
        b = min(a + cfg.chunk_size, prefill)
        logits = model(ids[:, a:b], use_cache=True, **kw).logits[0]
        chunks.append(torch.log_softmax(logits.float(), dim=-1))
    for i in range(prefill, ids.shape[1]):
        steps.append(torch.log_softmax(model(ids[:, i : i + 1], use_cache=True, **kw).logits[0, -1:].float(), -1))
    return chunks, steps


def compare(args) -> dict:
    model, tokenizer, cfg = load_for_eval(args.config, BASE)
    ids = _text_ids(tokenizer, args.text or DEFAULT_TEXTS, args.tokens + args.decode).to(model.device)
    base = _read(model, cfg, ids, args.tokens)
    del model
    results = {}
    for name in args.variant_names:
        variant, _, vcfg = load_for_eval(args.config, VARIANTS[name])
        if name == "int8-dynamic":
            _quantize_int8(variant)
        chunks, steps = _read(variant, vcfg, ids, args.tokens)
        prefill, decode = Agreement(), Agreement()
        for b, v in zip(base[0], chunks):
            prefill.add(b, v)
        for b, v in zip(base[1], steps):
            decode.add(b, v)
        results[name] = {"prefill": prefill.as_dict(), "decode": decode.as_dict()}
        del variant
    return {"model": cfg.model.path, "tokens": args.tokens, "decode": args.decode, "results": results}


def table(report: dict) -> str:
    lines = ["| weights | prefill mean KL (nats) | prefill top-1 | decode mean KL | decode top-1 | max abs Δ log p |",
             "|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        p, d = r["prefill"], r["decode"]
        worst = max(p["max_abs_logprob_diff"], d["max_abs_logprob_diff"])
        decode = (f"{d['mean_kl']:.2e} | {100 * d['top1_agreement']:.2f}%" if d["positions"] else "- | -")
        lines.append(f"| {name} | {p['mean_kl']:.2e} | {100 * p['top1_agreement']:.2f}% | {decode} | {worst:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    report = compare(args)
    print(f"{report['model']}: {args.tokens} tokens prefilled, {args.decode} decoded, against float32")
    print(table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
