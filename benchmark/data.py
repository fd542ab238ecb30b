"""Local benchmark data: LongBench and InfiniteBench jsonl files -> `EvalExample`s.

LongBench lines: {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}
(the official data.zip, `data/<task>.jsonl`). InfiniteBench lines: {"id", "context", "input", "answer",
"options"} (the official `<task>.jsonl`). The template fields and answers are derived as the original InfLLM
`benchmark/pred.py` (`load_infinite_bench`) does. Knows nothing of models or tokenizers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.metrics import INFINITEBENCH_METRICS, LONGBENCH_METRICS
from inf_llm.errors import InfLLMError

# Sub-folders searched under --data-dir, in order (the original's layout, the zip's, and flat).
LONGBENCH_DIRS = ("", "longbench", "LongBench", "data", "longbench/data")
INFINITEBENCH_DIRS = ("", "infinite-bench", "infinitebench", "InfiniteBench")
_OPTIONS = "ABCD"
_UUID_IN_QUOTES = re.compile(r'"[0-9a-fA-F-]{36}"')


class BenchmarkDataError(InfLLMError):
    """A benchmark data file is missing or malformed."""

    http_status = 400
    error_type = "benchmark_data_error"


@dataclass
class EvalExample:
    """One benchmark example, ready for a prompt template."""

    task: str
    id: str  # LongBench `_id`, InfiniteBench `id`, else the line number
    fields: dict[str, Any]  # template fields ({context}, {input}, {question}, ...)
    answers: Any  # what the scorer compares with: a list of strings (or ints for math tasks)
    all_classes: list[str] | None = None
    length: int = 0  # words of the context (LongBench's own count when given)
    extra: dict[str, Any] = field(default_factory=dict)


def find_task_file(data_dir: str | Path, task: str) -> Path:
    """The jsonl file of `task` under `data_dir` (flat, or in the official sub-folders)."""
    subdirs = LONGBENCH_DIRS if task in LONGBENCH_METRICS else INFINITEBENCH_DIRS
    tried = []
    for sub in subdirs:
        path = Path(data_dir, sub, f"{task}.jsonl")
        if path.is_file():
            return path
        tried.append(str(path))
    raise BenchmarkDataError(
        f"no data file for task {task!r}; looked for: {', '.join(tried)}. "
        f"Download the data with benchmark/download_data.sh or pass --data-dir"
    )


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a malformed line is an error naming the line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkDataError(f"{path}:{lineno}: not valid JSON ({exc})") from None


def load_task(data_dir: str | Path, task: str, limit: int | None = None) -> list[EvalExample]:
    """All examples of a task (the first `limit` if given), in file order."""
    if task not in LONGBENCH_METRICS and task not in INFINITEBENCH_METRICS:
        raise BenchmarkDataError(
            f"unknown task {task!r}; LongBench: {sorted(LONGBENCH_METRICS)}; "
            f"InfiniteBench: {sorted(INFINITEBENCH_METRICS)}"
        )
    path = find_task_file(data_dir, task)
    examples = []
    for index, (lineno, obj) in enumerate(iter_jsonl(path)):
        if limit is not None and index >= limit:
            break
        try:
            if task in LONGBENCH_METRICS:
                examples.append(longbench_example(task, obj, index))
            else:
                examples.append(infinitebench_example(task, obj, index))
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise BenchmarkDataError(f"{path}:{lineno}: malformed {task} example: {exc!r}") from None
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise BenchmarkDataError(f"{path}: duplicate example ids; resumable runs need unique ids")
    return examples


def longbench_example(task: str, obj: dict[str, Any], index: int) -> EvalExample:
    answers = obj["answers"]
    return EvalExample(
        task=task,
        id=str(obj.get("_id", index)),
        fields={"context": obj["context"], "input": obj["input"]},
        answers=list(answers) if isinstance(answers, list) else [answers],
        all_classes=obj.get("all_classes"),
        length=int(obj.get("length", len(obj["context"].split()))),
    )


def _choice_answer(obj: dict[str, Any]) -> list[str]:
    """[option text, letter], as the original `get_answer` for the multiple-choice tasks."""
    answer, options = obj["answer"], obj["options"]
    if isinstance(answer, str):
        return [answer, _OPTIONS[options.index(answer)]]
    if isinstance(answer, list) and len(answer) == 1:
        return [answer[0], _OPTIONS[options.index(answer[0])]]
    if isinstance(answer, list) and len(answer) == 2 and answer[1] in _OPTIONS:
        return list(answer)
    raise ValueError(f"cannot read a multiple-choice answer from {answer!r}")


def _kv_key(text: str) -> str:
    """The quoted key of a kv_retrieval question. The original slices `input[6:44]` (InfiniteBench's inputs
    start with '\\nKey: "'); a quoted UUID anywhere in the input is accepted too."""
    if len(text) > 43 and text[6] == '"' and text[43] == '"':
        return text[6:44]
    found = _UUID_IN_QUOTES.search(text)
    if found is None:
        raise ValueError(f"no quoted key in kv_retrieval input {text[:80]!r}")
    return found.group(0)


def infinitebench_example(task: str, obj: dict[str, Any], index: int) -> EvalExample:
    context = obj["content"] if "content" in obj else obj.get("context", "")
    fields: dict[str, Any]
    if task == "code_run":
        func_call = re.findall(r"func_[0-9]+\(\-?[0-9]+\)", obj["input"])[0]
        fields = {"func": func_call.split("(")[0], "func_call": func_call, "context": context}
    elif task in ("code_debug", "longbook_choice_eng"):
        options = obj["options"]
        fields = {"context": context, **{f"OPTION_{c}": options[i] for i, c in enumerate(_OPTIONS)}}
        if task == "longbook_choice_eng":
            fields["question"] = obj["input"]
    elif task in ("longbook_qa_eng", "longbook_qa_chn"):
        fields = {"context": context, "question": obj["input"]}
    elif task in ("longbook_sum_eng", "math_calc", "longdialogue_qa_eng"):
        fields = {"context": context}
    elif task == "math_find":
        target = re.findall(r"The .+ of", obj["input"])
        if not target:
            raise ValueError(f"cannot find the target number in {obj['input']!r}")
        fields = {
            "prefix": f"What is {target[0].lower()[:-3]} in the following list?",
            "context": context,
            "input": obj["input"],
        }
    elif task.startswith("kv_retrieval"):
        fields = {"context": context, "input": obj["input"], "key": _kv_key(obj["input"])}
    else:
        fields = {"context": context, "input": obj["input"]}
    if task in ("code_debug", "longbook_choice_eng"):
        answers: Any = _choice_answer(obj)
    else:
        answer = obj["answer"]
        answers = answer if isinstance(answer, list) else [answer]
    return EvalExample(
        task=task,
        id=str(obj.get("id", index)),
        fields=fields,
        answers=answers,
        all_classes=None,
        length=len(context.split()),
    )
