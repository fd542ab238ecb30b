"""The RULER-style suite (benchmark/ruler.py) on natural text: its cases are what they claim (the needle
stated once, natural paragraphs never repeated, the prompt the length asked for, the same prompt for every
variant), and a tiny run goes through the real pipeline on SmolLM2 (1K tokens) into JSON, a table and a heatmap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark import haystacks, ruler

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pydoc-topics"]  # shipped with CPython: no download in CI


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def test_haystack_paragraphs_are_prose_and_never_repeated():
    paras = haystacks.paragraphs("pydoc-topics")
    assert len(paras) > 500 and len(set(paras)) == len(paras)
    assert all(len(p.split()) >= haystacks.MIN_PARAGRAPH_WORDS for p in paras)


def test_rst_markup_is_cleaned_to_prose():
    markup = """Title
=====

The :func:`open` function returns a ``file`` object, see :ref:`the tutorial <tut-files>` for more.
It is described in `the docs <https://x>`_ at length.

Example::

    >>> open("x")

* A list item that is long enough to be kept as a paragraph
  of its own, with its continuation line.

.. code-block:: python

   print("this is code and never prose in any haystack")
"""
    assert haystacks.prose_paragraphs(markup) == [
        "The open function returns a file object, see the tutorial for more. It is described in the docs at "
        "length.",
        "A list item that is long enough to be kept as a paragraph of its own, with its continuation line.",
    ]


@pytest.mark.parametrize("task", ruler.TASKS)
def test_cases_are_deterministic_state_their_answers_and_fit_the_length(task, tokenizer):
    length = 1024
    case = ruler.make_case(task, length, 3, tokenizer, SOURCES)
    assert case == ruler.make_case(task, length, 3, tokenizer, SOURCES)  # every variant reads the same prompt
    prompt = ruler.prompt_text(tokenizer, case, None)
    tokens = len(tokenizer(prompt)["input_ids"])
    assert 0.85 * length <= tokens <= length, tokens
    assert ruler.score(case, " ".join(case.answers)) == 1.0 and ruler.score(case, "nothing") == 0.0
    if task == "vt":  # each variable is assigned once, in the document only
        assert all(case.prompt.count(f"VAR {name} =") == 1 for name in case.answers)
    if task.startswith("niah") or task in ("vt", "qa_paraphrase"):
        for answer in case.answers:  # the needle states each answer (vt: each assignment) in the document only
            assert case.prompt.count(answer) == (1 if task != "vt" else 2 - (answer == case.answers[-1]))
            assert answer not in case.answer_prefix
        hay = [p for p in case.prompt.split("\n\n") if p in set(haystacks.paragraphs("pydoc-topics"))]
        assert len(hay) == len(set(hay)) > 3  # natural paragraphs, none repeated


def test_suite_runs_through_the_engine_into_json_table_and_heatmap(tmp_path, smollm2_cache_dir):
    out = tmp_path / "ruler.json"
    common = f"model.device=cpu,model.dtype=float32,model.weights_cache_dir={smollm2_cache_dir}"
    memory = "model.full_attention_tokens=null,model.n_init=32,model.n_local=256,model.block_size=32,model.topk=4,model.exc_block_size=64"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark.ruler", "--lengths", "1024", "--cases", "2", "--sources", SOURCES[0],
         "--tasks", "niah_single_number,vt", "--variant", f"origin=model.type=origin,{common}",
         "--variant", f"inf-llm={common},{memory},chunk_size=256", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {(r["variant"], r["task"], r["case"]) for r in results} == {
        (v, t, i) for v in ("origin", "inf-llm") for t in ("niah_single_number", "vt") for i in range(2)}
    assert all(0.85 * 1024 <= r["prompt_tokens"] <= 1024 and 0 <= r["score"] <= 1 for r in results)
    # inside SmolLM2's window full attention copies a 7-digit number it was shown once
    assert sum(r["score"] for r in results if r["variant"] == "origin" and r["task"] == "niah_single_number") == 2
    table = out.with_suffix(".md").read_text()
    assert "| origin | niah_single_number |" in table and "| inf-llm | vt |" in table
    assert out.with_suffix(".png").stat().st_size > 1000
    # a rerun resumes: nothing is recomputed
    again = subprocess.run(proc.args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and json.loads(out.read_text())["results"] == results


def test_retrieval_probe_ranks_the_needle_and_forces_it_in(tmp_path, smollm2_cache_dir):
    """benchmark/retrieval_probe.py on SmolLM2 at 1K: every layer's lookup ranks the needle's block, a block
    is selected exactly when it ranks within topk, and the oracle run is recorded beside the plain one."""
    out = tmp_path / "probe.json"
    overrides = (f"model.device=cpu,model.dtype=float32,model.weights_cache_dir={smollm2_cache_dir},"
                 "model.full_attention_tokens=null,model.n_init=32,model.n_local=256,model.block_size=32,"
                 "model.topk=2,model.exc_block_size=64,chunk_size=256")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark.retrieval_probe", "--lengths", "1024", "--cases", "2", "--sources",
         SOURCES[0], "--oracle", "all", "--variant", f"small={overrides}", "--out", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["case"]) for r in results] == [
        ("small", 0), ("small+oracle-all", 0), ("small", 1), ("small+oracle-all", 1)]
    for r in results:
        s, e = r["needle"]
        assert 0 < s < e <= r["prompt_tokens"]
        ranks = r["question_ranks"]
        assert len(ranks) == 30  # SmolLM2's layers, each looked up for the question
        if r["variant"] == "small" and all(k is not None for k in ranks):
            assert r["question_hit"] == round(sum(k < 2 for k in ranks) / len(ranks), 3)
    assert "| small+oracle-all | 1K | " in out.with_suffix(".md").read_text()
