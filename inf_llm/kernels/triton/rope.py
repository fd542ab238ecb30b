"""`rotate`: RoPE of (H, L, D) rows, rounding where the torch ops round (bit-identical to
`reference.rotate` in 16-bit dtypes). Knows nothing of positions or of the memory's buffers: the angles
arrive as cos/sin rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inf_llm.kernels.launcher import DirectLauncher
from inf_llm.kernels.triton.common import (
    DTYPES,
    INTERPRETED,
    INTERPRETER_BLOCK,
    cdiv,
    check_device,
    check_tensors,
    device_guard,
    rotated_halves,
)


@triton.jit
def _rotate_kernel(
    X, Cos, Sin, Out, n_rows, stride_xh, stride_xl, stride_cl, stride_sl, stride_oh, stride_ol,
    HALF: tl.constexpr, ONE_ROW: tl.constexpr, BLOCK_L: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """Out = X * cos + rotate_half(X) * sin for BLOCK_L rows of one head. Grid (cdiv(L, BLOCK_L), H); ONE_ROW:
    every row at the same angle (cos/sin row 0).

    Rounds where the torch ops round (`reference.rotate`: each product, then the sum, to X's dtype), so the
    result is bit-identical to the torch path's: a single float32 rounding moved near-tied block lookups of
    the bf16 fast-vs-torch agreement tests. Products of two 16-bit floats are exact in float32, and a float32
    difference of two of them rounded once to 16 bits is what torch's opmath computes."""
    h = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    ok = (rows < n_rows)[:, None]
    r64 = rows[:, None].to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    x_base = X + h * stride_xh + r64 * stride_xl
    x1 = tl.load(x_base + d, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + HALF + d, mask=ok, other=0.0).to(tl.float32)
    angle = r64 * 0 if ONE_ROW else r64
    c_base = Cos + angle * stride_cl
    s_base = Sin + angle * stride_sl
    c1 = tl.load(c_base + d, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_base + HALF + d, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_base + d, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_base + HALF + d, mask=ok, other=0.0).to(tl.float32)
    o_base = Out + h * stride_oh + r64 * stride_ol
    dtype = Out.dtype.element_ty
    o1, o2 = rotated_halves(x1, x2, c1, c2, s1, s2, dtype, INTERPRETER)
    tl.store(o_base + d, o1, mask=ok)
    tl.store(o_base + HALF + d, o2, mask=ok)


# the op launches its kernel through this (see inf_llm.kernels.launcher)
_rotate = DirectLauncher(_rotate_kernel)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin`, as `reference.rotate` and bit-identical to it for 16-bit dtypes, in
    one launch (the torch version is five elementwise launches, each a strided pass over x).

    x (H, L, D) with any strides but a contiguous last dimension (e.g. transformers' transposed q); cos/sin
    (L, D), or (1, D) for one angle for every row. Returns a new contiguous (H, L, D) in x's dtype, or writes
    `out` (H, L, D) of x's dtype, any strides with a contiguous last dimension (e.g. a buffer's slots) and
    not overlapping x, and returns it.
    """
    check_tensors((("x", x, 3), ("cos", cos, 2), ("sin", sin, 2)), "x", x)
    h, length, d = x.shape
    if cos.shape != sin.shape or cos.shape[0] not in (1, length) or cos.shape[1] != d:
        raise ValueError(f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must be ({length} or 1, {d})")
    if d % 2 or (d // 2) & (d // 2 - 1):
        raise ValueError(f"head dim {d} is not supported: need twice a power of two")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    check_device(x.device)
    if out is None:
        out = torch.empty((h, length, d), dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} on {out.device} must be {tuple(x.shape)} "
                         f"{x.dtype} on {x.device}, contiguous in its last dimension")
    if out.numel() == 0:
        return out
    block_l = INTERPRETER_BLOCK if INTERPRETED else 64
    with device_guard(x.device):
        _rotate[(cdiv(length, block_l), h)](
            x, cos, sin, out, length, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
            out.stride(0), out.stride(1),
            HALF=d // 2, ONE_ROW=cos.shape[0] == 1, BLOCK_L=block_l, INTERPRETER=INTERPRETED,
        )
    return out
