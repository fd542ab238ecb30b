"""`model.fused_elementwise`: the Triton RMSNorm and SiLU-and-multiply (`inf_llm.kernels.triton_elementwise`)
against transformers' own modules, and their installation by `patch_model`. On CPU the kernels run under
the Triton interpreter (`tests/triton_interpreter.py`); a CUDA model test is marked gpu.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from inf_llm.adapter import InfLLMCache, cache_kwargs, patch_model, unpatch_model
from inf_llm.config import ModelConfig
from tests.models import build_tiny_model
from tests.triton_interpreter import DEVICE, INTERPRET, import_kernels, triton_interpreter_env  # noqa: F401

triton_elementwise = import_kernels("inf_llm.kernels.triton_elementwise")


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of the dtype at each value of t (its unit in the last place)."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[t.dtype]
    exp = torch.frexp(t.float().abs().clamp_min(torch.finfo(t.dtype).tiny))[1]
    return torch.ldexp(torch.ones_like(t, dtype=torch.float32), exp - 1 - mant)


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("hidden", [96, 100])
def test_rms_norm_matches_transformers_module(dtype, weight_dtype, hidden):
    """Same formula and roundings as LlamaRMSNorm: equal but for rare 1-ulp differences (the mean's
    summation order), for rows of odd width, 16-bit and float32, and a float32 weight on bf16 input."""
    gen = torch.Generator().manual_seed(hidden)
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(hidden, generator=gen) * 0.3)
    norm = norm.to(DEVICE, weight_dtype)
    x = (torch.randn(2, 37, hidden, generator=gen) * 3).to(DEVICE, dtype)
    with torch.no_grad():
        want = norm(x)
    got = triton_elementwise.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    diff = (got.float() - want.float()).abs()
    if want.dtype == torch.float32:  # no rounding step hides rsqrt's and the mean's last bits
        assert bool((diff <= 4 * _ulp(want)).all()), diff.max()
    else:  # the intermediate's rare 1-ulp difference, times a weight below 1, can round to 2 of the output's
        assert bool((diff <= (1 if hidden < 1000 else 2) * _ulp(want)).all()), diff.max()
        assert (diff > 0).float().mean() < 0.01  # all but a few values bit-equal


def test_rms_norm_strided_input_and_bad_input():
    gen = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-6).to(DEVICE, torch.bfloat16)
    x = torch.randn(64, 5, generator=gen).to(DEVICE, torch.bfloat16).T  # (5, 64), rows strided
    with torch.no_grad():
        torch.testing.assert_close(triton_elementwise.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="weight"):
        triton_elementwise.rms_norm(x, norm.weight[:10], 1e-6)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        triton_elementwise.rms_norm(x.to(torch.float64), norm.weight, 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_silu_mul_matches_torch(dtype):
    """silu(gate) * up with torch's roundings (after the SiLU, after the product): at most 1 ulp apart (the
    exponential's last bit), nearly all equal; an odd element count crosses block edges."""
    gen = torch.Generator().manual_seed(7)
    gate = (torch.randn(3, 5, 77, generator=gen) * 4).to(DEVICE, dtype)
    up = torch.randn(3, 5, 77, generator=gen).to(DEVICE, dtype)
    want = torch.nn.functional.silu(gate) * up
    got = triton_elementwise.silu_mul(gate, up)
    assert got.shape == want.shape and got.dtype == dtype
    diff = (got.float() - want.float()).abs()
    assert bool((diff <= (4 if dtype == torch.float32 else 1) * _ulp(want)).all()), diff.max()
    if dtype != torch.float32:
        assert (diff > 0).float().mean() < 0.01
    with pytest.raises(ValueError, match="must match"):
        triton_elementwise.silu_mul(gate, up[:, :4])


def test_patch_installs_and_removes_the_fused_modules():
    """fused_elementwise: every RMSNorm and SiLU MLP of the model gets the fused forward (CPU tensors take
    the module's own forward: identical logits); unpatching, or patching again with the option off, removes
    it. By default it is on for a model on a CUDA GPU only."""
    model = build_tiny_model("llama", seed=1)
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    layers = model.config.num_hidden_layers
    fused = [m for m in model.modules() if isinstance(m, (LlamaRMSNorm, LlamaMLP))]
    assert len(fused) == 3 * layers + 1
    with torch.no_grad():
        stock = model(ids).logits
        patch_model(model, ModelConfig(type="origin", fused_elementwise=True))
        assert all("forward" in m.__dict__ for m in fused)
        logits = model(ids, **cache_kwargs(model, InfLLMCache(model)), use_cache=True).logits
        patch_model(model, ModelConfig(type="origin", fused_elementwise=False))
        assert not any("forward" in m.__dict__ for m in fused)
        patch_model(model, ModelConfig(type="origin"))  # the default (null): only for a model on a CUDA GPU
        assert not any("forward" in m.__dict__ for m in fused)
        patch_model(model, ModelConfig(type="origin", fused_elementwise=True))
        unpatch_model(model)
        assert not any("forward" in m.__dict__ for m in fused)
        assert torch.equal(model(ids).logits, stock)
    torch.testing.assert_close(logits, stock, rtol=0, atol=1e-5)


def test_fused_forwards_equal_the_modules_own_on_kernel_tensors():
    """The replacement forwards' kernel branch (entered here directly: CPU tensors take the module's own
    forward) against the module's forward, on a tiny model's first norm and MLP in bf16."""
    from inf_llm.adapter import fused_elementwise

    model = build_tiny_model("mistral", seed=3).to(torch.bfloat16)
    norm, mlp = model.model.layers[0].input_layernorm, model.model.layers[0].mlp
    x = torch.randn(1, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.no_grad():
        got_norm = triton_elementwise.rms_norm(x, norm.weight, norm.variance_epsilon)
        got_mlp = mlp.down_proj(triton_elementwise.silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
        torch.testing.assert_close(got_norm, norm(x), rtol=0, atol=2e-2)
        torch.testing.assert_close(got_mlp, mlp(x), rtol=2e-2, atol=2e-2)
    assert fused_elementwise._replacement(norm) is fused_elementwise._norm_forward
    assert fused_elementwise._replacement(mlp) is fused_elementwise._mlp_forward
    mlp.act_fn = torch.nn.GELU()  # another activation: not fused
    assert fused_elementwise._replacement(mlp) is None


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_elementwise_ops_gpu(dtype):
    """The roundings between two ops survive the GPU compiler (it folds a plain .to() round trip away): the
    CPU checks at Mistral-7B's hidden size, 4096 (RMSNorm), and on a larger SiLU input."""
    test_rms_norm_matches_transformers_module(dtype, dtype, 4096)
    test_silu_mul_matches_torch(dtype)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs a CUDA GPU")
def test_fused_elementwise_model_on_gpu_matches_stock_modules():
    """A bf16 model on the GPU with the fused kernels gives the stock modules' logits within bf16 rounding."""
    model = build_tiny_model("mistral", num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = model.to("cuda", torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 500), generator=torch.Generator().manual_seed(4)).cuda()
    results = []
    for fused in (False, True):
        patch_model(model, ModelConfig(type="origin", fused_elementwise=fused))
        with torch.inference_mode():
            results.append(model(ids, **cache_kwargs(model, InfLLMCache(model)), use_cache=True).logits.float())
    cosine = torch.nn.functional.cosine_similarity(results[0].flatten(), results[1].flatten(), dim=0)
    assert cosine > 0.9999, cosine
