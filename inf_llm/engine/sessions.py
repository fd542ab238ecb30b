"""Saved conversations: the on-disk session format, and the in-memory copies that fork() makes.

Owns: SESSION_FORMAT, the file layout and its validation. A session saved as NAME is two files:

    NAME.pt    the memory: InfLLMCache.state_dict() written with torch.save (its own MEMORY_STATE_FORMAT and
               the model/config fingerprint inside), read back with torch.load(weights_only=True), so
               nothing but tensors and plain containers is ever unpickled from a file
    NAME.json  {"kind", "format", "saved_at", "model", "memory_type", "held_ids": [token ids the memory holds],
                ...the caller's metadata (the terminal chat's system, documents and history)}

Files written by the terminal chat's /save before this module existed are the same layout (kind
"inf_llm.chat session", format 1) and load as they are.
Must not know: threads or the worker (the engine calls these in its worker thread), HTTP, the chat's UI.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from inf_llm.adapter import InfLLMCache
from inf_llm.errors import SessionStateError

# Bumped when the files' layout changes; a file of another format is refused with both numbers.
SESSION_FORMAT = 1
SESSION_KIND = "inf_llm session"
# What /save wrote before the engine owned sessions: the same layout, read as format 1.
LEGACY_KINDS = ("inf_llm.chat session",)
CACHE_SUFFIX = ".pt"
SIDECAR_SUFFIX = ".json"
# Sidecar keys this module writes; a caller's metadata may not use them.
RESERVED_KEYS = frozenset({"kind", "format", "saved_at", "model", "memory_type", "held_ids"})


@dataclass(frozen=True)
class SessionState:
    """A conversation's state held in memory (Engine.fork): the token ids and a private copy of their memory
    (None when nothing is held). Restoring it installs a fresh copy, so one fork can be restored many times."""

    held: tuple[int, ...]
    cache: InfLLMCache | None = field(repr=False, default=None)


@dataclass(frozen=True)
class SessionInfo:
    """What the engine holds now: token count and the memory's per-layer statistics (InfLLMCache.stats())."""

    held_tokens: int
    layers: list = field(default_factory=list)


@dataclass(frozen=True)
class SavedSession:
    """What save() wrote or restore() read: the two files, the token count and the caller's metadata."""

    cache_path: Path
    sidecar: Path
    held_tokens: int
    metadata: dict[str, Any]


def session_paths(target: str | Path) -> tuple[Path, Path]:
    """NAME (or NAME.pt, NAME.json) -> (NAME.pt, NAME.json)."""
    path = Path(target).expanduser()
    if path.suffix in (CACHE_SUFFIX, SIDECAR_SUFFIX):
        path = path.with_suffix("")
    return path.with_name(path.name + CACHE_SUFFIX), path.with_name(path.name + SIDECAR_SUFFIX)


def write_session(target: str | Path, cache: InfLLMCache | None, held: list[int], model_name: str,
                  memory_type: str, metadata: dict[str, Any] | None = None) -> SavedSession:
    """Write NAME.pt and NAME.json (each atomically). Raises SessionStateError (nothing held, no such folder,
    a reserved metadata key, an OS error)."""
    if cache is None or not held:
        raise SessionStateError("nothing to save: the memory is empty")
    metadata = dict(metadata or {})
    clash = sorted(RESERVED_KEYS & metadata.keys())
    if clash:
        raise SessionStateError(f"session metadata may not use the keys {clash}")
    cache_path, sidecar = session_paths(target)
    if not cache_path.parent.is_dir():
        raise SessionStateError(f"cannot save to {target}: folder {cache_path.parent} does not exist")
    data = {
        "kind": SESSION_KIND, "format": SESSION_FORMAT,
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_name, "memory_type": memory_type, **metadata, "held_ids": list(held),
    }
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    try:
        cache.save(cache_path)
        tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        tmp.replace(sidecar)  # atomic: a crash never leaves half a sidecar under the real name
    except OSError as exc:
        raise SessionStateError(f"cannot save to {target}: {exc.strerror or exc}") from None
    return SavedSession(cache_path, sidecar, len(held), metadata)


def read_session(target: str | Path, model) -> tuple[InfLLMCache, list[int], SavedSession]:
    """Read and check a saved session for `model` (patched). Raises SessionStateError naming the file and
    what is wrong: missing, not a session, another format, damaged, another model/config, files that are not
    from the same save."""
    cache_path, sidecar = session_paths(target)
    missing = [str(p) for p in (cache_path, sidecar) if not p.is_file()]
    if missing:
        raise SessionStateError(f"no saved session at {target}: missing {' and '.join(missing)}")
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SessionStateError(f"{sidecar} is not a saved session: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") not in (SESSION_KIND, *LEGACY_KINDS):
        raise SessionStateError(f"{sidecar} is not a saved session (no kind {SESSION_KIND!r})")
    if data.get("format") != SESSION_FORMAT:
        raise SessionStateError(f"{sidecar} has session format {data.get('format')!r}; this version reads "
                                f"format {SESSION_FORMAT}")
    ids = data.get("held_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise SessionStateError(f"{sidecar} is damaged: held_ids is not a list of token ids")
    cache = load_memory(cache_path, model)
    if cache.get_seq_length() != len(ids):
        raise SessionStateError(f"{cache_path} holds {cache.get_seq_length()} tokens but {sidecar} lists "
                                f"{len(ids)}; the two files are not from the same save")
    metadata = {k: v for k, v in data.items() if k not in RESERVED_KEYS}
    return cache, ids, SavedSession(cache_path, sidecar, len(ids), metadata)


def load_memory(path: Path, model) -> InfLLMCache:
    """InfLLMCache.load with every way a foreign or damaged file fails as a SessionStateError."""
    try:
        return InfLLMCache.load(path, model)
    except (pickle.UnpicklingError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise SessionStateError(f"{path} is not a saved memory file ({type(exc).__name__})") from None
