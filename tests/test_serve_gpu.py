"""benchmark/serve_gpu.py end to end on a CPU: the tiny shape, 2K-token prompts, both variants (the shipped GPU
config with the model replaced, and `--model` alone) served by `python -m inf_llm.serve` subprocesses; the JSON
has every measurement the GPU run reports."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

TOKENS = 2048


def test_serve_gpu_tiny_smoke(tmp_path):
    out = tmp_path / "serve_gpu.json"
    done = subprocess.run(
        [sys.executable, "benchmark/serve_gpu.py", "--shape", "tiny", "--tokens", str(TOKENS), "--decode-tokens", "16",
         "--concurrent-tokens", "256", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--budget-s", "240"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["shape"] == "tiny" and result["tokens"] == TOKENS and result["build"]["built"]
    assert set(result["variants"]) == {"shipped", "auto"}
    assert "follow-up: cached / prompt tokens" in done.stdout  # the table
    for name, v in result["variants"].items():
        assert "error" not in v, (name, v.get("error"), v.get("log_tail"))
        assert v["ready_s"] > 0 and v["device"] == "cpu" and v["warmup_s"] is None and set(v["auto"]) >= {"fattn"}
        long = v["long"]
        assert long["status"] == 200 and long["prompt_tokens"] > TOKENS and long["cached_tokens"] == 0
        assert 0 < long["completion_tokens"] <= 16 and long["ttft_s"] > 0 and long["prefill_tokens_per_s"] > 0
        assert long["server"]["ttft_ms"] > 0
        follow = v["follow_up"]
        assert follow["status"] == 200 and follow["cached_tokens"] >= long["prompt_tokens"] - 1
        assert follow["prompt_tokens"] > long["prompt_tokens"] + long["completion_tokens"] - 1
        assert v["second"]["status"] == 200 and v["second"]["cached_tokens"] == 0
        assert v["second"]["first_over_second_ttft"] > 0
        gone = v["disconnect"]
        assert gone["next_status"] == 200 and gone["next_ttft_s"] > 0 and gone["closed_after_s"] > 0
        assert "cancelled" in gone["server_log"] and "0 generated" in gone["server_log"]
        clients = v["concurrent"]
        assert len(clients["clients"]) == 4 and clients["answered"] + clients["refused"] == 4
        assert clients["hung"] == 0 and clients["other"] == 0
