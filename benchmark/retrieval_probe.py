"""Why a needle is missed: is its memory block not retrieved, or retrieved and not used?

Runs RULER's single-needle cases (benchmark/ruler.py, natural-text haystacks) in-process and watches every
block lookup of every layer (the host lookup paths: CPU, or a GPU with host lookups). Per case it records
where the needle's blocks ranked among all blocks for the question's own lookup (the last execution block of
the prefill, which holds the question) and for each decode step, and whether the answer was right. With
`--oracle all` the lookups are also made to include the needle's blocks (in place of the lowest-scored selected
ones): the answer a perfect retrieval would give with the same memory, positions and attention; with
`--oracle question` only the lookups of the question's own execution block and of the decode steps are.

    python -m benchmark.retrieval_probe --lengths 4k --cases 10 \\
        --variant memory=model.full_attention_tokens=null --oracle all --out benchmark/results/probe.json

Columns: `found` answers right; `question hit` the share of layers whose question lookup selected a needle
block; `decode hit` the same over the first decode steps' lookups; `rank` the needle block's best rank (over
heads) in those lookups (0 = the highest score), each case's median, averaged over cases. A low hit with a right oracle answer means retrieval
is what fails; a high hit (or the oracle) still wrong means the model does not use what it is given.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmark/retrieval_probe.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark import ruler

TASK = "niah_single_number"
DECODE_STEPS = 8  # decode lookups counted per layer: the answer's first tokens carry the digits


@dataclass
class Lookup:
    layer: int
    queries: int  # queries of the looked-up execution block (1: a decode step)
    rank: int | None  # best rank of a needle block over heads (None: no needle block formed yet)
    hit: bool  # a needle block was selected
    alt: dict[str, int] = field(default_factory=dict)  # --alt-scores: the needle's rank under each other score


def alternative_scores(lookup, qb) -> dict:
    """Block scores (N,) other than the served one, for the same lookup: which score would rank the needle
    first? Queries rotated to the global angle against the stored (un-rotated) keys, as the attention sees
    them; each query head against its KV head, summed over query heads.
    - `max-key`: a block's highest logit over all its keys for the mean query (the exact max, not 4 keys' mean)
    - `lse-key`: the attention mass the block would take (log-sum-exp of its logits) for the mean query
    - `bound`: Quest's upper bound from the block's per-channel key minimum and maximum, mean query
    - `mass-sum` / `mass-max`: the share of a head's attention over all blocks that the block would take
      (mean query), summed / the largest over query heads (a few sharp heads outvote many flat ones)
    - `last-query`: `max-key` for the block's last query alone (the token the answer follows)
    - `max-query`: each query's `max-key`, the highest over the execution block's queries
    - `lse-query`: each query's `lse-key`, the highest over the execution block's queries"""
    import torch

    store = lookup.store
    n = store.count
    keys, _ = store.read(0, n)  # (N, Hkv, bs, D)
    keys = keys.float().repeat_interleave(lookup.group, dim=1)  # (N, Hq, bs, D)
    q = lookup.rope.rotate_at(qb.float(), lookup.global_query_pos)  # (Hq, Lq, D)
    scale = lookup.d ** -0.5

    def max_key(qv):  # qv (Hq, D) -> (N,)
        return torch.einsum("hd,nhtd->nht", qv, keys).amax(dim=-1).sum(dim=-1)

    qm = q.mean(dim=1)
    logits = torch.einsum("hd,nhtd->nht", qm, keys)
    bound = torch.maximum(qm[None] * keys.amin(dim=2), qm[None] * keys.amax(dim=2)).sum(dim=(1, 2))
    lse = (logits * scale).logsumexp(dim=-1)  # (N, Hq)
    mass = (lse - lse.logsumexp(dim=0, keepdim=True)).exp()  # (N, Hq): each head's attention share per block
    scores = {"max-key": logits.amax(dim=-1).sum(dim=-1), "lse-key": lse.sum(dim=-1), "bound": bound,
              "mass-sum": mass.sum(dim=-1), "mass-max": mass.amax(dim=-1), "last-query": max_key(q[:, -1])}
    if q.shape[1] > 1:
        per_query = torch.einsum("hld,nhtd->lnht", q, keys)  # (Lq, N, Hq, bs)
        scores["max-query"] = per_query.amax(dim=-1).sum(dim=-1).amax(dim=0)
        scores["lse-query"] = (per_query * scale).logsumexp(dim=-1).sum(dim=-1).amax(dim=0)
    return scores


@dataclass
class Probe:
    """Watches BlockLookup.select: the lookups of one generation, and (oracle) forces the needle's blocks in."""

    needle: tuple[int, int] = (0, 0)  # token positions [start, end) of the needle sentence
    oracle: bool = False
    alt_scores: bool = False  # also rank the needle under `alternative_scores`
    topk: int = 0  # the lookups' topk (a rank below it is selected)
    masses: list = field(default_factory=list)  # (layer, queries, mass-sum scores, needle blocks) per lookup
    # "all": every lookup once the needle's blocks exist; "question": only the question's own execution
    # block (the one ending the prompt) and the decode steps
    scope: str = "all"
    prompt_tokens: int = 0
    lookups: list[Lookup] = field(default_factory=list)
    layers: dict[int, int] = field(default_factory=dict)  # id(lookup) -> layer index, by first use
    block_end: int = 0  # end position of the execution block being looked up (set by `watching`)

    def needle_blocks(self, lookup) -> list[int]:
        store, size = lookup.store, lookup.cfg.block_size
        s, e = self.needle
        return [b for b in range(store.count) if store.start_pos[b] < e and store.start_pos[b] + size > s]

    def observe(self, lookup, qb, index: int, q_rotated, ids):
        layer = self.layers.setdefault(id(lookup), len(self.layers))
        # the prefill stops one token short: the last prompt token is the first decode step
        in_question = qb.shape[1] == 1 or self.block_end >= self.prompt_tokens - 1
        if not isinstance(ids, list) or len(ids[0]) >= lookup.store.count:
            return ids  # no lookup made (every block taken) or a device path
        blocks = self.needle_blocks(lookup)
        if not blocks:
            self.lookups.append(Lookup(layer, qb.shape[1], None, False))
            return ids
        qvec = lookup.call_qvecs[index] if lookup.call_qvecs is not None else lookup.query_vector(qb, q_rotated)
        scores = lookup.block_scores(qvec, 0, lookup.store.count)  # (Hsel, N)
        order = scores.argsort(dim=-1, descending=True).tolist()
        rank = min(row.index(b) for row in order for b in blocks)
        hit = any(b in head for head in ids for b in blocks)
        alt = {}
        if self.alt_scores and in_question:  # the question's and decode steps' lookups only: it reads every key
            for name, score in alternative_scores(lookup, qb).items():
                order_alt = score.argsort(descending=True).tolist()
                alt[name] = min(order_alt.index(b) for b in blocks)
                if name == "mass-sum":  # for the layers' votes (see `layer_votes`)
                    self.masses.append((layer, qb.shape[1], score, blocks))
        self.topk = lookup.cfg.topk
        self.lookups.append(Lookup(layer, qb.shape[1], rank, hit, alt))
        if not self.oracle or (self.scope == "question" and not in_question):
            return ids
        keep = lookup.cfg.topk - len(blocks)
        return [sorted(blocks + [b for b in row if b not in blocks][:keep]) for row in order]

    def layer_votes(self, question: list[Lookup], decode: list[Lookup]) -> None:
        """What one selection shared by the layers would rank, from every layer's `mass-sum` of the same lookup
        (the question's block, or one decode step): `layers-mass` sums all 30 layers' (one rank per lookup,
        given to each layer), `layers-causal` gives layer L the sum over layers 0..L (what a layer could use
        without a second pass)."""
        groups: dict[tuple[int, int], list] = {}  # (queries > 1, step) -> [(layer, scores, blocks)]
        steps: dict[int, int] = {}
        for layer, queries, score, blocks in self.masses:
            if queries > 1:
                key = (1, 0)
            else:
                key = (0, steps.get(layer, 0))
                steps[layer] = key[1] + 1
            groups.setdefault(key, []).append((layer, score, blocks))
        by_layer = {(lk.layer, 1 if lk.queries > 1 else 0): [] for lk in question + decode}
        for lk in question + decode:
            by_layer[(lk.layer, 1 if lk.queries > 1 else 0)].append(lk)
        for (is_question, step), members in groups.items():
            members.sort(key=lambda m: m[0])
            n = min(len(m[1]) for m in members)
            total = sum(m[1][:n] for m in members)
            blocks = [b for b in members[-1][2] if b < n]
            if not blocks:
                continue
            full = min(total.argsort(descending=True).tolist().index(b) for b in blocks)
            running = 0
            for layer, score, _ in members:
                running = running + score[:n]
                causal = min(running.argsort(descending=True).tolist().index(b) for b in blocks)
                items = by_layer.get((layer, is_question), [])
                target = items[-1] if is_question and items else (items[step] if step < len(items) else None)
                if target is not None:
                    target.alt["layers-mass"], target.alt["layers-causal"] = full, causal

    def summary(self) -> dict:
        """The question's lookup (the last prefill lookup of each layer) and the first decode lookups."""
        question: dict[int, Lookup] = {}
        decode: list[Lookup] = []
        steps: dict[int, int] = {}
        for lk in self.lookups:
            if lk.queries > 1:
                question[lk.layer] = lk
            elif steps.get(lk.layer, 0) < DECODE_STEPS:
                steps[lk.layer] = steps.get(lk.layer, 0) + 1
                decode.append(lk)

        def share(items: list[Lookup]) -> float | None:
            ranked = [lk for lk in items if lk.rank is not None]
            return round(sum(lk.hit for lk in ranked) / len(ranked), 3) if ranked else None

        def median_rank(items: list[Lookup]) -> float | None:
            ranks = [lk.rank for lk in items if lk.rank is not None]
            return statistics.median(ranks) if ranks else None

        q = list(question.values())
        by_layer: dict[int, list[int]] = {}
        for lk in decode:
            if lk.rank is not None:
                by_layer.setdefault(lk.layer, []).append(lk.rank)
        self.layer_votes(q, decode)
        alt = {}
        for name in sorted({n for lk in q + decode for n in lk.alt}):
            qr, dr = ([lk.alt[name] for lk in items if name in lk.alt] for items in (q, decode))
            alt[name] = {"question_rank": statistics.median(qr) if qr else None,
                         "decode_rank": statistics.median(dr) if dr else None,
                         "question_hit": round(sum(r < self.topk for r in qr) / len(qr), 3) if qr else None,
                         "decode_hit": round(sum(r < self.topk for r in dr) / len(dr), 3) if dr else None}
        return {"alt": alt, "question_hit": share(q), "decode_hit": share(decode), "question_rank": median_rank(q),
                "decode_rank": median_rank(decode),
                # per layer: the needle's rank in the question's lookup, and its median over the decode steps
                "question_ranks": [question[i].rank if i in question else None for i in range(len(self.layers))],
                "decode_ranks": [statistics.median(by_layer[i]) if i in by_layer else None
                                 for i in range(len(self.layers))]}


@contextlib.contextmanager
def watching(probe: Probe) -> Iterator[Probe]:
    from inf_llm.memory.context_memory import ContextMemory
    from inf_llm.memory.lookup import BlockLookup

    original, global_keys = BlockLookup.select, ContextMemory._global_keys

    def select(self, qb, index, q_rotated=None):
        return probe.observe(self, qb, index, q_rotated, original(self, qb, index, q_rotated))

    def watched_global_keys(self, qb, s, e, *args, **kwargs):  # the execution block [s, e) about to look up
        probe.block_end = e
        return global_keys(self, qb, s, e, *args, **kwargs)

    BlockLookup.select, ContextMemory._global_keys = select, watched_global_keys
    try:
        yield probe
    finally:
        BlockLookup.select, ContextMemory._global_keys = original, global_keys


def needle_span(tokenizer, text: str, case: ruler.Case) -> tuple[int, int]:
    """Token positions [start, end) of the needle sentence holding the case's answer, as the engine tokenizes."""
    value = case.answers[0]
    end_char = text.index(f"is: {value}.") + len(f"is: {value}.")
    start_char = text.rindex("One of the special magic", 0, end_char)
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    tokens = [i for i, (s, e) in enumerate(offsets) if s < end_char and e > start_char]
    return tokens[0], tokens[-1] + 1


def run(name: str, overrides: list[str], oracle: str | None, lengths: list[int], cases: int, sources: list[str],
        config: str | None, results: list[dict], save, alt_scores: bool = False) -> None:
    tokenizer, conv_type, generate, engine = ruler.engine_runner(config, overrides)
    done = {(r["variant"], r["length"], r["case"]) for r in results}
    try:
        for length in lengths:
            for i in range(cases):
                modes = [(name, None)] + ([(f"{name}+oracle-{oracle}", oracle)] if oracle else [])
                for variant, forced in modes:
                    if (variant, length, i) in done:
                        continue
                    case = ruler.make_case(TASK, length, i, tokenizer, sources)
                    text = ruler.prompt_text(tokenizer, case, conv_type)
                    ids = tokenizer(text)["input_ids"]
                    probe = Probe(needle=needle_span(tokenizer, text, case), oracle=forced is not None,
                                  scope=forced or "all", prompt_tokens=len(ids), alt_scores=alt_scores)
                    # no held state or snapshot: every lookup of the prompt is made
                    engine.generator.reset(snapshots=True)
                    start = time.perf_counter()
                    with watching(probe):
                        answer, prompt_tokens = generate(text, ruler.MAX_NEW_TOKENS[TASK])
                    results.append({"variant": variant, "length": length, "case": i, "source": case.source,
                                    "depth": case.depth, "prompt_tokens": prompt_tokens, "needle": probe.needle,
                                    "answer": case.answers[0], "prediction": answer,
                                    "found": ruler.score(case, answer), **probe.summary(),
                                    "seconds": round(time.perf_counter() - start, 2)})
                    save()
                    r = results[-1]
                    print(f"{variant:>18} {length:>6} #{i:<2} depth {case.depth:.1f} found {r['found']:.0f} "
                          f"q-hit {r['question_hit']} d-hit {r['decode_hit']} q-rank {r['question_rank']} "
                          f"{answer[:40]!r}", flush=True)
    finally:
        engine.shutdown()


def table(results: list[dict]) -> str:
    rows: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        rows.setdefault((r["variant"], r["length"]), []).append(r)

    def mean(items: list, key: str) -> str:
        vals = [x[key] for x in items if x[key] is not None]
        return f"{statistics.mean(vals):.2f}" if vals else "-"

    # ranks: each case's median over layers (question) or layers and steps (decode), averaged over cases
    lines = ["| variant | length | found | question hit | decode hit | question rank | decode rank |",
             "|---|---|---|---|---|---|---|"]
    for (variant, length), items in rows.items():
        found = sum(x["found"] for x in items)
        lines.append(f"| {variant} | {ruler._short(length)} | {found:.0f}/{len(items)} | {mean(items, 'question_hit')} "
                     f"| {mean(items, 'decode_hit')} | {mean(items, 'question_rank')} | {mean(items, 'decode_rank')} |")
    alts = sorted({a for r in results for a in r.get("alt", {})})
    if alts:  # the needle's rank and hit under the other scores, for the same lookups
        lines += ["", "| variant | length | score | question hit | decode hit | question rank | decode rank |",
                  "|---|---|---|---|---|---|---|"]
        for (variant, length), items in rows.items():
            for a in ["served"] + alts:
                got = [x if a == "served" else x["alt"][a] for x in items if a == "served" or a in x.get("alt", {})]
                if got:
                    lines.append(f"| {variant} | {ruler._short(length)} | {a} | {mean(got, 'question_hit')} | "
                                 f"{mean(got, 'decode_hit')} | {mean(got, 'question_rank')} | {mean(got, 'decode_rank')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="retrieval of the needle's blocks, and what a perfect one would give")
    p.add_argument("--config", default=None, help="config file (default: the served config)")
    p.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDE,OVERRIDE... (config dotlist)")
    p.add_argument("--oracle", choices=("all", "question"), default=None,
                   help="also run each case with the needle's blocks forced into every lookup once they exist "
                   "(all), or into the question's execution block and the decode steps only (question)")
    p.add_argument("--alt-scores", action="store_true",
                   help="also rank the needle under other block scores (see alternative_scores) in the question's "
                   "and the decode steps' lookups")
    p.add_argument("--lengths", default="4k")
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--sources", default=None, help="haystack sources (default: as benchmark/ruler.py)")
    p.add_argument("--out", default="benchmark/results/retrieval-probe.json")
    args = p.parse_args(argv)
    lengths = [ruler._length(n) for n in args.lengths.split(",") if n]
    sources = ruler.pick_sources(args.sources)
    out = Path(args.out)
    results, save = ruler.resumable(out, sources)

    for spec in args.variant or ["memory=model.full_attention_tokens=null"]:
        name, _, overrides = spec.partition("=")
        run(name, [o for o in overrides.split(",") if o], args.oracle, lengths, args.cases, sources, args.config,
            results, save, args.alt_scores)
    report = table(results)
    out.with_suffix(".md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
