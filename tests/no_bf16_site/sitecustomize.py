"""Test switch INFLLM_TEST_NO_BF16=1: run the suite as on a CPU without native bf16 (AVX512-BF16 / AMX).

CI machines differ: on one without bf16, `model.dtype: auto` resolves to float32 and the oneDNN packing probe
finds no exact bf16 kernel. The switch reports both as absent, in the pytest process (tests/conftest.py calls
`apply_to_loaded`) and in every Python subprocess a test starts (conftest puts this folder first on
PYTHONPATH, so Python imports this file at start-up). The patch is applied when `inf_llm`'s modules are
first imported, so a subprocess still configures OpenMP before torch loads.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

ENV_VAR = "INFLLM_TEST_NO_BF16"


def _no_native_bf16(module: ModuleType) -> None:
    module._cpu_has_native_bf16 = lambda: False


def _no_exact_packing(module: ModuleType) -> None:
    module.packing_is_exact = lambda linear: False


# module -> how it is made to report a CPU without native bf16
PATCHES = {"inf_llm.engine.loading": _no_native_bf16, "inf_llm.engine.packed_linear": _no_exact_packing}


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def apply_to_loaded() -> None:
    """Patch the modules imported already (the pytest process imports them before its tests run)."""
    for name, patch in PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the patched modules as usual and applies their patch right after each is executed."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module: ModuleType) -> None:
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_then_patch
        return spec


if enabled():
    sys.meta_path.insert(0, _PatchOnImport())
