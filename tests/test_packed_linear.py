"""CPU bf16 linear layers with prepacked oneDNN weights: bit-identical to the model they replace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from inf_llm.adapter import InfLLMCache, cache_kwargs, patch_model
from inf_llm.config import load_config
from inf_llm.engine.loading import load_model
from inf_llm.engine.packed_linear import PackedLinear, pack_linear_layers
from tests.models import build_tiny_model, save_tiny_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs torch with oneDNN")

MEMORY = ["model.n_init=4", "model.n_local=32", "model.block_size=8", "model.topk=2", "model.exc_block_size=16",
          "model.repr_topk=2", "chunk_size=48"]


def _packed(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, PackedLinear)]


def _prefill_then_decode(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits of an InfLLM prefill (past the window, so blocks form) and greedy decode steps."""
    cache = InfLLMCache(model)
    kwargs = cache_kwargs(model, cache)
    with torch.inference_mode():
        logits = [model(ids, use_cache=True, **kwargs).logits[0, -1:]]
        for _ in range(steps):
            step = model(logits[-1].argmax(-1).view(1, 1), use_cache=True, **kwargs).logits[0, -1:]
            logits.append(step)
    return torch.cat(logits)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v with bias
def test_packed_model_gives_the_same_bits(family: str) -> None:
    cfg = load_config(None, MEMORY).model
    ids = torch.randint(3, 300, (1, 120), generator=torch.Generator().manual_seed(1))
    plain = build_tiny_model(family, seed=2).to(torch.bfloat16)
    packed = build_tiny_model(family, seed=2).to(torch.bfloat16)
    assert pack_linear_layers(packed) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    assert len(_packed(packed)) == 15 and not any(isinstance(m, nn.Linear) for m in packed.modules())
    with torch.inference_mode():  # the stock model, full attention
        assert torch.equal(packed(ids).logits, plain(ids).logits)
    expected = _prefill_then_decode(patch_model(plain, cfg), ids, 8)
    assert torch.equal(_prefill_then_decode(patch_model(packed, cfg), ids, 8), expected)


def test_only_bf16_cpu_layers_are_packed() -> None:
    model = build_tiny_model("llama", seed=2)  # float32: packing would change the summation order
    assert pack_linear_layers(model) == 0 and not _packed(model)


def test_loading_packs_bf16_cpu_models_unless_disabled(tmp_path: Path) -> None:
    tiny_folder = save_tiny_model(tmp_path / "llama", "llama", seed=3)

    def load(*overrides: str):
        return load_model(load_config(None, [f"model.path={tiny_folder}", "model.device=cpu", *overrides])).model

    assert len(_packed(load("model.dtype=bfloat16"))) == 15
    assert not _packed(load("model.dtype=bfloat16", "model.cpu_packed_linear=false"))
    assert not _packed(load("model.dtype=float32"))
