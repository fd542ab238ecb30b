"""The HTTP server against the real SmolLM2 model: `python -m inf_llm.serve` on a free loopback port, driven
with httpx and the official openai client.

One server for the module (API key on, queue of 4, max_len 1024 with truncation: error, a 64 KiB body
limit, 512-token prefill chunks and 1 s keepalives so that the limits and the progress/ping paths are cheap
to reach). Every request uses temperature 0 and a few new tokens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_CONFIG, REPO_ROOT

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = "What is the capital of France?"
MAX_QUEUE = 4
MAX_BODY = 65536
MAX_LEN = 1024
SERVER_OVERRIDES = [
    f"server.api_key={API_KEY}", f"server.max_queue={MAX_QUEUE}", f"server.max_body_bytes={MAX_BODY}",
    f"max_len={MAX_LEN}", "truncation=error", "chunk_size=512", "server.keepalive_seconds=1",
    "server.cors_origins=[http://example.test]", "generation.max_new_tokens=16", "model.device=cpu",
    "server.max_client_requests=16",  # the queue test fills the queue from this one client address
]
MODEL = "SmolLM2-135M-Instruct"  # the served name: OpenAI requests naming another model are a 404
STARTUP_TIMEOUT = 240  # seconds: a cold GGUF conversion takes ~15-40 s on 2 busy cores
REQUEST_TIMEOUT = 120


# ------------------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A server subprocess; `statuses` records every /status answer seen while waiting for readiness."""

    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    port: int = field(default_factory=free_port)
    statuses: list[tuple[int, dict]] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})})
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.url}/status", timeout=5)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            self.statuses.append((r.status_code, r.json()))
            if r.status_code == 200:
                return
            if r.json().get("state") == "error":
                pytest.fail(f"model failed to load: {r.json().get('error')}\n{self.log_tail()}")
            time.sleep(0.05)
        pytest.fail(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode if self.proc else None

    def log_tail(self, n: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def serve_argv(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "inf_llm.serve", "--config", str(DEFAULT_CONFIG), "--port", "{port}", *overrides]


def parse_sse(lines) -> list[tuple[str, str]]:
    """(event name, data) per event, and ("comment", text) per comment line, in order."""
    out, name, data = [], "message", []
    for line in lines:
        if line == "":
            if data:
                out.append((name, "\n".join(data)))
            name, data = "message", []
        elif line.startswith(":"):
            out.append(("comment", line[1:].strip()))
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        out.append((name, "\n".join(data)))
    return out


def chat_body(prompt: str = QUESTION, **kw) -> dict:
    return {"prompt": prompt, "temperature": 0, "max_new_tokens": 16, **kw}


@contextmanager
def served(log_dir: Path, *overrides: str) -> Iterator[ServerProcess]:
    """`python -m inf_llm.serve` with the default config and `overrides`, ready; stopped on exit. Saved document
    memories go to `log_dir`/contexts unless the overrides say where (a test never writes to the home folder)."""
    srv = ServerProcess(serve_argv(f"contexts.dir={log_dir / 'contexts'}", *overrides), log_dir / "server.log").start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("server"), *SERVER_OVERRIDES) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=REQUEST_TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=REQUEST_TIMEOUT, max_retries=0)


def stream_chat(client: httpx.Client, body: dict, path: str = "/chat") -> tuple[httpx.Response, list]:
    with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        return r, parse_sse(r.iter_lines())


def tokens_of(events) -> str:
    return "".join(json.loads(d)["text"] for e, d in events if e == "token")


def done_of(events) -> dict:
    dones = [json.loads(d) for e, d in events if e == "done"]
    assert len(dones) == 1 and events[-1][0] == "done", events[-3:]
    return dones[0]


# ----------------------------------------------------------------------------------- loading, status
def test_loading_then_ready(server):
    """The port answers while the model loads (503, state loading), then 200 ready."""
    codes = [code for code, _ in server.statuses]
    assert codes[0] == 503 and codes[-1] == 200, codes
    loading = server.statuses[0][1]
    assert loading["ready"] is False and loading["state"] == "loading"
    assert set(loading["progress"]) == {"phase", "fraction"}


def test_status_payload_with_the_key(server):
    """/status never needs the key; with it (here) it tells the served configuration (without it: readiness only,
    tests/test_server_hardening.py)."""
    r = httpx.get(f"{server.url}/status", headers=AUTH)
    body = r.json()
    assert r.status_code == 200 and body["ready"] is True and body["state"] == "ready" and body["error"] is None
    assert body["model"] == "SmolLM2-135M-Instruct" and body["type"] == "inf-llm" and body["device"] == "cpu"
    assert body["memory"] == {"type": "inf-llm", "n_init": 64, "n_local": 512, "block_size": 32, "topk": 16,
                              "max_cached_block": 32, "exc_block_size": 128, "repr_topk": 4}
    assert body["max_len"] == MAX_LEN and body["auth_required"] is True
    assert body["limits"] == {"max_prompt_tokens": 131072, "max_new_tokens_limit": 4096, "max_client_requests": 16}
    assert body["generation_defaults"]["max_new_tokens"] == 16
    assert set(body["generation_defaults"]) == {"temperature", "top_p", "top_k", "max_new_tokens",
                                                "repetition_penalty", "repeat_last_n", "frequency_penalty",
                                                "presence_penalty", "stop", "system_prompt"}


def test_page_and_static_assets_are_open(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    asset = httpx.get(f"{server.url}/static/js/api.js")
    assert asset.status_code == 200


# -------------------------------------------------------------------------------------------- /chat
def test_chat_stream_equals_non_stream(client):
    r, events = stream_chat(client, chat_body())
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in r.headers
    streamed = tokens_of(events)
    done = done_of(events)
    plain = client.post("/chat", params={"stream": "false"}, json=chat_body()).json()
    assert streamed == plain["response"] and "Paris" in streamed
    assert done["finish_reason"] == plain["finish_reason"] == "stop"
    assert set(done) == {"finish_reason", "usage", "timings", "truncated", "retrieval"}
    assert done["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    assert set(done["timings"]) >= {"ttft_ms", "prefill_ms", "prefill_tokens_per_s", "decode_ms",
                                    "decode_tokens_per_s"}


def test_multi_turn_reuses_memory_and_matches_fresh_state(client):
    first = client.post("/chat?stream=false", json=chat_body()).json()
    turn2 = chat_body("And of Germany?", history=[{"role": "user", "content": QUESTION},
                                                 {"role": "bot", "content": first["response"]}])
    reused = client.post("/chat?stream=false", json=turn2).json()
    assert reused["usage"]["cached_tokens"] > first["usage"]["prompt_tokens"]
    client.post("/chat?stream=false", json=chat_body("Name a color.", max_new_tokens=2))  # replace the state
    # the same turn again (a regenerate) continues from the snapshot kept at the end of its prefill
    again = client.post("/chat?stream=false", json=turn2).json()
    assert again["usage"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert again["response"] == reused["response"] and "Berlin" in again["response"]


def test_stop_strings_never_reach_the_client(client):
    r, events = stream_chat(client, chat_body(stop=["Paris"]))
    text = tokens_of(events)
    assert done_of(events)["finish_reason"] == "stop"
    assert text == "The capital of France is " and "Paris" not in text


def test_progress_events_and_keepalive_comments(client):
    """A prompt of two prefill chunks reports progress; the 1 s keepalive sends `: ping` comments."""
    prompt = "Read this. " + " ".join(f"Item {i} is on shelf {i % 7}." for i in range(55)) + " Which shelf?"
    start = time.perf_counter()
    r, events = stream_chat(client, chat_body(prompt, max_new_tokens=16))
    wall = time.perf_counter() - start
    progress = [json.loads(d) for e, d in events if e == "progress"]
    done = done_of(events)
    assert progress and progress[-1]["processed"] == progress[-1]["total"] - 1 == done["usage"]["prompt_tokens"] - 1
    if wall > 2.5:  # pings come every second of a stream
        assert ("comment", "ping") in events


def test_extreme_sampling_values_are_no_server_error(client):
    """Regression: a seed above 2**32 made transformers.set_seed (numpy) raise, and a temperature of 1e-300
    overflowed the logits; both were 500s. A penalty below 0.01 is refused (422)."""
    for extra in ({"temperature": 0.7, "seed": 2**63 - 1}, {"temperature": 1e-300}, {"top_p": 1e-300}):
        r = client.post("/chat?stream=false", json=chat_body(max_new_tokens=2, **extra))
        assert r.status_code == 200, (extra, r.text)
    r = client.post("/chat?stream=false", json=chat_body(max_new_tokens=2, repetition_penalty=1e-300))
    assert r.status_code == 422 and r.json()["error"]["param"] == "repetition_penalty"


def test_tokenize(client):
    r = client.post("/tokenize", json={"text": "hello world"})
    assert r.status_code == 200 and r.json() == {"tokens": 2}


# ------------------------------------------------------------------------------------------- OpenAI
def test_openai_chat_stream_and_non_stream(oai, client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    full = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length") and full.usage.total_tokens > 0
    assert full.model == MODEL
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # The same conversation again is no extension of what the memory holds (its answer is there too), but
    # the snapshot kept at the end of its prefill serves it: only its last token is read again.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens - 1
    # Its next turn extends it: the whole first prompt is reused from memory, and the count says so.
    follow_up = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "And of Italy?"}]
    turn2 = oai.chat.completions.create(model=MODEL, messages=follow_up, temperature=0, max_tokens=4)
    assert turn2.usage.prompt_tokens_details.cached_tokens >= full.usage.prompt_tokens
    assert turn2.usage.prompt_tokens_details.cached_tokens < turn2.usage.prompt_tokens
    # The raw wire format ends with the literal [DONE].
    with client.stream("POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": 2,
                                                             "stream": True}) as r:
        raw = [line for line in r.iter_lines() if line.startswith("data:")]
    assert raw[-1] == "data: [DONE]" and json.loads(raw[0][5:])["object"] == "chat.completion.chunk"


def test_openai_completions_and_models(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    done = oai.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=4)
    assert done.object == "text_completion" and done.choices[0].text.strip().startswith("Paris")
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 4
    pieces = list(oai.completions.create(model=MODEL, prompt="The capital of France is", temperature=0,
                                         max_tokens=4, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == done.choices[0].text


def test_openai_client_errors(server, oai):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.UnprocessableEntityError) as err:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=9)
    assert err.value.body["param"] == "temperature"


# ------------------------------------------------------------------------------ cancellation, queue
def test_disconnect_frees_the_worker(client):
    with client.stream("POST", "/chat", json=chat_body("Write a long story about a dragon.",
                                                       max_new_tokens=400)) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("event: token")
            if seen == 3:
                break  # leaving the block closes the connection mid-stream
    start = time.perf_counter()
    after = client.post("/chat?stream=false", json=chat_body(max_new_tokens=2)).json()
    assert after["timings"]["queue_ms"] < 1500, after["timings"]
    assert time.perf_counter() - start < 30
    metrics = client.get("/metrics").text
    assert 'inf_llm_requests_finished_total{outcome="cancelled"}' in metrics


def test_disconnect_cancels_a_non_streaming_request_too(server, client):
    long = chat_body("Write a long story about a dragon.", max_new_tokens=400)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/chat?stream=false", json=long, headers=AUTH, timeout=2.0)
    after = client.post("/chat?stream=false", json=chat_body(max_new_tokens=2)).json()
    assert after["timings"]["queue_ms"] < 1500, after["timings"]


def test_queue_full_is_429_with_retry_after(server, client):
    long = chat_body("Write a long story about a dragon.", max_new_tokens=400)
    streams = []

    def open_stream():
        cm = client.stream("POST", "/chat", json=long)
        response = cm.__enter__()
        streams.append(cm)
        return response

    try:
        running = open_stream()
        lines = running.iter_lines()
        while not next(lines).startswith("event: token"):
            pass  # the worker is generating for the first stream
        for _ in range(MAX_QUEUE):
            assert open_stream().status_code == 200  # accepted, waiting in the queue
        refused = client.post("/chat", json=long)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert refused.json()["error"]["type"] == "server_busy"
        refused = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert refused.status_code == 429
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)
    # The server learns of the closed streams as their disconnects arrive: the queue empties within moments.
    deadline = time.monotonic() + 10
    while "inf_llm_requests_queued 0.0" not in client.get("/metrics").text and time.monotonic() < deadline:
        time.sleep(0.05)
    after = client.post("/chat?stream=false", json=chat_body(max_new_tokens=2))
    assert after.status_code == 200 and after.json()["timings"]["queue_ms"] < 3000, after.text


# ------------------------------------------------------------------------------------------- errors
def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status and body["error"]["message"]
    return body["error"]


def test_validation_errors_name_the_field(client):
    assert error_of(client.post("/chat", json=chat_body(temperature=-1)), 422)["param"] == "temperature"
    assert error_of(client.post("/chat", json={"history": []}), 422)["param"] == "prompt"
    err = error_of(client.post("/chat", json=chat_body(history=[{"role": "robot", "content": "x"}])), 422)
    assert err["param"] == "history.0.role"
    assert error_of(client.post("/chat", json=chat_body(unknown_field=1)), 422)["param"] == "unknown_field"
    bad_json = client.post("/chat", content=b"{not json", headers={"content-type": "application/json"})
    assert "JSON" in error_of(bad_json, 422)["message"]
    assert error_of(client.post("/v1/chat/completions", json={"messages": []}), 422)["param"] == "messages"
    assert error_of(client.post("/v1/completions", json={"prompt": "x", "n": 2}), 400)["param"] == "n"


def test_prompt_too_long_is_400_with_counts(client):
    err = error_of(client.post("/chat", json=chat_body("hello " * 1500)), 400)
    assert err["type"] == "prompt_too_long" and str(MAX_LEN) in err["message"] and "tokens" in err["message"]
    err = error_of(client.post("/v1/completions", json={"prompt": "hello " * 1500, "max_tokens": 1}), 400)
    assert err["type"] == "prompt_too_long"


def test_body_too_large_is_413(client):
    error_of(client.post("/chat", json=chat_body("x" * (MAX_BODY + 10))), 413)

    def chunks():  # no Content-Length: the limit is enforced on the bytes received
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 1000 + 2):
            yield b"y" * 1000
        yield b'"}'

    error_of(client.post("/chat", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_api_key_required_except_status(server):
    url = server.url
    assert error_of(httpx.post(f"{url}/chat", json=chat_body()), 401)["type"] == "authentication_error"
    error_of(httpx.post(f"{url}/chat", json=chat_body(), headers={"Authorization": "Bearer nope"}), 401)
    error_of(httpx.get(f"{url}/v1/models"), 401)
    error_of(httpx.get(f"{url}/metrics"), 401)
    assert httpx.get(f"{url}/v1/models", headers={"x-api-key": API_KEY}).status_code == 200
    assert httpx.get(f"{url}/status").status_code == 200


def test_not_found_has_the_error_shape(client):
    assert error_of(client.get("/nope"), 404)["type"] == "not_found_error"


def test_cors_and_request_id(server, client):
    pre = httpx.options(f"{server.url}/chat", headers={"Origin": "http://example.test",
                                                       "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.test"
    other = httpx.options(f"{server.url}/chat", headers={"Origin": "http://evil.test",
                                                         "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    r = client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(client.get("/v1/models").headers["x-request-id"]) >= 8


def test_metrics(client):
    text = client.get("/metrics").text
    for name in ("inf_llm_requests_running", "inf_llm_requests_queued", "inf_llm_time_to_first_token_seconds_bucket",
                 "inf_llm_decode_tokens_per_second_bucket", "inf_llm_prompt_tokens_total",
                 'inf_llm_requests_refused_total{reason="queue_full"}'):
        assert name in text, name


def test_logs_carry_request_ids_but_no_prompt_text(server, client):
    secret = "zebra-umbrella-4411"
    client.post("/chat?stream=false", json=chat_body(f"Repeat: {secret}", max_new_tokens=2),
                headers={"X-Request-ID": "log-check-1"})
    log = server.log_path.read_text()
    assert "log-check-1" in log and secret not in log


# --------------------------------------------------------------------------------------------- load
@pytest.mark.slow
def test_load_200_requests_from_8_clients(server):
    """Every request is answered (200) or refused (429); none hangs, no 5xx. Prints p50/p95."""
    n_clients, n_requests = 8, 200
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=REQUEST_TIMEOUT) as c:
            for i in range(k, n_requests, n_clients):
                body = chat_body(f"Question {i}: what is {i} plus {i}?", max_new_tokens=4)
                start = time.perf_counter()
                if i % 3 == 0:
                    with c.stream("POST", "/chat", json=body) as r:
                        events = parse_sse(r.iter_lines()) if r.status_code == 200 else []
                        if r.status_code == 200:
                            done_of(events)
                elif i % 3 == 1:
                    r = c.post("/chat?stream=false", json=body)
                else:
                    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": body["prompt"]}],
                                                              "max_tokens": 4, "temperature": 0})
                with lock:
                    results.append((r.status_code, time.perf_counter() - start))

    start = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        list(pool.map(worker, range(n_clients)))
    wall = time.perf_counter() - start
    codes = [c for c, _ in results]
    answered = sorted(t for c, t in results if c == 200)
    assert len(results) == n_requests and set(codes) <= {200, 429}, sorted(set(codes))
    p50 = statistics.median(answered)
    p95 = answered[int(0.95 * (len(answered) - 1))]
    print(f"\nload: {n_requests} requests, {n_clients} clients, {wall:.1f} s: {codes.count(200)} answered, "
          f"{codes.count(429)} refused (429), 0 failures; answered latency p50 {p50:.2f} s, p95 {p95:.2f} s")
