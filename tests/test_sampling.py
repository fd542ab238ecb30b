"""The sampling fields are defined once (inf_llm.sampling.FIELDS): every surface's field set is derived from it,
and a field added there shows up on every surface (config, /chat, OpenAI bodies, /status, the engine) with its
bounds and default."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from fastapi.testclient import TestClient

from inf_llm import sampling
from inf_llm.config import GenerationConfig, load_config
from inf_llm.engine.events import SamplingParams
from inf_llm.errors import ConfigError
from inf_llm.sampling import Surface
from inf_llm.server.app import create_app
from inf_llm.server.state import ServerState

STATIC = Path(__file__).resolve().parent.parent / "inf_llm" / "static"
# What the bodies hold besides the sampling fields.
CHAT_OWN = {"prompt", "history", "system", "session_id", "context_id"}
OPENAI_OWN = {"model", "n", "stream", "stream_options", "context_id"}
CHAT_COMPLETION_OWN = OPENAI_OWN | {"messages", "max_completion_tokens"}
COMPLETION_OWN = OPENAI_OWN | {"prompt", "echo"}


def _no_model(cfg, progress):
    raise ConfigError("no model in this test")


def names(surface: Surface) -> set[str]:
    return {f.wire_name(surface) for f in sampling.on(surface)}


def test_every_surface_is_derived_from_the_definition():
    cfg = load_config(None)
    schema = create_app(cfg, engine_factory=_no_model).openapi()["components"]["schemas"]
    assert set(GenerationConfig.model_fields) == names(Surface.CONFIG) | {"system_prompt"}
    assert set(schema["ChatRequest"]["properties"]) == names(Surface.CHAT) | CHAT_OWN
    assert set(schema["ChatCompletionRequest"]["properties"]) == names(Surface.OPENAI) | CHAT_COMPLETION_OWN
    assert set(schema["CompletionRequest"]["properties"]) == names(Surface.OPENAI) | COMPLETION_OWN
    status = ServerState(cfg).status()
    assert set(status["generation_defaults"]) == names(Surface.STATUS) | {"system_prompt"}
    assert [f["name"] for f in status["generation_fields"]] == [f.name for f in sampling.on(Surface.CHAT)]
    assert [f.name for f in dataclasses.fields(SamplingParams)] == [f.name for f in sampling.FIELDS]


def test_bounds_and_defaults_are_the_definitions():
    """The config, the request bodies and /status enforce and tell the same bounds (max_new_tokens: /status tells
    the server's limit, the tighter one)."""
    cfg = load_config(None)
    config_schema = GenerationConfig.model_json_schema()["properties"]
    chat_schema = create_app(cfg, engine_factory=_no_model).openapi()["components"]["schemas"][
        "ChatRequest"]["properties"]
    fields = {f["name"]: f for f in ServerState(cfg).status()["generation_fields"]}
    for f in sampling.FIELDS:
        expected = {json_name: getattr(f, name) for name, json_name in
                    (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum")) if getattr(f, name) is not None}
        config_field = config_schema[f.name]
        config_bounds = next((s for s in config_field.get("anyOf", [config_field]) if s.get("type") != "null"), {})
        assert {k: config_bounds[k] for k in expected} == expected, f.name
        chat_bounds = next(s for s in chat_schema[f.name]["anyOf"] if s.get("type") != "null")
        # the OpenAPI document writes numbers as floats (2**63 - 1 too)
        assert {k: float(chat_bounds[k]) for k in expected} == {k: float(v) for k, v in expected.items()}, f.name
        told = {k: fields[f.name][k] for k in ("minimum", "exclusive_minimum", "maximum") if k in fields[f.name]}
        if f.name == "max_new_tokens":
            expected["maximum"] = min(f.le, cfg.server.max_new_tokens_limit)
        assert told == {k.replace("exclusiveMinimum", "exclusive_minimum"): v for k, v in expected.items()}, f.name
        assert fields[f.name]["default"] == getattr(cfg.generation, f.name)
        assert getattr(GenerationConfig(), f.name) == (list(f.default) if isinstance(f.default, tuple) else f.default)


def test_the_page_has_no_list_of_sampling_fields():
    """The settings form is built from /status's generation_fields: no sampling field is named in the page's
    code but stop (a text area of its own, like the system prompt)."""
    for path in [STATIC / "index.html", *sorted((STATIC / "js").glob("*.js"))]:
        text = path.read_text()
        for f in sampling.FIELDS:
            if f.name != "stop":
                assert not re.search(rf"\b{f.name}\b", text), f"{path.name} names {f.name}"


NEW_FIELD = textwrap.dedent("""
    import json, sys
    from inf_llm import sampling
    sampling.FIELDS = (*sampling.FIELDS, sampling.SamplingField(
        "min_p", float, 0.0, "drop tokens below min_p times the likeliest one's probability", ge=0, le=1,
        openai_default=0.0, extension=True, page=sampling.PageInput("Min p", "number", 0.01, 6)))

    from fastapi.testclient import TestClient
    from pydantic import ValidationError
    from inf_llm.config import load_config
    from inf_llm.engine.generation import sampling_params
    from inf_llm.server.app import create_app
    from inf_llm.server.protocol import ChatCompletionRequest, ChatRequest, CompletionRequest
    from inf_llm.server.serving import Serving
    from inf_llm.server.state import ServerState

    cfg = load_config(None, ["generation.min_p=0.05"])
    chat = ChatRequest(prompt="hi", min_p=0.2)
    completion = CompletionRequest(prompt="hi")
    try:
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], min_p=2)
        refused = False
    except ValidationError:
        refused = True
    schema = create_app(cfg).openapi()["components"]["schemas"]  # the model is never loaded
    status = ServerState(cfg).status()
    json.dump({
        "config": cfg.generation.min_p,
        "chat": Serving._sampling(chat)["min_p"],
        "openai_default": Serving._openai_sampling(completion)["min_p"],
        "openai_refuses_out_of_bounds": refused,
        "schemas": [name for name in ("ChatRequest", "ChatCompletionRequest", "CompletionRequest")
                    if "min_p" in schema[name]["properties"]],
        "status_default": status["generation_defaults"]["min_p"],
        "status_field": [f for f in status["generation_fields"] if f["name"] == "min_p"],
        "engine": sampling_params(cfg.generation, min_p=0.3).min_p,
        "engine_default": sampling_params(cfg.generation).min_p,
    }, sys.stdout)
""")


def test_a_new_field_shows_up_on_every_surface():
    """One entry in FIELDS (a fresh interpreter, so every surface is built with it) is a config key, a /chat and
    an OpenAI field with its bounds and OpenAI default, a /status default and form field, and a SamplingParams
    field filled by sampling_params."""
    out = subprocess.run([sys.executable, "-c", NEW_FIELD], capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    assert got.pop("status_field") == [{
        "name": "min_p", "type": "number", "nullable": False, "default": 0.05, "minimum": 0, "maximum": 1,
        "description": "drop tokens below min_p times the likeliest one's probability",
        "page": {"label": "Min p", "widget": "number", "step": 0.01, "order": 6}}]
    assert got == {"config": 0.05, "chat": 0.2, "openai_default": 0.0, "openai_refuses_out_of_bounds": True,
                   "schemas": ["ChatRequest", "ChatCompletionRequest", "CompletionRequest"], "status_default": 0.05,
                   "engine": 0.3, "engine_default": 0.05}


def test_openai_defaults_are_openais():
    """OpenAI routes get no penalty the request did not ask for; other fields left out get the config's default
    (exactly the rules test_penalties.py checks on the served model)."""
    from inf_llm.server.protocol import ChatCompletionRequest, ChatRequest
    from inf_llm.server.serving import Serving

    openai = Serving._openai_sampling(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]))
    assert openai == {"temperature": None, "top_p": None, "top_k": None, "repetition_penalty": 1.0,
                      "repeat_last_n": None, "frequency_penalty": 0.0, "presence_penalty": 0.0, "stop": None,
                      "seed": None}
    asked = Serving._openai_sampling(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],
                                                           repetition_penalty=1.3, stop="END"))
    assert (asked["repetition_penalty"], asked["stop"]) == (1.3, ["END"])
    assert set(Serving._sampling(ChatRequest(prompt="x"))) == set(openai)
    assert all(v is None for v in Serving._sampling(ChatRequest(prompt="x")).values())


def test_status_route_carries_the_fields():
    """/status (here: a server whose model failed to load, which still tells its configuration)."""
    with TestClient(create_app(load_config(None), engine_factory=_no_model)) as client:
        body = client.get("/status").json()
    assert [f["name"] for f in body["generation_fields"] if f["page"]] == [
        "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed"]
