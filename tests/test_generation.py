"""The generation engine (inf_llm/engine: templates, generation, worker) with the real SmolLM2 model.

The model is loaded once for the module with a SMALL memory window (n_local 256, blocks of 32) so that a
prompt of a few hundred tokens already exercises the context memory (retrieval, chunked prefill) on CPU;
short prompts stay inside the window, where InfLLM equals full attention.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from inf_llm.adapter import patch_model
from inf_llm.config import InfLLMConfig, Truncation, load_config
from inf_llm.engine import Done, Engine, Error, Message, Progress, TextDelta, build_messages
from inf_llm.engine.generation import StopFilter, prepare_chat, truncate_ids
from inf_llm.engine.loading import load_model
from inf_llm.engine.templates import render_chat
from inf_llm.errors import PromptTooLongError, QueueFullError, RequestError
from tests.conftest import DEFAULT_CONFIG

SMALL_WINDOW = [
    "model.device=cpu", "model.full_attention_tokens=null", "model.n_init=32", "model.n_local=256",
    "model.block_size=32", "model.repr_topk=4",
    "model.topk=4", "model.max_cached_block=8", "model.exc_block_size=64", "chunk_size=128",
    "server.max_queue=2", "generation.repetition_penalty=1.0",
]
QUESTION = "What is the capital of France?"
# A document of ~700 tokens: longer than the 256-token window, so the answer reads from memory blocks.
DOCUMENT = " ".join(f"Line {i}: the archive entry number {i} describes a quiet village by the sea." for i in range(40))
EVENT_TIMEOUT = 120  # seconds to wait for any single event before failing instead of hanging


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cfg() -> InfLLMConfig:
    return load_config(DEFAULT_CONFIG, SMALL_WINDOW)


@pytest.fixture(scope="module")
def loaded(cfg):
    """A private SmolLM2 copy (patched here, so the session-wide `smollm2` fixture stays unpatched)."""
    lm = load_model(cfg)
    patch_model(lm.model, cfg.model)
    return lm


@pytest.fixture(scope="module")
def engine(cfg, loaded) -> Iterator[Engine]:
    eng = Engine(cfg, loaded.model, loaded.tokenizer).start()
    yield eng
    eng.shutdown()


def run(engine: Engine, messages, **sampling) -> tuple[list, Done]:
    job = engine.submit(engine.prepare_chat(messages), engine.sampling(**sampling))
    events = list(job.events(timeout=EVENT_TIMEOUT))
    assert isinstance(events[-1], Done), events[-1]
    return events, events[-1]


def greedy(engine: Engine, messages, max_new_tokens: int = 16, **kw) -> Done:
    return run(engine, messages, temperature=0, max_new_tokens=max_new_tokens, **kw)[1]


# -------------------------------------------------------------------------------------- pure helpers
def test_stop_filter_holds_back_prefixes_and_cuts():
    f = StopFilter(["STOP", "\n\n"])
    assert f.feed("Hello ST") == "Hello "  # "ST" may start STOP: held back
    assert f.feed("ar") == "STar"  # it did not
    assert f.feed(" end\n") == " end"
    assert f.feed("\nmore") == ""  # "\n\n" completed: cut, stopped
    assert f.stopped and f.flush() == ""
    g = StopFilter(["abc"])
    assert g.feed("xxab") == "xx" and g.flush() == "ab"  # the end of the answer releases held text
    assert StopFilter([]).feed("anything") == "anything"


def test_truncate_ids_suffix_keeps_head_and_tail():
    ids = list(range(1000))
    kept, info = truncate_ids(ids, 300, Truncation.SUFFIX)
    assert len(kept) == 300 and info.original_tokens == 1000 and info.kept_tokens == 300
    assert kept[:128] == ids[:128] and kept[128:] == ids[-172:]
    assert truncate_ids(ids, 1000, Truncation.SUFFIX) == (ids, None)
    with pytest.raises(PromptTooLongError) as err:
        truncate_ids(ids, 999, Truncation.ERROR)
    assert err.value.http_status == 400 and "1000" in str(err.value) and "999" in str(err.value)


@pytest.mark.parametrize("conv_type,expected", [
    ("mistral-inst", "<s>[INST] S\n\nu1 [/INST] a1</s>[INST] u2 [/INST]"),
    ("vicuna", "S USER: u1 ASSISTANT: a1</s>USER: u2 ASSISTANT:"),
    ("qwen", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
             "<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n"),
    ("minicpm", "<用户>S\n\nu1<AI>a1<用户>u2<AI>"),
    ("llama-3-inst", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                     "<|start_header_id|>user<|end_header_id|>\n\nu1<|eot_id|><|start_header_id|>assistant"
                     "<|end_header_id|>\n\na1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nu2<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_fallback_templates(conv_type, expected):
    no_template = SimpleNamespace(chat_template=None)
    messages = build_messages("u2", [Message("user", "u1"), Message("assistant", "a1")], system="S")
    assert render_chat(no_template, messages, conv_type).text == expected


def test_fallback_template_errors():
    no_template = SimpleNamespace(chat_template=None)
    with pytest.raises(RequestError, match="conv_type"):
        render_chat(no_template, build_messages("hi"), None)
    with pytest.raises(RequestError, match="no user message"):
        render_chat(no_template, [Message("system", "S")], "qwen")
    with pytest.raises(RequestError, match="role"):
        render_chat(no_template, [Message("robot", "x")], "qwen")


# ------------------------------------------------------------------------------------------ the model
def test_chat_template_from_tokenizer(engine, loaded):
    text = render_chat(loaded.tokenizer, build_messages(QUESTION, system="Be brief.")).text
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert text.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_answer_usage_and_timings(engine):
    events, done = run(engine, build_messages(QUESTION), temperature=0, max_new_tokens=16)
    assert "Paris" in done.text
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == done.text
    assert done.finish_reason == "stop"
    u, t = done.usage, done.timings
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and 0 < u.completion_tokens < 16
    assert t.ttft_ms > 0 and t.prefill_ms > 0 and t.decode_tokens_per_s > 0


def test_max_new_tokens_gives_length(engine):
    done = greedy(engine, build_messages("Count from one to one hundred in words."), max_new_tokens=5)
    assert done.finish_reason == "length" and done.usage.completion_tokens == 5


def test_stop_strings_never_stream(engine):
    events, done = run(engine, build_messages(QUESTION), temperature=0, max_new_tokens=16, stop=["Paris"])
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert done.finish_reason == "stop" and "Paris" not in streamed and streamed == done.text
    assert done.text.startswith("The capital of France is")
    # A stop string that spans several tokens.
    done = greedy(engine, build_messages(QUESTION), stop=[" of Fr"])
    assert done.text == "The capital"


def test_multi_turn_reuse_equals_fresh_state(engine):
    first = greedy(engine, build_messages(QUESTION))
    history = [Message("user", QUESTION), Message("assistant", first.text)]
    second = greedy(engine, build_messages("And of Germany?", history))
    # The memory held the first prompt and the answer except its last (end-of-turn) token.
    assert second.usage.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens - 1
    engine.generator.reset(snapshots=True)
    fresh = greedy(engine, build_messages("And of Germany?", history))
    assert fresh.usage.cached_tokens == 0
    assert fresh.text == second.text and "Berlin" in fresh.text


def test_unrelated_prompt_rebuilds_state(engine):
    greedy(engine, build_messages(QUESTION), max_new_tokens=4)
    done = greedy(engine, build_messages("Name a color."), max_new_tokens=4)
    assert done.usage.cached_tokens == 0


def test_long_prompt_uses_memory_and_reports_retrieval(engine, loaded):
    """A prompt longer than the window: chunked prefill reports progress, the answer reads memory blocks,
    and the retrieval spans decode to text of the prompt."""
    messages = build_messages(f"{DOCUMENT}\n\nWhich entry mentions a village?")
    events, done = run(engine, messages, temperature=0, max_new_tokens=8)
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress and progress[-1].processed == done.usage.prompt_tokens - 1
    assert all(a.processed < b.processed for a, b in zip(progress, progress[1:]))
    r = done.retrieval
    assert r is not None and r.layers == loaded.model.config.num_hidden_layers and r.steps > 0
    assert 0 < len(r.spans) <= 8
    for span in r.spans:
        assert span.token_end - span.token_start == 32 and 0 < span.score <= 1
        assert span.token_end <= done.usage.prompt_tokens and span.text
    assert any("archive entry" in s.text for s in r.spans)
    # A follow-up question in the same conversation prefills only the new turn.
    follow = build_messages("Thanks. And which number comes last?",
                            [Message("user", messages[-1].content), Message("assistant", done.text)])
    again = greedy(engine, follow, max_new_tokens=4)
    assert again.usage.cached_tokens == done.usage.prompt_tokens + done.usage.completion_tokens - 1


def test_suffix_truncation_is_reported(engine, cfg, loaded):
    small = cfg.model_copy(update={"max_len": 200})
    prompt = prepare_chat(loaded.tokenizer, small, build_messages(DOCUMENT))
    assert prompt.tokens == 200 and prompt.truncated.original_tokens > 600
    job = engine.submit(prompt, engine.sampling(temperature=0, max_new_tokens=2))
    done = list(job.events(timeout=EVENT_TIMEOUT))[-1]
    assert done.truncated == prompt.truncated and done.usage.prompt_tokens == 200
    strict = cfg.model_copy(update={"max_len": 200, "truncation": Truncation.ERROR})
    with pytest.raises(PromptTooLongError):
        prepare_chat(loaded.tokenizer, strict, build_messages(DOCUMENT))


def test_seed_makes_sampling_reproducible(engine):
    a = run(engine, build_messages("Tell me a word."), temperature=1.0, max_new_tokens=8, seed=7)[1]
    b = run(engine, build_messages("Tell me a word."), temperature=1.0, max_new_tokens=8, seed=7)[1]
    assert a.text == b.text


def test_tiny_temperature_decodes_greedily(engine):
    """Regression (found by the schemathesis fuzz): temperature 1e-300 overflowed the logits to inf and
    sampling raised (a 500); below MIN_TEMPERATURE decoding is greedy."""
    tiny = run(engine, build_messages(QUESTION), temperature=1e-300, max_new_tokens=8)[1]
    assert tiny.text == greedy(engine, build_messages(QUESTION), max_new_tokens=8).text


def test_cancel_during_decode_stops_within_a_step(engine):
    job = engine.submit(engine.prepare_chat(build_messages("Write a long story about a dragon.")),
                        engine.sampling(temperature=0, max_new_tokens=300))
    seen = 0
    for event in job.events(timeout=EVENT_TIMEOUT):
        if isinstance(event, TextDelta):
            seen += 1
            if seen == 3:
                cancelled_at = time.perf_counter()
                job.cancel()
        elif isinstance(event, Done):
            assert event.finish_reason == "cancelled" and event.usage.completion_tokens < 20
            assert time.perf_counter() - cancelled_at < 5
    done = greedy(engine, build_messages(QUESTION), max_new_tokens=4)  # the worker is free again
    assert done.timings.queue_ms < 1000


def test_cancel_during_prefill_keeps_a_consistent_state(engine):
    """Cancelled between chunks: the memory keeps the chunks already read, so resending the same prompt
    resumes from there (cached_tokens > 0)."""
    engine.generator.reset()
    prompt = engine.prepare_chat(build_messages(DOCUMENT + "\n\nSummarize."))
    job = engine.submit(prompt, engine.sampling(temperature=0, max_new_tokens=4))
    for event in job.events(timeout=EVENT_TIMEOUT):
        if isinstance(event, Progress) and event.processed > 0:
            job.cancel()
        if isinstance(event, Done):
            assert event.finish_reason == "cancelled" and event.usage.completion_tokens == 0
    held = len(engine.generator.held)
    assert 0 < held < prompt.tokens - 1
    job = engine.submit(prompt, engine.sampling(temperature=0, max_new_tokens=2))
    done = list(job.events(timeout=EVENT_TIMEOUT))[-1]
    assert done.usage.cached_tokens == held


def test_queue_full_and_cancel_while_queued(engine):
    long = engine.prepare_chat(build_messages("Write a long story about a dragon."))
    params = engine.sampling(temperature=0, max_new_tokens=300)
    running = engine.submit(long, params)
    first = next(running.events(timeout=EVENT_TIMEOUT))  # the worker has taken it
    assert isinstance(first, (TextDelta, Progress))
    waiting = [engine.submit(long, params) for _ in range(engine.cfg.server.max_queue)]
    with pytest.raises(QueueFullError) as err:
        engine.submit(long, params)
    assert err.value.http_status == 429
    for job in (*waiting, running):
        job.cancel()
    for job in waiting:
        final = list(job.events(timeout=EVENT_TIMEOUT))[-1]
        assert isinstance(final, Done) and final.finish_reason == "cancelled" and final.usage.completion_tokens == 0


def test_a_bug_is_a_500_event_and_the_worker_survives(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected bug")

    monkeypatch.setattr(engine.generator, "_generate", broken)
    job = engine.submit(engine.prepare_chat(build_messages(QUESTION)), engine.sampling(temperature=0))
    final = list(job.events(timeout=EVENT_TIMEOUT))[-1]
    assert isinstance(final, Error) and final.status == 500 and "RuntimeError" in final.message
    monkeypatch.undo()
    assert "Paris" in greedy(engine, build_messages(QUESTION)).text
    assert engine.alive


def test_shutdown_ends_running_and_queued_jobs(cfg, loaded, engine):
    """A second engine over the same model (the module's engine is idle meanwhile)."""
    other = Engine(cfg, loaded.model, loaded.tokenizer).start()
    long = other.prepare_chat(build_messages("Write a long story about a dragon."))
    params = other.sampling(temperature=0, max_new_tokens=300)
    running = other.submit(long, params)
    next(running.events(timeout=EVENT_TIMEOUT))
    waiting = other.submit(long, params)
    other.shutdown(wait=10)
    for job in (running, waiting):
        final = list(job.events(timeout=EVENT_TIMEOUT))[-1]
        assert isinstance(final, Error) and final.status == 503 and final.type == "server_shutting_down"
    assert not other.alive
    with pytest.raises(Exception, match="shutting down"):
        other.submit(long, params)



# ------------------------------------------------------------------- tiny random models: follow-ups, host pool
# A memory small enough for a few hundred bytes (the tiny tokenizer: one token per byte) to form blocks.
TINY_WINDOW = ["model.device=cpu", "model.dtype=float32", "model.n_init=4", "model.n_local=64", "model.block_size=8",
               "model.topk=2", "model.repr_topk=2", "model.exc_block_size=16", "chunk_size=64",
               "generation.repetition_penalty=1.0"]


def tiny_engine(tmp_path, *overrides: str) -> Engine:
    from inf_llm.engine import load_engine
    from tests.models import save_tiny_model

    folder = tmp_path / "tiny"
    if not folder.exists():
        save_tiny_model(folder, "llama", seed=5)
    return load_engine(load_config(None, [f"model.path={folder}", *TINY_WINDOW, *overrides]))


def test_a_text_follow_up_continues_the_held_memory(tmp_path):
    """/v1/completions style: the previous prompt's text, the completion's text, a new question. A random model's
    answer is bytes that do not round-trip through text (invalid UTF-8 comes back as U+FFFD), so the follow-up's
    own tokenization leaves the held conversation after the prompt; it is read as the held ids plus the rest,
    and the whole held conversation is reused (before: only the prompt, from its snapshot)."""
    engine = tiny_engine(tmp_path)
    try:
        tok, gen = engine.tokenizer, engine.generator
        text = DOCUMENT[:400]
        first = engine.generate(engine.prepare_text(text), engine.sampling(temperature=0, max_new_tokens=12))
        held = list(gen.held)
        assert len(held) == first.usage.prompt_tokens + first.usage.completion_tokens - 1
        follow = text + first.text + "\nQuestion: and then?\nAnswer:"
        prompt = engine.prepare_text(follow)
        assert list(prompt.ids[: len(held)]) != held  # the case this is about: the text does not round-trip
        again = engine.generate(prompt, engine.sampling(temperature=0, max_new_tokens=4))
        assert again.usage.cached_tokens == len(held)
        aligned = gen.tokenized_for_reuse(prompt)
        assert list(aligned.ids[: len(held)]) == held and again.usage.prompt_tokens == aligned.tokens
        assert tok.decode(list(aligned.ids)) == tok.decode(list(prompt.ids))  # the same text
        # a prompt that extends only the earlier prompt's text keeps at least that prompt's ids
        other = engine.prepare_text(text + "Something else entirely.")
        n = first.usage.prompt_tokens
        assert gen.tokenized_for_reuse(other).ids[:n] == prompt.ids[:n]
        # an unrelated prompt is tokenized as usual
        unrelated = engine.prepare_text("Unrelated text.")
        assert gen.tokenized_for_reuse(unrelated) is unrelated
    finally:
        engine.shutdown()


def test_the_answer_anchor_is_every_generated_token(tmp_path):
    """The memory holds the answer but its last token, the client got the text of all of them: an answer whose
    last token completes a character (byte tokens 0xC3 0xA9: "é") after one that does not round-trip (0xFF comes
    back as U+FFFD) is still recognized in the follow-up's text."""
    engine = tiny_engine(tmp_path)
    try:
        gen, tok = engine.generator, engine.tokenizer
        prompt = engine.prepare_text("Un caf")
        answer = [tok.convert_tokens_to_ids("ÿ"), *tok("é", add_special_tokens=False)["input_ids"]]
        assert len(answer) == 3 and tok.decode(answer) == "\ufffdé"
        gen.cache, gen.held = object(), [*prompt.ids, *answer[:-1]]  # as a run leaves them (no model call here)
        gen._remember_text(prompt, answer)
        follow = engine.prepare_text(prompt.text + tok.decode(answer) + " au lait")
        assert follow.ids[: len(gen.held)] != tuple(gen.held)
        assert gen.tokenized_for_reuse(follow).ids[: len(answer) + prompt.tokens] == (*prompt.ids, *answer)
    finally:
        engine.generator.reset(snapshots=True)
        engine.shutdown()


@pytest.mark.parametrize("ram_mib,pool_back", [(1, True), (64, False)])
def test_a_new_conversation_takes_the_host_pool_back(tmp_path, ram_mib, pool_back):
    """host_pool_tokens (8 MiB here) is lent to one cache at a time. The first conversation's kept snapshots keep
    its cache, and so the pool, alive; a new conversation then had to allocate host memory of its own (page-locked
    on a GPU: seconds). When those snapshots are over contexts.ram_mib anyway they go and the new conversation gets
    the pool; within the budget they stay (the earlier conversation is still reused)."""
    engine = tiny_engine(tmp_path, "model.offload_access=direct", "model.host_pool_tokens=16384",
                         f"contexts.ram_mib={ram_mib}")
    try:
        gen = engine.generator
        a = engine.prepare_text(DOCUMENT[:900])
        b = engine.prepare_text(DOCUMENT[900:1800])
        params = engine.sampling(temperature=0, max_new_tokens=2)
        engine.generate(a, params)
        assert gen.cache.host_lease is not None
        engine.generate(b, params)
        assert (gen.cache.host_lease is not None) == pool_back
        again = engine.generate(a, params)
        assert (again.usage.cached_tokens == 0) == pool_back
    finally:
        engine.shutdown()
