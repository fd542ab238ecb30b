"""The fused elementwise ops' former import path: `inf_llm.kernels.triton.elementwise` re-exported, so that
imports of this module keep working; with the kernels (`scripts/compile_kernels.py` compiles them by name)
and `_INTERPRETED` (`tests/triton_interpreter.py`).
"""

from __future__ import annotations

from inf_llm.kernels.triton.common import INTERPRETED as _INTERPRETED  # noqa: F401
from inf_llm.kernels.triton.elementwise import _rms_norm_kernel, _silu_mul_kernel, rms_norm, silu_mul  # noqa: F401

__all__ = ["rms_norm", "silu_mul"]
