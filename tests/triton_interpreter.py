"""How test modules run Triton kernels without a GPU: on CPU tensors under the Triton interpreter.

`TRITON_INTERPRET=1` must be in the environment when the kernels are defined (import of the kernel module)
and when they launch, so a test module imports its kernel module through `import_kernels` (the variable is
set only around the import) and imports `triton_interpreter_env` (an autouse module fixture that sets it
while that module's tests run). Nothing leaks into other test modules. On a GPU both do nothing special.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import pytest
import torch

_ACCEL = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
DEVICE = _ACCEL if _ACCEL is not None else torch.device("cpu")
INTERPRET = DEVICE.type == "cpu"
_INTERPRET_ENV = "TRITON_INTERPRET"


def import_kernels(name: str) -> ModuleType:
    """Import the kernel module `name`; on CPU with TRITON_INTERPRET=1 set for the import. If an earlier import
    in this process built the kernels without the interpreter, the whole kernel package is imported again."""
    if not INTERPRET:
        return importlib.import_module(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_INTERPRET_ENV, "1")
        if not importlib.import_module("inf_llm.kernels.triton_attn")._INTERPRETED:
            for loaded in [m for m in sys.modules if m.startswith("inf_llm.kernels.triton")]:
                del sys.modules[loaded]
        module = importlib.import_module(name)
    return module


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter_env():
    """Keep TRITON_INTERPRET=1 while the importing module's tests launch kernels (triton reads it at launch)."""
    if not INTERPRET:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_INTERPRET_ENV, "1")
        yield
