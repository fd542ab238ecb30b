"""The config of `python -m inf_llm.serve --model ID_OR_PATH`: the memory preset of the model's architecture.

Owns: which architectures have a preset (`ARCHITECTURES`), the paper's memory settings (`PAPER_MEMORY`), the
window of a model with a short native context, and the config values that name a model (`model_updates`).
Must not know: HTTP, the memory's internals. Reads only the model's config (config.json or the GGUF's
metadata), never its weights, and never the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig

from inf_llm.engine.loading import ResolvedModel, resolve_path
from inf_llm.errors import ConfigError, ModelLoadError, ModelNotFoundError

# model_type of the decoders the adapter patches (their presets are the same: the paper's settings).
ARCHITECTURES = ("mistral", "llama", "qwen2", "qwen3")
# The paper's InfLLM settings (Mistral-7B-Instruct-v0.2, Llama-3-8B-Instruct, Qwen1.5-7B-Chat presets of
# config/): 128 sinks, a 4K window, 16 retrieved blocks of 128 tokens, each represented by its 4 best keys,
# a lookup per 512 queries. The RoPE base stays the model's own (base: null).
PAPER_MEMORY: dict[str, Any] = {
    "type": "inf-llm",
    "n_init": 128,
    "n_local": 4096,
    "block_size": 128,
    "repr_topk": 4,
    "topk": 16,
    "exc_block_size": 512,
    "base": None,
    "distance_scale": 1.0,
}
# Prompt tokens per forward call: the original Mistral and Llama presets' (the output does not depend on it).
PAPER_CHUNK_SIZE = 8192


def model_updates(path: str) -> dict[str, Any]:
    """Config values that name the model at `path` (a local folder, a .gguf file, or a hub id in the Hugging
    Face cache), replacing those of a config: path, no gguf_file or tokenizer_path, its served name."""
    source = local_source(path)
    names = {"gguf": Path(source.gguf_file or "").stem, "folder": Path(source.location).name, "hub": path}
    name = names[source.kind]
    return {"model": {"path": path, "gguf_file": None, "tokenizer_path": None}, "server": {"model_name": name}}


def preset(path: str) -> dict[str, Any]:
    """`model_updates(path)` plus the memory preset of the model's architecture. Raises ConfigError for an
    architecture without one, ModelNotFoundError for a path that is not a local model."""
    source = local_source(path)
    text = _model_config(source).get_text_config(decoder=True)
    kind = getattr(text, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ConfigError(
            f"--model {path}: its architecture is {kind!r}; presets exist for {', '.join(ARCHITECTURES)}: write a "
            f"config for it (--config)"
        )
    memory = dict(PAPER_MEMORY)
    native = getattr(text, "max_position_embeddings", None)
    if native and native < 2 * memory["n_local"]:
        # the window at most half the native context (the original's 2K window for 4K-context models),
        # in whole execution blocks, so no distance the model sees exceeds what it was trained on
        exc = memory["exc_block_size"]
        memory["n_local"] = max(exc, native // 2 // exc * exc)
    updates = model_updates(path)
    updates["model"].update(memory)
    updates["chunk_size"] = PAPER_CHUNK_SIZE
    return updates


def local_source(path: str) -> ResolvedModel:
    """`path` resolved without the network; a hub id must already be in the Hugging Face cache."""
    source = resolve_path(path)
    if source.kind == "hub" and not source.hub_cached:
        raise ModelNotFoundError(
            f"--model {path}: no such local folder or .gguf file, and no hub model of that id in the Hugging Face "
            f"cache; give a local model folder or .gguf file (or download it first: `hf download {path}`)"
        )
    return source


def _model_config(source: ResolvedModel):
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(source.location, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"the config of {source} could not be read: {str(exc).strip().splitlines()[0]}") from exc
