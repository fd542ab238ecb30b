"""Model glue shared by the runners: load + patch a model for evaluation, and greedy generation with chunked
prefill (timed), the way the engine feeds a prompt (docs/ARCHITECTURE.md, "Adapter API").

Owns nothing of the method: the memory is `inf_llm.adapter`, loading is `inf_llm.engine.loading`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig

from inf_llm.adapter import InfLLMCache, cache_kwargs, patch_model
from inf_llm.config import InfLLMConfig, default_config_path, load_config
from inf_llm.engine.loading import load_model
from inf_llm.engine.pacing import ChunkPacer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationStats:
    """Timing of one greedy generation."""

    prompt_tokens: int
    new_tokens: int
    prefill_tokens: int  # tokens fed by the chunked prefill (prompt tokens but the last, minus reused ones)
    prefill_seconds: float
    decode_seconds: float  # generate(): the last prompt token and every new token
    stop_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)
    reused_tokens: int = 0  # prompt tokens already in the memory passed in (a shared prefix)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "prefill_tokens_per_second": self.prefill_tokens_per_second,
            "decode_tokens_per_second": self.decode_tokens_per_second,
        }


@dataclass
class Agreement:
    """A variant's next-token distributions against a baseline's, accumulated position by position: mean KL
    divergence (nats), top-1 agreement and the largest change of a log-probability."""

    kl: float = 0.0
    top1: int = 0
    max_abs_logprob: float = 0.0
    positions: int = 0

    def add(self, base_logp: torch.Tensor, logp: torch.Tensor) -> None:
        """base_logp / logp (positions, vocab) float32 log-softmax of the same positions."""
        self.kl += float((base_logp.exp() * (base_logp - logp)).sum())  # host sync: one scalar per call
        self.top1 += int((base_logp.argmax(-1) == logp.argmax(-1)).sum())
        self.max_abs_logprob = max(self.max_abs_logprob, float((base_logp - logp).abs().max()))
        self.positions += base_logp.shape[0]

    def as_dict(self) -> dict:
        n = max(self.positions, 1)
        return {"mean_kl": self.kl / n, "top1_agreement": self.top1 / n,
                "max_abs_logprob_diff": self.max_abs_logprob, "positions": self.positions}


def torchrun_overrides(overrides: Sequence[str]) -> list[str]:
    """With torchrun (LOCAL_RANK set) and CUDA present, pin each process to its GPU unless the overrides
    already name a device."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or any(o.startswith("model.device=") for o in overrides):
        return list(overrides)
    if torch.cuda.is_available():
        return [*overrides, f"model.device=cuda:{int(local_rank) % torch.cuda.device_count()}"]
    return list(overrides)


def load_for_eval(config_path: str | os.PathLike | None, overrides: Sequence[str] = ()):
    """Load the config (+ dotlist overrides), the model and tokenizer, and patch the model with InfLLM
    attention. `config_path` None: the served config (`$INFLLM_CONFIG` or config/working's SmolLM2 file).
    Returns (model, tokenizer, cfg)."""
    cfg = load_config(config_path if config_path is not None else default_config_path(), list(overrides))
    loaded = load_model(cfg)
    model = patch_model(loaded.model, cfg.model)
    model.eval()
    return model, loaded.tokenizer, cfg


def _as_ids(tokenizer, prompt: str | Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if isinstance(prompt, torch.Tensor):
        return [int(t) for t in prompt.reshape(-1).tolist()]  # host copy of the prompt ids, once
    return [int(t) for t in prompt]


def prefill_chunks(model, cfg: InfLLMConfig, cache: InfLLMCache, input_ids: torch.Tensor, start: int, end: int):
    """Feed tokens [start, end) of `input_ids` (1, T) into `cache` in chunks that end at multiples of
    `cfg.chunk_size` (absolute positions), so a prompt fed in pieces is split exactly as when fed at once.
    Paced as the engine paces a prefill (`inf_llm.engine.pacing`); returns when every chunk is done."""
    kw = cache_kwargs(model, cache)
    pacer = ChunkPacer(input_ids.device)
    a = start
    while a < end:
        b = min((a // cfg.chunk_size + 1) * cfg.chunk_size, end)
        # logits_to_keep=1: the vocabulary projection of a whole chunk would dwarf the attention cost.
        model(input_ids[:, a:b], use_cache=True, logits_to_keep=1, **kw)
        pacer.issued(b)
        a = b
    pacer.drain()


@torch.inference_mode()
def generate_greedy(
    model,
    tokenizer,
    cfg: InfLLMConfig,
    prompt: str | Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] | None = None,
    cache: InfLLMCache | None = None,
    reused_tokens: int = 0,
) -> tuple[str, GenerationStats]:
    """Greedy decoding of one prompt.

    `prompt`: text (tokenized with the tokenizer's special tokens) or token ids. All prompt tokens but the
    last are prefilled in chunks of `cfg.chunk_size` through `model(...)`, then `model.generate` feeds the
    last one and decodes. The text returned is the decoded new tokens up to (not including) the first stop
    token (default: the tokenizer's EOS), special tokens kept, as the original benchmark code decodes.
    `cache`: a memory that already holds the first `reused_tokens` prompt tokens (taken over and extended);
    default a fresh one.
    """
    ids = _as_ids(tokenizer, prompt)
    if not ids:
        raise ValueError("empty prompt")
    prefill = len(ids) - 1
    if not 0 <= reused_tokens <= prefill or (cache is None and reused_tokens):
        raise ValueError(
            f"reused_tokens={reused_tokens} must be within the {prefill} prefilled tokens of a given cache"
        )
    device = model.get_input_embeddings().weight.device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    stops = list(stop_token_ids) if stop_token_ids else [tokenizer.eos_token_id]
    cache = cache if cache is not None else InfLLMCache(model)
    kw = cache_kwargs(model, cache)

    cache.plan(len(ids))  # as the engine: a prompt past full_attention_tokens reads with the configured window
    start = time.perf_counter()
    prefill_chunks(model, cfg, cache, input_ids, reused_tokens, prefill)  # returns when the GPU is done
    prefill_s = time.perf_counter() - start

    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
    )
    start = time.perf_counter()
    out = model.generate(input_ids, generation_config=gen_cfg, **kw)
    decode_s = time.perf_counter() - start

    new = out[0, len(ids) :].tolist()  # host copy of the generated ids, once per generation
    stop_reason = "length"
    for i, tok in enumerate(new):
        if tok in stops:
            new, stop_reason = new[:i], "stop"
            break
    text = tokenizer.decode(new, skip_special_tokens=False)
    stats = GenerationStats(
        prompt_tokens=len(ids),
        new_tokens=len(new),
        prefill_tokens=prefill - reused_tokens,
        prefill_seconds=prefill_s,
        decode_seconds=decode_s,
        stop_reason=stop_reason,
        reused_tokens=reused_tokens,
    )
    return text, stats
