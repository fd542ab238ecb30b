"""A RULER-style long-context suite on natural text (after Hsieh et al., 2024, "RULER: What's the Real Context
Size of Your Long-Context Language Models?"), run in-process against the engine or against a server URL.

    python -m benchmark.haystacks fetch                       # once: the natural-text haystacks (Debian docs)
    python -m benchmark.ruler --lengths 4k,8k --cases 20 \\
        --variant origin=model.type=origin --variant inf-llm= --out benchmark/results/ruler.json
    python -m benchmark.ruler --url http://127.0.0.1:8000 --variant served --lengths 4k
    python -m benchmark.ruler --report benchmark/results/ruler.json   # table and heatmap of what is there

Tasks (RULER's, with its templates and scoring; haystacks are natural documentation prose, never a repeated
sentence; benchmark/haystacks.py):
  niah_single_number / _word / _uuid  one needle "One of the special magic numbers for KEY is: VALUE."
  niah_multikey        the needle among 3 distractor needles with other keys
  niah_multivalue      4 values of one key: all must be recalled
  niah_multiquery      4 keys asked at once: all values
  vt                   variable tracking: a chain of 4 assignments VAR A = n, VAR B = VAR A, ...; name them all
  cwe                  common-words extraction: the 10 words a numbered word list repeats most
  fwe                  frequent-words extraction: the 3 most frequent words of a Zipf-distributed "coded text"
  qa_paraphrase        one fact stated in prose, asked in other words
Scoring: the fraction of the expected strings found in the answer (RULER's string_match_all); qa: any.
Cases: case i of a cell takes haystack source i mod S (S >= 5 independent texts) and depth (10, 30, 50, 70,
90)% by i div S, every choice seeded by (task, length, i), so every variant reads the same prompts.
Results are appended to the JSON after every case (a rerun skips what is there), then a markdown table and
a heatmap are written beside it. Greedy decoding, no penalties.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmark/ruler.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark import haystacks  # noqa: E402

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
TASKS = ("niah_single_number", "niah_single_word", "niah_single_uuid", "niah_multikey", "niah_multivalue",
         "niah_multiquery", "vt", "cwe", "fwe", "qa_paraphrase")
# new tokens per task: enough for the expected answer after the answer prefix
MAX_NEW_TOKENS = {"niah_single_number": 24, "niah_single_word": 24, "niah_single_uuid": 48, "niah_multikey": 24,
                  "niah_multivalue": 80, "niah_multiquery": 80, "vt": 48, "cwe": 96, "fwe": 32, "qa_paraphrase": 24}
# Plain English words for keys, values and word lists (not drawn from the haystacks, so they do not occur there).
WORDS = tuple("""
anchor apricot badger balcony banjo barley beacon beetle biscuit blossom bonnet boulder bramble bucket cabbage
camel candle canyon carpet cedar chisel cider cobbler comet copper cricket crystal cushion daisy dolphin dragon
ember falcon feather fiddle fjord flannel fossil garnet gecko ginger glacier goblet granite hammock harbor hazel
heron hollow honey iguana ivory jasmine jigsaw juniper kettle kiwi lantern lemon lilac lobster lotus magpie
mango maple marble meadow mitten mosaic nectar nutmeg oasis olive orchid otter oyster paddle parsley pebble
pepper pickle pigeon pillow pine plum pony puffin quartz quill rabbit radish raven ribbon robin saddle saffron
salmon sapphire satchel scarf sparrow spruce squid starfish teapot thimble thistle tiger tulip turnip velvet
violin walnut walrus willow wombat yarn zebra zinnia acorn almond antler apron
""".split())
ADJECTIVES = tuple("""
amber ancient brave breezy bright calm clever crimson curious dusty eager faint fancy fierce gentle gleaming
golden grumpy hidden humble jolly keen lively lonely lucky merry misty noble quiet rapid rusty silent silver
sleepy smooth snowy steady sunny swift tender tidy vivid wandering wild windy wise witty young zesty
""".split())


@dataclass(frozen=True)
class Case:
    task: str
    length: int
    index: int
    source: str
    depth: float
    prompt: str  # the user message
    answer_prefix: str  # appended after the chat template's assistant start
    answers: tuple[str, ...]
    score_any: bool = False  # qa: one of the answers suffices


# --------------------------------------------------------------------------------------------- tasks
def _key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(WORDS)}"


def _value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return rng.choice(WORDS)
    return str(uuid.UUID(int=rng.getrandbits(128)))


def _placement(index: int, sources: list[str]) -> tuple[str, float]:
    """Case `index`'s haystack source (i mod S) and needle depth (i div S over DEPTHS)."""
    return sources[index % len(sources)], DEPTHS[(index // len(sources)) % len(DEPTHS)]


def _insert(paragraphs: list[str], needles: list[str], depths: list[float]) -> str:
    """The haystack's paragraphs with each needle placed between paragraphs at its depth."""
    out = list(paragraphs)
    for needle, depth in sorted(zip(needles, depths), key=lambda nd: -nd[1]):
        out.insert(round(depth * len(paragraphs)), needle)
    return "\n\n".join(out)


def _needle_task(task: str, length: int, index: int, tokenizer, sources: list[str]) -> Case:
    rng = random.Random(f"{task}/{length}/{index}")
    source, depth = _placement(index, sources)
    kind = {"niah_single_uuid": "uuid", "niah_single_word": "word"}.get(task, "number")
    noun = {"number": "numbers", "word": "words", "uuid": "uuids"}[kind]
    keys = [_key(rng) for _ in range(4)]
    while len(set(keys)) < 4:
        keys = [_key(rng) for _ in range(4)]
    if task == "niah_multivalue":
        values = [_value(kind, rng) for _ in range(4)]
        needles = [f"One of the special magic {noun} for {keys[0]} is: {v}." for v in values]
        asked, answers = [keys[0]], values
    elif task == "niah_multiquery":
        values = [_value(kind, rng) for _ in range(4)]
        needles = [f"One of the special magic {noun} for {k} is: {v}." for k, v in zip(keys, values)]
        asked, answers = keys, values
    elif task == "niah_multikey":
        values = [_value(kind, rng) for _ in range(4)]
        needles = [f"One of the special magic {noun} for {k} is: {v}." for k, v in zip(keys, values)]
        asked, answers = [keys[0]], values[:1]
    else:
        value = _value(kind, rng)
        needles, asked, answers = [f"One of the special magic {noun} for {keys[0]} is: {value}."], [keys[0]], [value]
    # the target needle at the case's depth, the others spread at seeded depths
    depths = [depth] + [rng.uniform(0.05, 0.95) for _ in needles[1:]]
    query = ", ".join(asked[:-1]) + (", and " if len(asked) > 1 else "") + asked[-1]
    head = (f"Some special magic {noun} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {noun} afterwards.\n")
    if len(answers) == 1:  # RULER's singular question (its plural one sends a 135M model off into lists)
        tail = f"\nWhat is the special magic {noun[:-1]} for {query} mentioned in the provided text?"
        prefix = f" The special magic {noun[:-1]} for {query} mentioned in the provided text is"
    else:
        tail = f"\nWhat are all the special magic {noun} for {query} mentioned in the provided text?"
        prefix = f" The special magic {noun} for {query} mentioned in the provided text are"
    budget = length - _tokens(tokenizer, head + tail + prefix + "\n\n".join(needles)) - _slack(length)
    hay = haystacks.haystack(source, tokenizer, budget, rng)
    return Case(task, length, index, source, depth, head + _insert(list(hay.paragraphs), needles, depths) + tail,
                prefix, tuple(answers))


def _vt_task(length: int, index: int, tokenizer, sources: list[str]) -> Case:
    rng = random.Random(f"vt/{length}/{index}")
    source, depth = _placement(index, sources)
    names = set()
    while len(names) < 5:
        names.add("".join(rng.choice(string.ascii_uppercase) for _ in range(5)))
    names = list(names)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    tail = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    prefix = (f" Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
              f"assigned the value {value}, they are:")
    budget = length - _tokens(tokenizer, head + tail + prefix + " ".join(chain)) - _slack(length)
    hay = haystacks.haystack(source, tokenizer, budget, rng)
    # the chain in order, from the case's depth towards the end
    depths = [depth + (0.95 - depth) * i / 5 for i in range(5)]
    return Case("vt", length, index, source, depth, head + _insert(list(hay.paragraphs), chain, depths) + tail,
                prefix, tuple(names))


def _cwe_task(length: int, index: int, tokenizer, sources: list[str]) -> Case:
    rng = random.Random(f"cwe/{length}/{index}")
    words = list(WORDS)
    rng.shuffle(words)
    common, rare = words[:10], words[10:]
    head = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            "ones that appear most often.\n")
    tail = "\nQuestion: What are the 10 most common words in the above list?"
    prefix = " Answer: The top 10 words that appear most often in the list are:"
    fixed = _tokens(tokenizer, head + tail + prefix) + _slack(length)
    per_item = _tokens(tokenizer, "123. violin ") + 1
    items = max(40, (length - fixed) // per_item)
    for _ in range(3):  # the estimate, then scaled by the measured tokens until it fits
        list_rng = random.Random(f"cwe/{length}/{index}/list")
        common_each = max(3, items // 60)  # each common word about 10x as often as a rare one
        listed = [w for w in common for _ in range(common_each)]
        while len(listed) < items:
            listed.append(list_rng.choice(rare))
        list_rng.shuffle(listed)
        context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))
        measured = _tokens(tokenizer, context)
        if 0.9 * (length - fixed) <= measured <= length - fixed:
            break
        items = max(40, int(items * (length - fixed) / measured * 0.97))
    return Case("cwe", length, index, "word-list", 0.0, head + context + tail, prefix, tuple(common))


def _fwe_task(length: int, index: int, tokenizer, sources: list[str]) -> Case:
    rng = random.Random(f"fwe/{length}/{index}")
    vocab = ["".join(rng.choice(string.ascii_lowercase) for _ in range(6)) for _ in range(400)]
    weights = [1 / (rank + 1) ** 1.3 for rank in range(len(vocab))]  # Zipf: the first three are the answers
    head = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words.\n")
    tail = ("\nQuestion: Do not provide any explanation. What are the three most frequently appeared words in the "
            "above coded text?")
    prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"
    fixed = _tokens(tokenizer, head + tail + prefix) + _slack(length)
    per_word = _tokens(tokenizer, " " + " ".join(vocab[:50])) / 50
    n_words = max(60, int((length - fixed) / per_word))
    words = rng.choices(vocab, weights=weights, k=n_words)
    while n_words > 60 and _tokens(tokenizer, " ".join(words[:n_words])) > length - fixed:
        n_words = int(n_words * 0.97)  # a Zipf sample of rare words takes more tokens than the estimate
    text = " ".join(words[:n_words])
    return Case("fwe", length, index, "coded-text", 0.0, head + text + tail, prefix, tuple(vocab[:3]))


# (fact in prose, question in other words, answer); slots: name, place, color, thing, number
QA_FACTS = (
    ("{name}, who kept the lighthouse at {place}, painted its front door {color} in the summer her daughter was "
     "born.", "What colour is the door of the lighthouse at {place}?", "{color}"),
    ("When {name} finally left {place} for good, the only thing he carried with him was an old {thing}.",
     "What did {name} take along on leaving {place}?", "{thing}"),
    ("The bakery on the corner of {place} has sold exactly {number} loaves since {name} took it over.",
     "How many loaves has the bakery at {place} sold under {name}?", "{number}"),
    ("Nobody in {place} remembers who planted the orchard, but everyone agrees that {name} was the one who "
     "named the oldest tree {thing}.", "What name did {name} give to the oldest tree of the orchard in {place}?",
     "{thing}"),
    ("{name} keeps a {color} notebook in which the tide tables of {place} are written by hand.",
     "Which colour is the notebook holding the handwritten tide tables of {place}?", "{color}"),
    ("It took {name} {number} days to walk from the coast to {place}, sleeping in barns along the way.",
     "How long did the walk of {name} to {place} last, in days?", "{number}"),
)
NAMES = ("Elsie Varden", "Tomas Greel", "Ingrid Holm", "Marcus Obi", "Lena Farrow", "Piet Anker", "Rosa Quill",
         "Hugo Marsh", "Nadia Kern", "Oskar Lund")
PLACES = ("Marrow Point", "Little Hadley", "Kestrel Bay", "Ashby Fen", "Dunmore Quay", "Thornwick", "Brackenridge",
          "Saltmarsh End", "Old Carrow", "Wrenfield")
COLORS = ("green", "yellow", "purple", "orange", "scarlet", "turquoise", "brown", "crimson")


def _qa_task(length: int, index: int, tokenizer, sources: list[str]) -> Case:
    rng = random.Random(f"qa/{length}/{index}")
    source, depth = _placement(index, sources)
    fact, question, answer = QA_FACTS[index % len(QA_FACTS)]
    slots = {"name": rng.choice(NAMES), "place": rng.choice(PLACES), "color": rng.choice(COLORS),
             "thing": rng.choice(WORDS), "number": str(rng.randint(120, 9800))}
    fact, question, answer = (t.format(**slots) for t in (fact, question, answer))
    head = ("Answer the question based on the given documents. Only give me the answer and do not output any "
            "other words.\n\nThe following are given documents.\n\n")
    tail = f"\n\nAnswer the question based on the given documents.\n\nQuestion: {question}"
    prefix = " Answer:"
    budget = length - _tokens(tokenizer, head + tail + prefix + fact) - _slack(length)
    hay = haystacks.haystack(source, tokenizer, budget, rng)
    return Case("qa_paraphrase", length, index, source, depth, head + _insert(list(hay.paragraphs), [fact], [depth])
                + tail, prefix, (answer,), score_any=True)


# tokens of the chat template around the user message; paragraphs tokenized alone and joined differ by a
# token here and there, so the haystack's budget also keeps 2% in hand (prompts stay at most `length`)
TEMPLATE_SLACK = 48
JOIN_SLACK = 0.02


def _slack(length: int) -> int:
    return TEMPLATE_SLACK + int(JOIN_SLACK * length)


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_case(task: str, length: int, index: int, tokenizer, sources: list[str]) -> Case:
    if task.startswith("niah_"):
        return _needle_task(task, length, index, tokenizer, sources)
    makers = {"vt": _vt_task, "cwe": _cwe_task, "fwe": _fwe_task, "qa_paraphrase": _qa_task}
    if task not in makers:
        raise SystemExit(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return makers[task](length, index, tokenizer, sources)


def score(case: Case, prediction: str) -> float:
    """RULER's string_match_all (string_match_part for qa), case-insensitive."""
    text = prediction.lower()
    hits = [a.lower() in text for a in case.answers]
    return float(any(hits)) if case.score_any else sum(hits) / len(hits)


# ------------------------------------------------------------------------------------------- running
def prompt_text(tokenizer, case: Case, conv_type) -> str:
    """The chat-templated prompt with the answer prefix after the assistant's start (as /v1/completions
    receives it)."""
    from inf_llm.engine.templates import Message, render_chat

    rendered = render_chat(tokenizer, [Message("user", case.prompt)], conv_type)
    return rendered.text + case.answer_prefix


def engine_runner(config: str | None, overrides: list[str]):
    """(tokenizer, conv_type, generate(prompt, max_new_tokens) -> (text, prompt_tokens)) over an in-process engine."""
    from inf_llm import openmp

    openmp.configure()
    from inf_llm.config import default_config_path, load_config
    from inf_llm.engine import Done, load_engine

    cfg = load_config(config or default_config_path(), overrides)
    engine = load_engine(cfg)

    def generate(text: str, max_new_tokens: int) -> tuple[str, int]:
        job = engine.submit(engine.prepare_text(text), engine.sampling(
            temperature=0, repetition_penalty=1.0, max_new_tokens=max_new_tokens))
        final = list(job.events(timeout=3600))[-1]
        if not isinstance(final, Done):
            raise RuntimeError(f"generation failed: {final}")
        return final.text, final.usage.prompt_tokens

    return engine.tokenizer, cfg.conv_type, generate, engine


def server_runner(url: str, tokenizer_config: str | None):
    """The same over HTTP: `/v1/completions` of a running server (greedy, no penalty)."""
    import httpx

    from inf_llm.config import default_config_path, load_config
    from inf_llm.engine.loading import load_tokenizer

    cfg = load_config(tokenizer_config or default_config_path(), [])
    tokenizer = load_tokenizer(cfg.model)

    def generate(text: str, max_new_tokens: int) -> tuple[str, int]:
        r = httpx.post(f"{url.rstrip('/')}/v1/completions", timeout=3600,
                       json={"prompt": text, "max_tokens": max_new_tokens, "temperature": 0})
        r.raise_for_status()
        body = r.json()
        return body["choices"][0]["text"], body["usage"]["prompt_tokens"]

    return tokenizer, cfg.conv_type, generate, None


def run_variant(name: str, generate: Callable, tokenizer, conv_type, tasks, lengths, cases, sources,
                results: list[dict], save: Callable[[], None]) -> None:
    done = {(r["variant"], r["task"], r["length"], r["case"]) for r in results}
    for length in lengths:
        for task in tasks:
            for i in range(cases):
                if (name, task, length, i) in done:
                    continue
                case = make_case(task, length, i, tokenizer, sources)
                start = time.perf_counter()
                text, prompt_tokens = generate(prompt_text(tokenizer, case, conv_type), MAX_NEW_TOKENS[task])
                got = score(case, text)
                results.append({"variant": name, "task": task, "length": length, "case": i, "source": case.source,
                                "depth": case.depth, "prompt_tokens": prompt_tokens, "answers": list(case.answers),
                                "prediction": text, "score": got, "seconds": round(time.perf_counter() - start, 2)})
                save()
                print(f"{name:>16} {task:>20} {length:>6} #{i:<3} {got:4.2f} {text[:60]!r}", flush=True)


# ------------------------------------------------------------------------------------------ reporting
def summarize(results: list[dict]) -> dict:
    """variant -> task -> length -> (mean score in %, cases)."""
    table: dict = {}
    for r in results:
        cell = table.setdefault(r["variant"], {}).setdefault(r["task"], {}).setdefault(r["length"], [])
        cell.append(r["score"])
    return {v: {t: {n: (100 * sum(s) / len(s), len(s)) for n, s in by_len.items()} for t, by_len in by_task.items()}
            for v, by_task in table.items()}


def markdown(summary: dict) -> str:
    lengths = sorted({n for by_task in summary.values() for by_len in by_task.values() for n in by_len})
    head = "| variant | task | " + " | ".join(_short(n) for n in lengths) + " |"
    lines = [head, "|" + "---|" * (2 + len(lengths))]
    for variant, by_task in summary.items():
        for task in [t for t in TASKS if t in by_task] + ["mean"]:
            if task == "mean":
                cells = []
                for n in lengths:
                    vals = [by_task[t][n][0] for t in by_task if n in by_task[t]]
                    cells.append(f"**{sum(vals) / len(vals):.0f}**" if vals else "")
            else:
                cells = [f"{by_task[task][n][0]:.0f} ({by_task[task][n][1]})" if n in by_task[task] else ""
                         for n in lengths]
            lines.append(f"| {variant} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def heatmap(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(summary)
    lengths = sorted({n for by_task in summary.values() for by_len in by_task.values() for n in by_len})
    tasks = [t for t in TASKS if any(t in summary[v] for v in variants)]
    fig, axes = plt.subplots(1, len(variants), figsize=(2 + 1.1 * len(lengths) * len(variants), 0.5 * len(tasks) + 2),
                             squeeze=False)
    for ax, variant in zip(axes[0], variants):
        grid = [[summary[variant].get(t, {}).get(n, (float("nan"), 0))[0] for n in lengths] for t in tasks]
        ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [_short(n) for n in lengths])
        ax.set_yticks(range(len(tasks)), tasks if ax is axes[0][0] else [""] * len(tasks))
        ax.set_title(variant, fontsize=9)
        for y, row in enumerate(grid):
            for x, value in enumerate(row):
                if value == value:
                    ax.text(x, y, f"{value:.0f}", ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _length(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def write_report(out: Path, results: list[dict]) -> str:
    summary = summarize(results)
    table = markdown(summary)
    out.with_suffix(".md").write_text(table)
    heatmap(summary, out.with_suffix(".png"))
    return table


def pick_sources(given: str | None) -> list[str]:
    """The haystack sources asked for, or every available one (pydoc-topics only while fewer than 5 others)."""
    if given:
        return given.split(",")
    available = haystacks.available_sources()
    return [s for s in available if s != "pydoc-topics" or len(available) < 5]


def resumable(out: Path, sources: list[str]) -> tuple[list[dict], Callable[[], None]]:
    """The results already in `out` (a rerun skips them) and a save() that rewrites the file with them all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text())["results"] if out.is_file() else []

    def save() -> None:
        out.write_text(json.dumps({"sources": sources, "results": results}, indent=1))

    return results, save


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="RULER-style suite on natural text (see the module docstring)")
    p.add_argument("--config", default=None, help="config file (default: the served config)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=OVERRIDE,OVERRIDE... (config dotlist), one per variant; with --url just NAME")
    p.add_argument("--url", default=None, help="run against this server's /v1/completions instead")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--lengths", default="4k,8k,16k")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--sources", default=None, help="haystack sources (default: every available one)")
    p.add_argument("--out", default="benchmark/results/ruler.json")
    p.add_argument("--report", default=None, help="only write the table and heatmap of this JSON")
    args = p.parse_args(argv)
    if args.report:
        print(write_report(Path(args.report), json.loads(Path(args.report).read_text())["results"]))
        return
    tasks = [t for t in args.tasks.split(",") if t]
    lengths = [_length(n) for n in args.lengths.split(",") if n]
    sources = pick_sources(args.sources)
    out = Path(args.out)
    results, save = resumable(out, sources)

    for spec in args.variant or ["default="]:
        name, _, overrides = spec.partition("=")
        if args.url:
            tokenizer, conv_type, generate, engine = server_runner(args.url, args.config)
        else:
            tokenizer, conv_type, generate, engine = engine_runner(args.config, [o for o in overrides.split(",") if o])
        try:
            run_variant(name, generate, tokenizer, conv_type, tasks, lengths, args.cases, sources, results, save)
        finally:
            if engine is not None:
                engine.shutdown()
    print(write_report(out, results))


if __name__ == "__main__":
    main()
