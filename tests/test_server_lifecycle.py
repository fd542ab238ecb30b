"""Server lifecycle: loading gates every generation route (503), a failed load is reported, a bug is a 500
that leaves the worker alive, SIGTERM ends in-flight streams with an error event and exits promptly, and
the CLI rejects bad input with a message and exit status 2.

The in-process tests run the real app (TestClient runs its lifespan) over the real SmolLM2 model; loading is
held back by a gate so the loading state is observed deterministically.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from inf_llm.config import load_config
from inf_llm.engine import load_engine
from inf_llm.server import create_app
from tests.conftest import DEFAULT_CONFIG, REPO_ROOT
from tests.test_server import QUESTION, ServerProcess, parse_sse

GATE_TIMEOUT = 120
READY_TIMEOUT = 240


def wait_for(client: TestClient, state: str, timeout: float = READY_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get("/status").json()
        if body["state"] == state:
            return body
        time.sleep(0.1)
    pytest.fail(f"server never reached state {state!r}: {body}")


@pytest.fixture(scope="module")
def gated() -> Iterator[tuple[TestClient, threading.Event]]:
    """The app with loading held at a gate; the test releases it."""
    cfg = load_config(DEFAULT_CONFIG, ["model.device=cpu", "generation.max_new_tokens=8"])
    gate = threading.Event()

    def factory(c, progress):
        progress("waiting for the test", 0.0)
        gate.wait(GATE_TIMEOUT)
        return load_engine(c, progress)

    with TestClient(create_app(cfg, engine_factory=factory)) as client:
        yield client, gate
        gate.set()


def test_every_generation_route_is_503_while_loading_then_ready(gated):
    client, gate = gated
    status = client.get("/status")
    assert status.status_code == 503
    body = status.json()
    assert body["ready"] is False and body["state"] == "loading" and body["error"] is None
    assert body["progress"] == {"phase": "waiting for the test", "fraction": 0.0}
    requests = [("/chat", {"prompt": QUESTION}), ("/chat?stream=false", {"prompt": QUESTION}),
                ("/tokenize", {"text": "x"}), ("/v1/completions", {"prompt": "x"}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]
    for path, payload in requests:
        r = client.post(path, json=payload)
        assert r.status_code == 503, path
        assert r.json()["error"]["type"] == "model_not_ready" and "loading" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) > 0
    assert client.get("/").status_code == 200  # the page shows its own loading screen
    gate.set()
    ready = wait_for(client, "ready")
    assert ready["ready"] is True and ready["progress"]["fraction"] == 1.0
    assert client.get("/status").status_code == 200
    r = client.post("/chat?stream=false", json={"prompt": QUESTION, "temperature": 0})
    assert r.status_code == 200 and "Paris" in r.json()["response"]


def test_a_bug_is_a_500_and_the_worker_stays_alive(gated, monkeypatch):
    client, gate = gated
    gate.set()
    wait_for(client, "ready")
    engine = client.app.state.inf_llm.engine

    def broken(*args, **kwargs):
        raise RuntimeError("injected bug")

    monkeypatch.setattr(engine.generator, "_generate", broken)
    r = client.post("/chat?stream=false", json={"prompt": QUESTION, "temperature": 0})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    with client.stream("POST", "/chat", json={"prompt": QUESTION, "temperature": 0}) as s:
        events = parse_sse(s.iter_lines())
    assert s.status_code == 200 and events[-1][0] == "error"
    assert json.loads(events[-1][1])["error"]["code"] == 500
    monkeypatch.undo()
    r = client.post("/chat?stream=false", json={"prompt": QUESTION, "temperature": 0})
    assert r.status_code == 200 and "Paris" in r.json()["response"] and engine.alive


def test_a_failed_load_is_reported():
    cfg = load_config(DEFAULT_CONFIG, ["model.path=/nonexistent/model.gguf"])
    with TestClient(create_app(cfg)) as client:
        body = wait_for(client, "error", timeout=60)
        assert client.get("/status").status_code == 503
        assert body["ready"] is False and "/nonexistent/model.gguf" in body["error"]
        r = client.post("/chat", json={"prompt": "x"})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------- processes
def test_sigterm_ends_streams_with_an_error_and_exits(tmp_path):
    """`uvicorn inf_llm.serve:app` (the lazily created app, default config): SIGTERM during a stream and a
    non-streaming request ends both with a shutdown error, and the process exits promptly."""
    srv = ServerProcess([sys.executable, "-m", "uvicorn", "inf_llm.serve:app", "--port", "{port}"],
                        tmp_path / "server.log", env={"INFLLM_CONFIG": str(DEFAULT_CONFIG)}).start()
    try:
        srv.wait_ready()
        long = {"prompt": "Write a long story about a dragon.", "temperature": 0, "max_new_tokens": 500}
        other: dict = {}

        def non_streaming() -> None:
            other["response"] = httpx.post(f"{srv.url}/chat?stream=false", json=long, timeout=60)

        with httpx.stream("POST", f"{srv.url}/chat", json=long, timeout=60) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("event: token"):
                pass
            waiting = threading.Thread(target=non_streaming)
            waiting.start()
            time.sleep(0.5)
            sent = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            events = parse_sse(lines)
        ended = time.monotonic() - sent
        waiting.join(30)
        assert events[-1][0] == "error", events[-3:]
        assert json.loads(events[-1][1])["error"]["type"] == "server_shutting_down"
        assert ended < 5
        assert other["response"].status_code == 503
        # uvicorn re-raises the captured signal once shut down: the exit status says "terminated by SIGTERM".
        assert srv.proc.wait(15) in (0, -signal.SIGTERM)
        assert time.monotonic() - sent < 15
    finally:
        srv.stop()


@pytest.mark.parametrize("args,message", [
    (["--config", "/nonexistent/config.yaml"], "does not exist"),
    (["model.topk=many"], "model.topk"),
    (["model.nope=1"], "valid keys"),
    (["model.n_local=100"], "exc_block_size"),
    (["notanoverride"], "key.path=value"),
    (["--port", "http"], "invalid int value"),
])
def test_cli_rejects_bad_input_with_exit_2(args, message):
    done = subprocess.run([sys.executable, "-m", "inf_llm.serve", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
