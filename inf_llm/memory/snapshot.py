"""Prefix snapshots of one layer's memory: the memory as it was after a conversation's first N tokens, kept
so that a later request starting with those tokens continues from there instead of reading them again.

What a snapshot holds, and what it shares:
- memory blocks: a `BlockShare` of the live store's first blocks, not a copy. Blocks never change once
  formed; when the store is rewound below a share's blocks (another snapshot restored), that share first
  copies just the blocks it would lose (copy on write of the divergent suffix);
- the window (the tail's raw K/V): only the positions its parent snapshot (an earlier snapshot of the same
  conversation) does not hold; the rest are views of the parent's. A question asked on a document's
  snapshot copies the question's tokens, not the document's window;
- the sinks: the parent's when they are complete in both (they never change once full), else a copy;
- the window's key scores: a copy (every query adds to them).
Rotated keys are not kept: a restore re-rotates the window, as loading a saved session does.
Must not know: token ids, the engine, transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inf_llm.memory.buffers import BlockShare, TokenBuffer


@dataclass(frozen=True)
class TailPiece:
    """Raw K/V (H, L, D) of the consecutive positions [first_pos, first_pos + L)."""

    first_pos: int
    k: torch.Tensor
    v: torch.Tensor

    @property
    def end_pos(self) -> int:
        return self.first_pos + self.k.shape[1]


@dataclass
class LayerSnapshot:
    """One layer's memory after `seen` tokens (see the module docstring for what is shared)."""

    seen: int
    n_local: int | None
    rot_base: int | None
    init_k: torch.Tensor  # (H, init_len, D)
    init_v: torch.Tensor
    tail_first_pos: int
    pieces: tuple[TailPiece, ...]  # the window, [tail_first_pos, seen) in order
    scores: torch.Tensor | None  # (score heads, seen - tail_first_pos)
    blocks: BlockShare | None = field(default=None, repr=False)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this snapshot keeps alive, the blocks it reads in place included (byte accounting)."""
        out = [self.init_k, self.init_v, *(t for p in self.pieces for t in (p.k, p.v))]
        if self.scores is not None:
            out.append(self.scores)
        if self.blocks is not None:
            out += self.blocks.store.storages() + self.blocks.private_tensors()
        return out

    def state(self) -> dict:
        """The layer state that `ContextMemory.state()` would have written at this point (to save a snapshot)."""
        state = {"seen": self.seen, "rot_base": self.rot_base, "n_local": self.n_local,
                 "init_k": self.init_k, "init_v": self.init_v,
                 "tail": {"first_pos": self.tail_first_pos,
                          "k": torch.cat([p.k for p in self.pieces], 1) if self.pieces else self.init_k[:, :0],
                          "v": torch.cat([p.v for p in self.pieces], 1) if self.pieces else self.init_v[:, :0]}}
        if self.scores is not None:
            state["tail"]["score"] = self.scores
        if self.blocks is not None:
            k, v, reprs, starts = self.blocks.read_all()
            state["store"] = {"k": k, "v": v, "repr": reprs, "start_pos": starts}
        return state


def take(seen: int, n_local: int | None, rot_base: int | None, init_k: torch.Tensor, init_v: torch.Tensor,
         tail: TokenBuffer, blocks: BlockShare | None, parent: LayerSnapshot | None) -> LayerSnapshot:
    """A snapshot of a layer whose sinks are `init_k/v` (the filled part), window `tail` and blocks `blocks`.
    `parent`: an earlier snapshot of the same conversation (same tokens up to its `seen`), or None."""
    first, end = tail.first_pos, tail.end_pos
    if parent is not None and (parent.seen > seen or parent.tail_first_pos > first):
        raise ValueError("a snapshot's parent must be an earlier state of the same conversation")
    pieces: list[TailPiece] = []
    copied_from = first
    if parent is not None:
        for piece in parent.pieces:  # the same positions hold the same K/V: views, no copy
            lo, hi = max(piece.first_pos, first), min(piece.end_pos, end)
            if lo < hi:
                a, b = lo - piece.first_pos, hi - piece.first_pos
                pieces.append(TailPiece(lo, piece.k[:, a:b], piece.v[:, a:b]))
                copied_from = hi
    if copied_from < end:
        pieces.append(TailPiece(copied_from, tail.keys(copied_from, end).clone(), tail.values(copied_from, end).clone()))
    # sinks fill in order and never change after: as many as the parent's are the parent's
    sinks_shared = parent is not None and parent.init_k.shape[1] == init_k.shape[1]
    return LayerSnapshot(
        seen=seen, n_local=n_local, rot_base=rot_base,
        init_k=parent.init_k if sinks_shared else init_k.clone(),
        init_v=parent.init_v if sinks_shared else init_v.clone(),
        tail_first_pos=first, pieces=tuple(pieces),
        scores=tail.scores(first, end).clone() if tail.score is not None else None,
        blocks=blocks,
    )
