"""Typed events a generation job yields, and the typed request it consumes. Plain dataclasses: the engine
knows nothing of HTTP; the server turns these into SSE/JSON, the CLI and benchmarks read them directly.

A job yields, in order: zero or more `Progress` (prefill), zero or more `TextDelta`, then exactly one final
event, `Done` or `Error`. Nothing follows the final event.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, make_dataclass
from typing import Literal

from inf_llm import sampling
from inf_llm.errors import InfLLMError

FinishReason = Literal["stop", "length", "cancelled"]


# What to generate: every field of inf_llm.sampling.FIELDS (its defaults are the config's). `temperature == 0` is
# greedy decoding; `top_k == 0` and `top_p == 1` disable those filters; `stop` strings end the answer and are
# never part of the returned text; `repetition_penalty` looks back over `repeat_last_n` generated tokens (never
# the prompt).
SamplingParams = make_dataclass("SamplingParams", sampling.engine_fields(), frozen=True)
SamplingParams.__module__ = __name__
SamplingParams.__doc__ = "What to generate: the fields of inf_llm.sampling.FIELDS (filled by sampling_params)."


@dataclass(frozen=True)
class Truncated:
    """The prompt was longer than `max_len` and was cut (truncation: suffix)."""

    original_tokens: int
    kept_tokens: int


@dataclass(frozen=True)
class PreparedPrompt:
    """Token ids ready for the worker (chat template applied, truncation done)."""

    ids: tuple[int, ...]
    truncated: Truncated | None = None
    extra_stop: tuple[str, ...] = ()  # stop strings implied by a fallback chat template
    # token counts after which the memory is worth keeping as a prefix snapshot (the end of the system part,
    # of the history, of an attached document): later prompts likely start the same way
    boundaries: tuple[int, ...] = ()
    context_id: str | None = None  # the document memory this prompt starts with (POST /v1/contexts)

    @property
    def tokens(self) -> int:
        return len(self.ids)


# --------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class TextDelta:
    """New answer text (never contains any part of a stop string)."""

    text: str


@dataclass(frozen=True)
class Progress:
    """Prefill progress: `processed` of `total` prompt tokens are in the memory (cached ones included)."""

    processed: int
    total: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int  # prompt tokens reused from the previous request's memory state (not prefilled)


@dataclass(frozen=True)
class Timings:
    """Milliseconds and rates. ttft counts from submission (queue wait included), prefill from the moment
    the worker took the job to the first generated token, decode from the first to the last token."""

    ttft_ms: float | None
    prefill_ms: float | None
    prefill_tokens_per_s: float | None
    decode_ms: float | None
    decode_tokens_per_s: float | None
    queue_ms: float | None = None


@dataclass(frozen=True)
class RetrievalSpan:
    """A memory block the answer attended to: prompt token positions [token_start, token_end), their
    text, and `score` = the fraction of (layer, decode step) lookups that selected it."""

    token_start: int
    token_end: int
    text: str
    score: float


@dataclass(frozen=True)
class Retrieval:
    layers: int
    steps: int  # tokens decoded while counting (lookups per layer)
    spans: list[RetrievalSpan] = field(default_factory=list)


@dataclass(frozen=True)
class Done:
    """The final event of a successful (or cancelled) job."""

    finish_reason: FinishReason
    text: str  # the whole answer (the concatenation of every TextDelta)
    usage: Usage
    timings: Timings
    truncated: Truncated | None = None
    retrieval: Retrieval | None = None

    def payload(self) -> dict:
        """The wire form of `done` (everything but the text, which the deltas already carried)."""
        out = asdict(self)
        out.pop("text")
        return out


@dataclass(frozen=True)
class Error:
    """The final event of a failed job. `status` and `type` come from the InfLLMError class."""

    message: str
    type: str
    status: int
    param: str | None = None

    @classmethod
    def of(cls, exc: BaseException) -> Error:
        if isinstance(exc, InfLLMError):
            return cls(message=str(exc) or type(exc).__name__, type=exc.error_type, status=exc.http_status)
        return cls(message=f"internal error ({type(exc).__name__})", type="internal_error", status=500)


Event = TextDelta | Progress | Done | Error
