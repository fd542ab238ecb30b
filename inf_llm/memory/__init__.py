"""Per-layer context memory (sinks, local window, memory blocks, lookup, block cache, offload).

Knows nothing of transformers: the adapter feeds it un-rotated q/k/v of new tokens.
"""

from inf_llm.memory.context_memory import ContextMemory, LayerStats
from inf_llm.memory.policy import MemoryPolicy
from inf_llm.memory.rope import RotaryTable

__all__ = ["ContextMemory", "LayerStats", "MemoryPolicy", "RotaryTable"]
