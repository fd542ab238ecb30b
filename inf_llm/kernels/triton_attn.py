"""The Triton ops' former import path: `inf_llm.kernels.triton` (one module per op family) re-exported, so
that imports of this module keep working.

Besides the ops, the private names that code outside the package reads through this path: the kernels
(`scripts/compile_kernels.py` compiles them by name), the autotuned launches (`benchmark/kernels_bench.py`
reports their choices) and `_INTERPRETED` (`tests/triton_interpreter.py`).
"""

from __future__ import annotations

from inf_llm.kernels.triton import *  # noqa: F403  (every op of the package, as before the split)
from inf_llm.kernels.triton import __all__  # noqa: F401
from inf_llm.kernels.triton.attention import (  # noqa: F401
    _attn_fwd_kernel,
    _attn_fwd_tuned,
    _combine_splits_kernel,
    _merge_kernel,
)
from inf_llm.kernels.triton.block_cache import (  # noqa: F401
    _cache_assign_kernel,
    _gather_blocks_kernel,
    _refine_topk_kernel,
)
from inf_llm.kernels.triton.common import INTERPRETED as _INTERPRETED  # noqa: F401
from inf_llm.kernels.triton.decode import (  # noqa: F401
    _decode_attn_kernel,
    _decode_combine_kernel,
    _decode_prologue_kernel,
)
from inf_llm.kernels.triton.formation import _form_blocks_kernel  # noqa: F401
from inf_llm.kernels.triton.global_stage import _global_stage_kernel  # noqa: F401
from inf_llm.kernels.triton.rope import _rotate_kernel  # noqa: F401
from inf_llm.kernels.triton.scoring import _window_key_scores_kernel, _window_key_scores_tuned  # noqa: F401
