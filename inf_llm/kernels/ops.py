"""The ops protocol: every op the context memory calls on its backend, with the signature both backends give
it. `inf_llm.kernels.reference` (torch; the specification, and the CPU path) and `inf_llm.kernels.triton`
(fused GPU kernels) each define all of `Ops` with the same parameter names, kinds and defaults, so a memory
holds either module (chosen once by `get_backend`) and calls it without probing what it has.
`tests/test_ops_protocol.py` checks both backends against `Ops`, and that the memory uses nothing else.

Shapes, dtypes and semantics are each op's docstring in `reference`; docs/kernels.md gives the Triton side
(grids, launches, numerics). Knows no implementation.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import Tensor


class Ops(Protocol):
    """A backend of the context memory's ops (a module: its functions are the methods here, without self)."""

    LOCAL_STAGE_ROWS: int | None
    """Queries per `windowed_attention` call the memory should use: None for one execution block at a time."""

    def windowed_attention(
        self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, window: int | None,
        token_major_out: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """The local stage: causal sliding-window attention, (out, lse)."""

    def window_key_scores(
        self, q: Tensor, k: Tensor, *, scale: float, q_offset: int, window: int | None, lse: Tensor,
        into: Tensor | None = None, check: bool = True,
    ) -> Tensor:
        """The probability mass each key of the local stage receives under the final lse (added to `into`)."""

    def prefix_attention(
        self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, visible: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The host path's global stage: query i sees keys 0 .. visible[i] - 1, (out, lse)."""

    def merge_partials(self, out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
        """Two partials over disjoint key sets merged into one softmax, (out, lse)."""

    def global_stage_into(
        self, q: Tensor, out: Tensor, lse: Tensor, sink_k: Tensor, sink_v: Tensor, store_k: Tensor,
        store_v: Tensor, block_ids: Tensor, rem_k: Tensor, rem_v: Tensor, *, rem_offset: int, scale: float,
        check: bool = True,
    ) -> None:
        """The device path's global stage (sinks, store blocks by id, remainder) merged in place into out/lse."""

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor, out: Tensor | None = None) -> Tensor:
        """RoPE `x * cos + rotate_half(x) * sin` (into `out` when given)."""

    def form_blocks(
        self, keys: Tensor, values: Tensor, scores: Tensor, repr_topk: int, dst_k: Tensor, dst_v: Tensor,
        dst_repr: Tensor, check: bool = True, scales: tuple | None = None,
    ) -> None:
        """New blocks into the store's slots with their representatives (encoded as codes with `scales`)."""

    def refine_topk(
        self, values: Tensor, indices: Tensor, query: Tensor, reprs: Tensor, first: int, k: int, check: bool = True
    ) -> Tensor:
        """Top-k block ids among an earlier top-k and the blocks formed since."""

    def gather_blocks(self, src_k: Tensor, src_v: Tensor, block_ids: Tensor, dst_k: Tensor, dst_v: Tensor) -> None:
        """dst[j, h] = src[block_ids[h or 0, j], h] for K and V."""

    def cache_blocks(
        self, src_k: Tensor, src_v: Tensor, block_ids: Tensor, cache_k: Tensor, cache_v: Tensor, tags: Tensor,
        stamps: Tensor, counters: Tensor, prefetch: bool = False, ring: tuple | None = None, check: bool = True,
        scales: tuple | None = None,
    ) -> Tensor:
        """The selected blocks made resident in the device LRU cache; their slots."""

    def refine_and_cache(
        self, values: Tensor, indices: Tensor, query: Tensor, reprs: Tensor, first: int, k: int, src_k: Tensor,
        src_v: Tensor, cache_k: Tensor, cache_v: Tensor, tags: Tensor, stamps: Tensor, counters: Tensor,
        ring: tuple | None = None, check: bool = True, scales: tuple | None = None,
    ) -> tuple[Tensor, Tensor]:
        """`refine_topk` of a shared top-k, then `cache_blocks` of the ids found, (ids, slots)."""

    def decode_prologue(
        self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, angle: Tensor, write: Tensor,
        tail_k: Tensor, tail_v: Tensor, tail_k_rot: Tensor, tail_score: Tensor,
    ) -> Tensor:
        """The static decode step's rotations and its token's write into the tail; the rotated q."""

    def decode_attention(
        self, q_loc: Tensor, k_loc: Tensor, v_loc: Tensor, q_glb: Tensor, k_glb: Tensor, v_glb: Tensor, *,
        scale: float, global_bias: Tensor | None = None, window: tuple[Tensor, int] | None = None,
        received_into: Tensor | None = None, blocks: tuple | None = None, remainder: tuple | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One decoding query over global and window keys in one softmax, (out, lse, received)."""


# The protocol's members by kind, read from `Ops` (the one list of them).
OPS: tuple[str, ...] = tuple(name for name, member in vars(Ops).items() if inspect.isfunction(member)
                             and not name.startswith("_"))
CONSTANTS: tuple[str, ...] = tuple(inspect.get_annotations(Ops))
