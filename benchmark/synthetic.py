"""Offline synthetic retrieval tasks built with the InfiniteBench recipes (OpenBMB/InfiniteBench
`data/construct_synthetic_dataset.py`), at any token length and needle depth, deterministic per seed.

- passkey: noise lines "The grass is green. ... There and back again.\\n" repeated, with the needle
  "The pass key is N. Remember it. N is the pass key.\\n" (N: 5 random digits) after a share `depth` of them;
  question "What is the pass key?".
- number_string: same noise, needle "The sequence of digits is N. Remember it. N is the sequence of
  digits.\\n" with N the recipe's 10 digits (5 random digits, then 5 times a random one duplicated in place);
  question "What is the sequence of digits?".
- kv_retrieval: "JSON data:\\n{...}" of random UUID4 key/value pairs; the asked key is the pair at `depth`;
  input '\\nKey: "<uuid>"\\nThe value associated with the specified key is: ' (InfiniteBench's layout: the
  original InfLLM reads the key as input[6:44]).

Length is measured, not estimated: `measure(context, input)` returns the token count of the final prompt
(template + chat format, see `prompt_measurer`), and the noise (or pair count) is the largest that fits the
target. Knows nothing of models; the tokenizer only counts.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmark.prompts import TokenizerLike, encode_prompt

TASKS = ("passkey", "number_string", "kv_retrieval")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key?"
NUMBER_NEEDLE = "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n"
NUMBER_QUESTION = "What is the sequence of digits?"
KV_PREFIX = "JSON data:\n{"
KV_QUESTION = '\nKey: "{key}"\nThe value associated with the specified key is: '
# No prompt template is shorter than this many tokens: the smallest target accepted.
MIN_TARGET_TOKENS = 64
# First guess of noise lines / JSON pairs used to estimate the tokens each one adds.
_PROBE_UNITS = 32

Measure = Callable[[str, str], int]


@dataclass(frozen=True)
class SyntheticExample:
    task: str
    context: str
    input: str
    answer: str
    depth: float  # requested needle position, 0 = start of the haystack, 1 = end
    seed: int
    target_tokens: int
    n_tokens: int  # measured prompt tokens (<= target_tokens)
    needle_index: int  # noise lines (or pairs) before the needle
    n_units: int  # noise lines (or pairs) in the haystack

    @property
    def id(self) -> str:
        return f"{self.task}-{self.target_tokens}-d{self.depth:g}-s{self.seed}"

    @property
    def fields(self) -> dict[str, Any]:
        """Template fields of benchmark.prompts (kv_retrieval's {key} is the quoted key, as the original)."""
        fields = {"context": self.context, "input": self.input}
        if self.task == "kv_retrieval":
            fields["key"] = self.input[6:44]
        return fields

    def to_infinitebench(self) -> dict[str, Any]:
        """The example as a line of InfiniteBench's jsonl."""
        return {"id": self.id, "context": self.context, "input": self.input, "answer": [self.answer], "options": []}


def passkey_key(rng: random.Random) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(5))


def number_string_key(rng: random.Random) -> str:
    keys = [str(rng.randint(0, 9)) for _ in range(5)]
    for k in range(5):
        pos = rng.randint(0, 5 + k - 1)
        keys.insert(pos, keys[pos])
    return "".join(keys)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _largest_fitting(
    build: Callable[[int], tuple[str, str]], measure: Measure, target: int, limit: int | None = None
) -> int:
    """Largest n (>= 0) whose build(n) measures <= target, assuming length grows with n."""
    base = measure(*build(0))
    if base > target:
        raise ValueError(f"even an empty haystack needs {base} tokens, more than the target {target}")
    probe = _PROBE_UNITS if limit is None else min(_PROBE_UNITS, limit)
    per_unit = max((measure(*build(probe)) - base) / max(probe, 1), 1e-6)
    guess = int((target - base) / per_unit)
    lo, hi = 0, max(guess, 1)
    if limit is not None:
        hi = min(hi, limit)
    # Grow hi until it no longer fits (or hits the limit), then bisect.
    while measure(*build(hi)) <= target:
        lo = hi
        if limit is not None and hi >= limit:
            return hi
        hi = hi + max(hi // 20, 4)
        if limit is not None:
            hi = min(hi, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(*build(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def make_example(task: str, target_tokens: int, depth: float, seed: int, measure: Measure) -> SyntheticExample:
    """One example of `task` whose prompt measures at most `target_tokens` (as close as the noise allows)."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if target_tokens < MIN_TARGET_TOKENS:
        raise ValueError(f"target_tokens must be >= {MIN_TARGET_TOKENS}, got {target_tokens}")
    rng = random.Random(f"{task}|{target_tokens}|{depth!r}|{seed}")
    if task in ("passkey", "number_string"):
        key = passkey_key(rng) if task == "passkey" else number_string_key(rng)
        needle = (PASSKEY_NEEDLE if task == "passkey" else NUMBER_NEEDLE).format(key=key)
        question = PASSKEY_QUESTION if task == "passkey" else NUMBER_QUESTION

        def build(n: int) -> tuple[str, str]:
            j = round(depth * n)
            return NOISE * j + needle + NOISE * (n - j), question

        n = _largest_fitting(build, measure, target_tokens)
        context, inp = build(n)
        return SyntheticExample(
            task, context, inp, key, depth, seed, target_tokens, measure(context, inp), round(depth * n), n
        )

    # kv_retrieval: pairs are drawn once, in order, so a longer haystack extends a shorter one.
    pairs: list[tuple[str, str]] = []

    def pairs_upto(n: int) -> list[tuple[str, str]]:
        while len(pairs) < max(n, 1):
            pairs.append((_uuid(rng), _uuid(rng)))
        return pairs[: max(n, 1)]

    def build_kv(n: int) -> tuple[str, str]:
        items = pairs_upto(n)
        text = KV_PREFIX + ", ".join(f'"{k}": "{v}"' for k, v in items) + "}"
        key = items[round(depth * (len(items) - 1))][0]
        return text, KV_QUESTION.format(key=key)

    n = max(_largest_fitting(build_kv, measure, target_tokens), 1)
    context, inp = build_kv(n)
    index = round(depth * (n - 1))
    return SyntheticExample(
        task, context, inp, pairs[index][1], depth, seed, target_tokens, measure(context, inp), index, n
    )


def prompt_measurer(tokenizer: TokenizerLike, task: str, conv_type: str | None) -> Measure:
    """Token count of the exact prompt the runners feed (template, chat format, special tokens)."""

    def measure(context: str, inp: str) -> int:
        fields = {"context": context, "input": inp}
        if task == "kv_retrieval":
            fields["key"] = inp[6:44]
        return len(encode_prompt(tokenizer, task, fields, conv_type, max_len=2**62, max_gen=0).ids)

    return measure
