"""`model.fused_norm`: the model's Llama-family RMSNorm modules run `inf_llm.kernels.triton_norm.rms_norm`
on CUDA tensors (one launch instead of seven elementwise kernels with float32 intermediates), and their own
forward on any other device. Installed by `patch_model`, removed by `unpatch_model`; the weights and the
state dict are untouched (the replacement is an instance attribute `forward`)."""

from __future__ import annotations

import types

import torch
from torch import nn

from inf_llm.errors import MissingDependencyError

# Norm classes whose forward is exactly transformers' LlamaRMSNorm formula (checked on 5.17 and 5.24).
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.is_cuda:
        from inf_llm.kernels.triton_norm import rms_norm

        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def install_fused_norms(model: nn.Module) -> int:
    """Route the model's RMSNorm modules through the fused kernel on CUDA; returns how many. Idempotent."""
    try:
        import triton  # noqa: F401  (needed at the first CUDA call; say so now, not mid-generation)
    except ImportError as exc:
        raise MissingDependencyError(f"model.fused_norm needs triton ({exc}); set model.fused_norm=false") from None
    count = 0
    for module in model.modules():
        if type(module).__name__ in RMS_NORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def remove_fused_norms(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), types.MethodType) and module.forward.__func__ is _fused_forward:
            del module.forward
