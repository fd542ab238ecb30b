"""Natural, varied English text for long-context tests: documentation that Debian and CPython ship.

A haystack that repeats one sentence (InfiniteBench's passkey prompt) makes every memory block look alike and
flatters retrieval; these haystacks are real prose, written by people for people, never repeated. Sources
(each an independent text; a case draws its haystack from one source, from a seeded starting paragraph):

| source | text | package, licence |
|---|---|---|
| `python-howto` | the Python HOWTOs | Debian `python3.11-doc`, PSF License |
| `python-whatsnew-2` | "What's New in Python" 2.0-2.7 | Debian `python3.11-doc`, PSF License |
| `python-whatsnew-3` | "What's New in Python" 3.0-3.11 | Debian `python3.11-doc`, PSF License |
| `python-tutorial-faq` | the Python tutorial and FAQs | Debian `python3.11-doc`, PSF License |
| `python-library-a-l`, `-m-z` | the Python library reference, modules a-l / m-z | `python3.11-doc`, PSF License |
| `git-manual` | Git's user manual, tutorials and guides | Debian `git-doc`, GPL-2.0 |
| `pydoc-topics` | the Python language reference topics | CPython's own `pydoc_data` (always present), PSF License |

`fetch()` downloads the two Debian packages with `apt-get download` (no root needed) and extracts them into
the cache (`$INFLLM_CACHE_DIR/haystacks` or `~/.cache/inf_llm/haystacks`); nothing is installed. The text is
cleaned of markup (reStructuredText / AsciiDoc directives, code blocks, tables, roles) into paragraphs of prose,
and a paragraph seen before in the same source is dropped. Knows nothing of models; tokenizers are passed in.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from inf_llm.errors import InfLLMError

DEBIAN_PACKAGES = ("python3.11-doc", "git-doc")
_PY_SOURCES = "usr/share/doc/python3.11/html/_sources"
_GIT_DOCS = "usr/share/doc/git-doc"
# source -> (package, glob patterns under its extracted tree); pydoc-topics comes from the stdlib
SOURCES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "python-howto": ("python3.11-doc", (f"{_PY_SOURCES}/howto/*.rst.txt",)),
    "python-whatsnew-2": ("python3.11-doc", (f"{_PY_SOURCES}/whatsnew/2.*.rst.txt",)),
    "python-whatsnew-3": ("python3.11-doc", (f"{_PY_SOURCES}/whatsnew/3.*.rst.txt",)),
    "python-tutorial-faq": ("python3.11-doc", (f"{_PY_SOURCES}/tutorial/*.rst.txt", f"{_PY_SOURCES}/faq/*.rst.txt")),
    "git-manual": ("git-doc", (f"{_GIT_DOCS}/user-manual.txt", f"{_GIT_DOCS}/git*tutorial*.txt",
                               f"{_GIT_DOCS}/MyFirst*.txt", f"{_GIT_DOCS}/git-bisect-lk2009.txt",
                               f"{_GIT_DOCS}/giteveryday.txt", f"{_GIT_DOCS}/gitworkflows.txt",
                               f"{_GIT_DOCS}/SubmittingPatches.txt", f"{_GIT_DOCS}/ReviewingGuidelines.txt")),
    "python-library-a-l": ("python3.11-doc", (f"{_PY_SOURCES}/library/[a-l]*.rst.txt",)),
    "python-library-m-z": ("python3.11-doc", (f"{_PY_SOURCES}/library/[m-z]*.rst.txt",)),
    "pydoc-topics": (None, ()),
}
# Paragraphs shorter than this many words are headings, captions or list debris, not prose.
MIN_PARAGRAPH_WORDS = 8


class HaystackError(InfLLMError):
    http_status = 400
    error_type = "haystack_error"


def cache_dir() -> Path:
    root = os.environ.get("INFLLM_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "inf_llm") / "haystacks"


def available_sources() -> list[str]:
    """Sources whose text is on this machine (pydoc-topics always; the others after `fetch()`)."""
    return [name for name, (package, _) in SOURCES.items() if package is None or (cache_dir() / package).is_dir()]


def fetch(packages: tuple[str, ...] = DEBIAN_PACKAGES) -> None:
    """Download and extract the Debian packages of the haystack sources into the cache (idempotent)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise HaystackError(f"fetching {', '.join(packages)} needs apt-get and dpkg-deb (a Debian system); only "
                            f"pydoc-topics is available here")
    for package in packages:
        target = cache_dir() / package
        if target.is_dir():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob("*.deb"))
            if done.returncode != 0 or not debs:
                raise HaystackError(f"apt-get download {package} failed: {done.stderr.strip()[-500:]} "
                                    f"(run 'apt-get update' first?)")
            staging = Path(tmp) / "tree"
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staging), str(target))


# ------------------------------------------------------------------------------------------- cleaning
_ROLE = re.compile(r":[a-z:]+:`(?:([^`<]*?)\s*<[^`]*>|([^`]*))`")  # :func:`name`, :ref:`text <target>`
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`]*>)?`_{1,2}")  # `text <url>`_
_INLINE = re.compile(r"``([^`]*)``|`([^`]*)`|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*")
_ASCIIDOC = re.compile(r"\blinkgit:([\w-]+)\[\d\]|\[\[[^\]]*\]\]|<<[^>]*>>")
_UNDERLINE = re.compile(r"^([=\-~^\"'*#+`.:])\1{2,}\s*$")


def _inline(text: str) -> str:
    text = _ROLE.sub(lambda m: (m.group(1) or m.group(2) or "").lstrip("~!"), text)
    text = _LINK.sub(r"\1", text)
    text = _INLINE.sub(lambda m: next(g for g in m.groups() if g is not None), text)
    text = _ASCIIDOC.sub(lambda m: m.group(1) or "", text)
    return re.sub(r"\s+", " ", text).strip()


# table rows, doctest lines, AsciiDoc attribute lines ([...]) and headings (== Title), RST field lists
_NOT_PROSE = re.compile(r"^(?:[|+][-=+|]|\||>>>|\[.*\]$|=+ |:\w[\w -]*:(?:\s|$))")
_PROSE_DIRECTIVE = re.compile(r"^\.\. (?:[a-z]+:)?(?:function|method|class|attribute|data|exception|"
                              r"decorator|describe|note|warning|versionadded|versionchanged|deprecated|"
                              r"seealso|impl-detail|tip|important|opcode|envvar|option|cmdoption)::")
_BULLET = re.compile(r"^(?:[*\-+]|#\.|\d+\.)\s+(?=\S)")


def prose_paragraphs(markup: str) -> list[str]:
    """reStructuredText or AsciiDoc -> paragraphs of prose. A list item is a paragraph of its own (its
    continuation lines are indented by no more than its bullet); literal blocks (after "::"), directive bodies,
    code fences, tables, headings and their underlines are dropped; inline markup keeps its text."""
    paragraphs, current = [], []
    in_fence = False
    item_indent = None  # indentation of the current list item's text, else None
    indent_of_paragraph = 0
    skip_indent = None  # skipping a block indented deeper than this (a literal block or a directive body)

    def flush() -> None:
        if current:
            text = _inline(" ".join(current))
            if len(text.split()) >= MIN_PARAGRAPH_WORDS and not text.startswith((">>>", "$ ")):
                paragraphs.append(text.replace("::", ":"))
            current.clear()

    for line in markup.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith(("----", "....", "```")) and set(stripped) <= set("-.`"):
            in_fence = not in_fence  # AsciiDoc listing blocks and fenced code
            flush()
            continue
        if in_fence:
            continue
        if not stripped:
            if current and current[-1].endswith("::"):
                skip_indent = indent_of_paragraph
            flush()
            continue
        if skip_indent is not None:
            if indent > skip_indent:
                continue
            skip_indent = None
        if stripped.startswith(".."):  # a directive: the body of prose ones (function, note, ...) is kept
            flush()
            if not _PROSE_DIRECTIVE.match(stripped):  # code, tables, toctrees, comments: body skipped
                skip_indent = indent
            continue
        bullet = _BULLET.match(stripped)
        if bullet:
            flush()
            item_indent = indent + bullet.end()
            indent_of_paragraph = indent
            current.append(stripped[bullet.end():])
            continue
        if _UNDERLINE.match(stripped) or _NOT_PROSE.match(stripped):
            flush()
            continue
        if current and (indent == indent_of_paragraph or (item_indent is not None and indent == item_indent)):
            current.append(stripped)
            continue
        flush()
        if item_indent is not None and indent != item_indent:
            item_indent = None
        indent_of_paragraph = indent
        current.append(stripped)
    flush()
    return paragraphs


@lru_cache(maxsize=None)
def paragraphs(source: str) -> tuple[str, ...]:
    """The source's prose paragraphs in document order, each paragraph once."""
    if source not in SOURCES:
        raise HaystackError(f"unknown haystack source {source!r}; sources: {', '.join(SOURCES)}")
    package, patterns = SOURCES[source]
    if package is None:
        from pydoc_data.topics import topics

        texts = [topics[name] for name in sorted(topics)]
        found = [p for text in texts for p in _plain_paragraphs(text)]
    else:
        root = cache_dir() / package
        if not root.is_dir():
            raise HaystackError(f"haystack source {source!r} needs the Debian package {package}: run "
                                f"`python -m benchmark.haystacks fetch` (cache: {cache_dir()})")
        files = [f for pattern in patterns for f in sorted(root.glob(pattern))]
        found = [p for f in files for p in prose_paragraphs(f.read_text(encoding="utf-8", errors="replace"))]
    seen, unique = set(), []
    for p in found:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return tuple(unique)


def _plain_paragraphs(text: str) -> list[str]:
    """pydoc's topics are plain text: paragraphs are separated by blank lines; indented ones are code."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if lines and not lines[0].startswith(("   ", "\t")):
            joined = re.sub(r"\s+", " ", block).strip()
            if len(joined.split()) >= MIN_PARAGRAPH_WORDS and not joined.startswith(">>>"):
                out.append(joined)
    return out


# ------------------------------------------------------------------------------------------ haystacks
@dataclass(frozen=True)
class Haystack:
    source: str
    first_paragraph: int
    paragraphs: tuple[str, ...]  # consecutive paragraphs of the source
    tokens: int


def haystack(source: str, tokenizer, n_tokens: int, rng: random.Random) -> Haystack:
    """Consecutive paragraphs of `source` from a seeded start, about `n_tokens` tokens in all (never more).
    Raises HaystackError when the source is shorter than that."""
    paras = paragraphs(source)
    counts = _token_counts(source, tokenizer)
    total = sum(counts)
    if total < n_tokens:
        raise HaystackError(f"haystack source {source!r} has {total} tokens, fewer than {n_tokens}")
    # a start from which n_tokens fit before the end of the source
    suffix, last_start = 0, 0
    for i in range(len(paras) - 1, -1, -1):
        suffix += counts[i]
        if suffix >= n_tokens:
            last_start = i
            break
    start = rng.randint(0, last_start)
    taken, used, i = [], 0, start
    while i < len(paras) and used + counts[i] <= n_tokens:
        taken.append(paras[i])
        used += counts[i]
        i += 1
    if i < len(paras):  # the budget left is filled with the next paragraph's first sentences that fit
        sentences, head = re.split(r"(?<=[.!?]) ", paras[i]), ""
        for sentence in sentences:
            longer = f"{head} {sentence}".strip()
            if used + len(tokenizer(longer + "\n\n", add_special_tokens=False)["input_ids"]) > n_tokens:
                break
            head = longer
        if head:
            taken.append(head)
            used += len(tokenizer(head + "\n\n", add_special_tokens=False)["input_ids"])
    return Haystack(source, start, tuple(taken), used)


# tokenizer -> source -> token count of each paragraph; weak keys: a tokenizer's counts go with it (an id()
# key could be reused by a later tokenizer)
_COUNTS: "weakref.WeakKeyDictionary[object, dict[str, list[int]]]" = weakref.WeakKeyDictionary()


def _token_counts(source: str, tokenizer) -> list[int]:
    per_source = _COUNTS.setdefault(tokenizer, {})
    if source not in per_source:
        # each paragraph joins the haystack as "paragraph\n\n": count it that way
        per_source[source] = [len(ids) for ids in tokenizer([p + "\n\n" for p in paragraphs(source)],
                                                            add_special_tokens=False)["input_ids"]]
    return per_source[source]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["fetch", "list"])
    args = parser.parse_args()
    if args.command == "fetch":
        fetch()
    for name in available_sources():
        paras = paragraphs(name)
        print(f"{name}: {len(paras)} paragraphs, {sum(len(p.split()) for p in paras)} words")


if __name__ == "__main__":
    main()
