"""CPU bf16 linear layers with prepacked oneDNN weights: bit-identical to the model they replace where the
probe finds an exact kernel, and the model left as it is (same outputs, a log line) where it does not.

The tests decide by the probe the code uses (`packing_supported`), so they hold on CPUs with and without
AVX512-BF16; the fallback is also forced on every machine by patching the probe.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from inf_llm.adapter import InfLLMCache, cache_kwargs, patch_model
from inf_llm.config import load_config
from inf_llm.engine import packed_linear
from inf_llm.engine.loading import load_model
from inf_llm.engine.packed_linear import PackedLinear, pack_linear_layers, packing_supported
from tests.models import build_tiny_model, save_tiny_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs torch with oneDNN")

MEMORY = ["model.full_attention_tokens=null", "model.n_init=4", "model.n_local=32", "model.block_size=8", "model.topk=2", "model.exc_block_size=16",
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


LINEAR_LAYERS = 2 * 7 + 1  # q k v o gate up down per layer of the tiny models, and lm_head


def _no_exact_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe as on a CPU whose oneDNN has no exact bf16 kernel."""
    monkeypatch.setattr(packed_linear, "packing_is_exact", lambda linear: False)


def _assert_same_bits_as_plain(family: str, expected_packed: int, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, MEMORY).model
    ids = torch.randint(3, 300, (1, 120), generator=torch.Generator().manual_seed(1))
    plain = build_tiny_model(family, seed=2).to(torch.bfloat16)
    packed = build_tiny_model(family, seed=2).to(torch.bfloat16)
    with caplog.at_level("INFO", logger=packed_linear.__name__):
        assert pack_linear_layers(packed) == expected_packed
    assert len(_packed(packed)) == expected_packed
    linear_left = sum(type(m) is nn.Linear for m in packed.modules())
    assert linear_left == LINEAR_LAYERS - expected_packed
    if expected_packed == 0:  # the fallback says so, and leaves every weight where it was
        assert "unavailable or not exact" in caplog.text
        assert all(torch.equal(a, b) for a, b in zip(packed.state_dict().values(), plain.state_dict().values()))
    with torch.inference_mode():  # the stock model, full attention
        assert torch.equal(packed(ids).logits, plain(ids).logits)
    expected = _prefill_then_decode(patch_model(plain, cfg), ids, 8)
    assert torch.equal(_prefill_then_decode(patch_model(packed, cfg), ids, 8), expected)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v with bias
def test_packed_model_gives_the_same_bits(family: str, caplog: pytest.LogCaptureFixture) -> None:
    """Where this machine packs (the probe says so): every layer packed, bit-identical; elsewhere the fallback."""
    _assert_same_bits_as_plain(family, LINEAR_LAYERS if packing_supported() else 0, caplog)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_without_exact_packing_the_model_is_left_as_it_is(family: str, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A CPU without an exact oneDNN bf16 kernel (forced here on any machine): nothing packed, the same
    outputs, a log line. Regression: the suite assumed the fast path and failed on AVX2-only CPUs."""
    _no_exact_packing(monkeypatch)
    _assert_same_bits_as_plain(family, 0, caplog)


def test_only_bf16_cpu_layers_are_packed() -> None:
    model = build_tiny_model("llama", seed=2)  # float32: packing would change the summation order
    assert pack_linear_layers(model) == 0 and not _packed(model)


@pytest.mark.parametrize("exact", ["probe", "forced-absent"])
def test_loading_packs_bf16_cpu_models_unless_disabled(tmp_path: Path, exact: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if exact == "forced-absent":
        _no_exact_packing(monkeypatch)
    tiny_folder = save_tiny_model(tmp_path / "llama", "llama", seed=3)

    def load(*overrides: str):
        return load_model(load_config(None, [f"model.path={tiny_folder}", "model.device=cpu", *overrides])).model

    expected = LINEAR_LAYERS if exact == "probe" and packing_supported() else 0
    assert len(_packed(load("model.dtype=bfloat16"))) == expected
    assert not _packed(load("model.dtype=bfloat16", "model.cpu_packed_linear=false"))
    assert not _packed(load("model.dtype=float32"))
