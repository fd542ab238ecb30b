"""The transformers 5.x hook: InfLLM attention through supported extension points only.

- `IdentityRotary` replaces `model.model.rotary_emb` (cos=1, sin=0): q and k reach the cache and the
  attention function un-rotated and bit-exact; the memory applies RoPE at the positions it chooses.
  The one step outside transformers' extension points: the modeling module's `apply_rotary_pos_emb` is
  wrapped so that it returns q and k untouched when handed IdentityRotary's cos, instead of computing
  `q * 1 + rotate_half(q) * 0` (about ten full passes over q and k per layer: 2% of a GPU prefill chunk,
  and the most numerous ops of a CPU decode step). Any other cos goes to the original function.
- `InfLLMCache` (a `Cache` of `InfLLMLayer`s) owns one `ContextMemory` per layer for ONE sequence.
- `infllm_attention`, registered as attention implementation "infllm", hands each layer's new q/k/v to
  its memory. No mask function is registered, so transformers never builds an N x N mask.

How the attention function finds its layer: the cache's `update()` runs right before the attention
call, in the same thread, for the same layer (Llama, Mistral, Qwen2, Qwen3 on transformers 5.17 and 5.2x).
`update()` records the layer in a context variable and the function checks the layer index matches.
Knows nothing of HTTP or tokenizers.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.util
import logging
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from inf_llm.auto_config import resolve_for
from inf_llm.config import MemoryType, ModelConfig
from inf_llm.errors import GenerationCancelled, SessionStateError, UnsupportedModelError
from inf_llm.kernels import get_backend
from inf_llm.memory import ContextMemory, LayerStats, RotaryTable
from inf_llm.memory.block_cache import RingSlots
from inf_llm.memory.context_memory import check_block_cache
from inf_llm.memory.host_pool import HostBlockPool
from inf_llm.memory.snapshot import LayerSnapshot

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "infllm"
# The layout of InfLLMCache.state_dict(); bumped when it changes. A session file's own format (the files
# around this state) is inf_llm.engine.sessions.SESSION_FORMAT.
MEMORY_STATE_FORMAT = 1

# The layer whose update() ran last in this thread/context. A ContextVar, not a global: each worker
# thread sees its own value, so two sequences in two threads never see each other's layers.
_ACTIVE_LAYER: contextvars.ContextVar[InfLLMLayer | None] = contextvars.ContextVar("infllm_layer", default=None)


class IdentityRotary(nn.Module):
    """Drop-in for LlamaRotaryEmbedding & co.: returns cos=1, sin=0, so apply_rotary_pos_emb is a no-op.

    The real module is kept as `.real` (its inv_freq is a non-persistent buffer: the state dict is
    unchanged) and supplies the frequencies of the memory's RotaryTable.
    """

    def __init__(self, real: nn.Module):
        super().__init__()
        self.real = real
        self.dim = real.inv_freq.shape[-1] * 2

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*position_ids.shape[:2], self.dim)
        cos = torch.ones((), dtype=x.dtype, device=x.device).expand(shape)
        cos.infllm_identity = True  # recognised by the wrapped apply_rotary_pos_emb (_skip_identity_rope)
        return cos, torch.zeros((), dtype=x.dtype, device=x.device).expand(shape)


def _skip_identity_rope(model: nn.Module) -> None:
    """Wrap `apply_rotary_pos_emb` in the modeling modules of the model's attention classes (idempotent; the
    wrapper delegates unless cos comes from IdentityRotary, so other models in the process are unaffected).
    A module without that function keeps computing the identity rotation: slower, same result."""
    for module in model.modules():
        if not hasattr(module, "q_proj"):
            continue
        namespace = sys.modules.get(type(module).__module__)
        original = getattr(namespace, "apply_rotary_pos_emb", None)
        if not callable(original) or getattr(original, "infllm_skips_identity", False):
            continue

        @functools.wraps(original)
        def apply_rotary_pos_emb(q, k, cos, sin, *args, _original=original, **kwargs):
            if getattr(cos, "infllm_identity", False):
                return q, k
            return _original(q, k, cos, sin, *args, **kwargs)

        apply_rotary_pos_emb.infllm_skips_identity = True
        namespace.apply_rotary_pos_emb = apply_rotary_pos_emb


@dataclass
class PatchState:
    """What patch_model leaves on the model (as `model.infllm`): config, shapes, RoPE source."""

    cfg: ModelConfig
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rotary: nn.Module
    host_pool: HostBlockPool | None = None  # host memory of offloaded blocks, lent to one cache at a time
    ropes: dict = field(default_factory=dict)  # device -> RotaryTable
    copy_streams: dict = field(default_factory=dict)  # device -> side CUDA stream (async_global_stream)
    ring_slots: dict = field(default_factory=dict)  # (shape, dtype, device) -> the layers' shared ring slots

    def rope_for(self, device: torch.device) -> RotaryTable:
        if device not in self.ropes:
            real = self.rotary
            self.ropes[device] = RotaryTable(
                real.inv_freq.detach().to(device), self.head_dim,
                attention_scaling=float(getattr(real, "attention_scaling", 1.0) or 1.0),
                base=self.cfg.base, distance_scale=self.cfg.distance_scale,
            )
        return self.ropes[device]

    def copy_stream_for(self, device: torch.device):
        if device.type != "cuda" or not self.cfg.async_global_stream:
            return None  # no side stream on CPU: async_global_stream is a no-op there
        if device not in self.copy_streams:
            self.copy_streams[device] = torch.cuda.Stream(device=device)
        return self.copy_streams[device]

    def ring_slots_for(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> RingSlots:
        """The formation-ring slots the layers on `device` share (allocated at the first formation)."""
        key = (shape, dtype, device)
        if key not in self.ring_slots:
            self.ring_slots[key] = RingSlots(shape, dtype, device)
        return self.ring_slots[key]

    def fingerprint(self) -> dict:
        memory_keys = ("type", "n_init", "n_local", "topk", "repr_topk", "block_size", "exc_block_size",
                       "base", "distance_scale", "perhead", "dense_decoding", "full_attention_tokens", "lookup_heads",
                       "remainder_visibility", "block_score")
        return {"layers": self.num_layers, "q_heads": self.num_q_heads, "kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, **{k: _plain(getattr(self.cfg, k)) for k in memory_keys}}


def _plain(value):
    return value.value if hasattr(value, "value") else value


def _decoder(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no model.rotary_emb: InfLLM supports Llama-family decoders "
            f"(Llama, Mistral, Qwen2, Qwen3, SmolLM2)"
        )
    return inner


def patch_model(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Route attention through the context memory. Idempotent; the weights are untouched. `cfg`'s auto keys
    are resolved for the model's machine here unless the caller resolved them (inf_llm.auto_config)."""
    inner = _decoder(model)
    cfg = resolve_for(model, cfg)
    text_cfg = model.config.get_text_config(decoder=True)
    rotary = inner.rotary_emb.real if isinstance(inner.rotary_emb, IdentityRotary) else inner.rotary_emb
    if not hasattr(rotary, "inv_freq"):
        raise UnsupportedModelError(f"{type(rotary).__name__} has no inv_freq: unsupported rotary embedding")
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    first = next(model.parameters(), None)  # offload null: the block cache is used when the model is on a GPU
    offload = cfg.offload if cfg.offload is not None else first is not None and first.device.type != "cpu"
    check_block_cache(cfg, text_cfg.num_attention_heads,
                      getattr(text_cfg, "num_key_value_heads", None) or text_cfg.num_attention_heads, offload)
    if rotary.inv_freq.shape[-1] * 2 != head_dim:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    if cfg.full_attention_tokens == "auto":  # the model's native context
        native = getattr(text_cfg, "max_position_embeddings", None)
        if not native:
            raise UnsupportedModelError("model.full_attention_tokens: auto needs the model's "
                                        "max_position_embeddings; set a number of tokens")
        cfg = cfg.model_copy(update={"full_attention_tokens": int(native)})
    AttentionInterface.register(ATTN_IMPLEMENTATION, infllm_attention)
    inner.rotary_emb = IdentityRotary(rotary)
    _skip_identity_rope(model)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.infllm = PatchState(
        cfg=cfg, num_layers=text_cfg.num_hidden_layers, num_q_heads=text_cfg.num_attention_heads,
        num_kv_heads=getattr(text_cfg, "num_key_value_heads", None) or text_cfg.num_attention_heads,
        head_dim=head_dim, rotary=rotary,
        host_pool=HostBlockPool(cfg.host_pool_tokens) if cfg.host_pool_tokens else None,
    )
    from inf_llm.adapter.decode_graph import install_decode_graphs  # it builds on this module
    from inf_llm.adapter.fused_elementwise import install_fused_elementwise, remove_fused_elementwise

    install_decode_graphs(model)
    if _wants_fused_elementwise(model, cfg):
        install_fused_elementwise(model)
    else:
        remove_fused_elementwise(model)  # a re-patch with the option off
    log.info("patched %s with %s attention", type(model).__name__, MemoryType(cfg.type).value)
    return model


def _wants_fused_elementwise(model: nn.Module, cfg: ModelConfig) -> bool:
    """`fused_elementwise`: as set, or (null) when the weights are on a CUDA GPU and triton is installed."""
    if cfg.fused_elementwise is not None:
        return cfg.fused_elementwise
    first = next(model.parameters(), None)
    return first is not None and first.device.type == "cuda" and importlib.util.find_spec("triton") is not None


def unpatch_model(model: nn.Module, implementation: str = "sdpa") -> nn.Module:
    inner = _decoder(model)
    if isinstance(inner.rotary_emb, IdentityRotary):
        inner.rotary_emb = inner.rotary_emb.real
    model.set_attn_implementation(implementation)
    from inf_llm.adapter.decode_graph import remove_decode_graphs
    from inf_llm.adapter.fused_elementwise import remove_fused_elementwise

    remove_decode_graphs(model)
    remove_fused_elementwise(model)
    if hasattr(model, "infllm"):
        del model.infllm
    return model


class InfLLMLayer(CacheLayerMixin):
    """One decoder layer's slot in the cache; its ContextMemory is created at the first update (when the
    layer's device and dtype are known: with device_map, layers live on different devices)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: InfLLMCache, layer_idx: int):
        super().__init__()
        # What the layer needs of its cache, not the cache itself: a layer -> cache reference would make a
        # reference cycle, and Python frees cycles only when its collector runs, which it does by object
        # counts, not bytes: discarded caches (GBs of K/V each) then piled up (19.9 GB in a passkey sweep).
        self.patch_state: PatchState = cache.patch_state
        self.offload = cache.offload
        lease = getattr(cache, "host_lease", None)
        self.host_storage = lease.storage(layer_idx) if lease is not None else None
        self.layer_idx = layer_idx
        self.memory: ContextMemory | None = None
        self.pending_state: dict | None = None  # a loaded session waiting for the device to be known
        self.planned_tokens = 0  # the length the current request brings the conversation to (InfLLMCache.plan)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.initialize(key_states.device, key_states.dtype)

    def initialize(self, device: torch.device, dtype: torch.dtype) -> None:
        """Make the layer's memory for keys of `dtype` on `device` (and apply a loaded state)."""
        state = self.patch_state
        self.memory = ContextMemory(
            state.cfg, state.rope_for(device), state.num_q_heads, state.num_kv_heads, state.head_dim,
            dtype, device, get_backend(state.cfg.fattn, device.type),
            offload=self.offload, copy_stream=state.copy_stream_for(device), host_storage=self.host_storage,
            ring_slots=state.ring_slots_for,
        )
        if self.pending_state is not None:
            self.memory.load_state(self.pending_state)
            self.pending_state = None
        self.memory.plan(self.planned_tokens)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        if self.memory is None:
            return int(self.pending_state["seen"]) if self.pending_state else 0
        return self.memory.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0  # only consulted if a mask function were registered

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.memory = None
        self.pending_state = None
        self.is_initialized = False

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("InfLLM memory cannot be rolled back (no assisted decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("InfLLM memory holds one sequence (no beam search)")


class InfLLMCache(Cache):
    """The context memory of one sequence across all layers. Pass as `past_key_values=`.

    `should_stop`: optional callable checked before every layer of a prefill chunk and before the first
    layer of a decode step; when it returns True the forward pass raises `GenerationCancelled`. A pass
    cancelled half-way leaves the layers out of step: `is_consistent()` is then False and the cache must be
    discarded (a decode step is never cancelled half-way).
    """

    def __init__(self, model: nn.Module, offload: bool | None = None):
        state = getattr(model, "infllm", None)
        if not isinstance(state, PatchState):
            raise UnsupportedModelError("call inf_llm.adapter.patch_model(model, cfg) before making a cache")
        self.patch_state = state
        self.offload = offload if offload is not None else state.cfg.offload  # None: host blocks on GPUs
        self.should_stop: Callable[[], bool] | None = None
        self.decode_graph = None  # adapter.decode_graph.DecodeGraph of this cache's decode steps, made lazily
        # the host pool, if configured and free; given back when this cache is garbage (refcounting: layers
        # hold no reference to their cache)
        self.host_lease = state.host_pool.lend() if state.host_pool is not None and self.offload is not False else None
        if self.host_lease is not None:
            weakref.finalize(self, self.host_lease.give_back)
        super().__init__(layers=[InfLLMLayer(self, i) for i in range(state.num_layers)])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # A prefill chunk is checked before every layer (cancel within one layer's time; the half-done pass
        # leaves the cache inconsistent). A decode step is checked before layer 0 only: it is short, and
        # stopping there keeps the memory usable for the next turn.
        check = layer_idx == 0 or key_states.shape[2] > 1
        if check and self.should_stop is not None and self.should_stop():
            raise GenerationCancelled("generation cancelled")
        if key_states.shape[0] != 1:
            raise UnsupportedModelError(f"InfLLM memory holds one sequence; got batch size {key_states.shape[0]}")
        layer = self.layers[layer_idx]
        result = layer.update(key_states, value_states)
        _ACTIVE_LAYER.set(layer)
        return result

    def plan(self, total_tokens: int) -> None:
        """The next forward passes bring the conversation to `total_tokens` tokens (a prompt's length): with
        full_attention_tokens, a conversation that will not fit reads the whole prompt with the configured
        window instead of switching part-way."""
        for layer in self.layers:
            layer.planned_tokens = total_tokens
            if layer.memory is not None:
                layer.memory.plan(total_tokens)

    # --- sessions -----------------------------------------------------------------------------------
    def is_consistent(self) -> bool:
        return len({layer.get_seq_length() for layer in self.layers}) == 1

    def state_dict(self) -> dict:
        if not self.is_consistent():
            raise SessionStateError("the memory state is inconsistent (a cancelled forward); discard it")
        layers = []
        for layer in self.layers:
            if layer.memory is not None:
                layers.append(_to_cpu(layer.memory.state()))
            else:
                layers.append(layer.pending_state)
        return {"format": MEMORY_STATE_FORMAT, "fingerprint": self.patch_state.fingerprint(), "layers": layers}

    def load_state_dict(self, state: dict) -> None:
        """Raises SessionStateError when `state` is not a state_dict() of this model and config. The state's block
        tensors may be taken over by the memory (no copy): load a state once."""
        if not isinstance(state, dict) or state.get("format") != MEMORY_STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise SessionStateError(f"saved memory has format {found!r}, expected {MEMORY_STATE_FORMAT}")
        mine = self.patch_state.fingerprint()
        theirs = state.get("fingerprint", {})
        theirs = theirs if isinstance(theirs, dict) else {}
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise SessionStateError(f"saved memory does not match this model/config: {diff} (saved, current)")
        layers = state.get("layers")
        # checked here, not at the next forward that applies them: a damaged file fails at load, not mid-turn
        if (not isinstance(layers, list) or len(layers) != len(self.layers)
                or not all(s is None or (isinstance(s, dict) and "seen" in s) for s in layers)):
            raise SessionStateError(f"saved memory is damaged: expected {len(self.layers)} layer states")
        for layer, layer_state in zip(self.layers, layers):
            layer.reset()
            layer.pending_state = layer_state  # applied at the next update, on the layer's device

    def clone(self) -> InfLLMCache:
        """An independent copy (e.g. a document read once, then several conversations branch from it)."""
        twin = InfLLMCache.__new__(InfLLMCache)
        twin.patch_state, twin.offload, twin.should_stop = self.patch_state, self.offload, None
        twin.host_lease = None  # the pool is this cache's: the twin allocates its own host memory
        twin.decode_graph = None
        Cache.__init__(twin, layers=[InfLLMLayer(twin, i) for i in range(self.patch_state.num_layers)])
        twin.load_state_dict(self.state_dict())
        return twin

    def materialize(self, model: nn.Module) -> None:
        """Apply a loaded state now instead of at the next forward (a snapshot needs the layers' memories):
        each layer on its weights' device, keys in the model's dtype."""
        dtype = model.get_input_embeddings().weight.dtype
        for layer, decoder_layer in zip(self.layers, _decoder(model).layers):
            if layer.memory is None:
                layer.initialize(next(decoder_layer.parameters()).device, dtype)

    # --- prefix snapshots (inf_llm.memory.snapshot) ---------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """The tensors of the current memory: every layer's window and block store."""
        out = []
        for layer in self.layers:
            if layer.memory is not None:
                out += layer.memory.tail.tensors()
                if layer.memory.store is not None:
                    out += layer.memory.store.storages()
        return out

    def trim(self, spare_blocks: int = 64) -> None:
        """Give back the block stores' unused capacity beyond `spare_blocks` each (a kept document)."""
        for layer in self.layers:
            if layer.memory is not None and layer.memory.store is not None:
                layer.memory.store.trim(spare_blocks)

    def snapshot(self, parent: CacheSnapshot | None = None) -> CacheSnapshot:
        """This cache's memory now, sharing its blocks and, with `parent` (an earlier snapshot of this cache
        on the same conversation), the parent's window positions."""
        if not self.is_consistent():
            raise SessionStateError("the memory state is inconsistent (a cancelled forward); discard it")
        if any(layer.memory is None for layer in self.layers):
            raise SessionStateError("nothing to snapshot: the memory has not read any token yet")
        inherited = parent.layers if parent is not None and parent.cache is self else (None,) * len(self.layers)
        layers = tuple(layer.memory.snapshot(p) for layer, p in zip(self.layers, inherited))
        return CacheSnapshot(self, layers)

    def restore(self, snap: CacheSnapshot) -> None:
        """Continue from `snap`, a snapshot of this cache (its blocks are kept in place, not copied)."""
        if snap.cache is not self:
            raise ValueError("a snapshot can only be restored into the cache it was taken from")
        for layer, layer_snap in zip(self.layers, snap.layers):
            layer.memory.restore(layer_snap)
        self.decode_graph = None  # a new runner re-plans (and on a GPU re-captures) from the restored state

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)  # atomic: a crash never leaves half a file under the real name

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, offload: bool | None = None) -> InfLLMCache:
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:
            raise SessionStateError(f"cannot read saved memory {str(path)!r}: {exc}") from None
        cache = cls(model, offload=offload)
        cache.load_state_dict(state)
        return cache

    # --- introspection ------------------------------------------------------------------------------
    def stats(self) -> list[LayerStats]:
        return [layer.memory.stats() for layer in self.layers if layer.memory is not None]

    def reset_retrieval_counts(self) -> None:
        for layer in self.layers:
            if layer.memory is not None:
                layer.memory.reset_retrieval_counts()

    def retrieval_summary(self) -> list[tuple[int, int, int]]:
        """(start_pos, end_pos, times selected summed over layers and lookups), most retrieved first."""
        totals: dict[int, int] = {}
        starts: dict[int, tuple[int, int]] = {}
        for layer in self.layers:
            memory = layer.memory
            if memory is None or memory.store is None:
                continue
            for block, count in memory.retrieval_counts.items():
                span = memory.block_range(block)
                totals[span[0]] = totals.get(span[0], 0) + count
                starts[span[0]] = span
        return sorted(((*starts[s], c) for s, c in totals.items()), key=lambda t: (-t[2], t[0]))


@dataclass(frozen=True, eq=False)
class CacheSnapshot:
    """A cache's memory after `tokens` tokens, every layer's `LayerSnapshot`; restored with `cache.restore`.
    Holds the cache (its blocks are read in place) but not its token ids (the engine keeps those)."""

    cache: InfLLMCache = field(repr=False)
    layers: tuple[LayerSnapshot, ...] = field(repr=False)

    @property
    def tokens(self) -> int:
        return self.layers[0].seen

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor kept alive by this snapshot: its own, the blocks it shares, its cache's windows."""
        return [t for layer in self.layers for t in layer.tensors()] + self.cache.tensors()

    def state_dict(self) -> dict:
        """What `cache.state_dict()` would have returned at this point (InfLLMCache.load_state_dict reads it)."""
        return {"format": MEMORY_STATE_FORMAT, "fingerprint": self.cache.patch_state.fingerprint(),
                "layers": [_to_cpu(layer.state()) for layer in self.layers]}


def storage_sizes(tensors) -> dict[tuple[str, int], int]:
    """The distinct storages under `tensors` (views and shared tensors once): (device, address) -> bytes."""
    found: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        found[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return found


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def infllm_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """Registered attention: query (1, Hq, L, D), key/value (1, Hkv, L, D) un-rotated, current tokens only.

    Returns ((1, L, Hq, D), None) as transformers' attention functions do.
    """
    layer = _ACTIVE_LAYER.get()
    if layer is None or layer.layer_idx != getattr(module, "layer_idx", None) or layer.memory is None:
        raise UnsupportedModelError(
            "attention 'infllm' needs an InfLLMCache passed as past_key_values with use_cache=True"
        )
    scale = scaling if scaling is not None else module.scaling
    out = layer.memory.process(query[0], key[0], value[0], scale)  # (Hq, L, D)
    return out.transpose(0, 1).unsqueeze(0), None


def cache_kwargs(model: nn.Module, cache: Cache) -> dict:
    """`{"cache": cache}` on transformers versions whose models take `cache=` (5.2x), else
    `{"past_key_values": cache}` (5.17). Works for both `model(...)` and `model.generate(...)`."""
    import inspect

    takes_cache = "cache" in inspect.signature(type(model).forward).parameters
    return {"cache": cache} if takes_cache else {"past_key_values": cache}
