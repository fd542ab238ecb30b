"""`model.trust_remote_code`: a model folder whose config points at its own Python code (as MiniCPM's does) loads
only when the config allows it, and otherwise fails with an error that names the key.

The folder is a tiny seeded Llama saved with `auto_map` entries that name a config and a model class defined
in files beside it (subclasses of Llama's): real transformers loading of real custom code, offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inf_llm.config import load_config
from inf_llm.engine.loading import load_model
from inf_llm.errors import ModelLoadError
from tests.models import save_tiny_model

CONFIG_CODE = '''from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"
'''
MODEL_CODE = '''from transformers import LlamaForCausalLM

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''


@pytest.fixture(scope="module")
def custom_code_model(tmp_path_factory) -> Path:
    folder = save_tiny_model(tmp_path_factory.mktemp("custom") / "tiny-custom", "llama", seed=3)
    (folder / "configuration_tiny_custom.py").write_text(CONFIG_CODE)
    (folder / "modeling_tiny_custom.py").write_text(MODEL_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyCustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
    })
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_custom_code_is_refused_by_default_with_the_key_named(custom_code_model):
    cfg = load_config(None, [f"model.path={custom_code_model}", "model.device=cpu"])
    assert cfg.model.trust_remote_code is False
    with pytest.raises(ModelLoadError) as err:
        load_model(cfg)
    assert "model.trust_remote_code: true" in str(err.value) and str(custom_code_model) in str(err.value)


def test_custom_code_loads_when_trusted(custom_code_model):
    cfg = load_config(None, [f"model.path={custom_code_model}", "model.device=cpu", "model.trust_remote_code=true"])
    loaded = load_model(cfg)
    assert type(loaded.model).__name__ == "TinyCustomForCausalLM"
    assert loaded.tokenizer("hi")["input_ids"]
