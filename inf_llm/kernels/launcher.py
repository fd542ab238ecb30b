"""Direct launches of compiled Triton kernels, for the ops a prefill calls thousands of times per chunk.

A Mistral-7B-shaped prefill chunk of 8,192 tokens launches ~2,900 Triton kernels (per layer and execution
block: the lookup, the global stage, the key scores, the block formation, the gathers), and the host has to
keep ahead of the GPU. `JITFunction.run` spends most of a launch's host time before the launch itself: it
binds and specialises every argument, builds the cache key, runs hooks and checks globals. Measured on an
H100 host (`benchmark/figures/gpu-h100-host-time/launch-overhead.log`, the global stage's 47 arguments):
30-45 us per launch through `kernel[grid](...)` against 14-19 us for the compiled kernel's own launcher.

`DirectLauncher(fn)[grid](*args, **kwargs)` is a drop-in for `fn[grid](*args, **kwargs)`. Its first call
with a given specialisation goes through Triton (which compiles or finds the kernel) and keeps the compiled
kernel under a key made of everything Triton specialises on, each argument at least as finely as Triton:

- a tensor: its dtype and whether its address is a multiple of 16 (Triton's pointer alignment);
- an int: whether it is 1 (Triton makes a constexpr of it), a multiple of 16 (divisibility), and whether
  it fits int32 or int64 (the parameter's type); the same for do-not-specialize ints, which only costs a
  few more first calls;
- a float: its type only (Triton passes floats as fp32 values); anything else: its type and value;
- the keyword arguments (constexprs and compile options) by value, and the device.

Later calls with the same key launch that kernel directly. Not used under the Triton interpreter (no
compiled kernel: every call takes Triton's path) nor while a launch hook is installed (a profiler such as
proton wants Triton's path).
"""

from __future__ import annotations

import inspect

import torch
from triton import knobs
from triton.compiler import CompiledKernel
from triton.knobs import HookChain

_MAX_KERNELS = 256  # specialisations kept per kernel (a handful in practice); beyond that the cache starts over
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def launch_hooks_installed() -> bool:
    """Whether a launch hook is installed (Triton's default is an empty `HookChain`, which its own path
    still calls on every launch, with metadata built for it)."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(hook is not None and (hook.__class__ is not HookChain or hook.calls) for hook in hooks)


def specialisation_key(args: tuple, kwargs: dict) -> tuple:
    """What Triton's specialisation of a launch depends on (see the module docstring), argument by argument,
    then the keyword arguments. One expression, no call per argument: this runs on every launch."""
    return (
        *[
            (a == 1, not a & 15, _I32_MIN <= a <= _I32_MAX, _I64_MIN <= a <= _I64_MAX) if type(a) is int
            else (a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor)
            else float if type(a) is float
            else (type(a), a)
            for a in args
        ],
        *kwargs.items(),
    )


class DirectLauncher:
    """`DirectLauncher(fn)[grid](*args, **kwargs)` launches what `fn[grid](*args, **kwargs)` launches, with
    the compiled kernel's own launcher once Triton has chosen the kernel for that specialisation."""

    def __init__(self, fn):
        self.fn = fn
        params = inspect.signature(fn.fn).parameters
        self._names = tuple(params)
        self._defaults = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
        # key -> (launcher, function handle, packed metadata, the values of the parameters after the positional
        # ones: fixed by the key, which holds the keyword arguments)
        self._kernels: dict[tuple, tuple] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else None
        if callable(grid) or not isinstance(first, torch.Tensor) or not first.is_cuda or launch_hooks_installed():
            self.fn[grid](*args, **kwargs)
            return
        device = first.get_device()
        key = (device, *specialisation_key(args, kwargs))
        entry = self._kernels.get(key)
        if entry is None:
            self._launch_through_triton(key, grid, args, kwargs)
            return
        run, function, metadata, tail = entry
        stream = torch._C._cuda_getCurrentRawStream(device)
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        # every parameter in order, constexprs included (the launcher skips them)
        run(grid[0], g1, g2, stream, function, metadata, None, None, None, *args, *tail)

    def _launch_through_triton(self, key: tuple, grid: tuple, args: tuple, kwargs: dict) -> None:
        """Triton's own launch (compiling if needed); keeps the kernel it used for the next launches."""
        kernel = self.fn[grid](*args, **kwargs)
        if hasattr(kernel, "result"):  # an asynchronous compile's future
            kernel = kernel.result()
        if not isinstance(kernel, CompiledKernel):
            return
        tail = tuple(kwargs[name] if name in kwargs else self._defaults[name] for name in self._names[len(args):])
        if len(self._kernels) >= _MAX_KERNELS:
            self._kernels.clear()
        self._kernels[key] = (kernel.run, kernel.function, kernel.packed_metadata, tail)
