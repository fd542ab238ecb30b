"""Wire types (pydantic) of the HTTP API: /chat, /tokenize, /status and the OpenAI-compatible routes.

Owns: request validation (ranges, roles, the original client's "bot" role, text that is valid Unicode, the
OpenAI fields this server refuses) and response shapes.
Must not know: torch, the engine's internals (the serving layer converts to engine types).
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from inf_llm import sampling
from inf_llm.sampling import Surface

log = logging.getLogger(__name__)

# Cap on stop strings per request (each is checked at every decode step).
MAX_STOP_STRINGS = 16
# Cap on one stop string's length in characters.
MAX_STOP_LENGTH = 256

# The sampling fields of the bodies below come from inf_llm.sampling (defined once there, with their bounds).
MaxNewTokens = sampling.by_name("max_new_tokens").annotated()


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


def _bad_unicode(data: Any) -> tuple[str | None, str, str, int] | None:
    """(JSON path or None for the root, where in words, character, offset) of the first lone surrogate in a
    parsed body, keys included. JSON can carry one (`"\\ud800"`, or UTF-8 bytes ED A0 80, which Python's json
    decodes), a tokenizer cannot. Iterative: a deeply nested body must not hit the recursion limit."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        texts: list[tuple[str, str, str]] = []  # (path, where in words, text)
        if isinstance(value, str):
            texts.append((path, path, value))
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                texts.append((path, f"a key of {path or 'the body'}", str(key)))
                stack.append((f"{path}.{key}" if path else str(key), item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in reversed(list(enumerate(value))))
        for where, words, text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                return where or None, words or "the body", text[exc.start], exc.start
    return None


def _same(value: Any, off: Any) -> bool:
    return type(value) is type(off) and value == off  # True == 1 in Python: types must match too


class _Body(BaseModel):
    """A request body: every string in it (keys too) is valid Unicode, and no field of `unsupported` asks for
    something (a 400 naming the place or the fields, before any other check)."""

    # field -> the values that ask for nothing (accepted, as null is)
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _check_body(cls, data: Any) -> Any:
        found = _bad_unicode(data)
        if found is not None:
            param, where, char, offset = found
            raise PydanticCustomError("invalid_unicode", "{message}", {
                "param": param,
                "message": f"{where}: not valid Unicode: a lone surrogate U+{ord(char):04X} at character {offset} "
                           f"(JSON must write a character beyond U+FFFF as a surrogate pair, and UTF-8 cannot "
                           f"encode a lone one)"})
        if cls.unsupported and isinstance(data, dict):
            cls._refuse_unsupported(data)
        return data

    @classmethod
    def _refuse_unsupported(cls, data: dict) -> None:
        refused = [name for name, offs in cls.unsupported.items()
                   if data.get(name) is not None and not any(_same(data[name], off) for off in offs)]
        if refused:
            accepted = "; ".join(f"{name} may only be " + " or ".join(json.dumps(off) for off in cls.unsupported[name])
                                 for name in refused if cls.unsupported[name])
            raise PydanticCustomError("unsupported_field", "{message}", {
                "param": refused[0],
                "message": f"not supported by this server: {', '.join(refused)} (remove "
                           f"{'it' if len(refused) == 1 else 'them'}{'; ' + accepted if accepted else ''})"})
        ignored = sorted(str(k) for k in data if k not in cls.model_fields and k not in cls.unsupported)
        if ignored:
            log.info("request fields ignored: %s", ignored)  # the list's repr escapes any odd character


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    """OpenAI clients send fields of other servers: accept and ignore them (as vLLM does, logging their names);
    the OpenAI fields this server does not implement are refused (`unsupported`)."""

    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------------------ /chat
class ChatTurn(_Strict):
    role: Literal["user", "assistant", "system"] = Field(description='"bot" is accepted as "assistant"')
    content: str

    @field_validator("role", mode="before")
    @classmethod
    def _bot_is_assistant(cls, value: Any) -> Any:
        return "assistant" if value == "bot" else value


class _ChatBody(_Body, _Strict):
    @field_validator("stop", check_fields=False)
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        return _check_stops(value)


# The /chat body: the conversation, then every sampling field of Surface.CHAT (None: the config's default).
ChatRequest = create_model(
    "ChatRequest", __base__=_ChatBody, __module__=__name__,
    prompt=(str, Field(description="the new user message")),
    history=(list[ChatTurn], Field(default_factory=list, description="earlier turns, oldest first")),
    system=(str | None, Field(None, description="system prompt; default: the config's generation.system_prompt")),
    **sampling.request_fields(Surface.CHAT),
    session_id=(str | None, Field(None, max_length=200, description="client conversation id (logging only)")),
    context_id=(str | None, Field(None, max_length=64, description="a document memory (POST /v1/contexts): the "
                                  "document starts the first user message and its memory is not read again")),
)


class ContextRequest(_Body, _Strict):
    """POST /v1/contexts: a document to read once and keep."""

    name: str = Field(min_length=1, max_length=200, description="shown in listings; part of what the model reads")
    text: str = Field(min_length=1, description="the document")
    system: str | None = Field(None, description="system prompt of the chats on it; default: the config's")


class ContextBody(BaseModel):
    """A document memory."""

    id: str
    object: Literal["context"] = "context"
    name: str
    tokens: int
    bytes: int | None = Field(description="memory it takes in RAM (null: on disk only)")
    disk_bytes: int | None = Field(description="size of its saved file (null: not saved)")
    where: list[Literal["ram", "disk"]]
    created: int
    system: str | None = None
    disk_error: str | None = Field(None, description="why it could not be saved (it is then kept in RAM only)")


class ContextList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ContextBody]


class ContextText(BaseModel):
    """A document memory's text, as it was read."""

    id: str
    object: Literal["context.text"] = "context.text"
    name: str
    text: str


class ContextDeleted(BaseModel):
    id: str
    object: Literal["context.deleted"] = "context.deleted"
    deleted: bool


class TokenizeRequest(_Body, _Strict):
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
    max_cached_block: int | Literal["auto"]  # auto until the model is loaded
    exc_block_size: int
    repr_topk: int


# /status's generation_defaults: the config's value of every sampling field of Surface.STATUS, and the system prompt.
GenerationDefaults = create_model(
    "GenerationDefaults", __module__=__name__,
    **{f.name: (f.type if f.default is not None else f.type | None, ...) for f in sampling.on(Surface.STATUS)},
    system_prompt=(str | None, ...),
)


class GenerationField(BaseModel):
    """One sampling field as a client builds a form for it (`SamplingField.schema`): the bounds the server
    enforces (max_new_tokens: server.max_new_tokens_limit), and how the web page shows it (null: it does not)."""

    name: str
    type: Literal["number", "integer", "string[]"]
    nullable: bool
    default: Any
    description: str
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    page: sampling.PageInput | None = None


class ServerLimits(BaseModel):
    max_prompt_tokens: int
    max_new_tokens_limit: int
    max_client_requests: int


class AutoChoice(BaseModel):
    """A model key's value once loaded: chosen by its auto default (`auto`), or set in the config."""

    value: Any
    auto: bool
    reason: str


class PublicStatus(BaseModel):
    """What /status tells a client without the API key (when the server has one): what a health check needs."""

    ready: bool
    state: Literal["loading", "ready", "error"]
    progress: LoadProgress
    auth_required: bool


class StatusResponse(PublicStatus):
    """/status with the API key, or on a server without one."""

    model: str
    type: str
    device: str | None
    memory: MemorySettings
    max_len: int
    error: str | None
    limits: ServerLimits
    generation_defaults: GenerationDefaults
    generation_fields: list[GenerationField] = Field(description="every field a /chat request may set")
    auto: dict[str, AutoChoice] | None = Field(
        description="each auto key of the model section (fattn, offload, offload_access, pin_memory, "
        "host_pool_tokens, max_cached_block, async_global_stream): its value and why; null until loaded"
    )
    warmup_s: float | None = Field(description="seconds the kernels' warm-up took before ready; null: none ran")
    dtype: str | None = Field(description="the dtype the model computes in (e.g. bfloat16, float32); null until loaded")
    linear: str | None = Field(
        description="how the linear layers multiply: F.linear, bf16 prepacked for oneDNN, or float32 with fp16 "
        "weights (fbgemm) (model.cpu_packed_linear, model.cpu_fp16_weights); null until loaded"
    )


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


# OpenAI request fields this server does not implement, each with the values that ask for nothing (accepted,
# as null is): any other value is a 400 naming the field.
UNSUPPORTED_COMMON: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logit_bias": ({},),
}
UNSUPPORTED_CHAT: dict[str, tuple[Any, ...]] = {
    **UNSUPPORTED_COMMON, "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "logprobs": (False,), "top_logprobs": (0,), "response_format": ({"type": "text"},), "audio": (),
    "modalities": (["text"],), "prediction": (), "web_search_options": (),
}
UNSUPPORTED_COMPLETION: dict[str, tuple[Any, ...]] = {
    **UNSUPPORTED_COMMON, "best_of": (1,), "logprobs": (), "suffix": ("",),
}


class _OpenAIBody(_Body, _Lenient):
    @field_validator("stop", check_fields=False)
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        return _check_stops([value] if isinstance(value, str) else value)

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


# What both OpenAI bodies share: the model, every sampling field of Surface.OPENAI under its OpenAI name but the
# length (max_tokens, which each body places after its prompt, as max_completion_tokens too for chat), streaming.
_OpenAISampling = create_model(
    "_OpenAISampling", __base__=_OpenAIBody, __module__=__name__,
    model=(str | None, Field(None, description="the served model's name (GET /v1/models); another name is a 404")),
    **sampling.request_fields(Surface.OPENAI, skip=("max_new_tokens",)),
    n=(Literal[1], Field(1, description="only one choice is generated")),
    stream=(bool, False),
    stream_options=(StreamOptions | None, None),
)


ContextId = Field(None, max_length=64, description="a document memory (POST /v1/contexts) the prompt starts with "
                  "(an extra field of this server)")


class ChatCompletionRequest(_OpenAISampling):
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_tokens: MaxNewTokens | None = None
    max_completion_tokens: MaxNewTokens | None = None
    context_id: str | None = ContextId

    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = UNSUPPORTED_CHAT


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str]
    max_tokens: MaxNewTokens | None = None
    echo: bool = False
    context_id: str | None = ContextId

    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = UNSUPPORTED_COMPLETION

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
