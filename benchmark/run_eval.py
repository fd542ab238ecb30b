"""LongBench / InfiniteBench runner: predict (resumable, sharded), merge shards, score.

    python -m benchmark.run_eval predict --data-dir DATA --tasks longbench --out-dir results/lb \\
        [--config CFG] [--override model.topk=32 ...] [--rank R --world-size W] [--limit N]
    torchrun --nproc-per-node 4 -m benchmark.run_eval predict ...   # RANK / WORLD_SIZE from torchrun
    python -m benchmark.run_eval merge --out-dir results/lb --tasks longbench --world-size 4 [--data-dir DATA]
    python -m benchmark.run_eval score --out-dir results/lb [--variant code_debug=infllm]

`--tasks` takes task names and the groups `longbench` (16 English tasks), `infinitebench` (the 8 of the
InfLLM paper). Prompts, generation lengths, chat formats and truncation are the original InfLLM's
(benchmark/prompts.py); decoding is greedy; scoring is the official scorers' (benchmark/metrics.py).
With several ranks, rank 0 waits for the others and merges (unless --no-merge).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python benchmark/run_eval.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.data import EvalExample, load_task
from benchmark.metrics import INFINITEBENCH_TASKS, LONGBENCH_EN_TASKS
from benchmark.pipeline import format_scores, merge_task, parse_variants, predict_task, score_dir
from benchmark.prompts import DATASET2MAXGEN, TruncationStyle, encode_prompt, post_process, stop_token_ids
from inf_llm.errors import InfLLMError

log = logging.getLogger("benchmark.run_eval")

TASK_GROUPS = {"longbench": LONGBENCH_EN_TASKS, "infinitebench": INFINITEBENCH_TASKS}
# How often rank 0 looks for the other ranks' done markers (seconds).
MERGE_POLL_SECONDS = 10.0


def expand_tasks(spec: str) -> list[str]:
    """Comma-separated task names and group names -> task list (order kept, duplicates dropped)."""
    tasks: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        tasks.extend(TASK_GROUPS.get(item, (item,)))
    return list(dict.fromkeys(tasks))


def rank_and_world(args: argparse.Namespace) -> tuple[int, int]:
    """--rank/--world-size, else torchrun's RANK/WORLD_SIZE, else a single process."""
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "0"))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise SystemExit(f"rank {rank} is not in [0, world_size={world})")
    return rank, world


def make_predict_fn(model, tokenizer, cfg, task: str, max_new_tokens: int | None, style: TruncationStyle):
    """EvalExample -> prediction record, with the original's prompt rules and greedy decoding."""
    from benchmark.common import generate_greedy  # torch + the model stack, only when predicting

    max_gen = DATASET2MAXGEN[task]
    gen_tokens = min(max_gen, max_new_tokens) if max_new_tokens else max_gen
    stops = stop_token_ids(tokenizer, task, cfg.conv_type)
    truncation = cfg.truncation.value

    def predict(example: EvalExample) -> dict:
        enc = encode_prompt(tokenizer, task, example.fields, cfg.conv_type, cfg.max_len, max_gen, truncation, style)
        record = {"answers": example.answers, "all_classes": example.all_classes, "length": example.length}
        if enc.skipped:
            log.warning(
                "%s %s: %d prompt tokens > max_len - max_gen; skipped (truncation: error)",
                task,
                example.id,
                enc.original_tokens,
            )
            return {**record, "pred": "", "skipped": True, "prompt_tokens": enc.original_tokens}
        text, stats = generate_greedy(model, tokenizer, cfg, enc.ids, gen_tokens, stops)
        pred = post_process(text, cfg.conv_type, task)
        log.info(
            "%s %s: %d tokens, prefill %.0f tok/s, pred %r",
            task,
            example.id,
            len(enc.ids),
            stats.prefill_tokens_per_second,
            pred[:80],
        )
        return {
            **record,
            "pred": pred,
            "token_length": len(enc.ids) + max_gen,
            "prompt_tokens": len(enc.ids),
            "truncated": enc.truncated,
            "stats": stats.as_dict(),
        }

    return predict


def _done_marker(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / f".done.rank{rank}-of-{world}"


def _wait_for_ranks(out_dir: Path, world: int, since: float, timeout: float | None) -> bool:
    """Rank 0: wait until every rank wrote its done marker after `since`."""
    deadline = None if timeout is None else time.time() + timeout
    while True:
        ready = [
            p.is_file() and p.stat().st_mtime >= since for p in (_done_marker(out_dir, r, world) for r in range(world))
        ]
        if all(ready):
            return True
        if deadline is not None and time.time() > deadline:
            return False
        log.info("rank 0: waiting for ranks %s to finish", [r for r, ok in enumerate(ready) if not ok])
        time.sleep(MERGE_POLL_SECONDS)


def cmd_predict(args: argparse.Namespace) -> int:
    from benchmark.common import load_for_eval, torchrun_overrides

    rank, world = rank_and_world(args)
    tasks = expand_tasks(args.tasks)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    marker = _done_marker(out_dir, rank, world)
    marker.unlink(missing_ok=True)
    data = {task: load_task(args.data_dir, task, args.limit) for task in tasks}  # fail fast on bad data
    model, tokenizer, cfg = load_for_eval(args.config, torchrun_overrides(args.override))
    style = TruncationStyle(args.truncation_style)
    for task in tasks:
        fn = make_predict_fn(model, tokenizer, cfg, task, args.max_new_tokens, style)
        counts = predict_task(data[task], fn, out_dir, task, rank, world)
        log.info("rank %d/%d %s: %s", rank, world, task, counts)
    marker.write_text(json.dumps({"tasks": tasks, "finished": time.time()}))
    if world > 1 and rank == 0 and not args.no_merge:
        if not _wait_for_ranks(out_dir, world, started, args.merge_timeout):
            log.warning("rank 0: not every rank finished in time; run `merge` later")
            return 0
        for task in tasks:
            info = merge_task(out_dir, task, world, order=[e.id for e in data[task]])
            log.info("merged %s: %d records, %d missing", task, info["records"], len(info["missing"]))
        for r in range(world):
            _done_marker(out_dir, r, world).unlink(missing_ok=True)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    for task in expand_tasks(args.tasks):
        order = [e.id for e in load_task(args.data_dir, task, args.limit)] if args.data_dir else None
        info = merge_task(args.out_dir, task, args.world_size, order=order)
        print(
            f"{task}: {info['records']} records from {len(info['shards'])} shards"
            + (f", {len(info['missing'])} missing" if info["missing"] else "")
        )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    tasks = expand_tasks(args.tasks) if args.tasks else None
    result = score_dir(args.out_dir, tasks, parse_variants(args.variant))
    print(format_scores(result))
    print(f"written: {Path(args.out_dir, 'result.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="generate predictions (resumable)")
    p.add_argument("--config", default=None, help="config YAML (default: the served SmolLM2 config)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. model.type=stream-llm (repeatable)",
    )
    p.add_argument("--data-dir", required=True, help="folder with <task>.jsonl (or longbench/, infinite-bench/)")
    p.add_argument("--tasks", required=True, help="comma-separated tasks and groups (longbench, infinitebench)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--rank", type=int, default=None, help="this process's shard (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="cap on generated tokens (smoke runs; default: the task's original length)",
    )
    p.add_argument(
        "--truncation-style",
        choices=[s.value for s in TruncationStyle],
        default="infllm",
        help="infllm: keep 128 head tokens + the tail (the original); middle: LongBench's halves",
    )
    p.add_argument("--no-merge", action="store_true", help="rank 0 does not wait for and merge the shards")
    p.add_argument("--merge-timeout", type=float, default=None, help="seconds rank 0 waits for the others")
    p.set_defaults(func=cmd_predict)

    m = sub.add_parser("merge", help="fold rank shards into <task>.jsonl")
    m.add_argument("--out-dir", required=True)
    m.add_argument("--tasks", required=True)
    m.add_argument("--world-size", type=int, required=True)
    m.add_argument("--data-dir", default=None, help="order records as the data and report missing ids")
    m.add_argument("--limit", type=int, default=None)
    m.set_defaults(func=cmd_merge)

    s = sub.add_parser("score", help="score <task>.jsonl files and write result.json")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--tasks", default=None, help="default: every task with a prediction file")
    s.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="TASK=VARIANT",
        help="alternative scorer, e.g. code_debug=infllm (InfLLM's own code_debug scorer)",
    )
    s.set_defaults(func=cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InfLLMError, ValueError) as exc:  # bad data, config or arguments: the message, not a traceback
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
