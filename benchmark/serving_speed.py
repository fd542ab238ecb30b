"""Serving speed of the default deployment (SmolLM2-135M-Instruct, InfLLM, CPU): what a chat user feels.

    python benchmark/serving_speed.py                                   # 2K / 8K / 32K, overhead, follow-up
    python benchmark/serving_speed.py --contexts 2048,8192 --skip-server --out /tmp/speed.json

Measures, through the real engine (inf_llm.engine: chat template, chunked prefill, generate, streaming):
  decode tokens/s and prefill tokens/s at each context length (a document of that many tokens + a question);
  TTFT of a short follow-up message in the longest conversation (prompt reuse: only the new turn is
        prefilled; target < 2 s at 32K);
  streaming overhead: the same greedy request through `python -m inf_llm.serve` (SSE over loopback, measured
        by the client from request to `done`) against the engine alone (submit to Done), runs interleaved,
        medians compared (target < 5%).
Prints a table and writes JSON (rewritten after every measurement, so a run cut short keeps what it has).
Knows nothing of the engine's internals beyond its public API.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmark/serving_speed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inf_llm import openmp  # noqa: E402  (before torch: bounded OpenMP spinning, see inf_llm/openmp.py)

openmp.configure()

import httpx  # noqa: E402
import torch  # noqa: E402

from inf_llm.config import default_config_path, load_config  # noqa: E402
from inf_llm.engine import Done, Message, build_messages, load_engine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmark" / "results" / "serving_speed.json"
# Targets from issue 4 (default deployment, 2 CPU cores).
TARGET_DECODE_32K = 20.0  # tokens/s
TARGET_FOLLOW_UP_TTFT_S = 2.0
TARGET_OVERHEAD = 0.05
QUESTION = "Question: write a long, detailed essay that retells every section above, one by one."
FOLLOW_UP = "Thanks. In one short sentence, what was the first section about?"
STORY = "Write a long story about a dragon named Ember who guards a library."
READY_TIMEOUT_S = 600


def _say(msg: str) -> None:
    print(msg, flush=True)


def document(tokenizer, n_tokens: int) -> str:
    """Varied synthetic prose of about `n_tokens` tokens (sections with distinct names and numbers)."""
    places = ["harbour", "orchard", "observatory", "mill", "archive", "lighthouse", "market", "monastery"]
    parts, count, i = [], 0, 0
    while count < n_tokens:
        p = places[i % len(places)]
        para = (f"Section {i}. In the {p} of Vell-{i * 7 % 97}, the keeper counted {i * 13 % 211} crates of "
                f"{['salt', 'amber', 'tea', 'copper'][i % 4]} before the {['spring', 'autumn'][i % 2]} storm. "
                f"Her ledger, page {i + 3}, notes that the {p} opened in year {1700 + i % 250}.\n")
        parts.append(para)
        count += len(tokenizer(para, add_special_tokens=False)["input_ids"])
        i += 1
    ids = tokenizer("".join(parts), add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m inf_llm.serve` on a free loopback port with the same config."""

    def __init__(self, config: Path, overrides: list[str], log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inf_llm.serve", "--config", str(config), "--port", str(self.port), *overrides],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/status", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {READY_TIMEOUT_S} s")

    def stream_chat(self, body: dict) -> tuple[float, dict, int]:
        """Client-side wall time from sending the request to receiving `done`, the done payload, text events."""
        start = time.perf_counter()
        done, tokens = None, 0
        with httpx.stream("POST", f"{self.url}/chat", json=body, timeout=None) as r:
            r.raise_for_status()
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "token":
                    tokens += 1
                elif line.startswith("data: ") and event == "done":
                    done = json.loads(line[6:])
                    break
                elif line.startswith("data: ") and event == "error":
                    raise RuntimeError(line)
        return time.perf_counter() - start, done, tokens

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _engine_run(engine, messages: list[Message], max_new_tokens: int) -> tuple[float, Done]:
    prompt = engine.prepare_chat(messages)
    start = time.perf_counter()
    done = engine.generate(prompt, engine.sampling(temperature=0, max_new_tokens=max_new_tokens))
    return time.perf_counter() - start, done


def measure_overhead(engine, args, results: dict, write) -> None:
    """Same greedy request through the engine and through the HTTP server, interleaved."""
    server = Server(Path(args.config), args.set, Path(args.out).with_suffix(".server.log"))
    try:
        server.wait_ready()
        body = {"prompt": STORY, "temperature": 0, "max_new_tokens": args.overhead_tokens}
        server.stream_chat({**body, "max_new_tokens": 4})  # warm-up
        _engine_run(engine, build_messages(STORY), 4)
        engine_walls, server_walls, engine_rates, server_rates = [], [], [], []
        for i in range(args.repeats):
            wall, done = _engine_run(engine, build_messages(STORY), args.overhead_tokens)
            engine_walls.append(wall)
            engine_rates.append(done.timings.decode_tokens_per_s)
            s_wall, s_done, _ = server.stream_chat(body)
            server_walls.append(s_wall)
            server_rates.append(s_done["timings"]["decode_tokens_per_s"])
            _say(f"  overhead run {i + 1}: engine {wall:.2f} s ({done.usage.completion_tokens} tokens), "
                 f"server {s_wall:.2f} s ({s_done['usage']['completion_tokens']} tokens)")
        e, s = statistics.median(engine_walls), statistics.median(server_walls)
        results["streaming_overhead"] = {
            "completion_tokens": done.usage.completion_tokens, "repeats": args.repeats,
            "engine_wall_s": engine_walls, "server_wall_s": server_walls,
            "engine_decode_tokens_per_s": engine_rates, "server_decode_tokens_per_s": server_rates,
            "median_engine_s": round(e, 3), "median_server_s": round(s, 3), "overhead": round(s / e - 1, 4),
            "target": TARGET_OVERHEAD,
        }
        write()
    finally:
        server.stop()


def measure_context(engine, tokenizer, n: int, args, results: dict, write, follow_up: bool) -> None:
    engine.generator.reset()
    doc = document(tokenizer, n)
    messages = build_messages(f"{doc}\n\n{QUESTION}")
    _say(f"context {n}: prefilling ...")
    wall, done = _engine_run(engine, messages, args.new_tokens)
    t, u = done.timings, done.usage
    row = {"context_tokens": u.prompt_tokens, "prefill_s": round(t.prefill_ms / 1000, 2),
           "prefill_tokens_per_s": t.prefill_tokens_per_s, "completion_tokens": u.completion_tokens,
           "decode_tokens_per_s": t.decode_tokens_per_s, "wall_s": round(wall, 2)}
    if done.retrieval is not None:
        row["retrieved_spans"] = len(done.retrieval.spans)
    _say(f"  {row}")
    if follow_up:
        history = [Message("user", messages[-1].content), Message("assistant", done.text)]
        wall2, again = _engine_run(engine, build_messages(FOLLOW_UP, history), 16)
        row["follow_up"] = {"ttft_s": round(again.timings.ttft_ms / 1000, 3),
                            "cached_tokens": again.usage.cached_tokens, "prompt_tokens": again.usage.prompt_tokens,
                            "decode_tokens_per_s": again.timings.decode_tokens_per_s,
                            "target_ttft_s": TARGET_FOLLOW_UP_TTFT_S}
        _say(f"  follow-up: {row['follow_up']}")
    results["contexts"].append(row)
    write()


def table(results: dict) -> str:
    lines = ["", f"{'context':>8} {'prefill tok/s':>14} {'prefill s':>10} {'decode tok/s':>13} {'new tokens':>11}"]
    for r in results["contexts"]:
        lines.append(f"{r['context_tokens']:>8} {r['prefill_tokens_per_s'] or 0:>14.1f} {r['prefill_s']:>10.1f} "
                     f"{r['decode_tokens_per_s'] or 0:>13.2f} {r['completion_tokens']:>11}")
        if "follow_up" in r:
            f = r["follow_up"]
            lines.append(f"{'':>8} follow-up TTFT {f['ttft_s']:.2f} s ({f['cached_tokens']} of {f['prompt_tokens']} "
                         f"prompt tokens reused; target < {TARGET_FOLLOW_UP_TTFT_S} s)")
    o = results.get("streaming_overhead")
    if o:
        lines.append(f"streaming overhead: server {o['median_server_s']:.2f} s vs engine {o['median_engine_s']:.2f} s "
                     f"median over {o['repeats']} runs of {o['completion_tokens']} tokens: {o['overhead'] * 100:+.1f}% "
                     f"(target < {TARGET_OVERHEAD * 100:.0f}%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(default_config_path()))
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. model.topk=8")
    p.add_argument("--contexts", default="2048,8192,32768", help="comma-separated context lengths (tokens)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded at each context length")
    p.add_argument("--overhead-tokens", type=int, default=128, help="tokens per streaming-overhead run")
    p.add_argument("--repeats", type=int, default=3, help="streaming-overhead runs (each way)")
    p.add_argument("--skip-server", action="store_true", help="no streaming-overhead measurement")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    contexts = [int(x) for x in args.contexts.split(",") if x]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    cfg = load_config(args.config, args.set)
    results: dict = {
        "config": str(args.config), "overrides": args.set, "model": cfg.server.model_name or cfg.model.path,
        "memory": {k: getattr(cfg.model, k) for k in ("n_init", "n_local", "block_size", "topk", "exc_block_size")},
        "chunk_size": cfg.chunk_size, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "load_average_at_start": os.getloadavg(), "contexts": [],
    }

    def write() -> None:
        results["load_average_now"] = os.getloadavg()
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))

    engine = load_engine(cfg)
    try:
        if not args.skip_server:
            measure_overhead(engine, args, results, write)
        for i, n in enumerate(contexts):
            measure_context(engine, engine.tokenizer, n, args, results, write, follow_up=i == len(contexts) - 1)
    finally:
        engine.shutdown()
    _say(table(results))
    _say(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
