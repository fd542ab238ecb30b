"""The evaluation pipeline on the hand-made samples in tests/data (LongBench and InfiniteBench formats).

- Pure parts with a plain-function predictor: resumability (including a run killed mid-write), sharding
  over ranks and the merge, scoring, the synthetic-runner reports (heatmap PNG + JSON).
- With the real SmolLM2 (loaded once, patched with InfLLM attention): prompt encoding, truncation, the
  synthetic generators measured with its tokenizer, and predict -> score end to end on the samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark.data import BenchmarkDataError, load_task
from benchmark.pipeline import (
    done_ids,
    merge_task,
    predict_task,
    read_records,
    score_dir,
    shard,
    shard_file,
    task_file,
)
from benchmark.prompts import TRUNCATION_HEAD_TOKENS, TruncationStyle, encode_prompt, truncate_ids
from benchmark.synthetic import NOISE, make_example, prompt_measurer

DATA = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config" / "working" / "smollm2-135m-inf-llm.yaml"
SAMPLE_TASKS = ("hotpotqa", "trec", "lcc", "passkey", "kv_retrieval")
# Predictions of the stub predictor, by example id, and the score each gets (hand-computed).
STUB_PREDICTIONS = {
    "hp-0001": "Paris",  # qa F1 1.0
    "hp-0002": "The capital is Dodoma.",  # "capital is dodoma" vs "dodoma": P 1/3, R 1 -> F1 0.5
    "trec-0001": "City\nQuestion: next",  # first line "City" -> 1.0
    "trec-0002": "Date",  # answer "Number of something" -> 0.0
    "lcc-0001": "    return a * b",  # identical -> 1.0
    "0": "68240",  # passkey 0 right; passkey 1 ("31597") wrong -> 50.0
    "1": "68240",
}
EXPECTED_SCORES = {"hotpotqa": 75.0, "trec": 50.0, "lcc": 100.0, "passkey": 50.0, "kv_retrieval": 100.0}


def stub_predict(example):
    """A plain predictor: canned answers (the kv value is read from the answer list)."""
    pred = STUB_PREDICTIONS.get(example.id)
    if example.task == "kv_retrieval":
        pred = f'"{example.answers[0]}"'
    return {"pred": pred, "answers": example.answers, "all_classes": example.all_classes, "length": example.length}


def all_examples():
    return {task: load_task(DATA, task) for task in SAMPLE_TASKS}


# ------------------------------------------------------------------------------------ data loading
def test_samples_load_in_both_formats():
    data = all_examples()
    assert [e.id for e in data["hotpotqa"]] == ["hp-0001", "hp-0002"]
    assert data["trec"][0].all_classes and "City" in data["trec"][0].all_classes
    assert data["passkey"][1].answers == ["31597"]
    kv = data["kv_retrieval"][0]
    assert kv.fields["key"] == '"1b2c3d4e-5f60-4718-8a9b-0c1d2e3f4a5b"'  # the original's input[6:44]
    assert kv.answers == ["9e8d7c6b-5a49-4382-b1f0-e9d8c7b6a5f4"]


def test_missing_task_file_names_the_paths(tmp_path):
    with pytest.raises(BenchmarkDataError, match="narrativeqa.jsonl"):
        load_task(tmp_path, "narrativeqa")
    with pytest.raises(BenchmarkDataError, match="unknown task"):
        load_task(tmp_path, "no_such_task")


# ------------------------------------------------------------------- resumability, sharding, merge
def test_predict_score_and_resume(tmp_path):
    data = all_examples()
    for task, examples in data.items():
        counts = predict_task(examples, stub_predict, tmp_path, task)
        assert counts["predicted"] == len(examples)
    result = score_dir(tmp_path)
    assert result["scores"] == EXPECTED_SCORES
    assert json.loads((tmp_path / "result.json").read_text())["scores"] == EXPECTED_SCORES

    def must_not_run(example):
        raise AssertionError(f"{example.id} was already predicted")

    for task, examples in data.items():
        assert predict_task(examples, must_not_run, tmp_path, task)["skipped_done"] == len(examples)


def test_resume_after_a_run_killed_mid_write(tmp_path):
    """A run killed between two examples, with half a JSON line on disk, resumes where it stopped."""
    examples = load_task(DATA, "passkey")
    calls = []

    def crash_after_first(example):
        if calls:
            raise KeyboardInterrupt
        calls.append(example.id)
        return stub_predict(example)

    with pytest.raises(KeyboardInterrupt):
        predict_task(examples, crash_after_first, tmp_path, "passkey")
    path = task_file(tmp_path, "passkey")
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "1", "pred": "tor')  # the torn write of the example in flight
    assert done_ids(tmp_path, "passkey") == {"0"}
    counts = predict_task(examples, stub_predict, tmp_path, "passkey")
    assert counts == {"total": 2, "skipped_done": 1, "predicted": 1, "skipped_too_long": 0}
    assert [r["id"] for r in read_records(path)] == ["0", "1"]


def test_shards_cover_the_data_once_and_merge_in_data_order(tmp_path):
    examples = load_task(DATA, "trec") + load_task(DATA, "hotpotqa")  # 4 examples, any task name works
    world = 3
    parts = [shard(examples, r, world) for r in range(world)]
    assert sorted(e.id for p in parts for e in p) == sorted(e.id for e in examples)
    for rank in range(world):
        predict_task(examples, stub_predict, tmp_path, "trec", rank, world)
        assert shard_file(tmp_path, "trec", rank, world).is_file()
    assert not task_file(tmp_path, "trec").exists()
    info = merge_task(tmp_path, "trec", world, order=[e.id for e in examples])
    assert info["missing"] == [] and info["records"] == 4
    assert [r["id"] for r in read_records(task_file(tmp_path, "trec"))] == [e.id for e in examples]
    assert not any(shard_file(tmp_path, "trec", r, world).exists() for r in range(world))
    # After the merge a rerun of any rank has nothing left to do.
    assert predict_task(examples, stub_predict, tmp_path, "trec", 1, world)["predicted"] == 0


def test_merge_with_a_missing_rank_keeps_the_shards(tmp_path):
    examples = load_task(DATA, "passkey")
    predict_task(examples, stub_predict, tmp_path, "passkey", 0, 2)  # rank 1 never ran
    info = merge_task(tmp_path, "passkey", 2, order=[e.id for e in examples])
    assert info["missing"] == ["1"]
    assert shard_file(tmp_path, "passkey", 0, 2).is_file()  # kept for a later, complete merge
    predict_task(examples, stub_predict, tmp_path, "passkey", 1, 2)
    assert merge_task(tmp_path, "passkey", 2, order=[e.id for e in examples])["missing"] == []
    assert score_dir(tmp_path, ["passkey"], write=False)["scores"] == {"passkey": 50.0}


def test_skipped_records_are_not_scored(tmp_path):
    examples = load_task(DATA, "passkey")

    def skip_second(example):
        record = stub_predict(example)
        return {**record, "skipped": True} if example.id == "1" else record

    assert predict_task(examples, skip_second, tmp_path, "passkey")["skipped_too_long"] == 1
    result = score_dir(tmp_path, write=False)
    assert result["scores"] == {"passkey": 100.0} and result["skipped"] == {"passkey": 1}


# ------------------------------------------------------------------------------ synthetic reports
def test_passkey_reports_heatmap_and_json(tmp_path):
    from benchmark.passkey import write_reports

    cases = []
    for variant, hit in (("inf-llm", 1.0), ("stream-llm", 0.0)):
        for length in (2048, 4096):
            for depth in (0.0, 1.0):
                correct = 1.0 if variant == "inf-llm" or depth == 1.0 else hit
                cases.append(
                    {
                        "variant": variant,
                        "task": "passkey",
                        "length": length,
                        "depth": depth,
                        "seed": 0,
                        "correct": correct,
                        "prefill_tokens_per_second": 100.0 + length / 1024,
                    }
                )
    summary = write_reports(tmp_path, cases, ["inf-llm", "stream-llm"])
    assert summary["accuracy"]["inf-llm"]["passkey"]["2048"] == {"accuracy": 100.0, "n": 2}
    assert summary["accuracy"]["stream-llm"]["passkey"]["4096"] == {"accuracy": 50.0, "n": 2}
    assert summary["prefill_tokens_per_second"]["inf-llm"] == {"2048": 102.0, "4096": 104.0}
    heat = json.loads((tmp_path / "heatmap_passkey.json").read_text())
    assert heat["lengths"] == [2048, 4096] and heat["depths"] == [0.0, 1.0]
    assert heat["accuracy"]["stream-llm"] == [[0.0, 0.0], [100.0, 100.0]]  # rows: depths, columns: lengths
    assert (tmp_path / "heatmap_passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_parsing_of_tasks_lengths_variants_and_ranks(monkeypatch):
    import argparse

    from benchmark.passkey import parse_length, parse_variants
    from benchmark.run_eval import expand_tasks, rank_and_world

    tasks = expand_tasks("longbench,passkey,hotpotqa")
    assert len(tasks) == 17 and tasks[0] == "narrativeqa" and tasks[-1] == "passkey"  # hotpotqa kept once
    assert expand_tasks("infinitebench")[:3] == ["passkey", "number_string", "kv_retrieval"]
    assert [parse_length(x) for x in ("2k", "32K", "1m", "3000")] == [2048, 32768, 1048576, 3000]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_length("2q")
    variants = parse_variants("origin,inf-llm", ["small:model.n_local=512,model.topk=4"])
    assert [(v.label, v.overrides) for v in variants] == [
        ("origin", ("model.type=origin",)),
        ("inf-llm", ("model.type=inf-llm",)),
        ("small", ("model.n_local=512", "model.topk=4")),
    ]
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world(argparse.Namespace(rank=None, world_size=None)) == (2, 4)  # torchrun's variables
    assert rank_and_world(argparse.Namespace(rank=0, world_size=1)) == (0, 1)  # flags win


def test_shared_prefix_sweep_gives_the_results_of_separate_runs():
    """The synthetic sweep feeds the haystack common to a length's cases once and branches each case off a
    clone: every record (prediction, score, prompt) must equal the record of a run from scratch."""
    from benchmark.passkey import Variant, prepare_case, run_group, shared_prefix_plan
    from inf_llm.adapter import patch_model
    from inf_llm.config import load_config
    from tests.models import build_tiny_model, build_tiny_tokenizer

    assert shared_prefix_plan([[1, 2, 3, 4, 5], [1, 2, 3, 9, 9], [1, 2, 7, 7, 7]], 1) == [2, 2, 4]
    assert shared_prefix_plan([[1, 2, 3, 4, 5], [1, 2, 3, 9, 9]], 2) == [2, 4]  # chunk-aligned, last: len - 1
    cfg = load_config(
        DEFAULT_CONFIG,
        [
            "model.full_attention_tokens=null",
            "model.n_init=16",
            "model.n_local=128",
            "model.block_size=16",
            "model.topk=4",
            "model.max_cached_block=8",
            "model.exc_block_size=32",
            "chunk_size=256",
        ],
    )
    model = patch_model(build_tiny_model("llama"), cfg.model)
    tokenizer = build_tiny_tokenizer()
    variant = Variant("tiny", ())

    def records(share: bool) -> list[dict]:
        cases = [prepare_case(tokenizer, cfg, variant, "passkey", 1200, d, s, 4) for d in (0.2, 0.8) for s in (0, 1)]
        return list(run_group(model, tokenizer, cfg, cases, share_prefix=share))

    shared, separate = records(True), records(False)
    key = lambda r: (r["depth"], r["seed"])  # noqa: E731
    shared.sort(key=key)
    separate.sort(key=key)
    assert [r["reused_tokens"] for r in separate] == [0, 0, 0, 0]
    assert min(r["reused_tokens"] for r in shared) >= 256  # every case branched off the trunk
    drop = ("prefill_tokens", "prefill_seconds", "decode_seconds", "reused_tokens")
    strip = lambda r: {k: v for k, v in r.items() if k not in drop and "per_second" not in k}  # noqa: E731
    assert [strip(r) for r in shared] == [strip(r) for r in separate]
    assert [r["prefill_tokens"] + r["reused_tokens"] for r in shared] == [r["prefill_tokens"] for r in separate]


def test_truncate_ids_keeps_head_and_tail():
    ids = list(range(1000))
    kept = truncate_ids(ids, 300)
    assert kept == ids[:TRUNCATION_HEAD_TOKENS] + ids[-172:]
    assert truncate_ids(ids, 300, TruncationStyle.MIDDLE) == ids[:150] + ids[-150:]
    assert truncate_ids(ids[:10], 300) == ids[:10]


# ------------------------------------------------------------------------- with the real SmolLM2
@pytest.fixture(scope="session")
def eval_model(smollm2_cache_dir):
    """(model, tokenizer, cfg): the default config via load_model, patched with InfLLM attention, once."""
    from benchmark.common import load_for_eval

    return load_for_eval(DEFAULT_CONFIG, [f"model.weights_cache_dir={smollm2_cache_dir}", "model.device=cpu"])


def test_chat_template_and_raw_prompts(eval_model):
    _, tokenizer, cfg = eval_model
    hp = load_task(DATA, "hotpotqa")[0]
    chat = encode_prompt(tokenizer, "hotpotqa", hp.fields, cfg.conv_type, cfg.max_len, 32)
    text = tokenizer.decode(chat.ids)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    trec = load_task(DATA, "trec")[0]
    raw = encode_prompt(tokenizer, "trec", trec.fields, cfg.conv_type, cfg.max_len, 64)
    assert "<|im_start|>" not in tokenizer.decode(raw.ids)  # few-shot tasks stay raw, as the original


def test_truncation_keeps_instruction_and_question(eval_model):
    _, tokenizer, cfg = eval_model
    example = make_example("passkey", 1500, 0.5, 0, prompt_measurer(tokenizer, "passkey", cfg.conv_type))
    full = encode_prompt(tokenizer, "passkey", example.fields, cfg.conv_type, 10**9, 32)
    cut = encode_prompt(tokenizer, "passkey", example.fields, cfg.conv_type, 600, 32)
    assert cut.truncated and cut.original_tokens == len(full.ids)
    assert abs(len(cut.ids) - (600 - 32)) <= 2  # decode + re-encode may merge a token at the seam
    assert cut.ids[:100] == full.ids[:100] and cut.ids[-100:] == full.ids[-100:]
    refused = encode_prompt(tokenizer, "passkey", example.fields, cfg.conv_type, 600, 32, truncation="error")
    assert refused.skipped


@pytest.mark.parametrize("task", ["passkey", "number_string", "kv_retrieval"])
def test_synthetic_examples_fit_the_target_length(eval_model, task):
    _, tokenizer, cfg = eval_model
    measure = prompt_measurer(tokenizer, task, cfg.conv_type)
    a = make_example(task, 3000, 0.25, 7, measure)
    assert a == make_example(task, 3000, 0.25, 7, measure)  # deterministic
    assert a.n_tokens <= 3000
    unit = 25 if task != "kv_retrieval" else 80  # tokens of one noise line / one JSON pair
    assert a.n_tokens > 3000 - 2 * unit
    assert a.answer in a.context and a.answer != make_example(task, 3000, 0.25, 8, measure).answer
    assert a.needle_index == round(0.25 * (a.n_units - (task == "kv_retrieval")))
    if task == "passkey":
        assert a.context.startswith(NOISE * a.needle_index + f"The pass key is {a.answer}.")
    if task == "number_string":
        assert len(a.answer) == 10 and a.answer.isdigit()
    if task == "kv_retrieval":
        assert f'{a.fields["key"]}: "{a.answer}"' in a.context


def test_predict_and_score_with_smollm2(eval_model, tmp_path):
    """predict -> score on one example of a chat task, a raw few-shot task and passkey (short generations)."""
    from benchmark.run_eval import make_predict_fn

    model, tokenizer, cfg = eval_model
    for task in ("hotpotqa", "trec", "passkey"):
        examples = load_task(DATA, task, limit=1)
        fn = make_predict_fn(model, tokenizer, cfg, task, max_new_tokens=3, style=TruncationStyle.INFLLM)
        assert predict_task(examples, fn, tmp_path, task)["predicted"] == 1
        (record,) = read_records(task_file(tmp_path, task))
        assert isinstance(record["pred"], str) and record["prompt_tokens"] > 50
        assert 0 < record["stats"]["new_tokens"] <= 3 and record["stats"]["prefill_tokens_per_second"] > 0
    result = score_dir(tmp_path)
    assert set(result["scores"]) == {"hotpotqa", "trec", "passkey"}
    assert all(0.0 <= s <= 100.0 for s in result["scores"].values())
