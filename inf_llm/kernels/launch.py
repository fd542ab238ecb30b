"""Repeated launches of compiled Triton kernels with less host work than `kernel[grid](...)`.

A prefill chunk of a Mistral-7B-shaped model makes ~2,500 Triton launches (several per execution block,
layer and chunk), and on the GPU machines the host's share of a chunk is close to the GPU's. Triton 3.6's
`JITFunction.run` does, per launch: pre-run hooks, two knob reads for options, a current-device query
through torch (lazy-init checks), the argument binding and specialization, a cache key that formats the
options as a string, a check of the kernel's global variables, the grid's canonicalization and the launch
metadata. `launch` keeps the binding and specialization (Triton's own binder: the kernel chosen is the one
`run` would choose for these arguments: same dtypes, same pointer alignments, same integer
specializations, same constexprs and options) and the launch itself, and skips the rest once a call site's
specialization has been compiled: the first launch of each specialization goes through `run` (which
compiles or loads it), later ones reuse the compiled kernel it returned.

Falls back to `kernel[grid](...)` for anything else: the interpreter (CPU tests), autotuners, kernels with
pre-run hooks, and while launch hooks are set (profilers such as proton read them). The environment
variable `INF_LLM_TRITON_LAUNCH=run` (read at import) makes every launch `kernel[grid](...)`, to compare.
"""

from __future__ import annotations

import os

import torch
from triton import knobs
from triton.runtime.jit import JITFunction

_ALWAYS_RUN = os.environ.get("INF_LLM_TRITON_LAUNCH", "") == "run"
# (kernel, device, specialization..., options...) -> the CompiledKernel `JITFunction.run` returned for it
_COMPILED: dict[tuple, object] = {}


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)` for a grid of ints."""
    if (
        _ALWAYS_RUN
        or type(kernel) is not JITFunction
        or kernel.pre_run_hooks
        or knobs.runtime.launch_enter_hook is not None
        or knobs.runtime.launch_exit_hook is not None
    ):
        kernel[grid](*args, **kwargs)
        return
    device = torch._C._cuda_getDevice()  # what torch.cuda.current_device() returns, without its checks
    bound, specialization, options = kernel.device_caches[device][4](*args, **kwargs)  # Triton's binder
    key = (kernel, device, *specialization, *options.items())
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = kernel[grid](*args, **kwargs)  # compiles (or loads) and launches
        return
    n = len(grid)
    compiled.run(
        grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, torch._C._cuda_getCurrentRawStream(device),
        compiled.function, compiled.packed_metadata, None, None, None, *bound.values(),
    )


def compiled_count() -> int:
    """Specializations launched through `launch` so far (tests)."""
    return len(_COMPILED)
