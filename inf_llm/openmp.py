"""How torch's OpenMP threads wait between operations on the CPU; the entry points call `configure()` before
torch is imported (the OpenMP runtime reads its environment once, when it loads).

Decoding a small model runs thousands of short operations per token. Threads that sleep as soon as an
operation ends (OMP_WAIT_POLICY=PASSIVE) pay a wake-up for each of them; threads that spin without bound
(ACTIVE) take the cores from every other thread and process on a small machine. A bounded spin keeps the
threads awake across back-to-back operations and lets them sleep when the work pauses. Measured with
benchmark/serving_speed.py on 2 cores, SmolLM2 on CPU (bf16), decode tokens/s at 2K / 8K / 32K tokens of
context: PASSIVE 10.5 / 10.0 / 9.8, GOMP_SPINCOUNT=10000 17.9 / 18.3 / 16.2 (prefill 367 -> 505 tokens/s at
2K), with the same streaming overhead of the server (-0.8%).

One pool per process. Every thread that runs a parallel torch operation gets an OpenMP thread pool of its own,
kept until the thread ends, and once the pools hold more threads than there are CPUs libgomp cuts every
thread's spin to ~100 iterations: the PASSIVE speed again. So only the engine's worker thread runs the model,
and `load_engine` loads it in a thread that ends before the worker starts (the calling thread, e.g. a
benchmark's main thread, never gets a pool). Measured on 2 cores, SmolLM2 bf16, 2K context, decode tokens/s
through the engine: model loaded in the main thread 12.0 / 13.3 (a second pool), loaded in a short-lived
thread 20.7-22.7 (with packed linear layers, inf_llm/engine/packed_linear.py).
"""

from __future__ import annotations

import os

# Busy-wait iterations of a libgomp thread before it sleeps (libgomp's own default is 300000, ~1 ms).
SPIN_COUNT = 10000


def configure() -> None:
    """Bounded spinning, unless the environment already chooses a wait policy or a spin count."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
