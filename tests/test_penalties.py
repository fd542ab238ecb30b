"""Penalties on generated tokens only (inf_llm/engine/penalties.py), and what they mean for copying a number
out of a document: the served default penalty must never push the model away from the document's digits."""

from __future__ import annotations

import pytest
import torch

from inf_llm.adapter import patch_model
from inf_llm.config import load_config
from inf_llm.engine import Done, Engine, build_messages
from inf_llm.engine.loading import load_model
from inf_llm.engine.penalties import GeneratedTokenPenalties
from tests.conftest import DEFAULT_CONFIG

VOCAB = 10


def _scores() -> torch.Tensor:
    return torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0, -3.0, 0.0, 4.0, -4.0]])  # (1, V)


def test_prompt_tokens_take_no_penalty():
    ids = torch.tensor([[0, 1, 2, 3]])  # all prompt
    penalties = GeneratedTokenPenalties(4, repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=1.0)
    assert torch.equal(penalties(ids, _scores()), _scores())


def test_repetition_penalty_covers_the_recent_generated_window_once_per_token():
    ids = torch.tensor([[5, 0, 1, 1, 8]])  # prompt [5]; generated 0, 1, 1, 8
    got = GeneratedTokenPenalties(1, repetition_penalty=2.0, repeat_last_n=3)(ids, _scores())
    want = _scores()
    want[0, 1] *= 2.0  # negative logit: multiplied (once, although 1 was generated twice)
    want[0, 8] /= 2.0  # positive logit: divided
    # token 0 left the 3-token window, token 5 is only in the prompt: unchanged
    assert torch.equal(got, want)


def test_frequency_and_presence_penalties_follow_openai():
    ids = torch.tensor([[9, 2, 2, 2, 4]])
    got = GeneratedTokenPenalties(1, frequency_penalty=0.5, presence_penalty=0.25)(ids, _scores())
    want = _scores()
    want[0, 2] -= 0.5 * 3 + 0.25
    want[0, 4] -= 0.5 * 1 + 0.25
    assert torch.allclose(got, want) and got[0, 9] == want[0, 9]


def test_neutral_penalties_are_inactive():
    assert not GeneratedTokenPenalties(3).active
    assert not GeneratedTokenPenalties(3, repetition_penalty=1.3, repeat_last_n=0).active
    assert GeneratedTokenPenalties(3, repetition_penalty=1.1).active
    assert GeneratedTokenPenalties(3, presence_penalty=-0.5).active


# A document stating a number among other numbers: the penalty over the prompt that transformers'
# `repetition_penalty` applies penalised these digits (the served chat's default is 1.1).
DOCUMENT = (
    "Inventory note. The east warehouse holds 318 crates of tea and 27 barrels of oil. The west warehouse "
    "was repainted in 1998 and holds 64 sacks of flour. The combination of the main safe is 583914. "
    "The night guard starts at 22:00 and the loading bay closes at 19:30."
)
QUESTION = "What is the combination of the main safe? Answer with the number only."


@pytest.fixture(scope="module")
def served_engine():
    """SmolLM2 with the served config as shipped (its generation defaults included), on the CPU."""
    cfg = load_config(DEFAULT_CONFIG, ["model.device=cpu", "generation.max_new_tokens=24"])
    assert cfg.generation.repetition_penalty > 1.0  # the served default this test is about
    loaded = load_model(cfg)
    patch_model(loaded.model, cfg.model)
    engine = Engine(cfg, loaded.model, loaded.tokenizer).start()
    yield engine
    engine.shutdown()


def test_a_number_in_the_document_comes_back_at_the_served_defaults(served_engine):
    """Regression: the served repetition penalty was applied over the prompt, so the model was pushed away
    from the digits it had to copy."""
    messages = build_messages(f"{DOCUMENT}\n\n{QUESTION}", [], None)
    job = served_engine.submit(served_engine.prepare_chat(messages), served_engine.sampling(temperature=0))
    done = [e for e in job.events(timeout=120)][-1]
    assert isinstance(done, Done) and "583914" in done.text, done.text
