"""transformers integration: patch a model so its attention runs through the InfLLM context memory."""

from inf_llm.adapter.hf import (
    ATTN_IMPLEMENTATION,
    IdentityRotary,
    InfLLMCache,
    cache_kwargs,
    infllm_attention,
    patch_model,
    unpatch_model,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "IdentityRotary",
    "InfLLMCache",
    "cache_kwargs",
    "infllm_attention",
    "patch_model",
    "unpatch_model",
]
