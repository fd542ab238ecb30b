"""Synthetic long-context runner: passkey / number_string / kv_retrieval (InfiniteBench recipes, generated
offline) for each attention type x length x depth x seed; accuracy tables, prefill speed, a
needle-in-a-haystack heatmap (PNG, one panel per type) and JSON.

    python -m benchmark.passkey --types origin,stream-llm,inf-llm --tasks passkey \\
        --lengths 4k,16k,32k --depths 0,0.25,0.5,0.75,1 --seeds 4 --out-dir results/passkey
    python -m benchmark.passkey --variant small-window:model.n_local=512,model.topk=8 ...
    python -m benchmark.passkey --out-dir results/passkey --report-only      # redraw from cases.jsonl

Every case is appended to `<out-dir>/cases.jsonl` as soon as it is done, and a rerun skips the cases already
there, so a long sweep can be stopped and resumed. Prompts use the InfLLM templates of these tasks and the
config's chat format and truncation (benchmark/prompts.py); answers are scored with InfiniteBench's scorers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python benchmark/passkey.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.metrics import INFINITEBENCH_METRICS
from benchmark.pipeline import read_records
from benchmark.prompts import DATASET2MAXGEN, encode_prompt, post_process, stop_token_ids
from benchmark.synthetic import TASKS, make_example, prompt_measurer
from inf_llm.errors import InfLLMError

log = logging.getLogger("benchmark.passkey")

CASES_FILE = "cases.jsonl"
SUMMARY_FILE = "summary.json"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Variant:
    """One attention setup: a label and the config overrides that make it."""

    label: str
    overrides: tuple[str, ...]


def parse_length(text: str) -> int:
    """ "4k" / "4K" -> 4096, "1m" -> 1048576, "3000" -> 3000."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    number = t[:-1] if mult > 1 else t
    try:
        value = int(float(number) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a length: {text!r} (use e.g. 2048, 4k, 1m)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"length must be positive: {text!r}")
    return value


def length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def parse_variants(types: str | None, specs: Sequence[str]) -> list[Variant]:
    """`--types a,b` (each `model.type=<t>`) plus `--variant label:k=v,k=v` entries."""
    variants = [Variant(t, (f"model.type={t}",)) for t in (types.split(",") if types else []) if t.strip()]
    for spec in specs:
        label, sep, rest = spec.partition(":")
        if not sep or not label:
            raise argparse.ArgumentTypeError(f"--variant {spec!r} must look like label:key=value,key=value")
        variants.append(Variant(label, tuple(o for o in rest.split(",") if o)))
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"variant labels must be unique: {labels}")
    return variants


def case_key(record: dict[str, Any]) -> tuple:
    return (record["variant"], record["task"], int(record["length"]), float(record["depth"]), int(record["seed"]))


@dataclass
class PreparedCase:
    """One synthetic example, encoded: its record so far and its prompt ids (None when skipped)."""

    record: dict[str, Any]
    ids: list[int] | None
    max_new_tokens: int


def prepare_case(
    tokenizer, cfg, variant: Variant, task: str, length: int, depth: float, seed: int, max_new_tokens: int | None
) -> PreparedCase:
    """Generate one synthetic example and encode its prompt (template, chat format, truncation)."""
    example = make_example(task, length, depth, seed, prompt_measurer(tokenizer, task, cfg.conv_type))
    max_gen = DATASET2MAXGEN[task]
    enc = encode_prompt(tokenizer, task, example.fields, cfg.conv_type, cfg.max_len, max_gen, cfg.truncation.value)
    record: dict[str, Any] = {
        "variant": variant.label,
        "type": cfg.model.type.value,
        "task": task,
        "length": length,
        "depth": depth,
        "seed": seed,
        "answer": example.answer,
        "prompt_tokens": enc.original_tokens,
        "truncated": enc.truncated,
    }
    if enc.skipped:
        return PreparedCase({**record, "pred": "", "correct": 0.0, "skipped": True}, None, 0)
    gen = min(max_gen, max_new_tokens) if max_new_tokens else max_gen
    return PreparedCase(record, list(enc.ids), gen)


def finish_case(model, tokenizer, cfg, case: PreparedCase, cache=None, reused_tokens: int = 0) -> dict[str, Any]:
    """Run the model on a prepared case (optionally from a memory holding its first `reused_tokens`), score it."""
    from benchmark.common import generate_greedy

    task = case.record["task"]
    text, stats = generate_greedy(
        model, tokenizer, cfg, case.ids, case.max_new_tokens, stop_token_ids(tokenizer, task, cfg.conv_type),
        cache=cache, reused_tokens=reused_tokens,
    )
    pred = post_process(text, cfg.conv_type, task)
    return {
        **case.record,
        "pred": pred,
        "correct": INFINITEBENCH_METRICS[task](pred, [case.record["answer"]]),
        **{k: v for k, v in stats.as_dict().items() if k != "prompt_tokens"},
    }


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_prefix_plan(id_lists: Sequence[Sequence[int]], align: int) -> list[int]:
    """For prompts run in the given order: how many leading tokens of each a shared "trunk" memory can hold
    before the prompt branches off, so that it stays a prefix of every later prompt. Rounded down to a
    multiple of `align` (the chunk size), so every prompt is still fed in exactly the chunks it would be
    fed in alone: the results are those of separate runs, only the repeated prefill work is gone."""
    plan = []
    for i, ids in enumerate(id_lists):
        limit = len(ids) - 1  # the last prompt token goes to generate()
        for later in id_lists[i + 1 :]:
            limit = min(limit, common_prefix(ids, later))
        plan.append(limit // align * align)
    return plan


def run_group(model, tokenizer, cfg, cases: list[PreparedCase], share_prefix: bool):
    """Run the cases of one (variant, task, length), yielding each finished record.

    With `share_prefix`, a trunk memory is fed the prefix common to the remaining prompts (the haystack up to
    the shallowest needle left) once, and each case continues from a clone of it (synthetic haystacks repeat
    the same noise, so the cases of one length share most of their tokens)."""
    import torch

    from benchmark.common import prefill_chunks
    from inf_llm.adapter import InfLLMCache

    runnable = [c for c in cases if c.ids is not None]
    for c in cases:
        if c.ids is None:
            yield c.record
    if not share_prefix:
        for c in runnable:
            yield finish_case(model, tokenizer, cfg, c)
        return
    runnable.sort(key=lambda c: (c.record["depth"], c.record["seed"]))
    plan = shared_prefix_plan([c.ids for c in runnable], cfg.chunk_size)
    device = model.get_input_embeddings().weight.device
    trunk, held = InfLLMCache(model), 0
    for case, reach in zip(runnable, plan):
        if reach > held:  # the trunk's tokens are a prefix of this prompt: extend it along it
            with torch.inference_mode():
                ids = torch.tensor([case.ids], dtype=torch.long, device=device)
                prefill_chunks(model, cfg, trunk, ids, held, reach)
            held = reach
        yield finish_case(model, tokenizer, cfg, case, cache=trunk.clone(), reused_tokens=held)


# ------------------------------------------------------------------------------------------ summary
def summarize(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (percent) by variant/task/length and by depth, and mean prefill tokens/s by variant/length."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    by_depth: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    speed: dict = defaultdict(lambda: defaultdict(list))
    for c in cases:
        if c.get("skipped"):
            continue
        acc[c["variant"]][c["task"]][c["length"]].append(c["correct"])
        by_depth[c["variant"]][c["task"]][c["length"]][c["depth"]].append(c["correct"])
        tps = c.get("prefill_tokens_per_second")
        if tps is not None and math.isfinite(tps):
            speed[c["variant"]][c["length"]].append(tps)

    def pct(values: list[float]) -> dict[str, Any]:
        return {"accuracy": round(100 * statistics.fmean(values), 1), "n": len(values)}

    return {
        "accuracy": {
            v: {t: {str(n): pct(x) for n, x in sorted(ls.items())} for t, ls in ts.items()} for v, ts in acc.items()
        },
        "accuracy_by_depth": {
            v: {
                t: {str(n): {f"{d:g}": pct(x) for d, x in sorted(ds.items())} for n, ds in sorted(ls.items())}
                for t, ls in ts.items()
            }
            for v, ts in by_depth.items()
        },
        "prefill_tokens_per_second": {
            v: {str(n): round(statistics.fmean(x), 1) for n, x in sorted(ls.items())} for v, ls in speed.items()
        },
    }


def print_tables(summary: dict[str, Any], variants: Sequence[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    tasks = sorted({t for v in summary["accuracy"].values() for t in v})
    for task in tasks:
        lengths = sorted({int(n) for v in summary["accuracy"].values() for n in v.get(task, {})})
        table = Table(title=f"{task}: accuracy % (cases)")
        table.add_column("type")
        for n in lengths:
            table.add_column(length_label(n), justify="right")
        for v in variants:
            row = summary["accuracy"].get(v, {}).get(task, {})
            table.add_row(
                v, *[f"{row[str(n)]['accuracy']:.1f} ({row[str(n)]['n']})" if str(n) in row else "-" for n in lengths]
            )
        console.print(table)
    lengths = sorted({int(n) for v in summary["prefill_tokens_per_second"].values() for n in v})
    table = Table(title="prefill tokens/s (mean over cases)")
    table.add_column("type")
    for n in lengths:
        table.add_column(length_label(n), justify="right")
    for v in variants:
        row = summary["prefill_tokens_per_second"].get(v, {})
        table.add_row(v, *[f"{row[str(n)]:.0f}" if str(n) in row else "-" for n in lengths])
    console.print(table)


def heatmap_data(summary: dict[str, Any], task: str, variants: Sequence[str]) -> dict[str, Any]:
    """{variants, lengths, depths, accuracy[variant] = rows by depth of columns by length (None: not run)}."""
    per = summary["accuracy_by_depth"]
    lengths = sorted({int(n) for v in variants for n in per.get(v, {}).get(task, {})})
    depths = sorted({float(d) for v in variants for ds in per.get(v, {}).get(task, {}).values() for d in ds})
    grid = {}
    for v in variants:
        cells = per.get(v, {}).get(task, {})
        grid[v] = [[cells.get(str(n), {}).get(f"{d:g}", {}).get("accuracy") for n in lengths] for d in depths]
    return {"task": task, "variants": list(variants), "lengths": lengths, "depths": depths, "accuracy": grid}


def plot_heatmap(data: dict[str, Any], path: Path) -> None:
    """One panel per attention type: depth (rows) x length (columns), green = found."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    variants, lengths, depths = data["variants"], data["lengths"], data["depths"]
    fig, axes = plt.subplots(
        1,
        len(variants),
        figsize=(1.2 + 0.9 * max(len(lengths), 2) * len(variants), 3.6),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for ax, v in zip(axes[0], variants):
        grid = np.array([[np.nan if x is None else x for x in row] for row in data["accuracy"][v]], dtype=float)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        ax.set_title(v)
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="accuracy %", shrink=0.85)
    fig.suptitle(f"{data['task']}: needle in a haystack")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(out_dir: Path, cases: list[dict[str, Any]], variants: Sequence[str] | None = None) -> dict:
    """summary.json, heatmap_<task>.json/.png, and the tables on stdout."""
    variants = list(variants) if variants else list(dict.fromkeys(c["variant"] for c in cases))
    summary = summarize(cases)
    summary["variants"] = variants
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    for task in sorted({c["task"] for c in cases}):
        data = heatmap_data(summary, task, variants)
        (out_dir / f"heatmap_{task}.json").write_text(json.dumps(data, indent=2) + "\n")
        plot_heatmap(data, out_dir / f"heatmap_{task}.png")
    print_tables(summary, variants)
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="config YAML (default: the served SmolLM2 config)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every variant (repeatable)",
    )
    p.add_argument("--types", default=None, help="comma-separated model.type values, one variant each")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:K=V,K=V",
        help="a named variant with its own overrides (repeatable)",
    )
    p.add_argument("--tasks", default="passkey", help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--lengths", default="4k", help="comma-separated prompt lengths in tokens (e.g. 2k,4k,32k)")
    p.add_argument(
        "--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS), help="comma-separated needle depths in [0, 1]"
    )
    p.add_argument("--seeds", type=int, default=1, help="examples per (task, length, depth): seeds 0..N-1")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens (default: task's)")
    p.add_argument(
        "--no-share-prefix",
        action="store_true",
        help="prefill every prompt from scratch (default: cases of one length share their common prefix once)",
    )
    p.add_argument("--out-dir", required=True)
    p.add_argument("--report-only", action="store_true", help="no model: redraw reports from cases.jsonl")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (InfLLMError, ValueError, argparse.ArgumentTypeError) as exc:  # bad config/arguments: no traceback
        log.error("%s", exc)
        return 2


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases_path = out_dir / CASES_FILE
    if args.report_only:
        cases = read_records(cases_path)
        if not cases:
            raise SystemExit(f"no cases in {cases_path}")
        write_reports(out_dir, cases)
        return 0

    variants = parse_variants(args.types, args.variant) or [Variant("config", ())]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
    depths = [float(x) for x in args.depths.split(",") if x.strip()]
    if any(not 0 <= d <= 1 for d in depths):
        raise SystemExit(f"depths must be in [0, 1]: {depths}")

    from benchmark.common import load_for_eval

    done = {case_key(r) for r in read_records(cases_path)}
    with open(cases_path, "a", encoding="utf-8") as f:
        for variant in variants:
            todo = [
                (t, n, d, s)
                for t in tasks
                for n in lengths
                for d in depths
                for s in range(args.seeds)
                if (variant.label, t, n, d, s) not in done
            ]
            if not todo:
                continue
            model, tokenizer, cfg = load_for_eval(args.config, [*args.override, *variant.overrides])
            groups: dict[tuple[str, int], list[tuple[float, int]]] = defaultdict(list)
            for task, length, depth, seed in todo:
                groups[(task, length)].append((depth, seed))
            i = 0
            for (task, length), points in groups.items():
                cases = [
                    prepare_case(tokenizer, cfg, variant, task, length, d, s, args.max_new_tokens) for d, s in points
                ]
                for record in run_group(model, tokenizer, cfg, cases, share_prefix=not args.no_share_prefix):
                    i += 1
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    log.info(
                        "[%s %d/%d] %s %s depth %.2f seed %d: %s (pred %r, prefill %.0f tok/s, %d reused)",
                        variant.label,
                        i,
                        len(todo),
                        task,
                        length_label(length),
                        record["depth"],
                        record["seed"],
                        "ok" if record["correct"] else "MISS",
                        record["pred"][:60],
                        record.get("prefill_tokens_per_second", float("nan")),
                        record.get("reused_tokens", 0),
                    )
            del model
    labels = [v.label for v in variants]
    cases = [c for c in read_records(cases_path) if c["variant"] in labels]
    write_reports(out_dir, cases, labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
