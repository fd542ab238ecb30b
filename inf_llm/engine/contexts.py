"""Document memories ("contexts"): a document read once, its memory kept in RAM (a prefix-cache entry) and
on disk, so that every chat on it continues from there, also after a restart.

Owns: the document's place in a conversation (`with_document`, one definition of the text around it),
the context file format (CONTEXT_FORMAT), the folder and its byte budget.

A context is one file, `ctx-<12 hex>.safetensors`: the tensors of the memory's state (InfLLMCache's
state_dict, flattened: `layers.<i>.init_k`, `layers.<i>.tail.k`, `layers.<i>.store.repr`, ...) and `ids`
(the document's token ids) and `text`; its header metadata holds the kind, format, model name, the memory's
fingerprint (model shape and every memory setting), the document's name and system prompt, the per-layer
scalars and a SHA-256 of the ids. Nothing is unpickled: safetensors holds tensors and strings only. A file of
another model or memory config, of another format, or damaged, is refused with an error naming it.
A file is read through one private memory map: its tensors are views of the mapping, so loading a document
copies nothing up front and the pages a question never touches (most blocks) are never read.
Must not know: threads (the worker calls the engine side), HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from inf_llm.engine.templates import Message
from inf_llm.errors import ContextNotFoundError, ContextStorageError, RequestError

log = logging.getLogger(__name__)

CONTEXT_KIND = "inf_llm context"
# Bumped when the file layout changes; a file of a format not in READABLE_FORMATS is refused with both numbers.
# 2: each layer's store tensors hold unused rows for SPARE_TOKENS after its blocks.
CONTEXT_FORMAT = 2
READABLE_FORMATS = ("1", "2")
# Tokens of blocks saved unused after a document's: the store loaded in place grows into them (questions and
# answers) instead of copying every block into new tensors at its first new block; 6% of the file at 32K.
SPARE_TOKENS = 2048
SUFFIX = ".safetensors"
ID_PREFIX = "ctx-"
ID_HEX = 12
# Layer scalars kept in the header (the tensors hold the rest of a layer's state).
_SCALARS = ("seen", "rot_base", "n_local")
MAX_NAME_CHARS = 200
# safetensors' dtype names of the tensors a context file holds
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
# a header longer than this is not one we wrote (it lists a few tensors per layer)
_MAX_HEADER_BYTES = 64 << 20


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
            spare = -(-SPARE_TOKENS // store["k"].shape[2])  # k: (N, Hkv, block_size, D)
            for key in ("k", "v", "repr"):
                t = store[key]
                tensors[f"layers.{i}.store.{key}"] = torch.cat([t, t.new_zeros((spare, *t.shape[1:]))])
            tensors[f"layers.{i}.store.start_pos"] = torch.tensor(store["start_pos"], dtype=torch.int64)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, scalars


def _unflatten(f: _File, scalars: list[dict], fingerprint: dict, state_format: int) -> dict:
    layers = []
    for i, sc in enumerate(scalars):
        p = f"layers.{i}."
        tail = {"first_pos": int(sc["tail_first_pos"]), "k": f.tensor(p + "tail.k"), "v": f.tensor(p + "tail.v")}
        if p + "tail.score" in f.index:
            tail["score"] = f.tensor(p + "tail.score")
        layer = {key: sc.get(key) for key in _SCALARS} | {
            "init_k": f.tensor(p + "init_k"), "init_v": f.tensor(p + "init_v"), "tail": tail}
        if p + "store.k" in f.index:
            layer["store"] = {key: f.tensor(p + "store." + key) for key in ("k", "v", "repr")}
            layer["store"]["start_pos"] = f.tensor(p + "store.start_pos").tolist()
            blocks = len(layer["store"]["start_pos"])
            if any(layer["store"][key].shape[0] < blocks for key in ("k", "v", "repr")):
                raise ContextStorageError(f"{f.path.name} is damaged: layer {i} has fewer blocks than positions")
        layers.append(layer)
    return {"format": state_format, "fingerprint": fingerprint, "layers": layers}


@dataclass
class _File:
    """A context file: its header (metadata and the tensors' places), read once; `tensor` maps the data."""

    path: Path
    meta: dict[str, str]
    index: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}, offsets relative to `data_start`
    data_start: int
    size: int
    _bytes: torch.Tensor | None = None  # (size,) uint8 over the whole file, mapped at the first tensor

    @classmethod
    def read(cls, path: Path) -> _File:
        """The header of a safetensors file (8 bytes of little-endian length, then JSON), checked to be ours."""
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                (n,) = struct.unpack("<Q", fh.read(8).ljust(8, b"\0"))
                if not 2 <= n <= min(_MAX_HEADER_BYTES, size - 8):
                    raise ValueError("no safetensors header")
                index = json.loads(fh.read(n))
        except (OSError, ValueError) as exc:
            raise ContextStorageError(f"{path.name} is not a readable document memory: {exc}") from None
        if not isinstance(index, dict):
            raise ContextStorageError(f"{path.name} is not a readable document memory: its header is not a table")
        meta = index.pop("__metadata__", None) or {}
        if meta.get("kind") != CONTEXT_KIND:
            raise ContextStorageError(f"{path.name} is not a document memory (no kind {CONTEXT_KIND!r})")
        if meta.get("format") not in READABLE_FORMATS:
            raise ContextStorageError(f"{path.name} has context format {meta.get('format')!r}; this version reads "
                                      f"formats {', '.join(READABLE_FORMATS)}")
        return cls(path, meta, index, 8 + n, size)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name`: a view of the file's private mapping (copy on write: the file never changes)."""
        try:
            entry = self.index[name]
            dtype, shape = _DTYPES[entry["dtype"]], [int(d) for d in entry["shape"]]
            begin, end = (self.data_start + int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ContextStorageError(f"{self.path.name} is damaged: tensor {name!r}: {exc!r}") from None
        width = torch.empty((), dtype=dtype).element_size()
        count = 1
        for d in shape:
            count *= d
        if not self.data_start <= begin <= end <= self.size or end - begin != count * width:
            raise ContextStorageError(f"{self.path.name} is damaged: tensor {name!r} lies outside the file")
        if self._bytes is None:
            try:
                storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self.size)
            except RuntimeError as exc:
                raise ContextStorageError(f"{self.path.name} cannot be read: {exc}") from None
            self._bytes = torch.empty(0, dtype=torch.uint8).set_(storage)
        raw = self._bytes[begin:end]
        if begin % width:  # a view must be aligned to its element size; safetensors aligns, a copy if not
            raw = raw.clone()
        return raw.view(dtype).view(shape)

    def ids(self) -> list[int]:
        ids = self.tensor("ids").tolist()
        if ids_digest(ids) != self.meta.get("ids_sha256") or len(ids) != int(self.meta.get("tokens", -1)):
            raise ContextStorageError(f"{self.path.name} is damaged: its token ids do not match their checksum")
        return ids

    def text(self) -> str:
        try:
            return bytes(self.tensor("text").numpy()).decode("utf-8")
        except UnicodeDecodeError:
            raise ContextStorageError(f"{self.path.name} is damaged: its text is not UTF-8") from None

    def info(self, context_id: str) -> ContextInfo:
        meta = self.meta
        return ContextInfo(context_id, meta.get("name", ""), meta.get("system") or None, int(meta.get("tokens", 0)),
                           int(meta.get("created", 0)), disk_bytes=self.size)


class ContextFolder:
    """The saved document memories: one file per context in `root`, at most `budget_bytes` and `max_count`."""

    def __init__(self, root: Path, budget_bytes: int, max_count: int):
        self.root = root
        self.budget_bytes = budget_bytes
        self.max_count = max_count

    def path(self, context_id: str) -> Path:
        return self.root / (check_id(context_id) + SUFFIX)

    def _files(self) -> list[Path]:
        return sorted(self.root.glob(f"{ID_PREFIX}*{SUFFIX}")) if self.root.is_dir() else []

    def list(self) -> list[ContextInfo]:
        out = []
        for path in self._files():
            try:
                out.append(self.info(path.name[: -len(SUFFIX)]))
            except (ContextStorageError, ContextNotFoundError) as exc:
                log.warning("skipping %s: %s", path, exc)
        return out

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._files())

    def open(self, context_id: str) -> _File:
        """The context's file, its header read and checked (its tensors are mapped when first asked for)."""
        path = self.path(context_id)
        if not path.is_file():
            raise ContextNotFoundError(f"no document memory with id {context_id!r}")
        return _File.read(path)

    def info(self, context_id: str) -> ContextInfo:
        return self.open(context_id).info(context_id)

    def save(self, info: ContextInfo, ids: Sequence[int], state: dict, model_name: str, text: str) -> int:
        """Write the context's file atomically; returns its size. ContextStorageError when it does not fit the
        budget or the disk (nothing half-written is left)."""
        tensors, scalars = _flatten(state)
        tensors["ids"] = torch.tensor(list(ids), dtype=torch.int64)
        tensors["text"] = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.budget_bytes <= 0:
            raise ContextStorageError("saving document memories is off (contexts.disk_mib is 0)")
        # the files' sizes, not their headers: a damaged file takes its room on disk too
        others = [p for p in self._files() if p.name != info.id + SUFFIX]
        if len(others) >= self.max_count:
            raise ContextStorageError(f"{len(others)} document memories are saved, the most this server keeps "
                                      f"(contexts.max_count); delete one first")
        used = sum(p.stat().st_size for p in others)
        if used + size > self.budget_bytes:
            raise ContextStorageError(
                f"this document's memory takes {size / 2**20:.1f} MiB and {used / 2**20:.1f} of the "
                f"{self.budget_bytes / 2**20:.0f} MiB for saved documents are used (contexts.disk_mib); "
                f"delete one first")
        meta = {"kind": CONTEXT_KIND, "format": str(CONTEXT_FORMAT), "model": model_name,
                "fingerprint": json.dumps(state["fingerprint"], sort_keys=True), "state_format": str(state["format"]),
                "name": info.name, "system": info.system or "", "tokens": str(len(ids)), "created": str(info.created),
                "ids_sha256": ids_digest(ids), "layers": json.dumps(scalars)}
        path = self.path(info.id)
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            save_file(tensors, tmp, metadata=meta)
            tmp.replace(path)  # atomic: no half file under the real name, and a mapped old file stays intact
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ContextStorageError(f"cannot save the document memory: {exc.strerror or exc}") from None
        return path.stat().st_size

    def load(self, context_id: str, model_name: str, fingerprint: dict) -> tuple[ContextInfo, list[int], dict]:
        """(info, ids, InfLLMCache state dict) of a saved context, checked against this model and config. The
        state's tensors are views of the file's mapping (see the module docstring)."""
        f = self.open(context_id)
        meta, name = f.meta, f.path.name
        if meta.get("model") != model_name:
            raise ContextStorageError(f"{name} was saved by model {meta.get('model')!r}, not {model_name!r}")
        try:
            saved = json.loads(meta.get("fingerprint", "{}"))
            diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
            if diff:
                raise ContextStorageError(f"{name} was saved with other memory settings: {diff} (saved, current); "
                                          f"read the document again")
            ids = f.ids()
            state = _unflatten(f, json.loads(meta["layers"]), saved, int(meta["state_format"]))
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ContextStorageError(f"{name} is damaged: {type(exc).__name__}: {exc}") from None
        if any(layer["seen"] != len(ids) for layer in state["layers"]):
            raise ContextStorageError(f"{name} is damaged: its memory does not hold its {len(ids)} tokens")
        return f.info(context_id), ids, state

    def saved_ids(self) -> dict[str, list[int]]:
        """Every readable saved context's token ids (a damaged file is skipped with a warning)."""
        out = {}
        for path in self._files():
            context_id = path.name[: -len(SUFFIX)]
            try:
                out[context_id] = self.open(context_id).ids()
            except (ContextStorageError, ContextNotFoundError) as exc:
                log.warning("skipping saved context %s: %s", context_id, exc)
        return out

    def load_document(self, context_id: str) -> tuple[ContextInfo, list[int], str]:
        """(info, ids, text) of a saved context, from one reading of its header."""
        f = self.open(context_id)
        return f.info(context_id), f.ids(), f.text()

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

