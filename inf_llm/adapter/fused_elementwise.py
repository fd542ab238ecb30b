"""`model.fused_elementwise`: on CUDA tensors the model's Llama-family RMSNorm modules run
`triton_elementwise.rms_norm`, and its SwiGLU MLPs `down_proj(silu_mul(gate_proj(x), up_proj(x)))`; on any
other device each module runs its own forward. Installed by `patch_model`, removed by `unpatch_model`; the
weights and the state dict are untouched (the replacement is an instance attribute `forward`)."""

from __future__ import annotations

import types

import torch
from torch import nn

from inf_llm.errors import MissingDependencyError

# Classes whose forward is exactly transformers' Llama formula (checked on 5.17 and 5.24): RMSNorm, and the
# MLP `down_proj(act_fn(gate_proj(x)) * up_proj(x))` (fused only when act_fn is SiLU).
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
SILU_CLASSES = frozenset({"SiLUActivation", "SiLU"})


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.is_cuda:
        from inf_llm.kernels.triton.elementwise import rms_norm

        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from inf_llm.kernels.triton.elementwise import silu_mul

        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
    return type(self).forward(self, x)


def _replacement(module: nn.Module):
    name = type(module).__name__
    if name in RMS_NORM_CLASSES and hasattr(module, "variance_epsilon"):
        return _norm_forward
    if name in MLP_CLASSES and type(getattr(module, "act_fn", None)).__name__ in SILU_CLASSES:
        return _mlp_forward
    return None


def install_fused_elementwise(model: nn.Module) -> int:
    """Route the model's RMSNorms and SiLU MLPs through the fused kernels on CUDA; returns how many modules.
    Idempotent."""
    try:
        import triton  # noqa: F401  (needed at the first CUDA call; say so now, not mid-generation)
    except ImportError as exc:
        raise MissingDependencyError(
            f"model.fused_elementwise needs triton ({exc}); set model.fused_elementwise=false"
        ) from None
    count = 0
    for module in model.modules():
        forward = _replacement(module)
        if forward is not None:
            module.forward = types.MethodType(forward, module)
            count += 1
    return count


def remove_fused_elementwise(model: nn.Module) -> None:
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ in (_norm_forward, _mlp_forward):
            del module.forward
