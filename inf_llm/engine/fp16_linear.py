"""CPU float32 linear layers with their weights stored in fp16 (fbgemm's FP16 GEMM): half the bytes, about
twice as fast decoding, the same computation in float32.

On a CPU without native bf16 (AVX2-only machines, AMD before Zen 4) a model runs in float32, and decoding one
token reads every weight once: SmolLM2-135M's 0.54 GB of float32 weights are most of a decode step, and its
49152 x 576 vocabulary projection alone takes 10 ms through `F.linear`. fbgemm's FP16 GEMM (the kernel of
torch's `linear_dynamic_fp16`, which `torch.ao`'s dynamic fp16 linear uses) keeps the weight packed in fp16
and multiplies float32 activations by it in float32 (AVX2 + F16C converts on the fly): the vocabulary
projection of a decode step takes 1.5 ms, the MLP projections about half their float32 time, and a
prefill chunk's many-row products are as fast as float32's. The one change of numerics is the weight
rounded once to fp16 (11 significant bits, finer than the bf16 the model runs in on other CPUs):
`benchmark/linear_accuracy.py` measures it (SmolLM2 over 12K positions of natural text: mean next-token KL
against float32 1.9e-5 nats, the same top token at 99.8% of positions; bf16 weights: 2.6e-3 and 96.2%).

`torch.ops.quantized` is torch's eager quantized-kernel API; the pinned torch has it, and `fp16_supported`
probes it: where the ops are gone the model stays float32, with a log line.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from inf_llm.engine.packed_linear import cpu_linear_layers, replace_submodule

logger = logging.getLogger(__name__)

FP16_MAX = float(torch.finfo(torch.float16).max)


class FP16WeightLinear(nn.Module):
    """`nn.Linear` for float32 CPU inference with its weight in fbgemm's packed fp16 form (an opaque object,
    not a parameter: no `state_dict`, `.to()` or autograd)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed_weight = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)
        self.has_bias = bias is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features), self.packed_weight)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
                "weight fp16")


def fp16_supported() -> bool:
    """Are fbgemm's fp16-weight linear ops in this torch build, and do they compute what F.linear does (to the
    weight's fp16 rounding) on a small seeded layer?"""
    try:
        linear = nn.Linear(64, 48)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.1)
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
        rounded = nn.Linear(64, 48)
        with torch.inference_mode():
            rounded.weight.copy_(linear.weight.half().float())
            rounded.bias.copy_(linear.bias)
            return bool(torch.allclose(FP16WeightLinear(linear)(x), rounded(x), rtol=1e-4, atol=1e-5))
    except (RuntimeError, AttributeError) as exc:  # a torch build without fbgemm or the quantized ops
        logger.debug("fp16-weight linear probe failed: %s", exc)
        return False


def store_weights_in_fp16(model: nn.Module) -> int:
    """Replace every float32 `nn.Linear` on the CPU whose weight fits fp16's range (the vocabulary projection
    too) by an `FP16WeightLinear`; returns how many were replaced (0, the model untouched, when
    `fp16_supported` says no)."""
    targets = cpu_linear_layers(model, torch.float32)
    if not targets or not fp16_supported():
        if targets:
            logger.info("fp16-weight linear layers unavailable in this torch build; using float32 F.linear")
        return 0
    replaced = 0
    for name, linear in targets:
        if float(linear.weight.detach().abs().max()) > FP16_MAX:  # would overflow: this one stays float32
            logger.info("%s keeps float32 weights (values beyond fp16's range)", name)
            continue
        replace_submodule(model, name, FP16WeightLinear(linear))
        replaced += 1
    logger.info("%d float32 linear layers keep their weights in fp16 (fbgemm, CPU)", replaced)
    return replaced
