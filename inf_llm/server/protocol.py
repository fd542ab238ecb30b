"""Wire types (pydantic) of the HTTP API: /chat, /tokenize, /status and the OpenAI-compatible routes.

Owns: request validation (ranges, roles, the original client's "bot" role) and response shapes.
Must not know: torch, the engine's internals (the serving layer converts to engine types).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Cap on stop strings per request (each is checked at every decode step).
MAX_STOP_STRINGS = 16
# Cap on one stop string's length in characters.
MAX_STOP_LENGTH = 256

Temperature = Annotated[float, Field(ge=0, le=5, description="0 (or below 0.001) = greedy (deterministic)")]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=0, le=100_000, description="0 = disabled")]
# Below 0.01 the penalty divides logits by ~0 and overflows.
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=10, description="1 = none")]
RepeatLastN = Annotated[int, Field(ge=0, le=1_000_000, description="generated tokens the repetition penalty sees")]
OpenAIPenalty = Annotated[float, Field(ge=-2, le=2)]
MaxNewTokens = Annotated[int, Field(ge=1, le=1_000_000)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


def _check_stops(stops: list[str] | None) -> list[str] | None:
    if stops is None:
        return None
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
    for s in stops:
        if not s:
            raise ValueError("stop strings must not be empty")
        if len(s) > MAX_STOP_LENGTH:
            raise ValueError(f"a stop string has at most {MAX_STOP_LENGTH} characters")
    return stops


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    """OpenAI clients send fields we do not use (user, logit_bias, ...): accept and ignore them."""

    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------------------ /chat
class ChatTurn(_Strict):
    role: Literal["user", "assistant", "system"] = Field(description='"bot" is accepted as "assistant"')
    content: str

    @field_validator("role", mode="before")
    @classmethod
    def _bot_is_assistant(cls, value: Any) -> Any:
        return "assistant" if value == "bot" else value


class ChatRequest(_Strict):
    prompt: str = Field(description="the new user message")
    history: list[ChatTurn] = Field(default_factory=list, description="earlier turns, oldest first")
    system: str | None = Field(None, description="system prompt; default: the config's generation.system_prompt")
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    max_new_tokens: MaxNewTokens | None = None
    repetition_penalty: RepetitionPenalty | None = None
    repeat_last_n: RepeatLastN | None = None
    frequency_penalty: OpenAIPenalty | None = None
    presence_penalty: OpenAIPenalty | None = None
    stop: list[str] | None = Field(None, description="stop strings (never part of the answer)")
    seed: Seed | None = None
    session_id: str | None = Field(None, max_length=200, description="client conversation id (logging only)")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        return _check_stops(value)


class TokenizeRequest(_Strict):
    text: str


class TokenizeResponse(BaseModel):
    tokens: int


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int


class TimingsBody(BaseModel):
    ttft_ms: float | None = None
    prefill_ms: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_ms: float | None = None
    decode_tokens_per_s: float | None = None
    queue_ms: float | None = None


class TruncatedBody(BaseModel):
    original_tokens: int
    kept_tokens: int


class RetrievalSpanBody(BaseModel):
    token_start: int
    token_end: int
    text: str
    score: float


class RetrievalBody(BaseModel):
    layers: int
    steps: int
    spans: list[RetrievalSpanBody]


class ChatResponse(BaseModel):
    """`POST /chat?stream=false`; the SSE `done` event carries the same fields except `response`."""

    response: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: UsageBody
    timings: TimingsBody
    truncated: TruncatedBody | None = None
    retrieval: RetrievalBody | None = None


# ----------------------------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# ----------------------------------------------------------------------------------------------- status
class LoadProgress(BaseModel):
    phase: str
    fraction: float


class MemorySettings(BaseModel):
    type: str
    n_init: int
    n_local: int
    block_size: int
    topk: int
    max_cached_block: int
    exc_block_size: int
    repr_topk: int


class GenerationDefaults(BaseModel):
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    repetition_penalty: float
    repeat_last_n: int
    frequency_penalty: float
    presence_penalty: float
    stop: list[str]
    system_prompt: str | None


class StatusResponse(BaseModel):
    ready: bool
    state: Literal["loading", "ready", "error"]
    progress: LoadProgress
    model: str
    type: str
    device: str | None
    memory: MemorySettings
    max_len: int
    error: str | None
    auth_required: bool
    generation_defaults: GenerationDefaults


# ------------------------------------------------------------------------------------------ OpenAI API
class StreamOptions(_Lenient):
    include_usage: bool = False


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class OpenAIMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _OpenAISampling(_Lenient):
    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = Field(None, description="extension")
    repetition_penalty: RepetitionPenalty | None = Field(
        None, description="extension; none unless asked for (OpenAI has no such default)")
    repeat_last_n: RepeatLastN | None = Field(None, description="extension")
    frequency_penalty: OpenAIPenalty | None = None
    presence_penalty: OpenAIPenalty | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    n: Literal[1] = Field(1, description="only one choice is generated")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        return _check_stops([value] if isinstance(value, str) else value)

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


class ChatCompletionRequest(_OpenAISampling):
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_tokens: MaxNewTokens | None = None
    max_completion_tokens: MaxNewTokens | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str]
    max_tokens: MaxNewTokens | None = None
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request (batches are not supported)")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage
    timings: TimingsBody | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage
    timings: TimingsBody | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inf_llm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
