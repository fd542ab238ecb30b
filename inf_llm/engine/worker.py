"""The generation worker: one thread owns the model and its memory state; requests wait in a bounded FIFO.

Owns: the worker thread, the queue (`server.max_queue` waiting jobs; one more is refused with
QueueFullError), jobs and their event channels (sync or asyncio), cancellation and shutdown.
Must not know: HTTP. The server submits jobs and relays their events.

    engine = load_engine(cfg)                         # load + patch + start the worker
    prompt = engine.prepare_chat(messages)             # any thread; raises RequestError/PromptTooLongError
    job = engine.submit(prompt, params)                # raises QueueFullError / NotReadyError
    for event in job.events(): ...                     # or `async for event in job` with submit(loop=...)
    job.cancel()                                       # takes effect within one decode step / one layer

Sessions are jobs of the same queue (each takes a `server.max_queue` slot while it waits), so they wait for
the generation before them and never touch the generator from another thread. Each returns a
concurrent.futures.Future (from any thread; asyncio callers wrap it with asyncio.wrap_future); its result or
its SessionStateError/QueueFullError/ShuttingDownError:

    engine.save(path, metadata).result()              # -> SavedSession (NAME.pt + NAME.json, sessions.py)
    engine.restore(path).result()                     # -> SavedSession; or restore(a SessionState from fork())
    state = engine.fork().result()                    # -> SessionState: a private copy of the conversation
    engine.reset().result(); engine.session_info().result()   # -> None; SessionInfo (tokens held, stats)

Document memories (engine.library, inf_llm/engine/library.py): a document read once and kept in RAM and on
disk; prompts that start with it continue from its memory:

    doc = engine.library.prepare(name, text, system)      # any thread (tokenizes)
    info = engine.read_document(doc, emit).result()       # -> ContextInfo; a job of the worker
    prompt = engine.library.prepare_chat(info.id, messages)
    engine.library.list(); engine.library.delete(info.id)  # any thread
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from inf_llm.adapter import patch_model
from inf_llm.auto_config import ModelShape, describe_machine, resolve_config
from inf_llm.config import InfLLMConfig, MemoryType
from inf_llm.engine.contexts import ContextInfo
from inf_llm.engine.events import Done, Error, Event, PreparedPrompt, SamplingParams, Timings, Usage
from inf_llm.engine.generation import Generator, prepare_chat, prepare_text, sampling_params
from inf_llm.engine.library import Document, DocumentLibrary
from inf_llm.engine.packed_linear import PLAIN_LINEAR
from inf_llm.engine.sessions import SavedSession, SessionInfo, SessionState, read_session, write_session
from inf_llm.engine.templates import Message, encode_text
from inf_llm.errors import ConfigError, InfLLMError, NotReadyError, QueueFullError

log = logging.getLogger(__name__)

# How long the worker waits for a job before checking whether it should exit.
IDLE_POLL_SECONDS = 0.5
# Seconds a client should wait before retrying after a 429 (one short answer's worth on a CPU).
RETRY_AFTER_SECONDS = 2
# Decode steps of the warm-up: the first captures the decode step's CUDA graph, the next ones replay it.
WARMUP_DECODE_STEPS = 4
# Short prompts of the warm-up: a one-token prefill (a 2-token request) and an odd few tokens.
SHORT_WARMUP_LENGTHS = (2, 5)
# Environment variable that turns the warm-up off (0) or on everywhere (1); `python -m inf_llm.serve --no-warmup`
# sets it to 0.
WARMUP_ENV_VAR = "INFLLM_WARMUP"


class ShuttingDownError(NotReadyError):
    """The server is stopping: queued and running jobs end with this error."""

    error_type = "server_shutting_down"


@dataclass(frozen=True)
class EngineInfo:
    """What /status and /v1/models report about the loaded model."""

    model_name: str
    device: str
    dtype: str
    load_seconds: float
    auto: dict | None = None  # each auto key's value and reason (inf_llm.auto_config.Resolution.as_status)
    warmup_seconds: float | None = None  # the kernels' warm-up before ready (None: none ran)
    linear: str = PLAIN_LINEAR  # how the linear layers multiply (`LoadedModel.linear`)


class _Channel:
    """Worker -> consumer events: a plain queue for threads, or an asyncio queue fed thread-safely."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop = loop
        self.sync: queue.SimpleQueue | None = queue.SimpleQueue() if loop is None else None
        self.aqueue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None

    def put(self, event: Event) -> None:
        if self.sync is not None:
            self.sync.put(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.aqueue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class Job:
    """One request in the engine. Events arrive in order; the last is Done or Error."""

    _ids = itertools.count(1)

    def __init__(self, prompt: PreparedPrompt, params: SamplingParams, loop: asyncio.AbstractEventLoop | None,
                 request_id: str | None = None):
        self.id = request_id or f"job-{next(self._ids)}"
        self.prompt = prompt
        self.params = params
        self.cancel_event = threading.Event()
        self.abort_error: InfLLMError | None = None  # set at shutdown: the final event is this error
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None
        self.final: Done | Error | None = None
        self._channel = _Channel(loop)

    def cancel(self) -> None:
        """Stop generating (client gone, stop button). Idempotent; the job still ends with Done(cancelled)."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def emit(self, event: Event) -> None:
        if isinstance(event, (Done, Error)):
            self.final = event
        self._channel.put(event)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Blocking iteration (threads). `timeout` bounds the wait for each event (queue.Empty)."""
        if self._channel.sync is None:
            raise RuntimeError("this job was submitted with an event loop: iterate it with `async for`")
        while True:
            event = self._channel.sync.get(timeout=timeout)
            yield event
            if isinstance(event, (Done, Error)):
                return

    async def next_event(self) -> Event:
        if self._channel.aqueue is None:
            raise RuntimeError("this job was submitted without an event loop: iterate it with events()")
        return await self._channel.aqueue.get()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.next_event()
            yield event
            if isinstance(event, (Done, Error)):
                return


class SessionJob:
    """A save/restore/reset/fork/info step, run in the worker thread between generation jobs. Its result
    (or exception) goes to `future`; cancelling the future before the job starts drops it."""

    def __init__(self, name: str, step: Callable[[Generator], object]):
        self.id = f"session-{name}"
        self.step = step
        self.future: Future = Future()

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    def run(self, generator: Generator) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.step(generator)
        except InfLLMError as exc:
            log.warning("%s failed: %s", self.id, exc)
            self.future.set_exception(exc)
        except Exception as exc:  # a bug: the caller gets it; the generator's state was not replaced
            log.exception("%s crashed", self.id)
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class _JobQueue:
    """Bounded FIFO of waiting jobs. A job cancelled while waiting (its client left) gives its slot back at
    once: it is dropped, with its final Done(cancelled), the next time the queue is touched."""

    def __init__(self, maxsize: int, on_drop: Callable[[Job], None]):
        self.maxsize = maxsize
        self._items: deque[Job] = deque()
        self._cv = threading.Condition()
        self._on_drop = on_drop

    def _purge(self) -> None:
        if any(job.cancelled for job in self._items):
            for job in [j for j in self._items if j.cancelled]:
                self._items.remove(job)
                self._on_drop(job)

    def put_nowait(self, job: Job | SessionJob) -> None:
        with self._cv:
            self._purge()
            if len(self._items) >= self.maxsize:
                raise queue.Full
            self._items.append(job)
            self._cv.notify()

    def get(self, timeout: float) -> Job | SessionJob:
        with self._cv:
            if not self._items:
                self._cv.wait(timeout)
            if not self._items:
                raise queue.Empty
            return self._items.popleft()

    def drain(self) -> list[Job | SessionJob]:
        with self._cv:
            items, self._items = list(self._items), deque()
            return items

    def qsize(self) -> int:
        """Waiting jobs, those whose client left not counted (the server checks room before tokenizing)."""
        with self._cv:
            self._purge()
            return len(self._items)


class Engine:
    """The single generation worker over one patched model."""

    def __init__(self, cfg: InfLLMConfig, model, tokenizer, info: EngineInfo | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.generator = Generator(cfg, model, tokenizer)
        device = self.generator.device
        self.info = info or EngineInfo(
            model_name=cfg.server.model_name or cfg.model.path, device=str(device),
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."), load_seconds=0.0,
        )
        self._queue = _JobQueue(cfg.server.max_queue, on_drop=self._drop_cancelled)
        self._lock = threading.Lock()  # submit vs shutdown
        self._closing = False
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="inf_llm-worker", daemon=True)
        self.on_finished: Callable[[Job], None] | None = None  # metrics hook, called in the worker thread
        self.library = DocumentLibrary(cfg, self.generator, self.info.model_name)

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, reason: str = "the server is shutting down", wait: float | None = 5.0) -> None:
        """Refuse new jobs; end the running and queued ones with ShuttingDownError; stop the thread."""
        with self._lock:
            first, self._closing = not self._closing, True
        if first:
            error = ShuttingDownError(reason)
            current = self._current
            if current is not None:
                current.abort_error = error
                current.cancel()
            for job in self._queue.drain():
                if isinstance(job, SessionJob):
                    if job.future.set_running_or_notify_cancel():
                        job.future.set_exception(error)
                else:
                    job.emit(Error.of(error))
        if wait and self._thread.is_alive():
            self._thread.join(wait)

    # --- requests ---------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return 1 if self._current is not None else 0

    def prepare_chat(self, messages: Sequence[Message]) -> PreparedPrompt:
        return prepare_chat(self.tokenizer, self.cfg, messages)

    def prepare_text(self, prompt: str) -> PreparedPrompt:
        return prepare_text(self.tokenizer, self.cfg, prompt)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as a message of the chat (what an attachment costs in context)."""
        return len(encode_text(self.tokenizer, text))

    def sampling(self, **overrides) -> SamplingParams:
        return sampling_params(self.cfg.generation, **overrides)

    def submit(self, prompt: PreparedPrompt, params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None,
               request_id: str | None = None) -> Job:
        """Queue a job. Raises QueueFullError when `server.max_queue` jobs already wait, NotReadyError
        when shutting down."""
        job = Job(prompt, params, loop, request_id)
        self._enqueue(job)
        return job

    def _enqueue(self, job: Job | SessionJob) -> None:
        with self._lock:
            if self._closing:
                raise ShuttingDownError("the server is shutting down")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFullError(
                    f"the server is busy: {self._queue.maxsize} requests are already waiting; retry in a "
                    f"few seconds"
                ) from None

    # --- sessions (jobs of the worker thread; see the module docstring) ---------------------------
    def _session_job(self, name: str, step: Callable[[Generator], object]) -> Future:
        job = SessionJob(name, step)
        self._enqueue(job)
        return job.future

    def save(self, path: str | Path, metadata: dict | None = None) -> Future[SavedSession]:
        """Save the held conversation as NAME.pt + NAME.json (inf_llm/engine/sessions.py); `metadata` (JSON
        values) is stored beside it and comes back from restore(). SessionStateError when nothing is held."""
        def step(gen: Generator) -> SavedSession:
            return write_session(path, gen.cache, gen.held, self.info.model_name, self.cfg.model.type.value,
                                 metadata)
        return self._session_job("save", step)

    def restore(self, source: str | Path | SessionState) -> Future[SavedSession | None]:
        """Continue from a saved session (path) or a fork(). A file that is not a session of this model and
        config fails with SessionStateError and leaves the held state as it was."""
        def step(gen: Generator) -> SavedSession | None:
            if isinstance(source, SessionState):
                gen.adopt(source.cache.clone() if source.cache is not None else None, source.held)
                return None
            cache, held, saved = read_session(source, gen.model)
            gen.adopt(cache, held)
            return saved
        return self._session_job("restore", step)

    def fork(self) -> Future[SessionState]:
        """A private copy of the held conversation, to restore() later (regenerate, branches)."""
        def step(gen: Generator) -> SessionState:
            return SessionState(tuple(gen.held), gen.cache.clone() if gen.cache is not None else None)
        return self._session_job("fork", step)

    def reset(self) -> Future[None]:
        """Forget the held conversation (the next request prefills from scratch)."""
        return self._session_job("reset", lambda gen: gen.reset())

    def session_info(self) -> Future[SessionInfo]:
        """Tokens held and the memory's per-layer statistics."""
        def step(gen: Generator) -> SessionInfo:
            return SessionInfo(len(gen.held), gen.cache.stats() if gen.cache is not None else [])
        return self._session_job("info", step)

    # --- document memories (inf_llm/engine/library.py) --------------------------------------------
    def read_document(self, doc: Document, emit: Callable[[Event], None] | None = None,
                      cancel: threading.Event | None = None) -> Future[ContextInfo]:
        """Read a document (library.prepare) into a kept memory, saved to disk; a job of the worker thread.
        `emit` gets its Progress events (in the worker thread); setting `cancel` stops the reading."""
        cancel = cancel or threading.Event()
        return self._session_job("context", lambda gen: self.library.read(doc, emit or (lambda e: None), cancel))

    def warm_up(self) -> Future[float]:
        """Run requests' kernels once (compiling the Triton ones) and forget them; a job of the worker thread.
        The result is its seconds."""
        return self._session_job("warmup", warm_up)

    def generate(self, prompt: PreparedPrompt, params: SamplingParams) -> Done:
        """Blocking convenience: submit and wait. Raises the job's error as an exception."""
        job = self.submit(prompt, params)
        for event in job.events():
            if isinstance(event, Error):
                error = InfLLMError(event.message)
                error.http_status, error.error_type = event.status, event.type
                raise error
            if isinstance(event, Done):
                return event
        raise AssertionError("unreachable: a job always ends with Done or Error")

    # --- the worker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._closing:
            try:
                job = self._queue.get(timeout=IDLE_POLL_SECONDS)
            except queue.Empty:
                continue
            if isinstance(job, SessionJob):
                job.run(self.generator)
                continue
            self._current = job
            try:
                self._process(job)
            finally:
                self._current = None
                if self.on_finished is not None:
                    self.on_finished(job)

    def _process(self, job: Job) -> None:
        job.started_at = time.perf_counter()
        if self._closing or job.abort_error is not None:
            job.emit(Error.of(job.abort_error or ShuttingDownError("the server is shutting down")))
            return
        if job.cancelled:
            job.emit(self._cancelled_before_start(job))
            return
        try:
            self.library.ensure_loaded(job.prompt)  # a saved document it starts with, back into RAM
            done = self.generator.run(job.prompt, job.params, job.emit, job.cancel_event, job.submitted_at)
        except InfLLMError as exc:
            log.warning("job %s failed: %s", job.id, exc)
            self.generator.reset()
            job.emit(Error.of(exc))
            return
        except Exception as exc:  # a bug: report it as a 500, keep the worker alive with a fresh state
            log.exception("job %s crashed", job.id)
            self.generator.reset()
            job.emit(Error.of(exc))
            return
        if job.abort_error is not None:
            job.emit(Error.of(job.abort_error))
            return
        u, t = done.usage, done.timings
        log.info(
            "job %s: %s, prompt %d tokens (%d cached), %d generated, ttft %s ms, decode %s tok/s",
            job.id, done.finish_reason, u.prompt_tokens, u.cached_tokens, u.completion_tokens,
            t.ttft_ms, t.decode_tokens_per_s,
        )
        job.emit(done)

    def _drop_cancelled(self, job: Job | SessionJob) -> None:
        if isinstance(job, SessionJob):  # its future is cancelled already: nothing to tell
            return
        job.started_at = time.perf_counter()
        job.emit(self._cancelled_before_start(job))
        if self.on_finished is not None:
            self.on_finished(job)

    @staticmethod
    def _cancelled_before_start(job: Job) -> Done:
        n = job.prompt.tokens
        return Done(
            finish_reason="cancelled", text="",
            usage=Usage(prompt_tokens=n, completion_tokens=0, total_tokens=n, cached_tokens=0),
            timings=Timings(None, None, None, None, None, round((job.started_at - job.submitted_at) * 1000, 2)),
            truncated=job.prompt.truncated,
        )


def freeze_long_lived_objects() -> None:
    """Move every object alive now (torch's, transformers', the model's: ~370K of them) out of the cyclic
    garbage collector's reach. They live as long as the process, yet each full collection rescans them: 190 ms
    on the CI CPU, and one that lands inside a prefill chunk keeps the GPU waiting for the host's launches.
    What the process allocates later is collected as usual."""
    gc.collect()
    gc.freeze()


def warmup_lengths(cfg: InfLLMConfig) -> list[int]:
    """Prompt lengths whose prefill and decode run every kernel shape a request does: a short prompt or two (their
    decode steps run while the sinks still fill, the ordinary path, which a long prompt's decode never takes), a
    full chunk and a partial one, past enough tokens to fill the sinks, the window and a whole top-k of blocks;
    with full_attention_tokens (an int once patched) also a prompt within it, read with the whole conversation in
    the window."""
    m = cfg.model
    exc = m.exc_block_size
    blocks = m.n_init + m.n_local + (m.topk + 1) * m.block_size if m.type is not MemoryType.ORIGIN else 0
    long = max(blocks, cfg.chunk_size) + 2 * exc
    full = m.full_attention_tokens
    if isinstance(full, int) and m.type is not MemoryType.ORIGIN:
        return [*SHORT_WARMUP_LENGTHS, min(full, cfg.chunk_size + exc), max(long, full + exc)]
    return [*SHORT_WARMUP_LENGTHS, long]


def warm_up(gen: Generator) -> float:
    """Prefill and decode prompts of `warmup_lengths` (ids cycling through the vocabulary, greedy, end of
    sequence ignored so every decode step runs), then forget the memory and its snapshots. Returns seconds."""
    start = time.perf_counter()
    vocab = gen.model.get_input_embeddings().weight.shape[0]  # (a CPU's packed lm_head has no .weight)
    params = sampling_params(gen.cfg.generation, temperature=0.0, max_new_tokens=WARMUP_DECODE_STEPS,
                             repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, stop=[])
    eos, gen.eos_ids = gen.eos_ids, []
    try:
        for length in warmup_lengths(_patched_config(gen)):
            prompt = PreparedPrompt(tuple((i * 7919 + 11) % vocab for i in range(length)))
            gen.run(prompt, params, lambda event: None, threading.Event())
            gen.reset(snapshots=True)  # a new prompt each time: no reuse
    finally:
        gen.eos_ids = eos
        gen.reset(snapshots=True)
    return time.perf_counter() - start


def _patched_config(gen: Generator) -> InfLLMConfig:
    """The generator's config with the model section as patched (full_attention_tokens an int)."""
    return gen.cfg.model_copy(update={"model": gen.model.infllm.cfg})


def warm_up_setting() -> bool | None:
    """`INFLLM_WARMUP`: 0/false/off/no never warms up, 1/true/on/yes always does (a CPU too), unset/empty/auto
    leaves it to `wants_warm_up`. Anything else is a ConfigError naming the variable."""
    value = os.environ.get(WARMUP_ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes"):
        return True
    raise ConfigError(f"{WARMUP_ENV_VAR}={os.environ[WARMUP_ENV_VAR]!r}: use 0 (no warm-up), 1 (always) or auto "
                      f"(on CUDA with fattn)")


def wants_warm_up(cfg: InfLLMConfig, device) -> bool:
    """Compiling the Triton kernels takes tens of seconds at a GPU's first request: warm up on CUDA with fattn,
    unless `INFLLM_WARMUP` says otherwise. A CPU has nothing to compile (a warm-up forward gained nothing there)."""
    setting = warm_up_setting()
    if setting is not None:
        return setting
    return torch.device(device).type == "cuda" and cfg.model.fattn is True


def load_engine(cfg: InfLLMConfig, progress: Callable[[str, float], None] | None = None, start: bool = True,
                warm: bool | None = None) -> Engine:
    """Load the configured model, resolve its auto keys (inf_llm.auto_config), patch it with InfLLM attention,
    start the worker and (`warm`; None: `wants_warm_up`, which reads `INFLLM_WARMUP`) warm its kernels up before
    returning.

    Loading runs in a short-lived thread of its own, so the calling thread (a server's event loop, a
    benchmark's or the terminal chat's main thread) never starts an OpenMP thread pool: the worker's must be
    the only live one, or libgomp throttles every pool's spinning (see inf_llm/openmp.py).
    """
    from inf_llm.engine.loading import load_model

    if warm is None:
        warm_up_setting()  # a bad INFLLM_WARMUP fails before minutes of loading, not after

    def load():
        loaded = load_model(cfg, progress=progress)
        resolved, resolution = resolve_config(cfg, describe_machine(loaded.model), ModelShape.of(loaded.model))
        resolution.log()
        return loaded, resolved, resolution, patch_model(loaded.model, resolved.model)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inf_llm-load") as pool:  # its thread ends at exit
        loaded, resolved, resolution, model = pool.submit(load).result()
    info = EngineInfo(
        model_name=cfg.server.model_name or str(loaded.source.origin or loaded.source),
        device=str(loaded.device), dtype=str(loaded.dtype).removeprefix("torch."),
        load_seconds=round(loaded.load_seconds, 2), auto=resolution.as_status(), linear=loaded.linear,
    )
    engine = Engine(resolved, model, loaded.tokenizer, info)
    freeze_long_lived_objects()
    if not start:
        return engine
    engine.start()
    if warm if warm is not None else wants_warm_up(resolved, loaded.device):
        if progress is not None:
            progress("warmup", 1.0)
        seconds = engine.warm_up().result()
        engine.info = replace(engine.info, warmup_seconds=round(seconds, 2))
        log.info("warm-up (kernels compiled, memory reset): %.1f s", seconds)
    return engine
