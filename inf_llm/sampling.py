"""The sampling fields, defined once: name, type, bounds, default, description, the surfaces that expose each and
the name and default it has on the OpenAI routes. A leaf module like `config` (imports only pydantic).

Everything else is derived from `FIELDS`: the config's `generation:` section (`inf_llm.config`), the `/chat` and
OpenAI request bodies (`inf_llm.server.protocol`), `/status`'s `generation_defaults` and `generation_fields`
(`inf_llm.server.state`; the web page builds its settings form from the latter) and the engine's
`SamplingParams` (`inf_llm.engine.events`, filled by `inf_llm.engine.generation.sampling_params`). A new field
is one entry here plus the engine code that honours it.
Must not know: HTTP, torch, the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import Field


class Surface(str, Enum):
    """Where a sampling field appears (the engine's SamplingParams holds every field)."""

    CONFIG = "config"  # the config's generation: section, which holds the default
    CHAT = "chat"  # the POST /chat body
    OPENAI = "openai"  # the /v1/completions and /v1/chat/completions bodies
    STATUS = "status"  # /status's generation_defaults
    PAGE = "page"  # the web page's settings form (through /status's generation_fields)


ALL = frozenset(Surface)


@dataclass(frozen=True)
class PageInput:
    """How the web page shows a field. `min`/`max` narrow the bounds where a slider needs a scale; `order` places
    it in the form (sliders first: they pair up in its two columns)."""

    label: str
    widget: Literal["range", "number"]
    step: float
    order: int
    min: float | None = None
    max: float | None = None
    placeholder: str | None = None  # None: the server's default


@dataclass(frozen=True)
class SamplingField:
    name: str
    type: Any  # the value's type (list[str]: the engine holds a tuple)
    default: Any
    description: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    surfaces: frozenset[Surface] = ALL
    openai_name: str | None = None  # its name in the OpenAI bodies where it differs
    openai_type: Any = None  # its type in the OpenAI bodies where it differs
    openai_default: Any = None  # what an OpenAI request that leaves it out gets; None: the config's default
    extension: bool = False  # not an OpenAI field: the OpenAI bodies accept it as an extension
    page: PageInput | None = None

    def bounds(self) -> dict[str, float]:
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None}

    def annotated(self, value_type: Any = None) -> Any:
        """The value's type with its bounds, for a pydantic field."""
        return Annotated[value_type or self.type, Field(**self.bounds())]

    def wire_name(self, surface: Surface) -> str:
        return (self.openai_name or self.name) if surface is Surface.OPENAI else self.name

    def openai_description(self) -> str:
        parts = ["extension" if self.extension else None, self.description,
                 None if self.openai_default is None else f"default {self.openai_default} (OpenAI's), not the "
                                                          f"config's"]
        return "; ".join(p for p in parts if p)

    def schema(self) -> dict[str, Any]:
        """The field as /status's generation_fields tells it (bounds in JSON Schema's words)."""
        names = {"ge": "minimum", "gt": "exclusive_minimum", "le": "maximum"}
        kind = {int: "integer", float: "number"}.get(self.type)
        body: dict[str, Any] = {"name": self.name, "type": kind or "string[]", "nullable": self.default is None,
                                "default": list(self.default) if isinstance(self.default, tuple) else self.default,
                                "description": self.description}
        body.update({names[k]: v for k, v in self.bounds().items()})
        body["page"] = None if self.page is None or Surface.PAGE not in self.surfaces else {
            k: v for k, v in vars(self.page).items() if v is not None}
        return body


# Below 0.01 the repetition penalty divides logits by ~0 and overflows.
MIN_REPETITION_PENALTY = 0.01

FIELDS: tuple[SamplingField, ...] = (
    SamplingField("temperature", float, 0.7, "0 (or below 0.001) = greedy (deterministic)", ge=0, le=5,
                  page=PageInput("Temperature", "range", 0.05, 0, min=0, max=2)),
    SamplingField("top_p", float, 0.95, "nucleus sampling: keep the smallest set of tokens this likely; 1 = off",
                  gt=0, le=1, page=PageInput("Top p", "range", 0.05, 1, min=0.05)),
    SamplingField("top_k", int, 0, "keep the k likeliest tokens; 0 = disabled", ge=0, le=100_000, extension=True,
                  page=PageInput("Top k", "number", 1, 3)),
    SamplingField("max_new_tokens", int, 512, "most tokens generated (also bounded by server.max_new_tokens_limit)",
                  ge=1, le=1_000_000, openai_name="max_tokens", page=PageInput("Max new tokens", "number", 1, 2)),
    SamplingField("repetition_penalty", float, 1.0,
                  "divides the logits of the last repeat_last_n generated tokens (never the prompt's: a penalty "
                  "over an attached document stops the model copying from it); 1 = none",
                  ge=MIN_REPETITION_PENALTY, le=10, openai_default=1.0, extension=True,
                  page=PageInput("Repetition penalty", "number", 0.01, 4, min=0.5, max=2)),
    SamplingField("repeat_last_n", int, 64, "generated tokens the repetition penalty sees", ge=0, le=1_000_000,
                  extension=True),
    SamplingField("frequency_penalty", float, 0.0, "OpenAI's: minus this times a token's count", ge=-2, le=2,
                  openai_default=0.0),
    SamplingField("presence_penalty", float, 0.0, "OpenAI's: minus this once a token was generated", ge=-2, le=2,
                  openai_default=0.0),
    SamplingField("stop", list[str], (), "stop strings (never part of the answer, never streamed)",
                  openai_type=str | list[str]),
    SamplingField("seed", int, None, "sampling seed; None: random", ge=0, le=2**63 - 1,
                  surfaces=ALL - {Surface.STATUS}, page=PageInput("Seed", "number", 1, 5, placeholder="random")),
)


def on(surface: Surface) -> tuple[SamplingField, ...]:
    """The fields a surface exposes, in definition order."""
    return tuple(f for f in FIELDS if surface in f.surfaces)


def by_name(name: str) -> SamplingField:
    return next(f for f in FIELDS if f.name == name)


def config_fields() -> dict[str, tuple[Any, Any]]:
    """The generation: section's sampling fields, as `pydantic.create_model` takes them."""
    out = {}
    for f in on(Surface.CONFIG):
        value_type = f.annotated() if f.default is not None else f.annotated() | None
        default = Field(default_factory=list) if isinstance(f.default, tuple) else Field(f.default)
        default.description = f.description
        out[f.name] = (value_type, default)
    return out


def request_fields(surface: Literal[Surface.CHAT, Surface.OPENAI], skip: tuple[str, ...] = ()
                   ) -> dict[str, tuple[Any, Any]]:
    """A request body's optional sampling fields (None: the default applies), as `pydantic.create_model` takes
    them."""
    out = {}
    for f in on(surface):
        if f.name in skip:
            continue
        openai = surface is Surface.OPENAI
        value_type = f.annotated(f.openai_type if openai else None)
        out[f.wire_name(surface)] = (value_type | None, Field(
            None, description=f.openai_description() if openai else f.description))
    return out


def engine_fields() -> list[tuple[str, Any, Any]]:
    """(name, type, dataclass field) of every field, for `dataclasses.make_dataclass`."""
    out = []
    for f in FIELDS:
        value_type = tuple[str, ...] if f.type == list[str] else (f.type if f.default is not None else f.type | None)
        out.append((f.name, value_type, field(default=f.default)))
    return out
