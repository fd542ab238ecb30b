"""The predict -> merge -> score pipeline, independent of how a prediction is made.

- Prediction files are jsonl, one record per example: {"id", "pred", "answers", "all_classes", "length",
  "token_length", ...} (the original's fields plus the id and timing). Each record is appended and flushed
  as soon as it exists, so an interrupted run loses at most the example in flight.
- Resumable: ids already present (in the task's file, or in this rank's shard) are skipped.
- Sharding: rank r of w takes examples r, r+w, r+2w, ... (the original's `data[rank::world_size]`) and
  writes `<task>.rank<r>-of-<w>.jsonl`; `merge_task` folds the shards into `<task>.jsonl` in data order.
- Scoring: `score_dir` scores every `<task>.jsonl` with benchmark.metrics and adds the LongBench averages.

Knows nothing of models; `predict_fn` is any function EvalExample -> record dict.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmark.data import EvalExample
from benchmark.metrics import (
    INFINITEBENCH_METRICS,
    LONGBENCH_METRICS,
    METRIC_VARIANTS,
    Metric,
    longbench_averages,
    score_task,
)

log = logging.getLogger(__name__)

PredictFn = Callable[[EvalExample], dict[str, Any]]
RESULT_FILE = "result.json"


def task_file(out_dir: str | Path, task: str) -> Path:
    return Path(out_dir, f"{task}.jsonl")


def shard_file(out_dir: str | Path, task: str, rank: int, world_size: int) -> Path:
    return Path(out_dir, f"{task}.rank{rank}-of-{world_size}.jsonl")


def output_file(out_dir: str | Path, task: str, rank: int, world_size: int) -> Path:
    """Where this rank appends its predictions."""
    return task_file(out_dir, task) if world_size == 1 else shard_file(out_dir, task, rank, world_size)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a prediction file; a missing file is empty, and a torn last line (a run killed while
    writing) is dropped with a warning. Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: dropping a torn last line (interrupted write)", path)
                continue
            raise
    return records


def _repair_tail(path: Path) -> None:
    """Make sure the file ends with a newline, dropping a torn last line, before appending to it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    last_nl = data.rfind(b"\n")
    tail = data[last_nl + 1 :]
    try:
        json.loads(tail)
        path.write_bytes(data + b"\n")
    except json.JSONDecodeError:
        log.warning("%s: removing a torn last line (interrupted write)", path)
        path.write_bytes(data[: last_nl + 1])


def done_ids(out_dir: str | Path, task: str, rank: int = 0, world_size: int = 1) -> set[str]:
    """Ids already predicted for `task`: in the merged file and in this rank's shard."""
    ids = {str(r["id"]) for r in read_records(task_file(out_dir, task))}
    if world_size > 1:
        ids |= {str(r["id"]) for r in read_records(shard_file(out_dir, task, rank, world_size))}
    return ids


def shard(examples: Sequence[EvalExample], rank: int, world_size: int) -> list[EvalExample]:
    """This rank's examples: every `world_size`-th starting at `rank`."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return list(examples[rank::world_size])


def predict_task(
    examples: Sequence[EvalExample],
    predict_fn: PredictFn,
    out_dir: str | Path,
    task: str,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, int]:
    """Predict this rank's not-yet-done examples of `task`, appending each record as it is made.

    Returns counts: {"total": examples of this rank, "skipped_done": already there, "predicted": new records,
    "skipped_too_long": examples the predict_fn declined (it returned a record with "skipped": true, which is
    written so a resumed run does not retry it)}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = shard(examples, rank, world_size)
    done = done_ids(out_dir, task, rank, world_size)
    path = output_file(out_dir, task, rank, world_size)
    _repair_tail(path)
    counts = {"total": len(mine), "skipped_done": 0, "predicted": 0, "skipped_too_long": 0}
    with open(path, "a", encoding="utf-8") as f:
        for example in mine:
            if example.id in done:
                counts["skipped_done"] += 1
                continue
            record = predict_fn(example)
            record = {"id": example.id, **record}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            counts["skipped_too_long" if record.get("skipped") else "predicted"] += 1
    return counts


def merge_task(
    out_dir: str | Path, task: str, world_size: int, order: Sequence[str] | None = None, remove_shards: bool = True
) -> dict[str, Any]:
    """Fold `<task>.rank*-of-<world_size>.jsonl` into `<task>.jsonl` (with what it already holds).

    Records are ordered by `order` (the data's ids; unknown ids go last) or by (rank, position), i.e. the
    original's concatenation. A duplicated id keeps its first record. Shards are removed only when `order`
    is given and every id in it is present, so an incomplete merge can be redone after the missing ranks run.
    Returns {"records": n, "missing": [ids of `order` with no record], "shards": shard files read}.
    """
    out_dir = Path(out_dir)
    merged: dict[str, dict[str, Any]] = {}
    for record in read_records(task_file(out_dir, task)):
        merged.setdefault(str(record["id"]), record)
    shards = [shard_file(out_dir, task, r, world_size) for r in range(world_size)]
    read = [p for p in shards if p.is_file()]
    for path in read:
        for record in read_records(path):
            merged.setdefault(str(record["id"]), record)
    if order is not None:
        rank_of = {id_: i for i, id_ in enumerate(order)}
        ids = sorted(merged, key=lambda i: (rank_of.get(i, len(rank_of)), i))
        missing = [i for i in order if i not in merged]
    else:
        ids, missing = list(merged), []
    tmp = task_file(out_dir, task).with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(merged[id_], ensure_ascii=False) + "\n" for id_ in ids)
    os.replace(tmp, task_file(out_dir, task))
    if remove_shards and order is not None and not missing:
        for path in read:
            path.unlink()
    return {"records": len(ids), "missing": missing, "shards": [str(p) for p in read]}


def known_tasks_in(out_dir: str | Path) -> list[str]:
    """Tasks with a merged prediction file in `out_dir` (shards and other files ignored)."""
    names = []
    for path in sorted(Path(out_dir).glob("*.jsonl")):
        name = path.name[: -len(".jsonl")]
        if name in LONGBENCH_METRICS or name in INFINITEBENCH_METRICS:
            names.append(name)
    return names


def parse_variants(specs: Iterable[str]) -> dict[str, Metric]:
    """`task=variant` strings -> scorer overrides (e.g. code_debug=infllm for InfLLM's code_debug scorer)."""
    out = {}
    for spec in specs:
        task, _, variant = spec.partition("=")
        if (task, variant) not in METRIC_VARIANTS:
            raise ValueError(f"unknown scorer variant {spec!r}; known: {[f'{t}={v}' for t, v in METRIC_VARIANTS]}")
        out[task] = METRIC_VARIANTS[(task, variant)]
    return out


def score_dir(
    out_dir: str | Path,
    tasks: Sequence[str] | None = None,
    variants: dict[str, Metric] | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Score each task's merged predictions; records marked "skipped" are left out, as the original leaves
    over-long examples out. Writes `result.json` ({"scores", "counts", "longbench", "skipped"})."""
    variants = variants or {}
    tasks = list(tasks) if tasks is not None else known_tasks_in(out_dir)
    scores: dict[str, float] = {}
    counts: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for task in tasks:
        records = read_records(task_file(out_dir, task))
        kept = [r for r in records if not r.get("skipped")]
        skipped[task] = len(records) - len(kept)
        counts[task] = len(kept)
        score = score_task(task, kept, variants.get(task))
        if score is not None:
            scores[task] = score
    result = {"scores": scores, "counts": counts, "skipped": skipped}
    if any(t in LONGBENCH_METRICS for t in scores):
        result["longbench"] = longbench_averages(scores)
    if write:
        Path(out_dir, RESULT_FILE).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def format_scores(result: dict[str, Any]) -> str:
    """A plain text table of a `score_dir` result."""
    lines = [f"{'task':<24}{'score':>8}{'n':>6}"]
    for task, score in result["scores"].items():
        lines.append(f"{task:<24}{score:>8.2f}{result['counts'][task]:>6}")
    lb = result.get("longbench")
    if lb:
        for key, label in (("avg_15", "LongBench avg (15)"), ("avg_16", "LongBench avg (16)")):
            value = lb[key]
            lines.append(f"{label:<24}{value:>8.2f}" if value is not None else f"{label:<24}{'n/a':>8}")
        if lb["missing"]:
            lines.append(f"(LongBench tasks without predictions: {', '.join(lb['missing'])})")
    return "\n".join(lines)
