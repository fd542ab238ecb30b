"""CPU bf16 linear layers with oneDNN-prepacked weights: the same results, faster decoding.

Decoding a small model on a CPU reads every weight once per token, so its speed is the memory bandwidth a
matrix-vector product reaches. `torch.nn.functional.linear` on a bf16 CPU tensor re-derives oneDNN's blocked
weight layout on every call and reaches about 12 GB/s on this project's 2-core machine; the same oneDNN
kernel on a weight packed once at load time reaches about 20 GB/s, with bit-identical outputs (SmolLM2-135M
through the engine at 2K: decoding 17.3 -> 21.8 tokens/s, prefill 436 -> 522). It is what inductor's CPU
backend does to frozen linear weights (`torch.ops.mkldnn._linear_pointwise`).

Those ops are private to torch, so `pack_linear_layers` first checks on a probe input that the packed layer
returns exactly what `F.linear` returns, and leaves the model as it is (with a log line) when the ops are
missing or disagree. Only bf16 is packed: float32 gets a different summation order, so not the same bits.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# what `LoadedModel.linear` and /status say when the linear layers are the model's own
PLAIN_LINEAR = "F.linear"


def _ops_available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """`nn.Linear` for inference with its weight in oneDNN's blocked layout (an opaque mkldnn tensor, not a
    parameter: it takes no part in `state_dict`, `.to()` or autograd)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # batch-size hint 1: the layout chosen for decoding; it serves any number of rows
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _agrees(linear: nn.Linear) -> bool:
    """Does the packed layer give F.linear's exact bits on a probe of 1 and of 5 rows?"""
    packed = PackedLinear(linear)
    probe = torch.randn(5, linear.in_features, generator=torch.Generator().manual_seed(0)).to(linear.weight.dtype)
    with torch.inference_mode():
        return all(
            torch.equal(packed(rows), nn.functional.linear(rows, linear.weight, linear.bias))
            for rows in (probe[:1], probe[None])
        )


def packing_is_exact(linear: nn.Linear) -> bool:
    """The probe `pack_linear_layers` decides by: are the oneDNN ops there, and does a packed copy of
    `linear` (a bf16 CPU layer) reproduce `F.linear` bit for bit? False on torch builds without the ops and
    on CPUs whose oneDNN has no exact bf16 kernel (e.g. without AVX512-BF16 / AMX)."""
    try:
        return _ops_available() and _agrees(linear)
    except RuntimeError as exc:  # a torch build whose oneDNN lacks a bf16 kernel for this CPU
        logger.debug("packed linear probe failed: %s", exc)
        return False


def packing_supported() -> bool:
    """`packing_is_exact` on a small seeded bf16 layer: whether this machine packs bf16 models at all."""
    linear = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=torch.Generator().manual_seed(1)))
    return packing_is_exact(linear.to(torch.bfloat16))


def cpu_linear_layers(model: nn.Module, dtype: torch.dtype) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every plain `nn.Linear` of `model` with a CPU weight in `dtype`."""
    return [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == dtype
    ]


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where `model.get_submodule(name)` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def pack_linear_layers(model: nn.Module) -> int:
    """Replace every bf16 `nn.Linear` on the CPU by a `PackedLinear`; returns how many were replaced
    (0, the model untouched, when `packing_is_exact` says no for its first layer)."""
    targets = cpu_linear_layers(model, torch.bfloat16)
    if not targets:
        return 0
    if not packing_is_exact(targets[0][1]):
        logger.info("packed linear layers unavailable or not exact on this CPU and torch build; using F.linear")
        return 0
    for name, linear in targets:
        replace_submodule(model, name, PackedLinear(linear))
    logger.info("packed %d bf16 linear layers for oneDNN (CPU decoding)", len(targets))
    return len(targets)
