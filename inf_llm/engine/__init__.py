"""The engine: model loading, chat templates, the generation worker, sampling, stop strings, cancellation
and session reuse. It yields typed events and knows nothing of HTTP.
"""

from inf_llm.engine.loading import LoadedModel, ResolvedModel, load_model, resolve_model_path

__all__ = ["LoadedModel", "ResolvedModel", "load_model", "resolve_model_path"]
