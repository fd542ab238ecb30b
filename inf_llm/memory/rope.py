"""Rotary position tables for the context memory: cos/sin rows for the positions InfLLM chooses
(window-relative positions for the local stage, one fixed angle for the global stage).

Computed exactly as transformers' rotary modules do (float32 outer product, cos/sin times the rope's
attention scaling, cast to the activation dtype, `x * cos + rotate_half(x) * sin`), so that positions
0..n-1 reproduce the stock model bit for bit. Knows nothing of transformers beyond `inv_freq`.
"""

from __future__ import annotations

import torch

from inf_llm.kernels.reference import rotate

# Rows precomputed at first use; the table doubles when a larger position is asked for.
INITIAL_ROWS = 4096


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# `x * cos + rotate_half(x) * sin` as transformers computes it: the reference op of the kernels
apply_rotation = rotate


class RotaryTable:
    """cos/sin rows for integer positions, optionally with a base override and position scaling.

    inv_freq: (D/2,) float32, the model's (already including llama3/yarn scaling) unless `base` is given.
    """

    def __init__(
        self,
        inv_freq: torch.Tensor,
        head_dim: int,
        attention_scaling: float = 1.0,
        base: float | None = None,
        distance_scale: float = 1.0,
    ):
        if base is not None:
            exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
            inv_freq = 1.0 / (base ** exponents.to(inv_freq.device))
        self.inv_freq = inv_freq.float()
        self.attention_scaling = float(attention_scaling)
        self.distance_scale = float(distance_scale)
        self._cos = torch.empty(0, head_dim, device=inv_freq.device)
        self._sin = torch.empty(0, head_dim, device=inv_freq.device)
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _ensure(self, rows: int) -> None:
        if rows <= self._cos.shape[0]:
            return
        n = max(INITIAL_ROWS, self._cos.shape[0] * 2, rows)
        positions = torch.arange(n, device=self.inv_freq.device, dtype=torch.int64).float()
        if self.distance_scale != 1.0:
            positions = positions * self.distance_scale
        freqs = torch.outer(positions, self.inv_freq)  # (n, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, D)
        self._cos = emb.cos() * self.attention_scaling
        self._sin = emb.sin() * self.attention_scaling
        self._cast.clear()

    def cos_sin(self, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for positions start..end-1, each (end-start, D) in `dtype`."""
        self._ensure(end)
        if dtype not in self._cast:
            self._cast[dtype] = (self._cos.to(dtype), self._sin.to(dtype))
        cos, sin = self._cast[dtype]
        return cos[start:end], sin[start:end]

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x (..., L, D) rotated to positions start..start+L-1."""
        cos, sin = self.cos_sin(start, start + x.shape[-2], x.dtype)
        return apply_rotation(x, cos, sin)

    def rotate_at(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """x (..., L, D) with every row rotated to the same `position` (InfLLM's global-stage query)."""
        cos, sin = self.cos_sin(position, position + 1, x.dtype)
        return apply_rotation(x, cos, sin)
