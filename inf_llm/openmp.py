"""How torch's OpenMP threads wait between operations on the CPU; the entry points call `configure()` before
torch is imported (the OpenMP runtime reads its environment once, when it loads).

Decoding a small model runs thousands of short operations per token. Threads that sleep as soon as an
operation ends (OMP_WAIT_POLICY=PASSIVE) pay a wake-up for each of them; threads that spin without bound
(ACTIVE) take the cores from every other thread and process on a small machine. A bounded spin keeps the
threads awake across back-to-back operations and lets them sleep when the work pauses. Measured with
benchmark/serving_speed.py on 2 cores, SmolLM2 on CPU (bf16), decode tokens/s at 2K / 8K / 32K tokens of
context: PASSIVE 10.5 / 10.0 / 9.8, GOMP_SPINCOUNT=10000 17.9 / 18.3 / 16.2 (prefill 367 -> 505 tokens/s at
2K), with the same streaming overhead of the server (-0.8%).
"""

from __future__ import annotations

import os

# Busy-wait iterations of a libgomp thread before it sleeps (libgomp's own default is 300000, ~1 ms).
SPIN_COUNT = 10000


def configure() -> None:
    """Bounded spinning, unless the environment already chooses a wait policy or a spin count."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
