"""Block lookup: which memory blocks an execution block's queries retrieve (the top-k by representative).

One `BlockLookup` per layer, chosen once when the memory is made (`lookup_for`); the memory asks it
`select(...)` per execution block:
- `BlockLookup` (the host paths: blocks on a CPU, or offloaded with the block cache): exact scores of every
  block, one host sync per lookup; with `chunk_topk_calc`, a call's lookups scored in batches (the same
  selection).
- `FaissLookup` (faiss: true): the exact top-k from faiss indexes on the host.
- `DeviceLookup` (blocks on the device, or offload_access: direct): ids stay on the device, a call's lookups
  in one batch refined per execution block (`refine`, which the memory supplies: with direct it also makes
  the blocks resident).
`perhead` is a parameter of each: every KV head (every query head with lookup_heads: query) selects its own.
Each also keeps the record of what was selected (`retrieved`, the per-block counts).
Knows nothing of attention, staging or where blocks live (beyond the store's representatives).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from inf_llm.config import ModelConfig
from inf_llm.errors import ConfigError, MissingDependencyError
from inf_llm.memory.buffers import BlockStore
from inf_llm.memory.rope import RotaryTable

# Device-path lookups whose selections are added to the retrieval counts together (see flush_counts).
COUNT_BATCH = 64
# block_score: attention while decoding: the blocks a full scoring keeps as the next steps' candidates, per topk
DECODE_CANDIDATES_PER_TOPK = 4


@dataclass
class LookupBatch:
    """Batched lookups of several execution blocks (chunk_topk_calc): top-k over the blocks existing when
    the batch was scored; blocks formed later are scored individually and merged (exact)."""

    first_block: int  # index of the first execution block of the batch
    known_blocks: int  # blocks that existed when scored
    values: torch.Tensor  # (n_exec, Hsel, k) scores of the top-k among known blocks
    indices: torch.Tensor  # (n_exec, Hsel, k)
    query_vectors: torch.Tensor  # (n_exec, Hsel, Hr*D or D): to score blocks formed later
    rows: tuple | None = None  # device path: (values, indices, query_vectors) unbound per execution block


class BlockLookup:
    """The host paths' lookup of one layer: exact top-k over every block (sorted host lists), or batched
    (chunk_topk_calc) for a call with several execution blocks."""

    def __init__(self, cfg: ModelConfig, store: BlockStore | None, rope: RotaryTable, heads: tuple[int, int, int],
                 head_dim: int, repr_dtype: torch.dtype, global_query_pos: int, exc: int | None,
                 device: torch.device):
        """`heads`: (query heads, KV heads as stored, score heads: those of the representatives)."""
        self.cfg, self.store, self.rope = cfg, store, rope
        hq, self.hkv, self.score_heads = heads
        self.group, self.d = hq // self.hkv, head_dim
        self.repr_dtype, self.global_query_pos, self.exc, self.device = repr_dtype, global_query_pos, exc, device
        # block_score: attention scores a block by its keys, each query head by its own mean query
        self.by_attention = cfg.block_score == "attention"
        self.sum_groups = self.score_heads == self.hkv and not self.by_attention
        if self.by_attention and store is not None and store.k.device.type != torch.device(device).type:
            raise ConfigError(f"model.block_score: attention reads every stored key per lookup, so the blocks must "
                              f"be on the compute device ({device}), not offloaded to {store.k.device}: set "
                              f"model.offload: false or block_score: representative")
        # Lookups of the last forward, as selected: host lists (host paths) or device id tensors (device path);
        # read through `retrieved_last` / `retrieval_counts`, which convert once, when asked.
        self.retrieved: list = []
        self.counts: dict[int, int] = {}  # block id -> execution blocks that selected it (host paths)
        self.device_counts: torch.Tensor | None = None  # the same, counted on the device (device path)
        self.uncounted: list[torch.Tensor] = []  # device path: selections not yet added to device_counts
        self.batch: LookupBatch | None = None
        self.call_qvecs: torch.Tensor | None = None  # (n_exec, Hsel, X): the call's lookup vectors, if batched
        # block_score: attention while decoding (block_score_refresh): the last full scoring's best blocks and
        # the blocks formed since, the block count they cover, and the steps scored since the full scoring
        self.candidates: torch.Tensor | None = None
        self.candidates_cover, self.steps_since_full = 0, 0

    def start(self) -> None:
        """A forward pass begins: its lookups are recorded afresh, no batch is scored yet."""
        self.retrieved, self.batch, self.call_qvecs = [], None, None

    def prepare(self, q_glb: torch.Tensor, bounds: list[tuple[int, int]], start: int) -> None:
        """The lookup vectors of every execution block of a call at once (see `query_vectors`): its lookups
        are then scored in batches."""
        self.call_qvecs = self.query_vectors(q_glb, bounds, start)

    def added(self, n: int) -> None:
        """The store's last `n` blocks were just formed (an index on the host would take them in)."""

    def reset(self) -> None:
        """The store's contents were replaced (a session loaded): nothing selected or counted before holds."""
        self.start()
        self.reset_counts()
        self.candidates = None

    def decode_attention_topk(self, qvec: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """block_score: attention, one decode step's top-k ids (1, k) in score order: every block scored once
        per `block_score_refresh` steps, which keeps its 4 * topk best as candidates; the steps between score
        the candidates and the blocks formed since. Consecutive steps of an answer seek the same few blocks,
        and a step reading 64 candidate blocks instead of all of them keeps decoding the cost it was."""
        topk, refresh = self.cfg.topk, self.cfg.block_score_refresh
        if self.candidates is None or self.steps_since_full >= refresh:
            scores = self.block_scores(qvec, 0, n_blocks)  # (1, N)
            keep = min(n_blocks, DECODE_CANDIDATES_PER_TOPK * topk)
            self.candidates = scores.topk(keep, dim=-1).indices[0]
            self.candidates_cover, self.steps_since_full = n_blocks, 1
            return scores.topk(topk, dim=-1).indices
        if n_blocks > self.candidates_cover:  # blocks formed since are candidates too
            fresh = torch.arange(self.candidates_cover, n_blocks, device=self.candidates.device)
            self.candidates = torch.cat([self.candidates, fresh])
            self.candidates_cover = n_blocks
        self.steps_since_full += 1
        keys = self.store.read(0, n_blocks)[0]  # a view, or every block decoded with a codec
        scores = self._attention(qvec, keys.index_select(0, self.candidates.to(keys.device)))  # (1, M)
        return self.candidates[scores.topk(topk, dim=-1).indices.to(self.candidates.device)]

    def select(self, qb: torch.Tensor, index: int, q_rotated: torch.Tensor | None = None
               ) -> list[list[int]] | torch.Tensor | None:
        """Top-k block ids for the execution block `index` of the call (queries qb (Hq, Lq, D), un-rotated): one
        sorted host list, or Hkv lists with perhead; None before the first block or with topk: 0. On the
        device path a (1 or Hkv, k) int64 tensor of ids on the device instead (in score order: the kernels
        do not care about the order, and a sort cost a launch per lookup)."""
        n_blocks = self.store.count
        if qb.shape[1] > 1:
            self.candidates = None  # a prompt: the next decode step scores every block
        if n_blocks == 0:
            return None
        topk = self.cfg.topk
        heads = self.hkv if self.cfg.perhead else 1
        if n_blocks <= topk or (self.cfg.dense_decoding and qb.shape[1] == 1):
            ids = [list(range(n_blocks))] * heads
        elif topk == 0:
            self._record([[]])
            return None
        elif self.call_qvecs is not None:
            ids = self._batched_select(index)
        elif self.by_attention and qb.shape[1] == 1:
            ids = self.decode_attention_topk(self.query_vector(qb, q_rotated), n_blocks).sort(dim=-1).values.tolist()
        else:
            ids = self._exact(self.query_vector(qb, q_rotated), n_blocks)
        self._record(ids)
        return ids

    def _exact(self, qvec: torch.Tensor, n_blocks: int) -> list[list[int]]:
        """The top-k of one lookup vector (Hsel, X) over every block, sorted host lists."""
        scores = self.block_scores(qvec, 0, n_blocks)  # (Hsel, N)
        # host sync: the ids drive the gather
        return scores.topk(self.cfg.topk, dim=-1).indices.sort(dim=-1).values.tolist()

    def _batched_select(self, index: int) -> list[list[int]]:
        """chunk_topk_calc: score the execution blocks of `chunk_topk_calc` tokens in one matmul and one host
        sync. Blocks formed after the batch was scored are merged in exactly (the overall top-k is inside
        old top-k plus new blocks), so the selection equals the per-block lookup."""
        topk, n_blocks = self.cfg.topk, self.store.count
        batch = self.batch
        if batch is None or index >= batch.first_block + batch.values.shape[0]:
            per_batch = max(1, self.cfg.chunk_topk_calc // self.cfg.exc_block_size)
            qvecs = self.call_qvecs[index : index + per_batch]  # (n, Hsel, X)
            scores = self.block_scores(qvecs, 0, n_blocks)  # (n, Hsel, N)
            values, indices = scores.topk(min(topk, n_blocks), dim=-1)
            # host sync: once per batch of execution blocks
            batch = LookupBatch(index, n_blocks, values.cpu(), indices.cpu(), qvecs)
            self.batch = batch
        j = index - batch.first_block
        values, ids = batch.values[j], batch.indices[j]  # (Hsel, k)
        if n_blocks > batch.known_blocks:
            fresh = self.block_scores(batch.query_vectors[j], batch.known_blocks, n_blocks).cpu()  # host sync
            fresh_ids = torch.arange(batch.known_blocks, n_blocks).expand(fresh.shape[0], -1)
            values, ids = torch.cat([values, fresh], dim=-1), torch.cat([ids, fresh_ids], dim=-1)
            ids = ids.gather(-1, values.topk(topk, dim=-1).indices)
        return ids.sort(dim=-1).values.tolist()

    def _record(self, ids_per_head: list[list[int]]) -> None:
        flat = sorted({i for ids in ids_per_head for i in ids})
        self.retrieved.append(flat)
        for i in flat:
            self.counts[i] = self.counts.get(i, 0) + 1

    def query_vector(self, qb: torch.Tensor, q_rotated: torch.Tensor | None = None) -> torch.Tensor:
        """Lookup vector of an execution block: the mean of its un-rotated queries rotated to the global
        angle (rotation is linear), heads of each KV group summed (lookup_heads: kv) or one per query head
        (query, or block_score: attention). (1, Hr*D) (Hr = score_heads, Hq with block_score: attention),
        or (Hkv, D) with perhead.
        `q_rotated`: one query already rotated to the global angle in the representatives' dtype."""
        if q_rotated is None:
            q_mean = qb.to(self.repr_dtype)
            q_rotated = self.rope.rotate_at(q_mean if qb.shape[1] == 1 else q_mean.mean(dim=1, keepdim=True),
                                            self.global_query_pos)
        per_head = q_rotated[:, 0]  # (Hq, D)
        if self.sum_groups:
            per_head = per_head.view(self.hkv, self.group, self.d).sum(dim=1)  # (Hkv, D)
        return per_head if self.cfg.perhead else per_head.reshape(1, -1)

    def query_vectors(self, q_glb: torch.Tensor, bounds: list[tuple[int, int]], start: int) -> torch.Tensor:
        """`query_vector` of every execution block of a call, (n, Hsel, X), in a few ops, from the call's
        queries already rotated to the global angle (rotation is linear: the mean of rotated queries is the
        rotated mean, up to their rounding, as the original averages its rotated global queries). Means in
        the representatives' precision, read straight from the contiguous q_glb: converting q first cost a
        full float32 copy of it per layer. Runs of full blocks by one reshaped mean, a partial first or last
        block by its own."""
        means, k = [], 0
        while k < len(bounds):
            j = k
            while j < len(bounds) and bounds[j][1] - bounds[j][0] == self.exc:
                j += 1
            if j > k:  # blocks k..j-1 are full: (Hq, j-k, D)
                rows = q_glb[:, bounds[k][0] - start : bounds[j - 1][1] - start]
                means.append(rows.unflatten(1, (j - k, self.exc)).mean(dim=2, dtype=self.repr_dtype))
                k = j
            else:
                s, e = bounds[k]
                means.append(q_glb[:, s - start : e - start].mean(dim=1, keepdim=True, dtype=self.repr_dtype))
                k += 1
        mean = means[0] if len(means) == 1 else torch.cat(means, dim=1)  # (Hq, n, D)
        if self.sum_groups:
            mean = mean.view(self.hkv, self.group, len(bounds), self.d).sum(dim=1)  # (Hkv, n, D)
        per_head = mean.transpose(0, 1)  # (n, Hr, D)
        return per_head if self.cfg.perhead else per_head.reshape(len(bounds), 1, -1)

    def block_scores(self, qvec: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Scores (..., Hsel, last-first) of blocks [first, last) for query vectors qvec (..., Hsel, X)."""
        if self.by_attention:
            return self.attention_scores(qvec, first, last)
        reprs = self.store.representatives()[first:last]  # (N, Hr*D), float32 (float64 in float64 tests)
        if self.cfg.perhead:
            return torch.einsum("...hd,nhd->...hn", qvec, reprs.view(-1, self.hkv, self.d))
        # (N, X) @ (X, Hsel): a GEMV for cuBLAS (as qvec @ reprs.T, an m=1 GEMM, it took 56 us on an H200);
        # one lookup vector through torch.mv, which dispatches in less host time than matmul
        if qvec.dim() == 2:
            return torch.mv(reprs, qvec[0]).unsqueeze(0)  # (1, N)
        return (reprs @ qvec.mT).mT  # (..., 1, N)

    def attention_scores(self, qvec: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """block_score: attention: (..., 1, last-first) the attention mass blocks [first, last) would take from
        per-query-head lookup vectors qvec (..., 1, Hq*D): per query head the log-sum-exp of its scaled logits
        over the block's keys (stored un-rotated: the global stage's angle), summed over query heads. A fact
        stated once in natural text is a few keys of one block; the mean of a block's 4 most-attended keys
        (the representative) dilutes them among ~500 blocks of similar prose, the exact mass does not."""
        return self._attention(qvec, self.store.read(first, last)[0])

    def slot_scores(self, qvec: torch.Tensor) -> torch.Tensor:
        """(1, capacity): one lookup vector's scores of every slot of the store, formed or not (the fixed-shape
        decode step's lookup, which masks the slots past the block count itself)."""
        if self.by_attention:
            return self._attention(qvec, self.store.read(0, self.store.k.shape[0])[0])
        return torch.mv(self.store.repr, qvec[0]).unsqueeze(0)

    def _attention(self, qvec: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`attention_scores` of the blocks whose keys are `keys` (N, Hkv, bs, D)."""
        lead = qvec.shape[:-2]
        q = qvec.reshape(-1, 1, self.hkv, self.group, self.d).to(keys.dtype)  # (B, 1, Hkv, g, D)
        # (1, N, Hkv, bs, D) @ (B, 1, Hkv, D, g): per block and KV head one small product, no copy of the keys
        logits = torch.matmul(keys.unsqueeze(0), q.transpose(-1, -2))  # (B, N, Hkv, bs, g)
        lse = logits.to(self.repr_dtype).mul_(self.d**-0.5).logsumexp(dim=3)  # (B, N, Hkv, g), float32 at least
        return lse.sum(dim=(2, 3)).reshape(*lead, 1, -1)

    def batch_topk(self, n_blocks: int) -> LookupBatch:
        """The call's lookups over the blocks existing now: one matmul and one top-k (device path)."""
        scores = self.block_scores(self.call_qvecs, 0, n_blocks)  # (n_exec, Hsel, N)
        values, indices = scores.topk(self.cfg.topk, dim=-1)
        rows = (values.unbind(0), indices.unbind(0), self.call_qvecs.unbind(0))  # views in three calls
        self.batch = LookupBatch(0, n_blocks, values, indices, self.call_qvecs, rows)
        return self.batch

    def flush_counts(self, force: bool = False) -> None:
        """Device path: add the pending selections to the per-block counts, on the device (a block counts
        once per execution block, whatever the heads), a few ops per COUNT_BATCH selections (or when the
        counts are read): decoding would otherwise pay three launches per layer and step."""
        if len(self.uncounted) < COUNT_BATCH and not (force and self.uncounted):
            return
        selections, self.uncounted = self.uncounted, []
        n_blocks = self.store.count
        if self.device_counts is None or self.device_counts.shape[0] < n_blocks:
            self.grow_counts(max(2 * n_blocks, 64))
        if all(ids.shape[0] == 1 for ids in selections):  # one id list per execution block: no duplicates
            flat = torch.cat([ids[0] for ids in selections])
            # index_add_ (atomic adds): index_put_(accumulate=True) sorts the indices and waits for the device
            # (a sync that cost the prefill its overlap of host and GPU, every 64 lookups of every layer)
            ones = torch.ones(flat.shape, dtype=torch.int32, device=flat.device)
            self.device_counts.index_add_(0, flat, ones)
            return
        for ids in selections:  # perhead: a block selected by several heads counts once
            hit = torch.zeros(n_blocks, dtype=torch.int32, device=ids.device).index_fill_(0, ids.flatten(), 1)
            self.device_counts[:n_blocks] += hit

    def grow_counts(self, size: int) -> None:
        """The device path's per-block counts with room for `size` blocks, the counts so far kept."""
        grown = torch.zeros(size, dtype=torch.int32, device=self.device)
        if self.device_counts is not None:
            grown[: self.device_counts.shape[0]] = self.device_counts
        self.device_counts = grown

    @property
    def retrieved_last(self) -> list[list[int]]:
        """Block ids selected by each execution block of the last forward (sorted, heads merged)."""
        return [ids if isinstance(ids, list) else sorted(set(ids.flatten().tolist())) for ids in self.retrieved]

    def retrieval_counts(self) -> dict[int, int]:
        """Block id -> execution blocks that selected it, since the last `reset_counts`."""
        counts = dict(self.counts)
        # counts made by forwards in inference mode are inference tensors: updated in that mode only
        with torch.inference_mode(self.device_counts is not None and self.device_counts.is_inference()):
            self.flush_counts(force=True)
        if self.device_counts is not None:
            hits = self.device_counts[: self.store.count].tolist()  # host copy, only when asked
            for block, n in enumerate(hits):
                if n:
                    counts[block] = counts.get(block, 0) + int(n)
        return counts

    def reset_counts(self) -> None:
        self.counts.clear()
        self.device_counts = None
        self.uncounted.clear()


class FaissLookup(BlockLookup):
    """faiss: true: a single lookup's exact top-k from inner-product indexes on the host (one per KV head with
    perhead), fed each block's representative as it forms. Batched lookups (chunk_topk_calc) score the
    store's representatives as the host path does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        perhead = self.cfg.perhead
        self.indexes = _new_faiss_index(self.hkv * self.d if not perhead else self.d, self.hkv if perhead else 1)

    def _exact(self, qvec: torch.Tensor, n_blocks: int) -> list[list[int]]:
        import numpy as np  # with faiss only

        indexes, topk = self.indexes, self.cfg.topk
        result = []
        for h, index in enumerate(indexes):
            query = np.ascontiguousarray(qvec[h : h + 1].detach().cpu().numpy().astype("float32"))  # host sync
            _, ids = index.search(query, topk)
            result.append(sorted(int(i) for i in ids[0]))
        return result

    def _add(self, representative: torch.Tensor) -> None:
        vec = representative.float().detach().cpu().numpy()  # host sync: faiss lives on the host
        if self.cfg.perhead:
            for h, index in enumerate(self.indexes):
                index.add(vec[None, h * self.d : (h + 1) * self.d])
        else:
            self.indexes[0].add(vec[None])

    # ---------------------------------------------------------------------------------------- sessions

    def added(self, n: int) -> None:
        for representative in self.store.repr[self.store.count - n : self.store.count]:
            self._add(representative)

    def reset(self) -> None:
        super().reset()
        for index in self.indexes:
            index.reset()
        for i in range(self.store.count):
            self._add(self.store.repr[i])


def _new_faiss_index(dim: int, count: int) -> list:
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(
            "model.faiss: true needs the faiss package (pip install faiss-cpu), or set model.faiss=false"
        ) from exc
    return [faiss.IndexFlatIP(dim) for _ in range(count)]


# refine(values, indices, query, reprs, first, k) -> ids (1 or Hsel, k): a batch row's top-k merged with
# blocks [first, ...) (the ops' refine_topk, or with offload_access: direct refine_and_cache)
Refine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


class DeviceLookup(BlockLookup):
    """The device path's lookup: top-k ids stay on the device (never read by the host, so a forward pass
    makes no host sync), counted on the device in batches."""

    def __init__(self, *args, refine: Refine, **kwargs):
        super().__init__(*args, **kwargs)
        self.refine = refine

    def select(self, qb: torch.Tensor, index: int, q_rotated: torch.Tensor | None = None
               ) -> list[list[int]] | torch.Tensor | None:
        n_blocks = self.store.count
        if n_blocks == 0 or self.cfg.topk == 0:  # nothing to select: as the host path
            return super().select(qb, index, q_rotated)
        if qb.shape[1] > 1:
            self.candidates = None  # a prompt: the next decode step scores every block
        return self._select_on_device(qb, n_blocks, self.hkv if self.cfg.perhead else 1, q_rotated, index)

    def _select_on_device(self, qb: torch.Tensor, n_blocks: int, heads: int, q_rotated: torch.Tensor | None = None,
                          index: int = 0) -> torch.Tensor:
        if n_blocks <= self.cfg.topk or (self.cfg.dense_decoding and qb.shape[1] == 1):
            ids = torch.arange(n_blocks, device=self.store.repr.device).expand(heads, -1)
        elif self.call_qvecs is not None:
            ids = self._batched_select_on_device(index, n_blocks)
        elif self.by_attention and qb.shape[1] == 1:
            ids = self.decode_attention_topk(self.query_vector(qb, q_rotated), n_blocks)
        else:
            qvec = self.query_vector(qb, q_rotated)
            ids = self.block_scores(qvec, 0, n_blocks).topk(self.cfg.topk, dim=-1).indices  # (Hsel, k)
        self.retrieved.append(ids)
        self.uncounted.append(ids)  # counted in batches by flush_counts
        return ids

    def _batched_select_on_device(self, index: int, n_blocks: int) -> torch.Tensor:
        """Device path, execution block `index` of a call: the call's lookups score the blocks that exist
        at its first lookup in one matmul and one top-k; each execution block then refines its row with
        the blocks formed since (`refine`: `ops.refine_topk`, one launch; exact, as in _batched_select). A
        lookup per execution block was a GEMV and a top-k of several launches each, in every layer."""
        topk, batch = self.cfg.topk, self.batch
        if batch is None:
            batch = self.batch_topk(n_blocks)
        values, indices, query = (part[index] for part in batch.rows)
        if n_blocks == batch.known_blocks:
            return indices
        if self.by_attention:  # the ops' refine scores representatives: the fresh blocks are merged here, and
            # refine only takes the result (no blocks left to score; with direct it makes them resident)
            fresh = self.attention_scores(query, batch.known_blocks, n_blocks)  # (1, fresh)
            fresh_ids = torch.arange(batch.known_blocks, n_blocks, device=indices.device).expand_as(fresh)
            values, indices = torch.cat([values, fresh], dim=-1), torch.cat([indices, fresh_ids], dim=-1)
            values, best = values.topk(topk, dim=-1)
            indices, batch_end = indices.gather(-1, best), n_blocks
        else:
            batch_end = batch.known_blocks
        return self.refine(values, indices, query, self.store.representatives(), batch_end, topk)


def lookup_for(cfg: ModelConfig, store: BlockStore | None, on_device: bool, refine: Refine, *args) -> BlockLookup:
    """The lookup of a memory: on the device, with faiss, or the host's (also for memories without blocks,
    which never select); `args` as `BlockLookup`'s after the store."""
    if store is not None and on_device:
        return DeviceLookup(cfg, store, *args, refine=refine)
    if store is not None and cfg.faiss:
        return FaissLookup(cfg, store, *args)
    return BlockLookup(cfg, store, *args)
