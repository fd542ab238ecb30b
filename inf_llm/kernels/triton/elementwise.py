"""Fused elementwise layer ops for Llama-family models on a GPU, computed as transformers computes them:

- `rms_norm`: `LlamaRMSNorm.forward` (upcast to float32, mean of squares, times rsqrt(mean + eps), back to
  the input dtype, times the weight) in one launch and one pass over the row, instead of seven elementwise
  kernels with float32 intermediates (about 25 ms per 8,192-token chunk of a Mistral-7B-shaped prefill on
  an H200);
- `silu_mul`: the SwiGLU MLP's `silu(gate) * up` in one pass instead of two (SiLU, then the product: about
  9 ms per chunk there).

Each rounds where the torch ops round (to the 16-bit dtype after every op), so outputs match the stock
modules up to the mean's summation order and the exponential's last bit (rare 1-ulp differences). Not ops
of the attention protocol (`inf_llm.kernels.ops`): knows nothing of models or of the context memory;
`inf_llm.adapter.fused_elementwise` decides which modules use them. Runs on CPU tensors under the Triton
interpreter (tests), like the other families of this package.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inf_llm.kernels.launcher import DirectLauncher
from inf_llm.kernels.triton.common import (
    DTYPES,
    INTERPRETED,
    cdiv,
    check_device,
    device_guard,
    next_pow2,
    reduce_sum,
    round_to,
    rounded,
)

_MAX_COLS = 65536  # one row per program, held in registers
_INTERPRETER_BLOCK_ELEMENTS = 256  # silu_mul under the interpreter: small blocks, so tests cross their edges


@triton.jit
def _rms_norm_kernel(
    X, W, Out, stride_x, stride_o, n_cols, eps,
    BLOCK: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """One row: Out = W * round_x(X * rsqrt(mean(X^2) + eps)), in float32 between the two roundings."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    mean_sq = reduce_sum(x * x, 0, INTERPRETER) / n_cols
    if INTERPRETER:
        inv = 1.0 / tl.sqrt(mean_sq + eps)
    else:
        inv = tl.math.rsqrt(mean_sq + eps)  # the libdevice rsqrtf that torch.rsqrt calls on CUDA
    normed = rounded(x * inv, X.dtype.element_ty, INTERPRETER)  # (a .to() pair would be folded away)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, round_to(w * normed, Out.dtype.element_ty, INTERPRETER), mask=ok)


_rms_norm = DirectLauncher(_rms_norm_kernel)  # see inf_llm.kernels.launcher


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(x.dtype)` for x (..., N), weight (N,).

    Returns a new contiguous tensor of x's shape in the promoted dtype of weight and x (as the torch
    expression gives). Bad input raises ValueError naming the argument."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("x and weight must be tensors")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be ({x.shape[-1] if x.dim() else '?'},) for x "
                         f"{tuple(x.shape)}")
    if x.dtype not in DTYPES or weight.dtype not in DTYPES:
        raise ValueError(f"x / weight must be float16, bfloat16 or float32, got {x.dtype} / {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    n = x.shape[-1]
    if n > _MAX_COLS:
        raise ValueError(f"rows of {n} values are more than the {_MAX_COLS} one program holds")
    check_device(x.device)
    rows = x.reshape(-1, n)
    if rows.numel() and rows.stride(-1) != 1:
        rows = rows.contiguous()
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if out.numel() == 0:
        return out
    block = next_pow2(n)
    warps = {} if INTERPRETED else {"num_warps": 8 if block >= 2048 else 4}
    with device_guard(x.device):
        _rms_norm[(rows.shape[0],)](
            rows, w, out, rows.stride(0), n, n, float(eps), BLOCK=block, INTERPRETER=INTERPRETED, **warps,
        )
    return out


@triton.jit
def _silu_mul_kernel(Gate, Up, Out, n, BLOCK: tl.constexpr, INTERPRETER: tl.constexpr):
    """Out = round(round(silu(Gate)) * Up) over BLOCK elements, silu(x) = x / (1 + exp(-x)) in float32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(Gate + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(Up + offs, mask=ok, other=0.0).to(tl.float32)
    act = rounded(g / (1.0 + tl.exp(-g)), Out.dtype.element_ty, INTERPRETER)
    tl.store(Out + offs, round_to(act * u, Out.dtype.element_ty, INTERPRETER), mask=ok)


_silu_mul = DirectLauncher(_silu_mul_kernel)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`torch.nn.functional.silu(gate) * up` for two tensors of one shape and dtype, in one pass.

    Returns a new contiguous tensor. Bad input raises ValueError naming the argument."""
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise ValueError("gate and up must be tensors")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} on {gate.device} and up {tuple(up.shape)} "
                         f"{up.dtype} on {up.device} must match")
    if gate.dtype not in DTYPES:
        raise ValueError(f"gate / up must be float16, bfloat16 or float32, got {gate.dtype}")
    check_device(gate.device)
    gate, up = gate.contiguous(), up.contiguous()  # no copy for a linear layer's output
    out = torch.empty_like(gate)
    if out.numel() == 0:
        return out
    block = _INTERPRETER_BLOCK_ELEMENTS if INTERPRETED else 2048
    with device_guard(gate.device):
        _silu_mul[(cdiv(out.numel(), block),)](
            gate, up, out, out.numel(), BLOCK=block, INTERPRETER=INTERPRETED,
        )
    return out
