"""The `auto` values of the memory's placement keys (`config.AUTO_KEYS`: fattn, offload, offload_access,
pin_memory, host_pool_tokens, max_cached_block, async_global_stream), resolved from the machine and the model.

Owns: `Machine` (what the resolution needs to know of the hardware), `ModelShape` (the K/V bytes of a
token), `resolve_model` (a pure function of a `ModelConfig`, a `Machine` and a `ModelShape`: unit-testable with
made-up machines) and `resolve_config` (the same for a whole config, which bounds a conversation's length and
is validated again once resolved). `describe_machine` reads the real machine (torch, imported lazily).
Must not know: the memory's internals beyond the rules `config.py` states, transformers (a model's config is
read through `getattr` only), HTTP.

On a CUDA GPU with triton: the Triton kernels, and the blocks kept on the GPU when a whole conversation's
blocks fit comfortably in its free memory (no host traffic at all), else the flat configuration the README's
GPU table measures (blocks in a pinned host pool read by the GPU through a device-bookkept cache, a side
stream). On a CPU: the torch ops and the blocks in host memory, where they already are. An explicit value
always wins; one that cannot run on this machine is a ConfigError naming its key.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from inf_llm.config import (
    AUTO,
    AUTO_KEYS,
    MAX_DEVICE_CACHED_BLOCKS,
    CacheStrategy,
    InfLLMConfig,
    MemoryType,
    ModelConfig,
)
from inf_llm.errors import ConfigError

logger = logging.getLogger(__name__)

# The device cache of the flat configuration (README, Results): 192 slots per layer hit 84.6% of a random-weight
# 128K prefill's lookups with the prefetch, and kept GPU memory at ~7.2 GiB above a 7B model's weights.
FLAT_CACHED_BLOCKS = 192
# The block cache of offload_access: cache, as the original project sizes it.
ORIGINAL_CACHED_BLOCKS = 32
# Blocks stay on the GPU when a whole conversation's (and the kept snapshots') take at most this share of the
# GPU memory free after the weights: the rest is for a prefill chunk's activations (about 4 GiB for a 7B model's
# 8K chunk) and the allocator's slack.
DEVICE_BLOCKS_SHARE = 0.5
# The device cache of offload_access: direct takes at most this share of the free GPU memory.
DEVICE_CACHE_SHARE = 0.25
# The pinned host pool takes at most this share of the host memory available after the weights: page-locked
# memory cannot be swapped, and snapshots, documents and the OS need the rest.
HOST_POOL_SHARE = 0.5


@dataclass(frozen=True)
class Machine:
    """What the resolution knows of the hardware the model runs on."""

    device: Literal["cpu", "cuda"]  # the kind of device holding the model's weights
    triton: bool = False  # triton is importable
    gpu_free_bytes: int = 0  # GPU memory free after the weights (summed over the model's GPUs)
    host_available_bytes: int = 0  # host memory available after the weights

    def describe(self) -> str:
        if self.device == "cpu":
            return f"CPU, {self.host_available_bytes / 2**30:.1f} GiB host memory available"
        return (
            f"CUDA GPU with {self.gpu_free_bytes / 2**30:.1f} GiB free, triton {'yes' if self.triton else 'no'}, "
            f"{self.host_available_bytes / 2**30:.1f} GiB host memory available"
        )


@dataclass(frozen=True)
class ModelShape:
    """The model's attention shape: what one token's keys and values cost."""

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int  # bytes of one element in the compute dtype

    @classmethod
    def of(cls, model: Any) -> ModelShape:
        """The shape of a transformers model (read through its config's attributes)."""
        text = model.config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        first = next(model.parameters())
        return cls(
            text.num_hidden_layers,
            heads,
            getattr(text, "num_key_value_heads", None) or heads,
            head_dim,
            first.element_size(),
        )

    def token_bytes(self, element_bytes: int | None = None) -> int:
        """K and V of one token over every layer."""
        return self.layers * 2 * self.kv_heads * self.head_dim * (element_bytes or self.dtype_bytes)


@dataclass(frozen=True)
class Choice:
    """One key's value and why: `auto` when the resolution chose it, else the config set it."""

    value: Any
    reason: str
    auto: bool

    def as_dict(self) -> dict:
        return {"value": self.value, "auto": self.auto, "reason": self.reason}


@dataclass(frozen=True)
class Resolution:
    """A model config with no `auto` left, and each auto key's value and reason."""

    model: ModelConfig
    machine: Machine
    choices: dict[str, Choice] = field(default_factory=dict)

    def as_status(self) -> dict:
        return {key: choice.as_dict() for key, choice in self.choices.items()}

    def log(self) -> None:
        chosen = "; ".join(f"{k}={c.value!r} ({c.reason})" for k, c in self.choices.items() if c.auto)
        logger.info("auto settings on %s: %s", self.machine.describe(), chosen or "none (every key set)")


def has_auto(m: ModelConfig) -> bool:
    return any(getattr(m, key) == AUTO for key in AUTO_KEYS)


def conversation_tokens(cfg: InfLLMConfig) -> int:
    """The most tokens one conversation holds: its longest prompt and answer."""
    return min(cfg.max_len, cfg.server.max_prompt_tokens) + cfg.server.max_new_tokens_limit


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def resolve_model(
    m: ModelConfig, machine: Machine, shape: ModelShape, tokens: int | None = None, kept_bytes: int = 0
) -> Resolution:
    """Every `auto` key of `m` resolved for `machine` and `shape`. `tokens`: the most tokens a conversation
    holds (None: unknown, then blocks are offloaded on a GPU); `kept_bytes`: the snapshots' budget, which lives
    where the blocks do. Raises ConfigError for an explicit value that cannot run on `machine`."""
    cuda = machine.device == "cuda"
    choices: dict[str, Choice] = {}

    def decide(key: str, value: Any, reason: str) -> Any:
        set_value = getattr(m, key)
        if set_value != AUTO:
            choices[key] = Choice(set_value, "set in the config", False)
            return set_value
        choices[key] = Choice(value, reason, True)
        return value

    # --- fattn: the Triton kernels where they run
    if m.fattn is True and not (cuda and machine.triton):
        where = "a CUDA GPU without triton" if cuda else "a CPU"
        raise ConfigError(
            f"model.fattn: true needs a CUDA GPU with triton installed, but the model is on {where}; "
            f"set model.fattn: auto or false"
        )
    if not cuda:
        decide("fattn", False, "the Triton kernels need a CUDA GPU")
    elif not machine.triton:
        decide("fattn", False, "triton is not installed")
    elif m.lookup_heads == "query":
        decide("fattn", False, "lookup_heads: query runs on the torch ops only")
    else:
        decide("fattn", True, "CUDA GPU with triton: the fused kernels")

    keeps_blocks = m.type is MemoryType.INF_LLM
    block_bytes = shape.token_bytes() * m.block_size  # one block's K/V over every layer
    # --- offload: where the blocks live
    if m.offload is False and m.offload_dtype is not None:
        raise ConfigError(
            f"model.offload_dtype: {m.offload_dtype} compresses offloaded blocks, but model.offload is "
            f"false; set offload: auto or true, or remove offload_dtype"
        )
    if not keeps_blocks:
        offload = decide("offload", False, f"type {m.type.value} keeps no memory blocks")
    elif m.offload_dtype is not None:
        offload = decide("offload", True, f"offload_dtype: {m.offload_dtype} stores blocks in host memory")
    elif m.offload_access == "direct":
        offload = decide("offload", True, "offload_access: direct reads blocks from host memory")
    elif not cuda:
        offload = decide("offload", False, "on a CPU the blocks are in host memory already")
    else:
        need = None if tokens is None else -(-tokens // m.block_size) * block_bytes + kept_bytes
        room = DEVICE_BLOCKS_SHARE * machine.gpu_free_bytes
        if need is not None and need <= room:
            offload = decide(
                "offload",
                False,
                f"a whole conversation's blocks ({tokens} tokens: {_gib(need)} with the "
                f"snapshots) fit in {DEVICE_BLOCKS_SHARE:.0%} of the free GPU memory",
            )
        else:
            why = "the conversation length is unknown"
            if need is not None:
                why = (
                    f"a whole conversation's blocks ({_gib(need)}) exceed {DEVICE_BLOCKS_SHARE:.0%} of the free "
                    f"GPU memory ({_gib(machine.gpu_free_bytes)})"
                )
            offload = decide("offload", True, f"{why}: blocks in host memory")
    offloaded = keeps_blocks and offload is True

    # --- offload_access: direct where its rules allow
    blockers = [
        reason
        for bad, reason in (
            (not cuda, "the GPU reads host memory directly only on CUDA"),
            (m.faiss, "faiss looks up on the host"),
            (
                m.cache_strategy is not CacheStrategy.LRU,
                f"cache_strategy {m.cache_strategy.value} needs the host cache",
            ),
            (m.pin_memory is False, "pin_memory is false"),
            (m.perhead and m.offload_dtype is not None, "perhead with offload_dtype needs the host cache"),
            (
                m.max_cached_block != AUTO and m.max_cached_block > MAX_DEVICE_CACHED_BLOCKS,
                f"max_cached_block is above {MAX_DEVICE_CACHED_BLOCKS}",
            ),
        )
        if bad
    ]
    if not offloaded:
        access = decide("offload_access", "cache", "blocks are not offloaded")
    elif blockers:
        access = decide("offload_access", "cache", blockers[0])
    else:
        access = decide("offload_access", "direct", "the GPU reads the blocks it lacks from pinned host memory")
    direct = offloaded and access == "direct"

    pinned = direct or (offloaded and cuda)
    decide(
        "pin_memory",
        pinned,
        "offload_access: direct reads pinned memory"
        if direct
        else "offloaded blocks copied to a CUDA GPU"
        if pinned
        else "nothing copies to a GPU",
    )
    decide(
        "async_global_stream",
        offloaded and cuda,
        "block loads overlap the local stage on a side stream"
        if offloaded and cuda
        else "no offloaded blocks on a GPU",
    )

    # --- max_cached_block: the device slots of offloaded blocks (>= topk, by the config's rule)
    floor = m.topk
    if m.perhead and offloaded and not direct:
        floor = m.topk * (shape.q_heads if m.lookup_heads == "query" else shape.kv_heads)  # every head's own topk
    if direct and not m.perhead:
        # on a CPU (direct runs inline there, for the tests) the "device" slots are host memory too
        fit = int(DEVICE_CACHE_SHARE * machine.gpu_free_bytes // max(block_bytes, 1)) if cuda else FLAT_CACHED_BLOCKS
        slots = max(floor, min(FLAT_CACHED_BLOCKS, MAX_DEVICE_CACHED_BLOCKS, fit))
        why = (
            f"the flat configuration's {FLAT_CACHED_BLOCKS} slots"
            if slots == FLAT_CACHED_BLOCKS
            else f"{fit} slots of {block_bytes >> 20} MiB fit in {DEVICE_CACHE_SHARE:.0%} of the free GPU memory"
        )
        decide("max_cached_block", slots, why)
    elif offloaded:
        decide(
            "max_cached_block",
            max(ORIGINAL_CACHED_BLOCKS, floor),
            "the original's block cache" if floor <= ORIGINAL_CACHED_BLOCKS else "every head's topk",
        )
    else:
        decide("max_cached_block", max(ORIGINAL_CACHED_BLOCKS, floor), "unused: blocks are not offloaded")

    # --- host_pool_tokens: page-locked once, for the longest conversation the host can hold
    if offloaded and cuda:
        element = 1 if m.offload_dtype is not None else None  # fp8 / int8 codes
        per_token = shape.token_bytes(element)
        fit = int(HOST_POOL_SHARE * machine.host_available_bytes // max(per_token, 1)) // m.block_size * m.block_size
        longest = None if tokens is None else -(-tokens // m.block_size) * m.block_size
        pool = fit if longest is None else min(fit, longest)
        if pool < m.block_size:
            decide("host_pool_tokens", None, "too little host memory for a pool")
        elif pool == longest:
            decide("host_pool_tokens", pool, f"the longest conversation ({tokens} tokens)")
        else:
            decide("host_pool_tokens", pool, f"{HOST_POOL_SHARE:.0%} of the available host memory")
    else:
        decide("host_pool_tokens", None, "no page-locking to save" if not cuda else "blocks are not offloaded")

    resolved = m.model_copy(update={key: c.value for key, c in choices.items()})
    return Resolution(_revalidated(resolved), machine, choices)


def _revalidated(m: ModelConfig) -> ModelConfig:
    """`m` checked field by field again (model_copy does not validate); the fields it was given stay set."""
    try:
        return ModelConfig.model_validate(m.model_dump(include=m.model_fields_set | set(AUTO_KEYS)))
    except ValueError as exc:
        raise ConfigError(f"the resolved auto settings are invalid: {exc}") from None


def resolve_config(cfg: InfLLMConfig, machine: Machine, shape: ModelShape) -> tuple[InfLLMConfig, Resolution]:
    """`cfg` with its auto keys resolved (sized by the longest conversation it serves), validated again."""
    kept = cfg.contexts.ram_mib << 20 if cfg.contexts.snapshots else 0
    resolution = resolve_model(cfg.model, machine, shape, conversation_tokens(cfg), kept)
    raw = cfg.model_dump(exclude_unset=True)
    raw["model"] = resolution.model.model_dump(exclude_unset=True)
    try:
        resolved = InfLLMConfig.model_validate(raw)
    except ValueError as exc:
        raise ConfigError(f"the resolved auto settings are invalid: {exc}") from None
    return resolved, resolution


# ------------------------------------------------------------------------------------ the real machine
def describe_machine(model: Any) -> Machine:
    """The machine `model` (a torch module) runs on: its device kind, the free memory of its GPUs, the host's
    available memory, whether triton is importable."""
    import torch

    devices = {p.device for p in model.parameters()}
    gpus = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    host = _host_available_bytes()
    if not gpus:
        return Machine("cpu", host_available_bytes=host)
    free = sum(torch.cuda.mem_get_info(i)[0] for i in gpus)
    return Machine("cuda", importlib.util.find_spec("triton") is not None, free, host)


def _host_available_bytes() -> int:
    """MemAvailable on Linux (what can be allocated without swapping), else the physical memory."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_for(model: Any, m: ModelConfig) -> ModelConfig:
    """`m` with its auto keys resolved for `model`'s machine (a caller that has no whole config: the
    conversation length is unknown). Logs the choices."""
    if not has_auto(m):
        return m
    resolution = resolve_model(m, describe_machine(model), ModelShape.of(model))
    resolution.log()
    return resolution.model
