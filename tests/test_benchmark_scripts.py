"""The GPU benchmark scripts run end to end on a CPU at tiny sizes (the GPU numbers in docs/speed.md come
from the same code): `benchmark/speed.py` on a tiny random model, `benchmark/kernels_bench.py --smoke` under
the Triton interpreter. Real subprocesses, real JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_speed_script_writes_rows_with_chunk_and_issue_times(tmp_path):
    out = tmp_path / "speed.json"
    rows = ["inf-llm-torch", "origin-sdpa", "origin-sdpa-1pass"]
    proc = _run(["benchmark/speed.py", "--shape", "tiny", "--rows", ",".join(rows), "--lengths", "2048",
                 "--decode-tokens", "4", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["row"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == set(rows)
    for row in results.values():
        assert row["status"] == "ok" and row["prefill_tok_s"] > 0 and row["decode_ms_per_token"] > 0
        chunks, issued = row["chunk_seconds"], row["chunk_issue_seconds"]
        assert len(chunks) == len(issued) > 0
        assert all(0 < i <= c for i, c in zip(issued, chunks))  # issuing a chunk is part of its time
        assert row["host_bytes"] == row["host_rss_growth_bytes"] + row["host_pool_bytes"]
        assert row["host_pool_bytes"] == 0  # no model.host_pool_tokens
    assert len(results["origin-sdpa"]["chunk_seconds"]) > 1 and len(results["origin-sdpa-1pass"]["chunk_seconds"]) == 1
    assert results["origin-sdpa-1pass"]["config"]["chunk_size"] is None
    assert "inf-llm-torch" in proc.stdout and "prefill tok/s" in proc.stdout


def test_kernels_bench_smoke_times_every_op_against_the_reference(tmp_path):
    out = tmp_path / "kernels.json"
    proc = _run(["-m", "benchmark.kernels_bench", "--smoke", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    ops = {row["op"] for row in rows}
    assert {"windowed_attention", "window_key_scores", "prefix_attention", "merge_partials", "global_stage_into",
            "rms_norm", "silu_mul"} <= ops
    for row in rows:
        assert row["triton_ms"] > 0 and row["reference_ms"] > 0
        assert row["out_err"] <= 2e-2, row  # bf16 outputs against the torch reference


def test_host_overhead_measures_the_glue_per_execution_block(tmp_path):
    """The fast path's prefill glue with the kernels stubbed out: lookups, formation and the ops' wrappers run
    (blocks form, every execution block looks up), and the JSON says what one execution block costs."""
    out = tmp_path / "host.json"
    proc = _run(["-m", "benchmark.host_overhead", "--chunks", "2", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["execution_blocks_per_chunk"] == 16 and len(result["chunk_layer_ms"]) == 2
    assert 0 < result["us_per_execution_block"] < 1e5
    assert "per execution block" in proc.stdout


def test_cpu_peers_measures_each_system_on_the_same_prompt_or_says_why_not(tmp_path):
    out = tmp_path / "peers.json"
    proc = _run(["benchmark/cpu_peers.py", "--contexts", "64,96", "--decode", "3", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["context"], r["system"]): r for r in report["rows"]}
    assert set(rows) == {(n, s) for n in (64, 96) for s in ("inf_llm", "transformers", "llama.cpp")}
    for (n, system), row in rows.items():
        if system == "llama.cpp" and "skipped" in row:  # no llama-cpp-python here: the reason, never a number
            assert "llama_cpp" in row["skipped"] and "prefill_tokens_per_s" not in row
            continue
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["prefill_tokens"] in (n - 1, n)  # the engine's path feeds the last prompt token to generate
    assert report["linear"] and report["dtype"] in ("bfloat16", "float32")
    assert "| 96 | inf_llm |" in proc.stdout


def test_cpu_peers_refuses_bad_arguments_by_name():
    for args, named in ((["--contexts", "8"], "--contexts"), (["--decode", "0"], "--decode"),
                        (["--systems", "vllm"], "--systems")):
        proc = _run(["benchmark/cpu_peers.py", *args])
        assert proc.returncode == 2 and named in proc.stderr, (args, proc.stderr[-500:])


def test_linear_accuracy_puts_fp16_weights_next_to_float32_and_int8_far_from_it(tmp_path):
    out = tmp_path / "accuracy.json"
    proc = _run(["benchmark/linear_accuracy.py", "--tokens", "200", "--decode", "3",
                 "--variants", "fp16-weights,int8-dynamic", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    fp16, int8 = results["fp16-weights"], results["int8-dynamic"]
    assert fp16["prefill"]["positions"] == 200 and fp16["decode"]["positions"] == 3
    assert fp16["prefill"]["mean_kl"] < 1e-3 and fp16["prefill"]["top1_agreement"] > 0.95
    assert int8["prefill"]["mean_kl"] > 100 * fp16["prefill"]["mean_kl"]
    assert "| fp16-weights |" in proc.stdout
