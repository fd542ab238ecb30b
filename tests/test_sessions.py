"""The engine's session API (Engine.save/restore/fork/reset/session_info, inf_llm/engine/sessions.py) with the
real SmolLM2 model and a small memory window, so the saved state holds memory blocks, not only the window.

Session calls are jobs of the worker thread: they run after the generation queued before them and return
futures; the files are NAME.pt (weights_only) + NAME.json, and every bad file is a SessionStateError naming it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from inf_llm.config import load_config
from inf_llm.engine import Done, Engine, Message, SessionState, ShuttingDownError, build_messages
from inf_llm.engine.sessions import SESSION_FORMAT, session_paths
from inf_llm.errors import SessionStateError
from tests import test_generation
from tests.conftest import DEFAULT_CONFIG
from tests.test_generation import DOCUMENT, EVENT_TIMEOUT, SMALL_WINDOW

QUESTION = "Which village does entry 7 describe?"
FOLLOW_UP = "And entry 12?"
FUTURE_TIMEOUT = 300  # seconds: a session call waits for the generation queued before it


@pytest.fixture(scope="module")
def cfg():
    return load_config(DEFAULT_CONFIG, [*SMALL_WINDOW, "server.max_queue=8"])  # a session call takes a slot too


# test_generation's fixtures, made over this module's cfg
loaded, engine = test_generation.loaded, test_generation.engine


def greedy(engine: Engine, messages, max_new_tokens: int = 12) -> Done:
    job = engine.submit(engine.prepare_chat(messages), engine.sampling(temperature=0, max_new_tokens=max_new_tokens))
    events = list(job.events(timeout=EVENT_TIMEOUT))
    assert isinstance(events[-1], Done), events[-1]
    return events[-1]


def first_turn(engine: Engine) -> tuple[list[Message], Done]:
    engine.reset().result(FUTURE_TIMEOUT)
    done = greedy(engine, build_messages(f"{DOCUMENT}\n\n{QUESTION}"))
    return [Message("user", f"{DOCUMENT}\n\n{QUESTION}"), Message("assistant", done.text)], done


def test_save_then_restore_in_a_new_engine_continues_identically(engine, cfg, loaded, tmp_path: Path):
    history, _ = first_turn(engine)
    held = engine.session_info().result(FUTURE_TIMEOUT).held_tokens
    assert held > cfg.model.n_local  # the memory holds blocks beyond the window
    saved = engine.save(tmp_path / "s", {"note": "hi"}).result(FUTURE_TIMEOUT)
    assert saved.held_tokens == held and saved.cache_path.is_file() and saved.sidecar.is_file()
    assert json.loads(saved.sidecar.read_text())["format"] == SESSION_FORMAT
    here = greedy(engine, build_messages(FOLLOW_UP, history))

    other = Engine(cfg, loaded.model, loaded.tokenizer).start()
    try:
        restored = other.restore(tmp_path / "s.pt").result(FUTURE_TIMEOUT)
        assert restored.held_tokens == held and restored.metadata == {"note": "hi"}
        assert other.session_info().result(FUTURE_TIMEOUT).held_tokens == held
        there = greedy(other, build_messages(FOLLOW_UP, history))
    finally:
        other.shutdown()
    assert there.usage.cached_tokens == held == here.usage.cached_tokens
    assert there.text == here.text and there.text


def test_fork_then_restore_regenerates_the_same_answer(engine):
    history, _ = first_turn(engine)
    fork = engine.fork().result(FUTURE_TIMEOUT)
    assert isinstance(fork, SessionState) and len(fork.held) > 0
    first = greedy(engine, build_messages(FOLLOW_UP, history))
    for _ in range(2):  # a fork restores as often as asked: each restore installs a fresh copy
        engine.restore(fork).result(FUTURE_TIMEOUT)
        again = greedy(engine, build_messages(FOLLOW_UP, history))
        # the fork's tokens at least (the snapshot kept at the end of the first prefill covers more)
        assert again.text == first.text and again.usage.cached_tokens >= len(fork.held)


def test_reset_empties_the_state(engine, tmp_path: Path):
    first_turn(engine)
    assert engine.session_info().result(FUTURE_TIMEOUT).layers
    engine.reset().result(FUTURE_TIMEOUT)
    info = engine.session_info().result(FUTURE_TIMEOUT)
    assert info.held_tokens == 0 and info.layers == []
    with pytest.raises(SessionStateError, match="nothing to save"):
        engine.save(tmp_path / "empty").result(FUTURE_TIMEOUT)
    empty = engine.fork().result(FUTURE_TIMEOUT)
    assert empty.held == () and empty.cache is None
    engine.restore(empty).result(FUTURE_TIMEOUT)
    assert engine.session_info().result(FUTURE_TIMEOUT).held_tokens == 0


def test_bad_files_are_clear_errors_and_change_nothing(engine, tmp_path: Path):
    first_turn(engine)
    held = engine.session_info().result(FUTURE_TIMEOUT).held_tokens
    good = engine.save(tmp_path / "good").result(FUTURE_TIMEOUT)
    sidecar = json.loads(good.sidecar.read_text())

    def restore_fails(name: str, match: str, pt: bytes | None = None, side: dict | str | None = None):
        cache_path, side_path = session_paths(tmp_path / name)
        cache_path.write_bytes(good.cache_path.read_bytes() if pt is None else pt)
        side_path.write_text(side if isinstance(side, str) else json.dumps(sidecar if side is None else side))
        with pytest.raises(SessionStateError, match=match):
            engine.restore(tmp_path / name).result(FUTURE_TIMEOUT)
        assert engine.session_info().result(FUTURE_TIMEOUT).held_tokens == held

    with pytest.raises(SessionStateError, match="no saved session at .*missing"):
        engine.restore(tmp_path / "nothing").result(FUTURE_TIMEOUT)
    restore_fails("notjson", "notjson.json is not a saved session", side="{")
    restore_fails("nokind", "nokind.json is not a saved session", side={})
    restore_fails("format", "session format 2; this version reads format 1", side={**sidecar, "format": 2})
    restore_fails("ids", "held_ids is not a list of token ids", side={**sidecar, "held_ids": ["x"]})
    restore_fails("count", "holds .* tokens but .* lists", side={**sidecar, "held_ids": sidecar["held_ids"][:-1]})
    restore_fails("garbage", "cannot read saved memory|not a saved memory file", pt=b"not a torch file")
    state = torch.load(good.cache_path, weights_only=True)
    restore_fails("config", "does not match this model/config",
                  pt=_torch_bytes(tmp_path, {**state, "fingerprint": {**state["fingerprint"], "n_local": 1}}))
    restore_fails("layers", "damaged", pt=_torch_bytes(tmp_path, {**state, "layers": state["layers"][:1]}))
    # A pickle holding an object other than tensors and containers is never unpickled (weights_only).
    restore_fails("pickle", "cannot read saved memory|not a saved memory file",
                  pt=_torch_bytes(tmp_path, {"format": 1, "evil": ThreadPoolExecutor}))


def _torch_bytes(tmp_path: Path, obj) -> bytes:
    path = tmp_path / "tmp.bin"
    torch.save(obj, path)
    return path.read_bytes()


def test_files_written_by_the_old_chat_save_load(engine, tmp_path: Path):
    """/save wrote kind "inf_llm.chat session", format 1, before the engine owned sessions: still readable."""
    history, _ = first_turn(engine)
    good = engine.save(tmp_path / "old", {"history": [{"role": m.role, "content": m.content} for m in history]}
                       ).result(FUTURE_TIMEOUT)
    data = json.loads(good.sidecar.read_text())
    good.sidecar.write_text(json.dumps({**data, "kind": "inf_llm.chat session"}))
    engine.reset().result(FUTURE_TIMEOUT)
    restored = engine.restore(tmp_path / "old").result(FUTURE_TIMEOUT)
    assert restored.held_tokens == good.held_tokens and restored.metadata["history"][1]["content"] == history[1].content


def test_session_calls_wait_for_the_generation_queued_before_them(engine, tmp_path: Path):
    """Submitted from other threads (as the server's thread pool would) while a generation is queued or
    running, each call runs after it: it sees the state the generation left, never a half-written one."""
    engine.reset().result(FUTURE_TIMEOUT)
    job = engine.submit(engine.prepare_chat(build_messages(f"{DOCUMENT}\n\n{QUESTION}")),
                        engine.sampling(temperature=0, max_new_tokens=12))
    with ThreadPoolExecutor(4) as pool:
        info = pool.submit(lambda: engine.session_info().result(FUTURE_TIMEOUT))
        fork = pool.submit(lambda: engine.fork().result(FUTURE_TIMEOUT))
        saved = pool.submit(lambda: engine.save(tmp_path / "busy").result(FUTURE_TIMEOUT))
        done = list(job.events(timeout=EVENT_TIMEOUT))[-1]
        assert isinstance(done, Done)
        held = info.result().held_tokens
        assert held >= done.usage.prompt_tokens  # the whole prompt: the generation ran first
        assert len(fork.result().held) == held and saved.result().held_tokens == held


def test_queued_session_call_ends_with_the_shutdown(cfg, loaded, tmp_path: Path):
    idle = Engine(cfg, loaded.model, loaded.tokenizer)  # not started: the call stays queued
    future = idle.save(tmp_path / "never")
    idle.shutdown(wait=None)
    with pytest.raises(ShuttingDownError):
        future.result(1)
    with pytest.raises(ShuttingDownError):
        idle.reset()
