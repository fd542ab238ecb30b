"""The engine: model loading, chat templates, the generation worker, sampling, stop strings, cancellation
and session reuse. It yields typed events and knows nothing of HTTP.
"""

from inf_llm.engine.events import (
    Done,
    Error,
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
from inf_llm.engine.loading import LoadedModel, ResolvedModel, load_model, resolve_model_path
from inf_llm.engine.sessions import SavedSession, SessionInfo, SessionState
from inf_llm.engine.templates import Message, build_messages, render_chat
from inf_llm.engine.worker import Engine, EngineInfo, Job, SessionJob, ShuttingDownError, load_engine

__all__ = [
    "Done", "Engine", "EngineInfo", "Error", "Event", "Job", "LoadedModel", "Message", "PreparedPrompt", "Progress",
    "ResolvedModel", "Retrieval", "RetrievalSpan", "SamplingParams", "SavedSession", "SessionInfo", "SessionJob",
    "SessionState", "ShuttingDownError", "TextDelta", "Timings",
    "Truncated", "Usage", "build_messages", "load_engine", "load_model", "render_chat", "resolve_model_path",
]
