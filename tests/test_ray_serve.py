"""The server on Ray Serve (inf_llm/deploy): routing keys and the proxy middleware (fast, no Ray needed), and
one slow end-to-end test: Ray started locally, 2 CPU replicas of a tiny random-weight Llama on loopback, two
conversations over several turns.

The slow test checks what the deployment promises: each conversation's turns land on one replica, a later
turn reuses the memory state (`cached_tokens` > 0), and after the replica holding a conversation is killed,
Serve replaces it and the conversation's next turn is rebuilt from its text on the new replica
(`cached_tokens` 0) with the same answer a fresh engine gives. Every answer is compared with a local engine
on the same model (greedy decoding).

Turns use max_new_tokens 1 so that what a replica holds after a turn is exactly the prompt: the next turn's
prompt extends it whatever the random model said (its tokens would not always survive a decode/re-encode).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from itertools import pairwise

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from inf_llm.deploy.affinity import (
    MULTIPLEXED_MODEL_ID_HEADER,
    PROXY_CALLBACK,
    PROXY_CALLBACK_ENV,
    SessionKeyMiddleware,
    conversation_opening,
    normalize_session_id,
    session_key,
)

# Seconds for a replica's new session to reach the proxy's router (pushed every 0.1 s, then broadcast by the
# controller). A person's next turn comes later than that; the test waits as long between requests.
ROUTING_SETTLE_SECONDS = 1.5
# Seconds for Ray, Serve and two replicas (each importing torch and transformers) to start on 2 busy cores.
START_TIMEOUT = 300
# Seconds for Serve to notice a killed replica and have its replacement running.
REPLACE_TIMEOUT = 240
REQUEST_TIMEOUT = 120
SYSTEM = "You are terse."


# --------------------------------------------------------------------------------------------- keys
def test_session_id_is_the_key_and_odd_ids_are_hashed():
    assert session_key("/chat", {"prompt": "hi", "session_id": "chat-42"}) == "chat-42"
    odd = session_key("/v1/chat/completions", {"messages": [], "session_id": "a b\n" + "x" * 300})
    assert odd.startswith("sid-") and len(odd) == 36 and odd == normalize_session_id("a b\n" + "x" * 300)


def test_every_turn_of_a_chat_has_the_key_of_its_opening():
    """Without a session id, /chat and /v1/chat/completions requests of one conversation share a key (the
    digest of the messages up to the first user message), whatever the later turns are."""
    turn1 = {"prompt": "Tell me about Paris.", "system": SYSTEM}
    turn3 = {"prompt": "And Rome?", "system": SYSTEM,
             "history": [{"role": "user", "content": "Tell me about Paris."}, {"role": "bot", "content": "Big."},
                         {"role": "user", "content": "And Lyon?"}, {"role": "assistant", "content": "Smaller."}]}
    assert session_key("/chat", turn1) == session_key("/chat", turn3)
    assert session_key("/chat", turn1).startswith("conv-")
    assert session_key("/chat", {**turn1, "system": "Other."}) != session_key("/chat", turn1)
    assert session_key("/chat", {"prompt": "Tell me about Rome."}) != session_key("/chat", {"prompt": "Paris?"})
    oai1 = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]}
    oai2 = {"messages": [*oai1["messages"], {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": [{"type": "text", "text": "More"}]}]}
    assert session_key("/v1/chat/completions", oai1) == session_key("/v1/chat/completions", oai2)
    assert conversation_opening("/v1/chat/completions", oai2) == [["system", SYSTEM], ["user", "Hi"]]


def test_no_key_without_a_conversation():
    assert session_key("/v1/completions", {"prompt": "Once upon a time"}) is None
    assert session_key("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}) is None
    assert session_key("/chat", ["not", "an", "object"]) is None


def _echo_app() -> SessionKeyMiddleware:
    """The middleware in front of an app that echoes the routing header and the body it received."""

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"key": request.headers.get(MULTIPLEXED_MODEL_ID_HEADER), "body": body.decode()})

    return SessionKeyMiddleware(Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])]))


def test_proxy_middleware_sets_the_routing_header_and_passes_the_body_on():
    client = TestClient(_echo_app())
    body = json.dumps({"prompt": "hi", "session_id": "s1", "history": []})
    r = client.post("/chat", content=body, headers={"content-type": "application/json"}).json()
    assert r == {"key": "s1", "body": body}
    derived = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert derived["key"].startswith("conv-")
    assert client.post("/chat", json={"prompt": "hi"}, headers={"X-Session-Id": "h1"}).json()["key"] == "h1"
    explicit = {MULTIPLEXED_MODEL_ID_HEADER: "mine", "X-Session-Id": "h1"}
    assert client.post("/chat", json={"prompt": "hi", "session_id": "s1"}, headers=explicit).json()["key"] == "mine"
    assert client.post("/chat", content=b"{not json").json() == {"key": None, "body": "{not json"}
    assert client.post("/tokenize", json={"text": "x", "session_id": "s1"}).json()["key"] is None
    assert client.get("/status").json()["key"] is None


def test_health_check_fails_for_a_failed_load_and_a_stopped_worker(tmp_path):
    """What makes Serve replace a replica: the model failed to load, or the worker thread is gone."""
    pytest.importorskip("ray")
    from inf_llm.config import load_config
    from inf_llm.deploy.ray_serve import replica_problem
    from inf_llm.engine import load_engine
    from inf_llm.server.state import ServerState
    from tests.models import save_tiny_model

    cfg = load_config(None, [f"model.path={save_tiny_model(tmp_path / 'tiny')}", "model.device=cpu"])
    state = ServerState(cfg, engine_factory=lambda c, progress: load_engine(c))
    assert replica_problem(state) is None  # loading
    state._load()
    assert state.state == "ready" and replica_problem(state) is None
    state.engine.shutdown()  # the thread ends, as if it had crashed; the server itself is not closing
    assert replica_problem(state) == "the generation worker thread has stopped"
    failed = ServerState(cfg, engine_factory=lambda c, progress: load_engine(load_config(None, ["model.path=/nope"])))
    failed._load()
    assert replica_problem(failed).startswith("the model failed to load: ") and "/nope" in replica_problem(failed)


# ----------------------------------------------------------------------------------- Ray, end to end
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_actors(ray, deployment_name: str) -> set[str]:
    """Names of the live replica actors of the deployment (SERVE_REPLICA::<app>#<deployment>#<id>)."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment_name}#" in a["name"]}


def _wait_running(serve, app_name: str, deployment_name: str, replicas: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == "RUNNING":
            states = app.deployments[deployment_name].replica_states
            if states.get("RUNNING", 0) == replicas and sum(states.values()) == replicas:
                return
        time.sleep(0.5)
    pytest.fail(f"Serve did not reach {replicas} running replicas in {timeout} s: {serve.status()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict]:
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from inf_llm.config import load_config
    from inf_llm.deploy import ray_serve
    from inf_llm.engine import load_engine
    from tests.models import save_tiny_model

    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=5)
    cfg = load_config(None, [f"model.path={folder}", "model.device=cpu", "model.dtype=float32",
                             "server.model_name=tiny-llama",
                             "generation.temperature=0", "generation.repetition_penalty=1.0",
                             "generation.max_new_tokens=1", f"generation.system_prompt={SYSTEM}"])
    port = _free_port()
    saved = os.environ.get(PROXY_CALLBACK_ENV)
    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK  # read by Serve's proxy, which Ray starts as our child
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 1024 * 1024)
    reference = load_engine(cfg)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_serve.deployment(cfg, replicas=2, num_gpus_per_replica=0, num_cpus_per_replica=1),
                  name=ray_serve.APP_NAME, route_prefix="/")
        _wait_running(serve, ray_serve.APP_NAME, ray_serve.DEPLOYMENT_NAME, 2, START_TIMEOUT)
        yield {"ray": ray, "serve": serve, "url": f"http://127.0.0.1:{port}", "reference": reference}
    finally:
        reference.shutdown()
        serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop(PROXY_CALLBACK_ENV, None)
        else:
            os.environ[PROXY_CALLBACK_ENV] = saved


class Conversation:
    """A conversation as a client keeps it (the history), and where and how each turn was served. `openai`:
    streamed /v1/chat/completions without a session id (the proxy derives the key from the opening);
    otherwise /chat with `session_id`."""

    def __init__(self, session_id: str, prompts: list[str], openai: bool = False):
        self.session_id = session_id
        self.prompts = prompts
        self.openai = openai
        self.history: list[dict] = []
        self.turns: list[dict] = []  # {"replica", "key", "cached", "prompt_tokens", "response"}

    def send(self, client: httpx.Client, reference, max_new_tokens: int = 1) -> dict:
        from inf_llm.engine.templates import Message, build_messages

        prompt = self.prompts[len(self.turns)]
        if self.openai:
            messages = [*self.history, {"role": "user", "content": prompt}]
            body = {"messages": messages, "max_tokens": max_new_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, r.read()
                chunks = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
            (usage,) = [c["usage"] for c in chunks if c.get("usage")]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
        else:
            body = {"prompt": prompt, "history": self.history, "session_id": self.session_id,
                    "max_new_tokens": max_new_tokens}
            r = client.post("/chat", params={"stream": "false"}, json=body)
            assert r.status_code == 200, r.text
            text, usage = r.json()["response"], r.json()["usage"]
            cached = usage["cached_tokens"]
        history = [Message(t["role"], t["content"]) for t in self.history]
        expected = reference.generate(reference.prepare_chat(build_messages(prompt, history, SYSTEM)),
                                      reference.sampling(max_new_tokens=max_new_tokens))
        assert (text, usage["completion_tokens"]) == (expected.text, expected.usage.completion_tokens), (
            f"turn {len(self.turns) + 1} of {self.session_id}")
        turn = {"replica": r.headers["x-infllm-replica"], "key": r.headers.get("x-infllm-session-key"),
                "cached": cached, "prompt_tokens": usage["prompt_tokens"], "response": text}
        self.turns.append(turn)
        self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        return turn


@pytest.mark.slow
def test_conversations_stick_to_replicas_and_survive_a_replica_kill(cluster):
    from inf_llm.deploy import ray_serve

    ray, serve, reference = cluster["ray"], cluster["serve"], cluster["reference"]
    bob_prompts = ["Count to five.", "Now backwards.", "Skip the evens.", "And the odds?"]
    bob_key = session_key("/v1/chat/completions", {"messages": [{"role": "user", "content": bob_prompts[0]}]})
    convs = [Conversation("alice", ["Name three rivers.", "Which is longest?", "Where does it end?", "Why?"]),
             Conversation(bob_key, bob_prompts, openai=True)]
    with httpx.Client(base_url=cluster["url"], timeout=REQUEST_TIMEOUT) as client:
        status = client.get("/status")
        assert status.status_code == 200 and status.json()["model"] == "tiny-llama"
        for _ in range(3):
            for conv in convs:
                conv.send(client, reference)
                time.sleep(ROUTING_SETTLE_SECONDS)
        for conv in convs:
            assert {t["replica"] for t in conv.turns} == {conv.turns[0]["replica"]}, conv.turns
            assert {t["key"] for t in conv.turns} == {conv.session_id}
            assert conv.turns[0]["cached"] == 0
            for before, turn in pairwise(conv.turns):
                assert turn["cached"] == before["prompt_tokens"] > 0, conv.turns  # the previous prompt is reused
        alice, bob = convs
        assert alice.turns[0]["replica"] != bob.turns[0]["replica"]

        doomed = alice.turns[0]["replica"]
        actors = _replica_actors(ray, ray_serve.DEPLOYMENT_NAME)
        (name,) = [a for a in actors if a.endswith(f"#{doomed}")]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        deadline = time.monotonic() + REPLACE_TIMEOUT
        while time.monotonic() < deadline:
            now = _replica_actors(ray, ray_serve.DEPLOYMENT_NAME)
            if name not in now and len(now) == 2:
                break
            time.sleep(0.5)
        _wait_running(serve, ray_serve.APP_NAME, ray_serve.DEPLOYMENT_NAME, 2, REPLACE_TIMEOUT)
        time.sleep(ROUTING_SETTLE_SECONDS)  # the proxy's router learns the new replica set

        rebuilt = alice.send(client, reference, max_new_tokens=8)
        assert rebuilt["replica"] not in {doomed, bob.turns[0]["replica"]}, rebuilt
        assert rebuilt["cached"] == 0 and rebuilt["prompt_tokens"] > alice.turns[-2]["prompt_tokens"]
        kept = bob.send(client, reference, max_new_tokens=8)
        assert kept["replica"] == bob.turns[0]["replica"] and kept["cached"] == bob.turns[-2]["prompt_tokens"]
