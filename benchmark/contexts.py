"""Read a document once, ask it many times: what document memories and prefix snapshots cost and save.

    python benchmark/contexts.py --tokens 32768 --out benchmark/figures/contexts-smollm2-cpu.json

Through the real engine (its public API: library.prepare, read_document, library.prepare_chat, generate) on
the default config: a natural-text document (benchmark/haystacks.py) of about --tokens tokens is read into a
document memory; then it measures the time to the first token of a question on it, of a second question (a
new chat), of a regenerate, of the first question after a restart (a new process loading the saved memory),
the memory's bytes per 1K tokens in RAM and on disk, and what --questions snapshots of different questions on
it cost against the document's own snapshot. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark import haystacks  # noqa: E402
from inf_llm.config import load_config  # noqa: E402
from inf_llm.engine import build_messages, load_engine  # noqa: E402
from inf_llm.engine.library import entry_bytes  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "working" / "smollm2-135m-inf-llm.yaml"
QUESTIONS = ["What is the main subject of this document?", "Summarize the first section in one sentence.",
             "Which names appear in the document?"]


def engine_for(folder: str, config: Path):
    cfg = load_config(config, [f"contexts.dir={folder}", "generation.repetition_penalty=1.0"])
    return load_engine(cfg)


def ask(engine, context_id: str, question: str, new_tokens: int = 8) -> dict:
    """ttft_s: what a client waits for the first token: tokenizing the prompt, then the engine's ttft."""
    start = time.perf_counter()
    prompt = engine.library.prepare_chat(context_id, build_messages(question))
    prepared = time.perf_counter() - start
    done = engine.generate(prompt, engine.sampling(temperature=0, max_new_tokens=new_tokens))
    return {"ttft_s": round(prepared + (done.timings.ttft_ms or 0) / 1000, 3), "prepare_s": round(prepared, 3),
            "wall_s": round(time.perf_counter() - start, 3),
            "cached_tokens": done.usage.cached_tokens, "prompt_tokens": done.usage.prompt_tokens, "text": done.text}


def after_restart(folder: str, context_id: str, config: Path) -> dict:
    """In a new process: the engine's start, then the first question (its memory loaded from disk)."""
    t0 = time.perf_counter()
    engine = engine_for(folder, config)
    ready = time.perf_counter() - t0
    first = ask(engine, context_id, QUESTIONS[0])
    engine.shutdown()
    return {"engine_ready_s": round(ready, 2), **first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--restart", nargs=2, metavar=("FOLDER", "ID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.restart:
        print(json.dumps(after_restart(*args.restart, args.config)))
        return
    folder = tempfile.mkdtemp(prefix="inf_llm-contexts-")
    engine = engine_for(folder, args.config)
    tok = engine.tokenizer
    source = haystacks.available_sources()[0]
    hay = haystacks.haystack(source, tok, args.tokens - 64, random.Random(0))
    doc = engine.library.prepare("document.txt", "\n\n".join(hay.paragraphs), None)
    t = time.perf_counter()
    info = engine.read_document(doc).result()
    read_s = time.perf_counter() - t
    result = {"machine": platform.processor() or platform.machine(), "source": source, "tokens": info.tokens,
              "device": engine.info.device, "dtype": engine.info.dtype, "read_s": round(read_s, 2),
              "read_tokens_per_s": round(info.tokens / read_s, 1),
              "ram_bytes_per_1k_tokens": round(info.ram_bytes / info.tokens * 1000),
              "disk_bytes_per_1k_tokens": round(info.disk_bytes / info.tokens * 1000) if info.disk_bytes else None}
    result["first_question"] = ask(engine, info.id, QUESTIONS[0])
    result["second_question"] = ask(engine, info.id, QUESTIONS[1])
    result["regenerate"] = ask(engine, info.id, QUESTIONS[1])
    cache = engine.generator.prefix_cache
    entry = cache.of_context(info.id)
    one = entry_bytes(entry)
    for i in range(args.questions):
        ask(engine, info.id, f"Question {i}: what does paragraph {i} say about {QUESTIONS[i % 3][:20]}?", 1)
    kept = [e for e in cache.snapshot_entries()]
    result["snapshots"] = {"document_snapshot_bytes": one, "entries": len(kept),
                           "all_entries_bytes": cache.nbytes(entries=kept), "evicted": cache.evicted,
                           "ratio_to_one": round(cache.nbytes(entries=kept) / one, 3)}
    engine.shutdown()
    out = subprocess.run([sys.executable, __file__, "--restart", folder, info.id, "--config", str(args.config)],
                         capture_output=True, text=True, check=True)
    result["after_restart"] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [("read the document", result["read_s"], info.tokens),
            ("first question", result["first_question"]["ttft_s"], result["first_question"]["cached_tokens"]),
            ("second question (new chat)", result["second_question"]["ttft_s"], result["second_question"]["cached_tokens"]),
            ("regenerate", result["regenerate"]["ttft_s"], result["regenerate"]["cached_tokens"]),
            ("first question after a restart", result["after_restart"]["ttft_s"], result["after_restart"]["cached_tokens"])]
    print(f"{info.tokens}-token document, {engine.info.device} {engine.info.dtype}")
    print("| step | time to first token, s | tokens not read again |\n|---|---|---|")
    for name, secs, cached in rows:
        print(f"| {name} | {secs} | {cached} |")
    s = result["snapshots"]
    print(f"RAM {result['ram_bytes_per_1k_tokens'] / 2**20:.2f} MiB per 1K tokens, disk "
          f"{(result['disk_bytes_per_1k_tokens'] or 0) / 2**20:.2f} MiB; {s['entries']} snapshots "
          f"({args.questions} questions) take {s['ratio_to_one']}x the document's own snapshot")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
