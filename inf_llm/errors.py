"""The project's error types. A leaf module: it imports nothing from inf_llm.

Every error a user can cause (config, request, file, CLI) is an `InfLLMError` with a message that names
what was wrong. The server maps each class to one HTTP status through `http_status`.
"""


class InfLLMError(Exception):
    """Base of every error raised on purpose by inf_llm."""

    http_status = 500
    error_type = "internal_error"


class ConfigError(InfLLMError):
    """A config file, override or field value is invalid."""

    http_status = 400
    error_type = "config_error"


class ModelNotFoundError(InfLLMError):
    """The model path could not be resolved (hub id, folder, .gguf file or package)."""

    http_status = 500
    error_type = "model_not_found"


class ModelLoadError(InfLLMError):
    """The model was found but could not be loaded."""

    http_status = 500
    error_type = "model_load_error"


class UnsupportedModelError(InfLLMError):
    """The model's architecture cannot be patched with InfLLM attention."""

    http_status = 500
    error_type = "unsupported_model"


class MissingDependencyError(InfLLMError):
    """An optional dependency was explicitly requested but is not installed."""

    http_status = 500
    error_type = "missing_dependency"


class RequestError(InfLLMError):
    """A request is well-formed JSON but asks for something invalid."""

    http_status = 400
    error_type = "invalid_request_error"


class PromptTooLongError(RequestError):
    """The prompt exceeds `max_len` and the config says `truncation: error`."""

    error_type = "prompt_too_long"

    def __init__(self, prompt_tokens: int, max_len: int):
        super().__init__(
            f"prompt has {prompt_tokens} tokens, more than max_len={max_len}; shorten it or set "
            f"truncation: suffix in the config"
        )
        self.prompt_tokens = prompt_tokens
        self.max_len = max_len


class QueueFullError(InfLLMError):
    """The worker queue is full; retry later."""

    http_status = 429
    error_type = "server_busy"


class NotReadyError(InfLLMError):
    """The model is still loading (or failed to load)."""

    http_status = 503
    error_type = "model_not_ready"


class GenerationCancelled(InfLLMError):
    """Generation was cancelled (client disconnect, stop button, shutdown). Not an error for the user."""

    http_status = 499
    error_type = "cancelled"


class SessionStateError(InfLLMError):
    """A saved memory state does not match the model or config it is loaded into."""

    http_status = 400
    error_type = "session_state_error"


class ContextNotFoundError(InfLLMError):
    """No document memory (context) with that id."""

    http_status = 404
    error_type = "context_not_found"


class ContextStorageError(InfLLMError):
    """A document memory cannot be kept: the disk budget or the disk is full, or a saved file is unreadable."""

    http_status = 507
    error_type = "insufficient_storage"
