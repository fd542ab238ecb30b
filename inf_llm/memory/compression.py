"""Compressed host copies of memory blocks (`offload_dtype`): fp8 (e4m3) or int8, with float32 scales.

Keys are scaled per channel over a block's tokens (a few channels of a head carry most of the magnitude,
so one scale per block would crush the others), values per token (as KIVI does for a KV cache). A block
is encoded once, on the compute device, when it leaves the window; it is decoded on the compute device
each time the block cache loads it, so host memory and host-to-device traffic both shrink.
The encoding itself is `kernels.reference.encode_codes`, which the fused formation kernel matches bit for bit.
Tensor in, tensor out; knows nothing of lookups or attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inf_llm.kernels.reference import encode_codes


@dataclass(frozen=True)
class BlockCodec:
    """Encode/decode (n, Hkv, block_size, D) blocks to `storage_dtype` plus a float32 scale per group."""

    name: str
    storage_dtype: torch.dtype

    @staticmethod
    def of(name: str) -> "BlockCodec":
        if name == "fp8":
            return BlockCodec(name, torch.float8_e4m3fn)
        if name == "int8":
            return BlockCodec(name, torch.int8)
        raise ValueError(f"unknown offload_dtype {name!r} (use fp8 or int8)")

    def scale_shape(self, block_shape: tuple[int, int, int], keys: bool) -> tuple[int, int, int]:
        """(Hkv, block_size, D) -> the per-block scale shape: per channel for keys, per token for values."""
        heads, tokens, channels = block_shape
        return (heads, 1, channels) if keys else (heads, tokens, 1)

    def encode(self, x: torch.Tensor, keys: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, Hkv, block_size, D) -> (codes in storage_dtype, scales float32 broadcastable to x)."""
        return encode_codes(x, self.storage_dtype, keys)

    @staticmethod
    def decode_into(dst: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """dst (..., block_size, D) in the model dtype <- codes * scale (both already on dst's device)."""
        dst.copy_(codes.float().mul_(scale))
