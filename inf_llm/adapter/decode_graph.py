"""Decode steps of a patched model replayed as one CUDA graph each: no Python, no per-op launch cost.

A decode step of a 7B model is ~3,000 small kernels; launched one by one from Python it is bound by the host
(55-65 ms per token on an H200 for InfLLM and for transformers' own full attention alike). `DecodeGraph`
captures the whole forward pass of one token (transformers' layers and every layer's
`StaticDecodeStep`) once and replays it:

    step = DecodeGraph(model, cache)     # after the prefill
    logits = step(token)                 # token (1, 1) on the device; logits (1, vocab), valid until the next step

`patch_model` also routes `model.generate`'s one-token forwards through a runner kept on each cache
(`install_decode_graphs`, config `decode_graph`), so the server and the chat decode through graphs on GPUs.

Per step the host only plans each layer's arguments (no device work), copies them in one transfer, and
replays. A step that changes the memory's layout (a block forms every `block_size` tokens, the window is
re-rotated, sinks still filling) runs the ordinary eager forward; when a buffer moved (the store grew), the
next plain step runs eagerly through the static path and the graph is captured again. Without CUDA (or with
`use_graph=False`) the static path runs eagerly, which is how CPU tests check it against the ordinary path.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from inf_llm.adapter.hf import InfLLMCache, cache_kwargs
from inf_llm.errors import GenerationCancelled
from inf_llm.memory.static_step import ARGS, StaticDecodeStep

log = logging.getLogger(__name__)

# Host buffers of step arguments in flight: the host writes one while the device may still copy the others.
ARG_BUFFERS = 4
# Where install_decode_graphs keeps the model's own forward.
PLAIN_FORWARD = "_infllm_plain_forward"
# True inside a DecodeGraph's own forward: the generate() hook then runs the model's forward (per thread)
_IN_RUNNER: contextvars.ContextVar[bool] = contextvars.ContextVar("infllm_in_decode_graph", default=False)


@dataclass
class DecodeGraphStats:
    replayed: int = 0  # steps replayed from the graph
    static_eager: int = 0  # steps through the static path without a graph (before a capture, or on CPU)
    eager: int = 0  # steps through the ordinary forward (layout changes, unsupported memory)
    captures: int = 0


class DecodeGraph:
    """One-token forward passes of `model` on `cache` (batch 1), replayed from a CUDA graph when possible."""

    def __init__(self, model: nn.Module, cache: InfLLMCache, use_graph: bool | None = None):
        self.model = model
        # weak: a runner kept on its cache must not make a reference cycle (a discarded cache holds GBs)
        self._cache = weakref.ref(cache)
        self._cache_arg = next(iter(cache_kwargs(model, cache)))  # "cache" or "past_key_values"
        self.use_graph = use_graph
        self.stats = DecodeGraphStats()
        self._steps: list[StaticDecodeStep] | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._layout: tuple | None = None
        self._token: torch.Tensor | None = None  # the graph's input (1, 1)
        self._logits: torch.Tensor | None = None  # the graph's output
        self._args: torch.Tensor | None = None  # (layers, len(ARGS)) on the device, rows bound to the steps
        self._host_args: list[torch.Tensor] = []
        self._copied: list = []  # an event per host buffer: its last copy to the device is done
        self._turn = 0
        self.disabled_reason: str | None = None

    @property
    def cache(self) -> InfLLMCache:
        cache = self._cache()
        if cache is None:
            raise RuntimeError("the cache of this DecodeGraph is gone")
        return cache

    # ------------------------------------------------------------------------------------------------ public
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (1, vocab) of the next token after `token` (1, 1), the cache advanced by one position."""
        # after a failed capture the ordinary eager step, not the static one (which only a graph makes fast)
        plans = self._plans() if self.disabled_reason is None else None
        if plans is None:
            self.stats.eager += 1
            return self._forward(token)
        if self.cache.should_stop is not None and self.cache.should_stop():  # what update() checks eagerly
            raise GenerationCancelled("generation cancelled")
        self._load_args(plans)
        if not self._graphs():
            logits = self._static_forward(token)
            self.stats.static_eager += 1
            return logits
        layout = tuple(step.layout() for step in self._steps)
        if self._graph is None or layout != self._layout:
            return self._capture(token, layout)
        self._token.copy_(token)
        self._graph.replay()
        self._advance()
        self.stats.replayed += 1
        return self._logits

    # ---------------------------------------------------------------------------------------------- internals
    def _forward(self, token: torch.Tensor) -> torch.Tensor:
        inside = _IN_RUNNER.set(True)  # the model's forward hook (install_decode_graphs) lets this call through
        try:
            return self.model(token, **{self._cache_arg: self.cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
        finally:
            _IN_RUNNER.reset(inside)

    def _graphs(self) -> bool:
        return self.use_graph if self.use_graph is not None else self._args.device.type == "cuda"

    def _plans(self) -> list[list[int]] | None:
        """Each layer's arguments for a static step, or None when any layer needs the ordinary path."""
        memories = [layer.memory for layer in self.cache.layers]
        if self._steps and any(step.memory is not m for step, m in zip(self._steps, memories)):
            self._steps, self._graph, self._layout = None, None, None  # the cache was reset or reloaded
        if self._steps is None:
            if any(m is None for m in memories) or len({m.device for m in memories}) != 1:
                return None  # before the prefill, or layers spread over devices
            if not all(StaticDecodeStep.supports(m) for m in memories):
                self.disabled_reason = "the memory has no static decode step (needs inf-llm on the device path)"
                self._steps = []
                return None
            self._steps = [StaticDecodeStep(m) for m in memories]
            device = memories[0].device
            self._args = torch.zeros(len(memories), len(ARGS), dtype=torch.int64, device=device)
            for i, step in enumerate(self._steps):
                step.args = self._args[i]
            pinned = device.type == "cuda"
            self._host_args = [torch.zeros(self._args.shape, dtype=torch.int64, pin_memory=pinned)
                               for _ in range(ARG_BUFFERS)]
            self._copied = [None] * ARG_BUFFERS
        if not self._steps:
            return None
        plans = []
        for step in self._steps:
            plan = step.plan()
            if plan is None:
                return None
            plans.append(plan)
        return plans

    def _load_args(self, plans: list[list[int]]) -> None:
        """One host-to-device copy of every layer's arguments, from a ring of pinned buffers: the host never
        writes a buffer whose previous copy the device has not done yet, and never waits for the device
        otherwise."""
        turn = self._turn % ARG_BUFFERS
        self._turn += 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()
        host = self._host_args[turn]
        host.copy_(torch.tensor(plans, dtype=torch.int64))
        self._args.copy_(host, non_blocking=True)
        if self._args.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._copied[turn] = event

    def _static_forward(self, token: torch.Tensor, advance: bool = True) -> torch.Tensor:
        for step in self._steps:
            step.memory.static_step = step
        try:
            logits = self._forward(token)
        finally:
            for step in self._steps:
                step.memory.static_step = None
        if advance:
            self._advance()
        return logits

    def _advance(self) -> None:
        for step in self._steps:
            step.advance()

    def _capture(self, token: torch.Tensor, layout: tuple) -> torch.Tensor:
        """Run this step eagerly through the static path (on a side stream: it also warms up what the capture
        needs), then capture the same step for the next ones."""
        self._graph = None  # frees the old graph's memory pool
        stream = torch.cuda.Stream(device=token.device)
        stream.wait_stream(torch.cuda.current_stream(token.device))
        with torch.cuda.stream(stream):
            logits = self._static_forward(token)
        torch.cuda.current_stream(token.device).wait_stream(stream)
        self._token = token.clone()
        graph = torch.cuda.CUDAGraph()
        should_stop, self.cache.should_stop = self.cache.should_stop, None  # checked before each replay instead
        try:
            with torch.cuda.graph(graph):
                self._logits = self._static_forward(self._token, advance=False)
        except RuntimeError as exc:  # an op of this model or transformers version that cannot be captured
            self.disabled_reason = f"CUDA graph capture failed: {exc}"
            log.warning("decode steps run without a CUDA graph: %s", self.disabled_reason)
            self._graph, self._logits = None, None
            return logits
        finally:
            self.cache.should_stop = should_stop
        self._graph, self._layout = graph, layout
        self.stats.captures += 1
        self.stats.static_eager += 1
        return logits


# --------------------------------------------------------------------------------------------- generate() hook
def install_decode_graphs(model: nn.Module) -> None:
    """Route the one-token forwards of `model` (as `generate` makes them) on an InfLLMCache through a
    `DecodeGraph` kept on that cache; every other call runs the model's own forward. The wrapper keeps the
    forward's signature (`functools.wraps`): generate inspects it (which arguments the model takes)."""
    if getattr(model, PLAIN_FORWARD, None) is not None:
        return
    plain = model.forward

    @functools.wraps(plain)
    def forward(*args, **kwargs):
        logits = _graph_step(model, args, kwargs)
        if logits is None:
            return plain(*args, **kwargs)
        return CausalLMOutputWithPast(logits=logits.unsqueeze(1).clone(), past_key_values=_cache_of(kwargs))

    setattr(model, PLAIN_FORWARD, plain)
    model.forward = forward


def remove_decode_graphs(model: nn.Module) -> None:
    if getattr(model, PLAIN_FORWARD, None) is not None:
        del model.forward  # the instance attribute: the class's forward shows through again
        delattr(model, PLAIN_FORWARD)


def _cache_of(kwargs: dict):
    return kwargs.get("past_key_values", kwargs.get("cache"))


# forward() arguments under which a call is not a plain decode step (their effect is not in the graph)
_OTHER_INPUTS = ("inputs_embeds", "labels")
_OTHER_OUTPUTS = ("output_attentions", "output_hidden_states")


def _graph_step(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Logits (1, vocab) of a one-token forward on an InfLLMCache through its DecodeGraph, or None when the
    call is something else (a prefill chunk, another cache, extra outputs asked for) or graphs are off."""
    if _IN_RUNNER.get():  # a runner's own forward (eager step or capture)
        return None
    cache = _cache_of(kwargs)
    input_ids = args[0] if args else kwargs.get("input_ids")
    if (not isinstance(cache, InfLLMCache) or input_ids is None or tuple(input_ids.shape) != (1, 1)
            or kwargs.get("use_cache") is False or any(kwargs.get(name) is not None for name in _OTHER_INPUTS)
            or any(kwargs.get(name) for name in _OTHER_OUTPUTS)):
        return None
    enabled = cache.patch_state.cfg.decode_graph
    if enabled is False or (enabled is None and input_ids.device.type != "cuda"):
        return None
    runner = getattr(cache, "decode_graph", None)
    if runner is None:
        runner = cache.decode_graph = DecodeGraph(model, cache)
    return runner(input_ids)
