"""The document library: contexts (a document read once) kept in RAM by the prefix cache and on disk by a
ContextFolder, looked up by id or by the prompt's tokens, loaded back after a restart.

Owns: which documents exist, their text (to place them in a conversation), the ids each one's memory holds,
and moving a memory between disk and the prefix cache. The engine runs `read`, `ensure_loaded` and
`evict` in its worker thread; `list` and `delete` run in any thread (the prefix cache locks its entries).
Must not know: HTTP, the queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from inf_llm.adapter import InfLLMCache
from inf_llm.adapter.hf import storage_sizes
from inf_llm.config import InfLLMConfig
from inf_llm.engine.contexts import (
    ContextFolder,
    ContextInfo,
    check_document,
    check_id,
    default_folder,
    document_text,
    new_id,
    now,
    with_document,
)
from inf_llm.engine.events import Event, PreparedPrompt
from inf_llm.engine.generation import Generator, prepare_chat, prepare_text
from inf_llm.engine.prefix_cache import PrefixEntry, common_prefix
from inf_llm.engine.templates import Message, build_messages, encode_chat
from inf_llm.errors import ContextNotFoundError, ContextStorageError, RequestError

log = logging.getLogger(__name__)

# Questions the document's token prefix is found with: the tokens all of them share with the document are
# the ones any question after it shares (a question's first characters may merge with the text before).
PROBES = ("Q", " q", "\n1", "?")


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    system: str | None
    ids: tuple[int, ...]
    created: int


class DocumentLibrary:
    def __init__(self, cfg: InfLLMConfig, generator: Generator, model_name: str):
        self.cfg = cfg
        self.generator = generator
        self.model_name = model_name
        disk = cfg.contexts.disk_mib
        root = Path(cfg.contexts.dir).expanduser() if cfg.contexts.dir else default_folder()
        self.folder = ContextFolder(root, disk << 20, cfg.contexts.max_count) if disk > 0 else None
        self._documents: dict[str, Document] = {}  # read or loaded in this process
        self._disk_ids: dict[str, tuple[int, ...]] | None = None  # saved documents' ids, read at first use
        self._lock = threading.Lock()

    @property
    def max_tokens(self) -> int:
        return self.cfg.contexts.max_tokens or self.cfg.server.max_prompt_tokens

    # --- any thread -------------------------------------------------------------------------------
    def prepare(self, name: str, text: str, system: str | None) -> Document:
        """The document's token prefix of a conversation (tokenizing: run it off the event loop)."""
        check_document(name, text)
        system = system if system is not None else self.cfg.generation.system_prompt
        tok, conv = self.generator.tokenizer, self.cfg.conv_type
        encodings = [encode_chat(tok, with_document(build_messages(p, system=system), name, text), conv).ids
                     for p in PROBES]
        n = min(common_prefix(encodings[0], other) for other in encodings[1:])
        if n > self.max_tokens:
            raise RequestError(f"the document has {n} tokens, more than this server keeps: at most {self.max_tokens} "
                               f"(contexts.max_tokens)")
        return Document(name, text, system, tuple(encodings[0][:n]), now())

    def messages(self, context_id: str, messages: Sequence[Message]) -> list[Message]:
        """`messages` on the document: its system prompt (unless they bring one) and its text first."""
        doc = self.document(context_id)
        out = list(messages)
        if doc.system and not any(m.role == "system" for m in out):
            out.insert(0, Message("system", doc.system))
        return with_document(out, doc.name, doc.text)

    def prepare_chat(self, context_id: str, messages: Sequence[Message]) -> PreparedPrompt:
        doc = self.document(context_id)
        prompt = prepare_chat(self.generator.tokenizer, self.cfg, self.messages(context_id, messages))
        if prompt.ids[: len(doc.ids)] != doc.ids:
            log.warning("context %s: this prompt does not start with the document's tokens (another system prompt?)"
                        "; it is read in full", context_id)
        return replace(prompt, context_id=context_id, boundaries=tuple(sorted({*prompt.boundaries, len(doc.ids)})))

    def prepare_text(self, context_id: str, prompt: str) -> PreparedPrompt:
        """A raw prompt (no chat template) on the document: its text, then `prompt`. Its memory is kept at the
        first such prompt (a boundary at the document's end) and reused by the next ones."""
        doc = self.document(context_id)
        head = document_text(doc.name, doc.text)
        prepared = prepare_text(self.generator.tokenizer, self.cfg, head + prompt)
        n = common_prefix(prepared.ids, prepare_text(self.generator.tokenizer, self.cfg, head + PROBES[0]).ids)
        return replace(prepared, boundaries=(n,))

    def document(self, context_id: str) -> Document:
        check_id(context_id)
        with self._lock:
            doc = self._documents.get(context_id)
        if doc is None:
            doc = self._load_document(context_id)
        return doc

    def list(self) -> list[ContextInfo]:
        found = {info.id: info for info in self.folder.list()} if self.folder is not None else {}
        with self._lock:
            documents = dict(self._documents)
        for cid, doc in documents.items():
            found[cid] = self._described(cid, doc, found.get(cid))
        return sorted(found.values(), key=lambda i: i.created)

    def info(self, context_id: str) -> ContextInfo:
        """One document's listing: its own file's header only."""
        check_id(context_id)
        with self._lock:
            doc = self._documents.get(context_id)
        saved = None
        if self.folder is not None:
            try:
                saved = self.folder.info(context_id)
            except (ContextStorageError, ContextNotFoundError):
                if doc is None:  # a damaged file raises its own error (the listing skips it)
                    raise
        if doc is None:
            if saved is None:
                raise ContextNotFoundError(f"no document memory with id {context_id!r}")
            return saved
        return self._described(context_id, doc, saved)

    def _described(self, context_id: str, doc: Document, saved: ContextInfo | None) -> ContextInfo:
        """A document of this process as listed: its file's info when saved, and the RAM its memory takes."""
        info = saved or ContextInfo(context_id, doc.name, doc.system, len(doc.ids), doc.created)
        cache = self.generator.prefix_cache
        entry = cache.of_context(context_id) if cache is not None else None
        if entry is not None:
            info.ram_bytes = entry_bytes(entry)
        return info

    def delete(self, context_id: str) -> bool:
        check_id(context_id)
        with self._lock:
            known = self._documents.pop(context_id, None) is not None
            if self._disk_ids is not None:
                self._disk_ids.pop(context_id, None)
        cache = self.generator.prefix_cache
        removed = cache.remove(lambda e: e.context_id == context_id) if cache is not None else 0
        on_disk = self.folder.delete(context_id) if self.folder is not None else False
        return known or removed > 0 or on_disk

    # --- the worker thread ------------------------------------------------------------------------
    def read(self, doc: Document, emit: Callable[[Event], None], cancel: threading.Event) -> ContextInfo:
        """Read a document into a kept memory and save it; a save that fails keeps it in RAM (disk_error)."""
        context_id = new_id()
        entry = self.generator.read_document(doc.ids, context_id, emit, cancel)
        with self._lock:
            self._documents[context_id] = doc
        info = ContextInfo(context_id, doc.name, doc.system, len(doc.ids), doc.created, ram_bytes=entry_bytes(entry))
        if self.folder is None:
            info.disk_error = "saving document memories is off (contexts.disk_mib: 0)"
            return info
        try:
            with torch.inference_mode():
                state = entry.snapshot.state_dict()
            info.disk_bytes = self.folder.save(info, doc.ids, state, self.model_name, doc.text)
            with self._lock:
                if self._disk_ids is not None:
                    self._disk_ids[context_id] = doc.ids
        except ContextStorageError as exc:
            log.warning("context %s kept in RAM only: %s", context_id, exc)
            info.disk_error = str(exc)
        return info

    def ensure_loaded(self, prompt: PreparedPrompt) -> None:
        """Before a prompt runs: the saved document it names (or whose tokens it starts with, beyond what RAM
        holds) comes back into the prefix cache."""
        cache = self.generator.prefix_cache
        if cache is None or self.folder is None:
            return
        wanted = prompt.context_id
        if wanted is None:
            ids = prompt.ids
            best = cache.longest(ids, lambda e: True)
            have = best.tokens if best is not None else 0
            candidates = [(len(d), cid) for cid, d in self._saved_ids().items()
                          if len(d) > have and len(d) < len(ids) and ids[: len(d)] == d]
            wanted = max(candidates)[1] if candidates else None
        if wanted is None or cache.of_context(wanted) is not None:
            return
        try:
            self._load(wanted)
        except (ContextStorageError, ContextNotFoundError) as exc:  # the prompt is still served: read in full
            log.warning("context %s not loaded: %s", wanted, exc)

    # --- internals --------------------------------------------------------------------------------
    def _saved_ids(self) -> dict[str, tuple[int, ...]]:
        with self._lock:
            if self._disk_ids is None:
                self._disk_ids = {cid: tuple(ids) for cid, ids in self.folder.saved_ids().items()}
            return dict(self._disk_ids)

    def _load_document(self, context_id: str) -> Document:
        if self.folder is None:
            raise ContextNotFoundError(f"no document memory with id {context_id!r}")
        info, ids, text = self.folder.load_document(context_id)
        doc = Document(info.name, text, info.system, tuple(ids), info.created)
        with self._lock:
            self._documents[context_id] = doc
        return doc

    def _load(self, context_id: str) -> PrefixEntry:
        gen = self.generator
        state = gen.model.infllm
        _, ids, saved = self.folder.load(context_id, self.model_name, state.fingerprint())
        cache = InfLLMCache(gen.model)
        with torch.inference_mode():
            cache.load_state_dict(saved)
            cache.materialize(gen.model)
        self.document(context_id)
        with torch.inference_mode():
            entry = gen.keep_snapshot(cache, ids, context_id)
        # the next prompt continues the loaded memory as it is: restoring the snapshot just taken of it would
        # copy its window back and rotate it a second time
        gen.adopt(cache, ids)
        gen.prefix_cache.evict(live=gen.cache, keep=entry)
        log.info("context %s (%d tokens) loaded from %s", context_id, len(ids), self.folder.root)
        return entry


def entry_bytes(entry: PrefixEntry) -> int:
    """What a kept memory takes: its snapshot's distinct storage (the blocks it shares included, not the
    working buffers of the conversation it was taken from)."""
    return sum(storage_sizes(t for layer in entry.snapshot.layers for t in layer.tensors()).values())
