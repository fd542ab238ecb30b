"""`inf_llm.kernels.launcher.DirectLauncher`: the key it keeps compiled kernels under separates every pair of
arguments that Triton specialises differently (checked against Triton's own specialisation on this CPU),
and on a GPU its direct launches give the results of Triton's path, with unaligned and aligned tensors in
turn (two compiled variants of one kernel)."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from inf_llm.kernels.launcher import launch_hooks_installed, specialisation_key
from tests.triton_interpreter import INTERPRET, import_kernels, triton_interpreter_env  # noqa: F401

triton_elementwise = import_kernels("inf_llm.kernels.triton_elementwise")
elementwise = importlib.import_module("inf_llm.kernels.triton.elementwise")  # built by that import

_BASE = torch.zeros(64, dtype=torch.float32)
ARGS = [
    0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 1, 2**40, 2**63 - 1,
    2**63, 0.5, 1.0, True, False, None,
    _BASE, _BASE[1:], _BASE[4:], _BASE[8:], _BASE.bfloat16(), _BASE.bfloat16()[1:], _BASE.bfloat16()[8:],
    torch.zeros(3, dtype=torch.int64),
]


def _triton(arg, specialize: bool):
    """Triton's specialisation of one argument: (type, attribute), as its generated binder computes it."""
    return native_specialize_impl(BaseBackend, arg, False, specialize, True)


@pytest.mark.parametrize("specialize", [True, False], ids=["specialized", "do_not_specialize"])
def test_equal_keys_mean_equal_triton_specialisations(specialize):
    """The launcher's key is at least as fine as Triton's specialisation: two arguments with one key are
    specialised alike, for ints around 1, 16, the int32/int64 edges, floats, bools, None and tensors at
    aligned and unaligned addresses."""
    def key(arg):
        return specialisation_key((arg,), {})

    for a, b in itertools.combinations(ARGS, 2):
        if key(a) == key(b):
            assert _triton(a, specialize) == _triton(b, specialize), (a, b)
    # and it tells apart what matters most: 1 (a constexpr), divisibility, alignment, width
    assert len({key(a) for a in (1, 16, 17, 2**31)}) == 4
    assert key(_BASE) != key(_BASE[1:])


def test_key_includes_keyword_arguments():
    """Constexprs and compile options are part of the key, by value."""
    assert specialisation_key((1,), {"BLOCK": 64}) != specialisation_key((1,), {"BLOCK": 128})
    assert specialisation_key((1,), {"BLOCK": 64, "num_warps": 4}) != specialisation_key((1,), {"BLOCK": 64})


def test_launch_hooks_are_seen():
    """No hook by default (Triton's empty chains), so launches go direct; an installed hook sends them through
    Triton's path, which calls it."""
    from triton import knobs

    assert not launch_hooks_installed()
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert launch_hooks_installed()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert not launch_hooks_installed()


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs a CUDA GPU")
def test_direct_launches_match_triton_launches_on_unaligned_and_aligned_tensors():
    """silu_mul on an unaligned view (its own compiled variant) and on aligned tensors, each twice: the first
    call goes through Triton, the second is a direct launch of the kernel it kept; both give the same bits,
    and the torch expression's values."""
    launcher = elementwise._silu_mul
    launcher._kernels.clear()
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 10_001, generator=gen).cuda().bfloat16()
    for gate, up in ((base[0, 1:], base[1, 1:]), (base[0, :10_000], base[1, :10_000])):
        through_triton = triton_elementwise.silu_mul(gate, up)
        direct = triton_elementwise.silu_mul(gate, up)
        assert torch.equal(through_triton, direct)
        torch.testing.assert_close(direct, torch.nn.functional.silu(gate) * up)
    assert len(launcher._kernels) == 2
    assert len({function for _, function, _, _ in launcher._kernels.values()}) == 2  # two compiled variants
