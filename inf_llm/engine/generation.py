"""Generation for ONE sequence at a time: prompt preparation, chunked prefill with prompt reuse, decoding
through `model.generate`, stop strings, cancellation, timings and retrieval introspection.

Owns: the memory state (`InfLLMCache`) of the single sequence being served and the exact token ids it has
processed, so that the next request reuses it when its prompt extends them (a multi-turn chat); for raw prompts
also their text and the answer's, so that a follow-up whose text extends them is read with the same ids
(`TextPrompt`, `Generator.tokenized_for_reuse`).
Must not know: threads and queues (worker.py), HTTP (inf_llm/server).

`Generator.run` is called from one thread only (the worker). It emits events through a callback: zero or
more Progress, zero or more TextDelta, and returns the final Done (it raises GenerationCancelled only
internally). Tensors: prompt ids are (1, T) int64 on the model's input device.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextStreamer

from inf_llm.adapter import InfLLMCache, cache_kwargs
from inf_llm.adapter.hf import CacheSnapshot
from inf_llm.config import GenerationConfig, InfLLMConfig, MemoryType, Truncation
from inf_llm.engine.events import (
    Done,
    Event,
    PreparedPrompt,
    Progress,
    Retrieval,
    RetrievalSpan,
    SamplingParams,
    TextDelta,
    Timings,
    Truncated,
    Usage,
)
from inf_llm.engine.pacing import ChunkPacer
from inf_llm.engine.penalties import GeneratedTokenPenalties
from inf_llm.engine.prefix_cache import PrefixCache, PrefixEntry, common_prefix
from inf_llm.engine.templates import Message, encode_chat
from inf_llm.errors import GenerationCancelled, PromptTooLongError, RequestError

log = logging.getLogger(__name__)

# truncation: suffix keeps this many leading tokens at most (system prompt, instruction, document start).
TRUNCATION_HEAD = 128
# Temperatures below this decode greedily: dividing logits by ~0 overflows to inf and sampling fails.
MIN_TEMPERATURE = 1e-3
# Memory blocks reported to the UI per answer (the most retrieved ones).
RETRIEVAL_SPANS = 8
# Tokens decoded at each step to look for a stop string, on top of the longest stop string's length in
# characters (every non-special token is at least one byte of text, partial UTF-8 sequences aside).
STOP_WINDOW_SLACK = 8
# Prompts shorter than this get no boundary snapshots inside them (reading them again is cheap); their
# prefill end and answer end are still kept.
BOUNDARY_MIN_TOKENS = 1024
# A last paragraph of the last user message becomes a boundary when the text before it is this long
# (characters): "document ... \n\n question" is the shape of a question about a document.
PARAGRAPH_MIN_CHARS = 2000
# Raw prompts whose text and ids are remembered (`TextPrompt`): the last few prompts and what the memory held
# after each, so that a follow-up's text extending one is tokenized as the memory read it.
TEXT_ANCHORS = 8
# Tokens of context decoded around a text boundary (byte-level and most BPE tokenizers decode locally).
DECODE_CONTEXT = 8


def sampling_params(defaults: GenerationConfig, **overrides) -> SamplingParams:
    """The config's generation defaults with the request's non-None overrides applied (every field of
    SamplingParams, i.e. of inf_llm.sampling.FIELDS; lists become tuples)."""
    values = {name: getattr(defaults, name) for name in SamplingParams.__dataclass_fields__}
    for key, value in overrides.items():
        if key not in values:
            raise TypeError(f"unknown sampling parameter {key!r}")
        if value is not None:
            values[key] = value
    return SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ------------------------------------------------------------------------------------- prompt building
def truncate_ids(ids: list[int], max_len: int, truncation: Truncation) -> tuple[list[int], Truncated | None]:
    """Apply `max_len`: keep the first min(TRUNCATION_HEAD, max_len // 2) tokens and the tail (suffix), or
    raise PromptTooLongError (error)."""
    if len(ids) <= max_len:
        return ids, None
    if truncation is Truncation.ERROR:
        raise PromptTooLongError(len(ids), max_len)
    head = min(TRUNCATION_HEAD, max_len // 2)
    kept = ids[:head] + ids[len(ids) - (max_len - head) :]
    return kept, Truncated(original_tokens=len(ids), kept_tokens=len(kept))


def prepare_chat(tokenizer, cfg: InfLLMConfig, messages: Sequence[Message]) -> PreparedPrompt:
    """Chat template + tokenization (control tokens typed into a message encoded as text, see `encode_chat`)
    + max_len. Raises RequestError / PromptTooLongError."""
    encoded = encode_chat(tokenizer, messages, cfg.conv_type)
    prompt = _finish(encoded.ids, cfg, encoded.stop)
    if cfg.contexts.snapshots and prompt.truncated is None and prompt.tokens >= BOUNDARY_MIN_TOKENS:
        prompt = dataclasses.replace(prompt, boundaries=chat_boundaries(tokenizer, cfg, messages, prompt.ids))
    return prompt


def chat_boundaries(tokenizer, cfg: InfLLMConfig, messages: Sequence[Message], ids: Sequence[int]) -> tuple[int, ...]:
    """Where a later prompt likely diverges from this one: after the system part, after the history (before
    the last user message), and before the last paragraph of a long last user message (a question after a
    document). Each found as the tokens this prompt shares with the shorter conversation's encoding."""
    shorter: list[list[Message]] = []
    if len(messages) > 1 and messages[0].role == "system":
        shorter.append(list(messages[:1]))
    if len(messages) > 2:
        shorter.append(list(messages[:-1]))
    last = messages[-1]
    cut = last.content.rfind("\n\n") if last.role == "user" else -1
    if cut >= PARAGRAPH_MIN_CHARS:
        shorter.append([*messages[:-1], Message(last.role, last.content[:cut])])
    out = set()
    for part in shorter:
        try:
            out.add(common_prefix(ids, encode_chat(tokenizer, part, cfg.conv_type).ids))
        except RequestError:  # a template that refuses the shorter conversation (e.g. a system turn alone)
            continue
    return tuple(sorted(b for b in out if 0 < b < len(ids)))


@dataclasses.dataclass(frozen=True)
class TextPrompt(PreparedPrompt):
    """A raw prompt with its text. The worker may tokenize it again so that it starts with the exact ids of an
    earlier prompt and answer whose text it extends (`Generator.tokenized_for_reuse`): an OpenAI-style follow-up
    (the previous prompt, the completion returned, a new question) then continues the memory that read them,
    however the tokenizer would split that text by itself (an answer's tokens need not be the ones its text
    encodes to, and the prompt's last token can merge with the answer's first)."""

    text: str = ""


def prepare_text(tokenizer, cfg: InfLLMConfig, prompt: str) -> PreparedPrompt:
    """A raw prompt (no chat template), tokenized as the tokenizer does by default (BOS if it adds one)."""
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        if tokenizer.bos_token_id is None:
            raise RequestError("the prompt is empty")
        ids = [tokenizer.bos_token_id]
    prepared = _finish(ids, cfg, ())
    if prepared.truncated is not None:  # the ids no longer stand for the text
        return prepared
    return TextPrompt(ids=prepared.ids, extra_stop=prepared.extra_stop, text=prompt)


def _finish(ids: list[int], cfg: InfLLMConfig, extra_stop: tuple[str, ...]) -> PreparedPrompt:
    ids, truncated = truncate_ids(list(ids), cfg.max_len, cfg.truncation)
    if not ids:
        raise RequestError("the prompt is empty")
    return PreparedPrompt(ids=tuple(ids), truncated=truncated, extra_stop=extra_stop)


# ------------------------------------------------------------------------------------------ stop strings
class StopFilter:
    """Holds back streamed text that could be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is safe to emit now."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        keep = self._partial_suffix()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best


class _StopOnEventOrString(StoppingCriteria):
    """Ends generate() after the current step when the job is cancelled or a stop string appeared in the
    generated text (checked on a short decoded tail: one small host sync of a few ids per step)."""

    def __init__(self, cancel: threading.Event, stops: Sequence[str], tokenizer, prompt_len: int,
                 text_filter: StopFilter | None = None):
        self.cancel = cancel
        self.text_filter = text_filter  # the streamed text already hit a stop string (a safety net)
        self.stops = [s for s in stops if s]
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.window = max((len(s) for s in self.stops), default=0) + STOP_WINDOW_SLACK
        self.hit = False

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        stop = self.cancel.is_set() or (self.text_filter is not None and self.text_filter.stopped)
        if not stop and self.stops:
            start = max(self.prompt_len, input_ids.shape[1] - self.window)
            tail = input_ids[0, start:].tolist()  # host sync: a few ids, once per step
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            self.hit = stop = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _AnswerStreamer(TextStreamer):
    """transformers' incremental detokenizer (skip_prompt, skip_special_tokens) that also records the
    generated ids and their arrival times, and hands finished text to `on_text` in the worker thread."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.token_ids: list[int] = []
        self.first_at: float | None = None
        self.last_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            now = time.perf_counter()
            self.first_at = self.first_at or now
            self.last_at = now
            self.token_ids.extend(value.reshape(-1).tolist())  # already on the host: generate() moved it
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


# ------------------------------------------------------------------------------------------- generator
class Generator:
    """The model, its tokenizer, and the memory state of the one sequence it serves. Not thread-safe:
    exactly one thread calls `run`."""

    def __init__(self, cfg: InfLLMConfig, model, tokenizer):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.get_input_embeddings().weight.device
        self.cache: InfLLMCache | None = None
        self.held: list[int] = []  # token ids the cache has processed, exactly cache.get_seq_length() of them
        # prefix snapshots of earlier prompts (contexts.snapshots), and the latest one of the held conversation
        # (a new snapshot shares its window positions)
        self.prefix_cache = PrefixCache(cfg.contexts.ram_mib << 20) if cfg.contexts.snapshots else None
        self._lineage: CacheSnapshot | None = None
        # (ids, text) of recent raw prompts and of what the memory held after each (newest first): a later
        # prompt's text that extends one is tokenized as those ids plus the rest (tokenized_for_reuse)
        self._anchors: list[tuple[tuple[int, ...], str]] = []
        patched = model.infllm.cfg  # full_attention_tokens resolved by patch_model
        windowed = MemoryType(patched.type) is not MemoryType.ORIGIN
        # Snapshots inside a prompt sit at multiples of exc_block_size: a lookup serves one execution block, and
        # a prefill split elsewhere would look up differently from a prefill of the whole prompt.
        self._align = patched.exc_block_size if windowed else 1
        full = patched.full_attention_tokens
        self._full_until = full if windowed and isinstance(full, int) and full > patched.n_local else None
        self._n_local = patched.n_local
        gen_cfg = model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]

    # --- memory state -----------------------------------------------------------------------------
    def reset(self, snapshots: bool = False) -> None:
        """Forget the held sequence (the next request prefills from scratch, or from a kept snapshot; with
        `snapshots`, the kept snapshots go too)."""
        self.cache, self.held, self._lineage = None, [], None
        if snapshots:
            self._anchors = []
            if self.prefix_cache is not None:
                self.prefix_cache.clear()

    def adopt(self, cache: InfLLMCache | None, held: Sequence[int]) -> None:
        """Continue from `cache` holding `held` (a restored session); the worker thread calls it between jobs."""
        if (cache is None) != (not held) or (cache is not None and cache.get_seq_length() != len(held)):
            raise ValueError(f"a memory of {cache and cache.get_seq_length()} tokens cannot hold {len(held)} ids")
        self.cache, self.held, self._lineage = cache, list(held), None

    def reusable(self, ids: Sequence[int], leave: int = 1) -> int:
        """How many of `ids` the memory would continue from (the held conversation or a kept snapshot), as
        `_state_for` decides, without changing anything."""
        n = len(self.held)
        held = n if self.cache is not None and 0 < n <= len(ids) - leave and list(ids[:n]) == self.held else 0
        entry = None
        if self.prefix_cache is not None:
            entry = self.prefix_cache.longest(tuple(ids), lambda e: self._usable(e, len(ids)), leave)
        return max(held, entry.tokens if entry is not None else 0)

    def tokenized_for_reuse(self, prompt: PreparedPrompt) -> PreparedPrompt:
        """`prompt` (a TextPrompt), tokenized as an earlier prompt or answer its text extends (their ids, then
        the rest of the text) when the memory then continues from more of it than from its own tokenization.
        The ids decode to the same text; anything else is returned unchanged."""
        if not isinstance(prompt, TextPrompt) or not self._anchors:
            return prompt
        ids = prompt.ids
        best, best_reuse = prompt, self.reusable(ids)
        for anchor_ids, anchor_text in self._anchors:
            if len(anchor_ids) <= best_reuse or not prompt.text.startswith(anchor_text):
                continue
            tail = self._continuation(anchor_ids, prompt.text[len(anchor_text):])
            if tail is None:
                continue
            candidate = anchor_ids + tail
            reuse = self.reusable(candidate)
            if reuse > best_reuse:
                shared = common_prefix(candidate, ids)
                best, best_reuse = dataclasses.replace(
                    prompt, ids=candidate, boundaries=tuple(b for b in prompt.boundaries if b <= shared)), reuse
        if best is not prompt:
            log.info("prompt of %d tokens read as %d: it extends the text of %d tokens the memory holds",
                     prompt.tokens, best.tokens, best_reuse)
        return best

    def _continuation(self, ids: Sequence[int], rest: str) -> tuple[int, ...] | None:
        """Token ids of `rest` following `ids`, or None when they would not decode to `ids`' text then `rest`
        (a tokenizer that marks a text's start, such as a sentencepiece prefix space)."""
        if not rest:
            return ()
        tail = tuple(self.tokenizer(rest, add_special_tokens=False)["input_ids"])
        context = list(ids[-DECODE_CONTEXT:])
        before = self.tokenizer.decode(context, skip_special_tokens=True)
        if not tail or self.tokenizer.decode(context + list(tail), skip_special_tokens=True) != before + rest:
            return None
        return tail

    def _remember_text(self, prompt: PreparedPrompt, generated: Sequence[int]) -> None:
        """After a raw prompt's run: its (ids, text), and the answer's: the prompt and every generated token (the
        memory holds all but the last; a last special token, such as the end of sequence, left out), with the
        text the client received (special tokens skipped)."""
        if not isinstance(prompt, TextPrompt) or self.cache is None:
            return
        anchors = [(prompt.ids, prompt.text)]
        n = len(prompt.ids)
        answer = list(generated)
        if answer and answer[-1] in self.tokenizer.all_special_ids:
            answer.pop()
        if answer and tuple(self.held[:n]) == prompt.ids and self.held[n:] == answer[: len(self.held) - n]:
            context = list(prompt.ids[-DECODE_CONTEXT:])
            before = self.tokenizer.decode(context, skip_special_tokens=True)
            after = self.tokenizer.decode(context + answer, skip_special_tokens=True)
            if after.startswith(before):
                anchors.insert(0, (prompt.ids + tuple(answer), prompt.text + after[len(before):]))
        ids = {a for a, _ in anchors}
        self._anchors = (anchors + [a for a in self._anchors if a[0] not in ids])[:TEXT_ANCHORS]

    def _state_for(self, ids: Sequence[int], leave: int = 1) -> tuple[InfLLMCache, int]:
        """The cache to continue from and how many of `ids` it already holds: the held conversation or the
        longest kept snapshot that `ids` extends, whichever covers more. Reuse leaves at least `leave` tokens
        to feed (generate() needs the logits of the last one)."""
        n = len(self.held)
        held = self.cache is not None and 0 < n <= len(ids) - leave and list(ids[:n]) == self.held
        entry = None
        if self.prefix_cache is not None:
            entry = self.prefix_cache.longest(tuple(ids), lambda e: self._usable(e, len(ids)), leave)
        if entry is not None and (not held or entry.tokens > n):
            return self._continue_from(entry), entry.tokens
        if held:
            return self.cache, n
        self.reset()
        return self._new_cache(len(ids)), 0

    def _new_cache(self, total: int) -> InfLLMCache:
        """A fresh memory for a new conversation of `total` tokens. With a host pool (model.host_pool_tokens)
        still lent to a past conversation whose cache only kept snapshots keep alive, the new conversation would
        page-lock host memory of its own as its blocks grow (~1.6 GB/s: seconds for a long prompt). When those
        snapshots keep more than `contexts.ram_mib` beyond the new conversation's memory (the pool alone usually
        does), the next eviction drops them anyway: they go now (documents' excepted) and the pool comes back."""
        cache = InfLLMCache(self.model)
        if cache.host_lease is not None or self.model.infllm.host_pool is None or self.prefix_cache is None:
            return cache
        entries = self.prefix_cache.snapshot_entries()
        documents = {id(e.snapshot.cache) for e in entries if e.context_id is not None}
        holders = {id(e.snapshot.cache) for e in entries if id(e.snapshot.cache) not in documents
                   and getattr(e.snapshot.cache, "host_lease", None) is not None}
        held = [e for e in entries if id(e.snapshot.cache) in holders]
        entries = None
        if not held or self.prefix_cache.nbytes(entries=held) <= self.prefix_cache.budget_bytes:
            return cache
        held = None
        dropped = self.prefix_cache.remove(lambda e: id(e.snapshot.cache) in holders)
        del cache
        cache = InfLLMCache(self.model)
        if cache.host_lease is None:  # a reference cycle kept the old cache: collect it
            gc.collect()
            cache = InfLLMCache(self.model)
        log.info("host pool %s for a new conversation of %d tokens (%d snapshots of a past conversation, over "
                 "contexts.ram_mib, dropped)", "taken back" if cache.host_lease is not None else "still lent",
                 total, dropped)
        return cache

    def _usable(self, entry: PrefixEntry, total: int) -> bool:
        """A snapshot read with the whole conversation in the window (full_attention_tokens) continues only a
        prompt that stays within it, and a narrowed one only a prompt past it: as a fresh prefill would read.
        A document's memory continues any prompt (its answers are those of the document read first)."""
        return self._full_until is None or entry.context_id is not None or entry.wide == (total <= self._full_until)

    def _continue_from(self, entry: PrefixEntry) -> InfLLMCache:
        cache = entry.snapshot.cache
        cache.restore(entry.snapshot)
        self.prefix_cache.touch(entry)
        self.cache, self.held, self._lineage = cache, list(entry.ids), entry.snapshot
        return cache

    def keep_snapshot(self, cache: InfLLMCache, ids: Sequence[int], context_id: str | None = None
                      ) -> PrefixEntry | None:
        """Snapshot `cache` (holding `ids`) into the prefix cache, sharing with the held conversation's latest
        snapshot when `cache` is the held one."""
        if self.prefix_cache is None or not ids:
            return None
        lineage = self._lineage
        ours = lineage is not None and lineage.cache is cache
        snapshot = cache.snapshot(lineage if ours else None)
        # the lineage follows the held conversation; another cache's snapshot (a loaded document) starts
        # one only when there is none
        if ours or lineage is None or cache is self.cache:
            self._lineage = snapshot
        wide = self._full_until is not None and snapshot.layers[0].n_local != self._n_local
        return self.prefix_cache.add(ids, snapshot, wide, context_id)

    def _snapshot_points(self, prompt: PreparedPrompt, ids: list[int], cached: int) -> list[int]:
        """Prefill positions after which to keep a snapshot: the prompt's boundaries and where an earlier
        prompt diverged from this one (aligned down to execution blocks), and the end of the prefill."""
        if self.prefix_cache is None:
            return []
        end = len(ids) - 1
        marks = set(prompt.boundaries)
        if len(ids) >= BOUNDARY_MIN_TOKENS:
            marks.add(self.prefix_cache.longest_shared(tuple(ids)))
        points = {m // self._align * self._align for m in marks}
        points = {p for p in points if cached < p < end}
        if end > cached:
            points.add(end)
        return sorted(points)

    def _keep(self, cache: InfLLMCache, ids: Sequence[int]) -> None:
        """Remember what `cache` holds after a (possibly interrupted) run; discard an inconsistent one."""
        seen = cache.get_seq_length()
        if not cache.is_consistent() or seen > len(ids):
            log.info("discarding the memory state (interrupted mid-forward)")
            self.reset()
            return
        self.cache, self.held = cache, list(ids[:seen])

    def read_document(self, ids: Sequence[int], context_id: str, emit: Callable[[Event], None],
                      cancel: threading.Event) -> PrefixEntry:
        """Read `ids` (a document's prefix of a conversation) into a memory kept as the context `context_id`
        (continuing from a kept snapshot when one covers a part of it)."""
        if self.prefix_cache is None:
            raise RequestError("document memories need contexts.snapshots: true")
        ids = list(ids)
        with torch.inference_mode():
            cache, cached = self._state_for(ids, leave=0)
        cache.plan(len(ids))
        cache.should_stop = cancel.is_set
        try:
            with torch.inference_mode():
                if cached < len(ids):
                    self._prefill(cache, ids, cached, emit, end=len(ids))
        finally:
            cache.should_stop = None
            self._keep(cache, ids)
        if self.cache is not cache or len(self.held) != len(ids):
            raise GenerationCancelled("cancelled while reading the document")
        with torch.inference_mode():
            cache.trim()  # kept for many questions: not twice its blocks' bytes
            entry = self.keep_snapshot(cache, ids, context_id)
        self.prefix_cache.evict(live=cache, keep=entry)
        return entry

    # --- one request ------------------------------------------------------------------------------
    def run(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        emit: Callable[[Event], None],
        cancel: threading.Event,
        submitted_at: float | None = None,
    ) -> Done:
        """Prefill (reusing the held state when possible), then generate. Emits Progress and TextDelta
        events; returns the final Done (finish_reason cancelled when `cancel` was set)."""
        started = time.perf_counter()
        submitted_at = submitted_at if submitted_at is not None else started
        prompt = self.tokenized_for_reuse(prompt)
        ids = list(prompt.ids)
        total = len(ids)
        with torch.inference_mode():  # a restored snapshot writes the memory's (inference) tensors
            cache, cached = self._state_for(ids)
        cache.plan(total)  # full_attention_tokens: a prompt past it reads with the configured window throughout
        cache.should_stop = cancel.is_set  # checked before every layer: a cancel lands within one layer
        stops = tuple(params.stop) + tuple(prompt.extra_stop)
        text_filter = StopFilter(stops)
        pieces: list[str] = []

        def on_text(text: str) -> None:
            out = text_filter.feed(text)
            if out:
                pieces.append(out)
                emit(TextDelta(out))

        streamer = _AnswerStreamer(self.tokenizer, on_text)
        criteria = _StopOnEventOrString(cancel, stops, self.tokenizer, total, text_filter)
        fed_before = total - 1
        finish = "cancelled"
        retrieval = None
        points = self._snapshot_points(prompt, ids, cached)
        try:
            with torch.inference_mode():
                self._prefill(cache, ids, cached, emit, points)
                if cancel.is_set():
                    raise GenerationCancelled("cancelled before decoding")
                if MemoryType(self.cfg.model.type) is MemoryType.INF_LLM:
                    cache.reset_retrieval_counts()
                self._generate(cache, ids, params, streamer, criteria, prompt.extra_stop)
            tail = text_filter.flush()
            if tail:
                pieces.append(tail)
                emit(TextDelta(tail))
            finish = self._finish_reason(streamer.token_ids, params, text_filter, criteria, cancel)
        except GenerationCancelled:
            finish = "cancelled"
            streamer.end()  # generate() only flushes its detokenizer when it returns normally
        finally:
            cache.should_stop = None
            self._keep(cache, ids + streamer.token_ids)
            if self.cache is cache and len(self.held) > fed_before:  # the end of the answer, for a follow-up
                with torch.inference_mode():
                    kept = self.keep_snapshot(cache, self.held)
                if kept is not None:
                    self.prefix_cache.evict(live=cache, keep=kept)
            self._remember_text(prompt, streamer.token_ids)
        if finish != "cancelled" and self.cache is cache:
            retrieval = self._retrieval(cache, ids, cache.get_seq_length() - fed_before)
        if finish == "cancelled" and not text_filter.stopped:
            rest = text_filter.flush()  # text held back as a possible stop-string start is still answer text
            if rest:
                pieces.append(rest)
                emit(TextDelta(rest))
        completion = len(streamer.token_ids)
        return Done(
            finish_reason=finish,
            text="".join(pieces),
            usage=Usage(prompt_tokens=total, completion_tokens=completion, total_tokens=total + completion,
                        cached_tokens=cached),
            timings=_timings(submitted_at, started, streamer, total - cached, completion),
            truncated=prompt.truncated,
            retrieval=retrieval,
        )

    def _prefill(self, cache: InfLLMCache, ids: list[int], start: int, emit: Callable[[Event], None],
                 points: Sequence[int] = (), end: int | None = None) -> None:
        """Feed ids[start : end] (default: all but the last, which generate() feeds: it needs its logits) in
        chunks aligned to multiples of chunk_size, split at `points`, after each of which a snapshot is kept."""
        end = len(ids) - 1 if end is None else end
        if end <= start:
            return
        chunk = self.cfg.chunk_size
        report = end - start > chunk  # progress only for prompts that take several forward calls
        if report:
            emit(Progress(processed=start, total=len(ids)))
        # one copy of the ids to the device: a copy per chunk, from pageable memory, would sync the stream
        # every chunk, and the host could no longer issue a chunk while the GPU runs the one before (pacing)
        x = torch.tensor([ids[start:end]], dtype=torch.long, device=self.device)  # (1, T)
        pacer = ChunkPacer(self.device)
        kwargs = cache_kwargs(self.model, cache)
        a = start
        marks = [p for p in points if start < p <= end]
        while a < end:
            b = min(end, (a // chunk + 1) * chunk, *(p for p in marks if p > a))
            self.model(x[:, a - start : b - start], **kwargs, use_cache=True, logits_to_keep=1)
            if b in marks:
                self.keep_snapshot(cache, ids[:b])
            a = b
            done = pacer.issued(b)
            if report and done is not None:
                emit(Progress(processed=done, total=len(ids)))
        if pacer.drain() != done and report:
            emit(Progress(processed=end, total=len(ids)))

    def _generate(self, cache: InfLLMCache, ids: list[int], params: SamplingParams, streamer: _AnswerStreamer,
                  criteria: _StopOnEventOrString, extra_stop: Sequence[str]) -> None:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T); generate feeds the unseen tail
        kwargs: dict = {
            "max_new_tokens": params.max_new_tokens,
            "num_beams": 1,
            # transformers' own penalty covers the prompt: off, whatever the model's generation_config says
            # (GeneratedTokenPenalties below applies the requested one to generated tokens only)
            "repetition_penalty": 1.0,
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_ids + self._special_stop_ids(extra_stop),
            "attention_mask": torch.ones_like(x),
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([criteria]),
        }
        penalties = GeneratedTokenPenalties(len(ids), params.repetition_penalty, params.repeat_last_n,
                                            params.frequency_penalty, params.presence_penalty)
        if penalties.active:
            kwargs["logits_processor"] = LogitsProcessorList([penalties])
        if params.temperature >= MIN_TEMPERATURE:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
            if params.seed is not None:
                torch.manual_seed(params.seed)  # sampling draws from torch's RNG; only this thread samples
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        self.model.generate(x, **cache_kwargs(self.model, cache), **kwargs)

    def _special_stop_ids(self, extra_stop: Sequence[str]) -> list[int]:
        """Template end-of-turn markers that are single special tokens (skip_special_tokens hides them from
        the text, so they must stop generation as token ids)."""
        special = set(self.tokenizer.all_special_ids)
        out = []
        for s in extra_stop:
            piece = self.tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(piece) == 1 and piece[0] in special and piece[0] not in self.eos_ids:
                out.append(piece[0])
        return out

    def _finish_reason(self, generated: list[int], params: SamplingParams, text_filter: StopFilter,
                       criteria: _StopOnEventOrString, cancel: threading.Event) -> str:
        if text_filter.stopped or criteria.hit:
            return "stop"
        if generated and generated[-1] in self.eos_ids:
            return "stop"
        if cancel.is_set():
            return "cancelled"
        if len(generated) >= params.max_new_tokens:
            return "length"
        return "stop"  # a template end-of-turn token

    def _retrieval(self, cache: InfLLMCache, ids: list[int], steps: int) -> Retrieval | None:
        """The memory blocks the answer attended to most (counted since reset_retrieval_counts)."""
        if MemoryType(self.cfg.model.type) is not MemoryType.INF_LLM or steps <= 0:
            return None
        summary = cache.retrieval_summary()
        if not summary:
            return None
        layers = len(cache.layers)
        spans = []
        for start, end, count in summary[:RETRIEVAL_SPANS]:
            text = self.tokenizer.decode(self.held[start:end], skip_special_tokens=False)
            spans.append(RetrievalSpan(token_start=start, token_end=end, text=text,
                                       score=round(min(1.0, count / (layers * steps)), 4)))
        return Retrieval(layers=layers, steps=steps, spans=spans)


def _timings(submitted: float, started: float, streamer: _AnswerStreamer, prefilled: int, completion: int) -> Timings:
    def ms(seconds: float) -> float:
        return round(seconds * 1000.0, 2)

    queue_ms = ms(started - submitted)
    if streamer.first_at is None:
        return Timings(None, None, None, None, None, queue_ms)
    prefill = streamer.first_at - started
    decode = (streamer.last_at or streamer.first_at) - streamer.first_at
    return Timings(
        ttft_ms=ms(streamer.first_at - submitted),
        prefill_ms=ms(prefill),
        prefill_tokens_per_s=round(prefilled / prefill, 2) if prefill > 0 else None,
        decode_ms=ms(decode),
        decode_tokens_per_s=round((completion - 1) / decode, 2) if completion > 1 and decode > 0 else None,
        queue_ms=queue_ms,
    )
