"""Attention ops with one signature per op (the protocol `inf_llm.kernels.ops.Ops`) and two implementations:
`reference` (torch; runs anywhere and is the specification) and `triton` (a package of fused GPU kernels,
one module per op family, selected by `fattn: true`).

`get_backend(name)` resolves the implementation once; callers keep the returned object.
"""

from __future__ import annotations

import logging

from inf_llm.errors import MissingDependencyError
from inf_llm.kernels.ops import Ops

log = logging.getLogger(__name__)


def get_backend(fattn: bool, device_type: str) -> Ops:
    """The ops module for this memory: Triton when `fattn` is requested, torch reference otherwise.

    An explicitly requested Triton backend that cannot run raises with the reason (no silent fallback).
    """
    from inf_llm.kernels import reference

    if not fattn:
        return reference
    if device_type != "cuda":
        raise MissingDependencyError(
            f"fattn: true needs a CUDA device (the model is on {device_type!r}); set model.fattn=false"
        )
    try:
        from inf_llm.kernels import triton
    except ImportError as exc:
        raise MissingDependencyError(f"fattn: true needs triton: {exc}") from exc
    log.info("attention backend: triton")
    return triton
