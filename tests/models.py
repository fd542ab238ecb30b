"""Tiny real transformers models and a tiny tokenizer for tests (no hub, no mocks).

Each builder makes a real model class of one family (Llama, Llama with llama3 RoPE scaling, Mistral, Qwen2,
Qwen3) from a small config with seeded random weights in float32: vocab 320, hidden 64, 2 layers, 4 query
heads and 2 KV heads (GQA 2:1) of dim 16. The tokenizer is byte-level (every string encodes, 259 ids) with
ChatML special tokens and a ChatML chat template, so a tiny model saved with it loads like a real one.

    from tests.models import build_tiny_model, save_tiny_model
    model = build_tiny_model("qwen2", seed=1)
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")

# Special tokens of the tiny tokenizer; their ids are 0, 1, 2 and the 256 byte symbols follow.
PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
PAD_ID, EOS_ID = 0, 2
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Shape shared by every family: small enough for CPU tests over thousands of tokens.
_COMMON = dict(
    vocab_size=320,  # >= the tokenizer's 259 ids
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=8192,
    # Larger than the usual 0.02 so attention is far from uniform: a wrong key set changes the output.
    initializer_range=0.1,
    pad_token_id=PAD_ID,
    bos_token_id=None,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
)
_ROPE_THETA = 10000.0
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,  # small, so test lengths cross the scaled frequencies
}


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """The config of a tiny model of `family` (one of FAMILIES); keyword overrides win."""
    default_rope = {"rope_type": "default", "rope_theta": _ROPE_THETA}
    if family == "llama":
        return LlamaConfig(**{**_COMMON, "rope_parameters": default_rope, **overrides})
    if family == "llama3":
        return LlamaConfig(**{**_COMMON, "rope_parameters": dict(_LLAMA3_ROPE), **overrides})
    if family == "mistral":
        # No sliding window: full attention is the baseline the InfLLM tests compare with.
        return MistralConfig(**{**_COMMON, "rope_parameters": default_rope, "sliding_window": None, **overrides})
    if family == "qwen2":
        return Qwen2Config(**{**_COMMON, "rope_parameters": default_rope, "use_sliding_window": False, **overrides})
    if family == "qwen3":
        return Qwen3Config(**{**_COMMON, "rope_parameters": default_rope, "use_sliding_window": False, **overrides})
    raise ValueError(f"unknown tiny model family {family!r}; choose from {', '.join(FAMILIES)}")


def build_tiny_model(family: str = "llama", seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny `family` model with weights drawn from `torch.manual_seed(seed)`, float32, on CPU, eval mode."""
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0-2 are <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos); 3-258 bytes."""
    specials = [PAD_TOKEN, IM_START, IM_END]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token=PAD_TOKEN)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def save_tiny_model(folder: str | Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny model and the tiny tokenizer into `folder` (a transformers folder `load_model` accepts)."""
    folder = Path(folder)
    build_tiny_model(family, seed, **overrides).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder
