"""CPU float32 linear layers with fp16 weights (`model.cpu_fp16_weights`): the float32 product of the weight
rounded to fp16, on by default for float32 CPU models, off with `false`, reported by the load and /status."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from inf_llm.adapter import InfLLMCache, cache_kwargs, patch_model
from inf_llm.config import load_config
from inf_llm.engine import fp16_linear, loading
from inf_llm.engine.fp16_linear import FP16WeightLinear, fp16_supported, store_weights_in_fp16
from inf_llm.engine.loading import load_model
from tests.models import build_tiny_model, save_tiny_model
from tests.test_packed_linear import LINEAR_LAYERS, MEMORY

pytestmark = pytest.mark.skipif(not fp16_supported(), reason="this torch build has no fbgemm fp16 linear")


def _fp16_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, FP16WeightLinear)]


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_the_product_is_float32_over_the_weight_rounded_to_fp16(rows: int) -> None:
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=gen) * 0.2)
    x = torch.randn(2, rows, 96, generator=gen)
    with torch.inference_mode():
        ours = FP16WeightLinear(linear)(x)
        rounded = nn.functional.linear(x, linear.weight.half().float(), linear.bias)
        exact = linear(x)
    assert ours.shape == (2, rows, 40) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, rounded, rtol=1e-5, atol=1e-5)  # float32 summation order only
    assert (exact - rounded).abs().max() > 0  # (the rounding is visible: the check above is not vacuous)


def test_a_model_with_fp16_weights_reads_and_decodes_as_float32_does() -> None:
    # a window holding every token: the numerics of the products alone (with blocks, a rounding can flip which
    # block a lookup picks; benchmark/linear_accuracy.py measures that on a real model)
    cfg = load_config(None, [*MEMORY, "model.n_local=256"]).model
    ids = torch.randint(3, 300, (1, 120), generator=torch.Generator().manual_seed(1))
    outputs = []
    for fp16 in (False, True):
        model = build_tiny_model("llama", seed=2)
        if fp16:
            assert store_weights_in_fp16(model) == LINEAR_LAYERS
        model = patch_model(model, cfg)
        cache = InfLLMCache(model)
        with torch.inference_mode():
            logits = [model(ids, use_cache=True, **cache_kwargs(model, cache)).logits[0, -1:]]
            for _ in range(6):  # the same greedy tokens (the float32 model's choice fed to both)
                token = outputs[0][len(logits) - 1].argmax(-1) if outputs else logits[-1].argmax(-1)
                logits.append(model(token.view(1, 1), use_cache=True, **cache_kwargs(model, cache)).logits[0, -1:])
        outputs.append(torch.cat(logits))
    base, fp16 = (torch.log_softmax(o.float(), dim=-1) for o in outputs)
    kl = (base.exp() * (base - fp16)).sum(-1)
    assert float(kl.max()) < 1e-5, kl
    assert float((base - fp16).abs().max()) < 0.01


def test_a_weight_beyond_fp16s_range_stays_float32(caplog: pytest.LogCaptureFixture) -> None:
    model = build_tiny_model("llama", seed=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e6
    with caplog.at_level("INFO", logger=fp16_linear.__name__):
        assert store_weights_in_fp16(model) == LINEAR_LAYERS - 1
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert "model.layers.0.mlp.down_proj keeps float32 weights" in caplog.text


def test_loading_stores_float32_cpu_weights_in_fp16_unless_disabled(tmp_path: Path) -> None:
    tiny_folder = save_tiny_model(tmp_path / "llama", "llama", seed=3)

    def load(*overrides: str):
        return load_model(load_config(None, [f"model.path={tiny_folder}", "model.device=cpu", *overrides]))

    on = load("model.dtype=float32", "model.cpu_fp16_weights=true")
    assert len(_fp16_layers(on.model)) == LINEAR_LAYERS
    assert on.linear == "float32 with fp16 weights (fbgemm)"
    explicit = load("model.dtype=float32")  # auto: an explicit float32 stays exact
    assert not _fp16_layers(explicit.model) and explicit.linear == "F.linear"
    off = load("model.dtype=float32", "model.cpu_fp16_weights=false")
    assert not _fp16_layers(off.model) and off.linear == "F.linear"
    bf16 = load("model.dtype=bfloat16", "model.cpu_packed_linear=false")
    assert not _fp16_layers(bf16.model) and bf16.linear == "F.linear"


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_dtype_is_bf16_prepacked_or_float32_with_fp16_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   native_bf16: bool) -> None:
    """dtype: auto on a CPU with native bf16 gives bf16 (never fp16 weights); without, float32 with fp16
    weights: the CPU's fast path, whichever kind it is."""
    monkeypatch.setattr(loading, "_cpu_has_native_bf16", lambda: native_bf16)
    tiny_folder = save_tiny_model(tmp_path / "llama", "llama", seed=3)
    loaded = load_model(load_config(None, [f"model.path={tiny_folder}", "model.device=cpu", "model.dtype=auto"]))
    if native_bf16:
        assert loaded.dtype == torch.bfloat16 and not _fp16_layers(loaded.model)
        assert loaded.linear in ("bf16, prepacked for oneDNN", "F.linear")
    else:
        assert loaded.dtype == torch.float32 and len(_fp16_layers(loaded.model)) == LINEAR_LAYERS
        assert loaded.linear == "float32 with fp16 weights (fbgemm)"


def test_without_the_ops_the_model_stays_float32(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(fp16_linear, "fp16_supported", lambda: False)
    model = build_tiny_model("llama", seed=2)
    with caplog.at_level("INFO", logger=fp16_linear.__name__):
        assert store_weights_in_fp16(model) == 0
    assert not _fp16_layers(model) and "unavailable" in caplog.text
