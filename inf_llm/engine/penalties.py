"""Penalties on tokens the answer has already generated (never on the prompt).

A repetition penalty over the prompt, as transformers' `repetition_penalty` applies it, penalises every token
of an attached document: asked for a number the document states, the model is pushed away from copying its
digits (SmolLM2, full attention, 3K-token natural-text haystacks, a 7-digit number asked greedily: 4 of 6
found without a penalty, 2 of 6 with transformers' 1.1 over the prompt). So the penalties here look at
generated tokens only:

- `repetition_penalty` (llama.cpp's `repeat_penalty` with `repeat_last_n`): the logits of tokens among the last
  `repeat_last_n` generated ones are divided by the penalty when positive and multiplied when negative;
- `frequency_penalty` and `presence_penalty` (OpenAI's definitions): `logit -= frequency_penalty * count +
  presence_penalty * (count > 0)`, counting each token's occurrences in the whole answer so far.

Knows nothing of the server; `Generator` passes one `GeneratedTokenPenalties` to `model.generate`.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class GeneratedTokenPenalties(LogitsProcessor):
    """A `LogitsProcessor` for `generate()` over ids (1, prompt_tokens + generated); the first
    `prompt_tokens` columns are the prompt and take no penalty."""

    def __init__(self, prompt_tokens: int, repetition_penalty: float = 1.0, repeat_last_n: int = 64,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0):
        self.prompt_tokens = prompt_tokens
        self.repetition_penalty = repetition_penalty
        self.repeat_last_n = repeat_last_n
        self.frequency_penalty = frequency_penalty
        self.presence_penalty = presence_penalty

    @property
    def active(self) -> bool:
        """Whether any penalty changes a logit (else generate() need not run this processor)."""
        return ((self.repetition_penalty != 1.0 and self.repeat_last_n > 0)
                or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """input_ids (B, T) int64, scores (B, V) float: the next-token logits, penalised (a new tensor)."""
        generated = input_ids[:, self.prompt_tokens :]  # (B, G)
        if generated.shape[1] == 0:
            return scores
        scores = scores.clone()
        if self.repetition_penalty != 1.0 and self.repeat_last_n > 0:
            recent = generated[:, -self.repeat_last_n :]
            logit = scores.gather(1, recent)
            logit = torch.where(logit > 0, logit / self.repetition_penalty, logit * self.repetition_penalty)
            scores.scatter_(1, recent, logit)  # a token repeated in the window is penalised once
        if self.frequency_penalty != 0.0 or self.presence_penalty != 0.0:
            counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores -= self.frequency_penalty * counts + self.presence_penalty * (counts > 0).to(scores.dtype)
        return scores
