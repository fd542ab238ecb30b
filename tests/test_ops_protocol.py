"""The ops protocol (`inf_llm.kernels.ops.Ops`): both backends define every op of it with its signature
(parameter names, kinds and defaults), and the context memory uses nothing of its backend outside it.

The second part runs real memories (host path, device path, offload_access: direct with its device cache and
formation ring, the static decode step) on a backend that records every name the memory looks up on it, so
an op the memory starts calling (or probing for) without its entry in the protocol fails here, not on a GPU.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from inf_llm.config import ModelConfig
from inf_llm.kernels import reference
from inf_llm.kernels.ops import CONSTANTS, OPS, Ops
from inf_llm.memory import ContextMemory, RotaryTable
from inf_llm.memory.static_step import StaticDecodeStep
from tests.triton_interpreter import import_kernels, triton_interpreter_env  # noqa: F401

triton_attn = import_kernels("inf_llm.kernels.triton_attn")
# the package itself, built by that import (under the interpreter on CPU): what get_backend returns
triton_package = importlib.import_module("inf_llm.kernels.triton")

BACKENDS = {"reference": reference, "triton": triton_package, "triton_attn": triton_attn}


def _parameters(fn, drop_self: bool = False) -> list[tuple]:
    params = list(inspect.signature(fn).parameters.values())[1 if drop_self else 0 :]
    return [(p.name, p.kind, p.default) for p in params]


def test_the_protocol_lists_its_ops_once():
    """`OPS` and `CONSTANTS` are read from `Ops`: thirteen ops and the local stage's row count."""
    assert len(OPS) == len(set(OPS)) == 13
    assert CONSTANTS == ("LOCAL_STAGE_ROWS",)
    for name in OPS:
        assert inspect.getdoc(getattr(Ops, name)), name  # a one-line docstring each


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_each_backend_provides_every_op_with_the_protocol_signature(backend):
    module = BACKENDS[backend]
    for name in OPS:
        assert callable(getattr(module, name, None)), f"{backend} has no op {name}"
        assert _parameters(getattr(module, name)) == _parameters(getattr(Ops, name), drop_self=True), name
    rows = module.LOCAL_STAGE_ROWS
    assert rows is None or (isinstance(rows, int) and rows > 0)


class RecordingOps:
    """A backend that passes every lookup through to `backend` and keeps the names looked up (a `hasattr`
    probe counts: it asks for the name too)."""

    def __init__(self, backend):
        self._backend = backend
        self.used: set[str] = set()

    def __getattr__(self, name):
        self.used.add(name)
        return getattr(self._backend, name)


def _memory(ops: RecordingOps, **overrides) -> ContextMemory:
    d = 16
    params = dict(type="inf-llm", n_init=4, n_local=32, block_size=8, topk=3, repr_topk=2, exc_block_size=8,
                  max_cached_block=6)
    params.update(overrides)
    device_lookup = params.pop("device_lookup", None)
    offload = params.get("offload_access") == "direct"
    rope = RotaryTable(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)), d)
    return ContextMemory(ModelConfig(**params), rope, 4, 2, d, torch.float32, torch.device("cpu"), ops,
                         offload=offload or None, device_lookup=device_lookup)


def _run(memory: ContextMemory, n: int = 120, prefill: int = 100, static: bool = False) -> None:
    """A prefill of `prefill` tokens, then one-token steps (through the static decode step when asked)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, n, 16, generator=gen) for h in (4, 2, 2))
    memory.process(q[:, :prefill], k[:, :prefill], v[:, :prefill], 0.25)
    step = StaticDecodeStep(memory) if static else None
    planned = 0
    for p in range(prefill, n):
        plan = step.plan() if step is not None else None
        if plan is None:
            memory.process(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], 0.25)
        else:
            planned += 1
            step.args.copy_(torch.tensor(plan))
            step.run(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], 0.25)
            step.advance()
    assert not static or planned > 0


def test_the_memory_uses_only_the_protocol_and_all_of_it():
    """Every name a memory looks up on its backend, over the paths that call the ops, is a member of `Ops`;
    and together they call every op of it (so the protocol lists no op that nothing calls)."""
    used: set[str] = set()
    for overrides, static in (
        ({}, False),  # host path: local stage, key scores, prefix global stage, merge, host-path decode
        ({"device_lookup": True}, False),  # device path: refine_topk, global_stage_into, form_blocks, gathers
        ({"device_lookup": True}, True),  # the static decode step: decode_prologue, decode_attention
        ({"offload_access": "direct", "pin_memory": True, "max_cached_block": 64}, False),  # device cache, ring
    ):
        ops = RecordingOps(reference)
        _run(_memory(ops, **overrides), static=static)
        assert ops.used <= set(OPS) | set(CONSTANTS), (overrides, sorted(ops.used - set(OPS) - set(CONSTANTS)))
        used |= ops.used
    assert used == set(OPS) | set(CONSTANTS), sorted(set(OPS) | set(CONSTANTS) - used)
