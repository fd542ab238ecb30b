"""Document memories ("contexts"): a document read once, its memory kept in RAM (a prefix-cache entry) and
on disk, so that every chat on it continues from there, also after a restart.

Owns: the document's place in a conversation (`with_document`, one definition of the text around it),
the context file format (CONTEXT_FORMAT), the folder and its byte budget.

A context is one file, `ctx-<12 hex>.safetensors`: the tensors of the memory's state (InfLLMCache's
state_dict, flattened: `layers.<i>.init_k`, `layers.<i>.tail.k`, `layers.<i>.store.repr`, ...) and `ids`
(the document's token ids); its header metadata holds the kind, format, model name, the memory's
fingerprint (model shape and every memory setting), the document's name and system prompt, the per-layer
scalars and a SHA-256 of the ids. Nothing is unpickled: safetensors holds tensors and strings only. A file of
another model or memory config, of another format, or damaged, is refused with an error naming it.
Must not know: threads (the worker calls the engine side), HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from inf_llm.engine.templates import Message
from inf_llm.errors import ContextNotFoundError, ContextStorageError, RequestError

log = logging.getLogger(__name__)

CONTEXT_KIND = "inf_llm context"
# Bumped when the file layout changes; a file of another format is refused with both numbers.
CONTEXT_FORMAT = 1
SUFFIX = ".safetensors"
ID_PREFIX = "ctx-"
ID_HEX = 12
# Layer scalars kept in the header (the tensors hold the rest of a layer's state).
_SCALARS = ("seen", "rot_base", "n_local")
MAX_NAME_CHARS = 200


def document_text(name: str, text: str) -> str:
    """A document as the start of a user message (the page composes attachments the same way)."""
    return f'Document: {name}\n"""\n{text}\n"""\n\n'


def with_document(messages: Sequence[Message], name: str, text: str) -> list[Message]:
    """`messages` with the document at the start of the first user message."""
    out, placed = [], False
    for m in messages:
        if m.role == "user" and not placed:
            m, placed = Message("user", document_text(name, text) + m.content), True
        out.append(m)
    return out


def new_id() -> str:
    return ID_PREFIX + secrets.token_hex(ID_HEX // 2)


def check_id(context_id: str) -> str:
    """A context id as this module makes them (a client never names a path)."""
    tail = context_id[len(ID_PREFIX):] if context_id.startswith(ID_PREFIX) else ""
    if len(tail) != ID_HEX or any(c not in "0123456789abcdef" for c in tail):
        raise ContextNotFoundError(f"no document memory with id {context_id!r}")
    return context_id


@dataclass
class ContextInfo:
    """What GET /v1/contexts lists for a document memory."""

    id: str
    name: str
    system: str | None
    tokens: int
    created: int
    ram_bytes: int | None = None  # what its memory takes while it is in RAM
    disk_bytes: int | None = None  # its file's size while it is saved
    disk_error: str | None = None  # why it could not be saved (it is then in RAM only)

    @property
    def where(self) -> list[str]:
        return [w for w, n in (("ram", self.ram_bytes), ("disk", self.disk_bytes)) if n is not None]


def ids_digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


def _flatten(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars = []
    for i, layer in enumerate(state["layers"]):
        scalars.append({key: layer.get(key) for key in _SCALARS} | {"tail_first_pos": layer["tail"]["first_pos"]})
        for key in ("init_k", "init_v"):
            tensors[f"layers.{i}.{key}"] = layer[key]
        for key in ("k", "v", "score"):
            if key in layer["tail"]:
                tensors[f"layers.{i}.tail.{key}"] = layer["tail"][key]
        if "store" in layer:
            store = layer["store"]
            for key in ("k", "v", "repr"):
                tensors[f"layers.{i}.store.{key}"] = store[key]
            tensors[f"layers.{i}.store.start_pos"] = torch.tensor(store["start_pos"], dtype=torch.int64)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, scalars


def _unflatten(f, scalars: list[dict], fingerprint: dict, state_format: int) -> dict:
    names = set(f.keys())
    layers = []
    for i, sc in enumerate(scalars):
        p = f"layers.{i}."
        tail = {"first_pos": int(sc["tail_first_pos"]), "k": f.get_tensor(p + "tail.k"), "v": f.get_tensor(p + "tail.v")}
        if p + "tail.score" in names:
            tail["score"] = f.get_tensor(p + "tail.score")
        layer = {key: sc.get(key) for key in _SCALARS} | {
            "init_k": f.get_tensor(p + "init_k"), "init_v": f.get_tensor(p + "init_v"), "tail": tail}
        if p + "store.k" in names:
            layer["store"] = {key: f.get_tensor(p + "store." + key) for key in ("k", "v", "repr")}
            layer["store"]["start_pos"] = f.get_tensor(p + "store.start_pos").tolist()
        layers.append(layer)
    return {"format": state_format, "fingerprint": fingerprint, "layers": layers}


class ContextFolder:
    """The saved document memories: one file per context in `root`, at most `budget_bytes` and `max_count`."""

    def __init__(self, root: Path, budget_bytes: int, max_count: int):
        self.root = root
        self.budget_bytes = budget_bytes
        self.max_count = max_count

    def path(self, context_id: str) -> Path:
        return self.root / (check_id(context_id) + SUFFIX)

    def list(self) -> list[ContextInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob(f"{ID_PREFIX}*{SUFFIX}")):
            try:
                out.append(self.info(path.name[: -len(SUFFIX)]))
            except (ContextStorageError, ContextNotFoundError) as exc:
                log.warning("skipping %s: %s", path, exc)
        return out

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob(f"{ID_PREFIX}*{SUFFIX}")) if self.root.is_dir() else 0

    def _header(self, path: Path) -> dict:
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except (OSError, SafetensorError) as exc:
            raise ContextStorageError(f"{path.name} is not a readable document memory: {exc}") from None
        if meta.get("kind") != CONTEXT_KIND:
            raise ContextStorageError(f"{path.name} is not a document memory (no kind {CONTEXT_KIND!r})")
        if meta.get("format") != str(CONTEXT_FORMAT):
            raise ContextStorageError(f"{path.name} has context format {meta.get('format')!r}; this version reads "
                                      f"format {CONTEXT_FORMAT}")
        return meta

    def info(self, context_id: str) -> ContextInfo:
        path = self.path(context_id)
        if not path.is_file():
            raise ContextNotFoundError(f"no document memory with id {context_id!r}")
        meta = self._header(path)
        return ContextInfo(context_id, meta.get("name", ""), meta.get("system") or None, int(meta.get("tokens", 0)),
                           int(meta.get("created", 0)), disk_bytes=path.stat().st_size)

    def save(self, info: ContextInfo, ids: Sequence[int], state: dict, model_name: str, text: str) -> int:
        """Write the context's file atomically; returns its size. ContextStorageError when it does not fit the
        budget or the disk (nothing half-written is left)."""
        tensors, scalars = _flatten(state)
        tensors["ids"] = torch.tensor(list(ids), dtype=torch.int64)
        tensors["text"] = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.budget_bytes <= 0:
            raise ContextStorageError("saving document memories is off (contexts.disk_mib is 0)")
        others = [c for c in self.list() if c.id != info.id]
        if len(others) >= self.max_count:
            raise ContextStorageError(f"{len(others)} document memories are saved, the most this server keeps "
                                      f"(contexts.max_count); delete one first")
        used = sum(c.disk_bytes or 0 for c in others)
        if used + size > self.budget_bytes:
            raise ContextStorageError(
                f"this document's memory takes {size / 2**20:.1f} MiB and {used / 2**20:.1f} of the "
                f"{self.budget_bytes / 2**20:.0f} MiB for saved documents are used (contexts.disk_mib); delete one first")
        meta = {"kind": CONTEXT_KIND, "format": str(CONTEXT_FORMAT), "model": model_name,
                "fingerprint": json.dumps(state["fingerprint"], sort_keys=True), "state_format": str(state["format"]),
                "name": info.name, "system": info.system or "", "tokens": str(len(ids)), "created": str(info.created),
                "ids_sha256": ids_digest(ids), "layers": json.dumps(scalars)}
        path = self.path(info.id)
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            save_file(tensors, tmp, metadata=meta)
            tmp.replace(path)  # atomic: a crash never leaves half a file under the real name
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ContextStorageError(f"cannot save the document memory: {exc.strerror or exc}") from None
        return path.stat().st_size

    def load(self, context_id: str, model_name: str, fingerprint: dict) -> tuple[ContextInfo, list[int], dict]:
        """(info, ids, InfLLMCache state dict) of a saved context, checked against this model and config."""
        info = self.info(context_id)
        path = self.path(context_id)
        meta = self._header(path)
        if meta.get("model") != model_name:
            raise ContextStorageError(f"{path.name} was saved by model {meta.get('model')!r}, not {model_name!r}")
        saved = json.loads(meta.get("fingerprint", "{}"))
        diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
        if diff:
            raise ContextStorageError(f"{path.name} was saved with other memory settings: {diff} (saved, current); "
                                      f"read the document again")
        try:
            with safe_open(path, framework="pt") as f:
                ids = f.get_tensor("ids").tolist()
                if ids_digest(ids) != meta.get("ids_sha256") or len(ids) != info.tokens:
                    raise ContextStorageError(f"{path.name} is damaged: its token ids do not match their checksum")
                state = _unflatten(f, json.loads(meta["layers"]), saved, int(meta["state_format"]))
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as exc:
            raise ContextStorageError(f"{path.name} is damaged: {type(exc).__name__}: {exc}") from None
        if any(layer["seen"] != len(ids) for layer in state["layers"]):
            raise ContextStorageError(f"{path.name} is damaged: its memory does not hold its {len(ids)} tokens")
        return info, ids, state

    def load_ids(self, context_id: str) -> list[int]:
        return self._tensor(context_id, "ids").tolist()

    def load_text(self, context_id: str) -> str:
        try:
            return bytes(self._tensor(context_id, "text").numpy()).decode("utf-8")
        except UnicodeDecodeError:
            raise ContextStorageError(f"{self.path(context_id).name} is damaged: its text is not UTF-8") from None

    def _tensor(self, context_id: str, name: str) -> torch.Tensor:
        path = self.path(context_id)
        if not path.is_file():
            raise ContextNotFoundError(f"no document memory with id {context_id!r}")
        self._header(path)
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        except (OSError, SafetensorError) as exc:
            raise ContextStorageError(f"{path.name} is damaged: {exc}") from None

    def delete(self, context_id: str) -> bool:
        path = self.path(context_id)
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False


def default_folder() -> Path:
    base = os.environ.get("INFLLM_CACHE_DIR")
    return Path(base).expanduser() / "contexts" if base else Path.home() / ".cache" / "inf_llm" / "contexts"


def check_document(name: str, text: str) -> None:
    if not name or len(name) > MAX_NAME_CHARS:
        raise RequestError(f"a document's name has 1 to {MAX_NAME_CHARS} characters")
    if not text.strip():
        raise RequestError("the document is empty")


def now() -> int:
    return int(time.time())

