"""What a memory type (`model.type`) keeps and where it puts positions: the one thing the memory's stages,
the static decode step and the engine ask about the type.

`inf-llm`, `stream-llm`, `infinite-lm` and `origin` are one engine with four policies (see
docs/algorithm.md). Knows nothing of tensors or of how the memory stores its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from inf_llm.config import MemoryType, ModelConfig


@dataclass(frozen=True)
class MemoryPolicy:
    """What a memory type keeps and where it puts positions."""

    windowed: bool  # False: plain full attention over everything (origin)
    keeps_blocks: bool  # evicted tokens become retrievable blocks (inf-llm) instead of being dropped
    sink_positions: bool  # sinks rotated at 0..n_init-1 (stream-llm) instead of un-rotated
    global_query_pos: int  # the fixed angle of global-stage queries

    @staticmethod
    def of(cfg: ModelConfig) -> MemoryPolicy:
        t = MemoryType(cfg.type)
        if t is MemoryType.ORIGIN:
            return MemoryPolicy(windowed=False, keeps_blocks=False, sink_positions=False, global_query_pos=0)
        if t is MemoryType.STREAM_LLM:
            return MemoryPolicy(True, False, True, cfg.n_init + cfg.n_local - 1)
        # inf-llm and infinite-lm: memory keys sit at distance ~n_local (code: row n_local - 1).
        return MemoryPolicy(True, t is MemoryType.INF_LLM, False, cfg.n_local - 1)
