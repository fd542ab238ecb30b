"""Pacing of a chunked prefill on a GPU: the host issues chunk k while the GPU still runs chunk k-1, and
waits for chunk k-1 (not k) before going on.

Waiting for each chunk before issuing the next (a sync per chunk, or a copy of the next chunk's ids from
pageable memory, which syncs the stream) drains the GPU's queue at every chunk boundary: a chunk whose host
work takes longer than its GPU work then leaves the GPU idle, and the time the host was ahead in the chunk
before is lost. A Mistral-7B-shaped chunk costs ~315 ms of GPU time on an H100 and, depending on the host,
~240-600 ms of host time (measured on H100 hosts: docs/speed.md), so the two sides alternate as the bound. Letting the
host run ahead without limit would make cancellation and progress reports meaningless (a small model's
chunks are a few hundred launches: the host could queue the whole prompt); one chunk ahead keeps both
within a chunk.
"""

from __future__ import annotations

import time

import torch


class ChunkPacer:
    """`issued(end)` after each chunk is issued; `drain()` after the last. On a CPU (synchronous) every
    chunk is done when issued. With `timed=True`, `seconds()` gives each finished chunk's time: on CUDA the
    time between the events that end consecutive chunks on the stream (the GPU's timeline: a chunk's own
    time, plus any wait for the host)."""

    def __init__(self, device: torch.device, timed: bool = False):
        self._cuda = device.type == "cuda"
        self._device = device
        self._timed = timed
        self._ends: list[int] = []  # token position where each issued chunk ends
        self._marks: list = []  # per chunk: its CUDA event, or the host time it was done (CPU)
        self._done = 0  # chunks known to be finished
        if timed:
            self._start = self._mark()

    def _mark(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=self._timed)
        event.record(torch.cuda.current_stream(self._device))  # the device the chunks start on (its inputs')
        return event

    def issued(self, end: int) -> int | None:
        """Chunk ending at token `end` was issued: marks its end on the stream and waits for the chunk before
        it. Returns the end of the last chunk known to be done (None before any is)."""
        self._ends.append(end)
        self._marks.append(self._mark())
        if not self._cuda:
            self._done = len(self._marks)
        elif len(self._marks) >= 2:
            self._marks[-2].synchronize()
            self._done = len(self._marks) - 1
        return self._ends[self._done - 1] if self._done else None

    def drain(self) -> int | None:
        """Waits for every issued chunk; returns the end of the last one (None if none was issued)."""
        if self._cuda and self._marks:
            self._marks[-1].synchronize()
        self._done = len(self._marks)
        return self._ends[-1] if self._ends else None

    def seconds(self) -> list[float]:
        """Time of each finished chunk, in order (needs `timed=True`)."""
        if not self._timed:
            raise ValueError("ChunkPacer(timed=False) keeps no times")
        marks = [self._start, *self._marks[: self._done]]
        if not self._cuda:
            return [b - a for a, b in zip(marks, marks[1:])]
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
