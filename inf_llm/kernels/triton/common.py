"""What the Triton op families share: the interpreter switch (`INTERPRETED`), the `@triton.jit` helpers
their kernels call (roundings, interpreter-safe reductions, the dot, the rotation of two halves), host-side
arithmetic, the launch utilities (device guard, SM count, the autotuners' config pruning) and the argument
validators that more than one family uses.

Knows no op: nothing here allocates an output or launches a kernel. A helper lives here because two or more
sibling modules use it (they import it by its public name); a helper of one family stays private in that
family's module.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from inf_llm.kernels.reference import CODE_MAX

LOG2E = 1.4426950408889634  # scores are kept in base 2 inside the kernels: exp2 is the fast hardware op
LN2 = tl.constexpr(0.6931471805599453)  # back to natural-log lse at the store
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16  # tl.dot needs every tile dimension >= 16
MAX_HEAD_DIM = 256  # a (BLOCK_M, D) fp32 accumulator beyond this no longer fits in registers
MAX_POSITION = 2**29  # positions, windows and lengths are int32 in the kernels; sums of three stay < 2**31
MAX_SPLITS = 64  # bounds the (splits, B, Hq, Lq, D) float32 workspace
_INTERPRETER_SMS = 8  # pretend "SM count" on CPU, so small CPU tests take the same split decisions
INTERPRETER_BLOCK = 16  # interpreter tiles: the smallest tl.dot allows, so tiny tests cross tile edges


def prune_configs(configs, named_args, **kwargs):
    """Drop configs that cannot help: 128-row tiles for < 128 rows, tiles over 64x128 at D = 256 (shared
    memory)."""
    args = {**named_args, **kwargs}
    rows = args["tune_rows"]
    head_dim = args["HEAD_DIM"]
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(64, rows)
        and not (head_dim >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 128)
    ]
    return kept or configs[:1]


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """float32 x -> dtype, rounding to nearest even (first on the bits where the interpreter would truncate:
    the conversion of an already rounded value is exact)."""
    if INTERPRETER:
        x = rounded(x, dtype, INTERPRETER)
    return x.to(dtype)


@triton.jit
def rounded(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """float32 x rounded to `dtype` (nearest even) and kept in float32: a rounding the torch ops make between
    two 16-bit ops, for more float32 arithmetic. Not `x.to(dtype).to(tl.float32)`: on the GPU the compiler
    folds that pair away (an H200 run of the rotation differed from the torch ops' in 23% of its bf16 values,
    benchmark/figures/gpu-h200-kernel-tuning/rotate-rounding-bits.txt). bf16: integer arithmetic on the bits
    (finite x); fp16: the PTX conversions;
    fp8 e4m3 (|x| <= 448): the bits, and a float32 add-and-subtract for its subnormals."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        if INTERPRETER:
            x = x.to(tl.float16).to(tl.float32)
        else:
            x = tl.inline_asm_elementwise(
                "{ .reg .b16 t; cvt.rn.f16.f32 t, $1; cvt.f32.f16 $0, t; }", "=r,r", [x],
                dtype=tl.float32, is_pure=True, pack=1,
            )
    elif dtype == tl.float8e4nv:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) << 20  # 3 mantissa bits, nearest even
        subnormal = (x + 24576.0) - 24576.0  # below 2**-6: multiples of 2**-9 (1.5 * 2**14 fixes that step)
        x = tl.where(tl.abs(x) < 0.015625, subnormal, bits.to(tl.float32, bitcast=True))
    return x


@triton.jit
def reduce_max(x, axis: tl.constexpr, INTERPRETER: tl.constexpr):
    """tl.max. In the interpreter tl.max/min/sum/cdiv are compiled-only objects when triton was imported
    before TRITON_INTERPRET was set (as under pytest, whose conftest imports transformers): there the
    reduction is spelled with the combine function that the interpreter maps to numpy."""
    if INTERPRETER:
        r = tl.reduce(x, axis, tl.standard._elementwise_max)
    else:
        r = tl.max(x, axis)
    return r


@triton.jit
def reduce_min(x, axis: tl.constexpr, INTERPRETER: tl.constexpr):
    """tl.min (see reduce_max)."""
    if INTERPRETER:
        r = tl.reduce(x, axis, tl.standard._elementwise_min)
    else:
        r = tl.min(x, axis)
    return r


@triton.jit
def reduce_sum(x, axis: tl.constexpr, INTERPRETER: tl.constexpr):
    """tl.sum (see reduce_max)."""
    if INTERPRETER:
        r = tl.reduce(x, axis, tl.standard._sum_combine)
    else:
        r = tl.sum(x, axis)
    return r


@triton.jit
def dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc + a @ b with float32 accumulation (operands upcast in the interpreter, see the package docstring)."""
    if INTERPRETER:
        res = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        res = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return res


@triton.jit
def attn_step(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len, start_n, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """Online-softmax update with the key tile at start_n.

    MASKED=False is the interior: every key of the tile is visible to every row, so no bounds or
    visibility masks are computed. MASKED=True applies each row's interval [lo_r, hi_r) (hi_r <= k_len).
    m_i is the running max in base-2 units, l_i the running sum, acc the unnormalised output.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = start_n + offs_n  # (BN,)
    # 64-bit scalar tile base + loop-invariant 32-bit offsets inside the tile (hoisted by the compiler).
    start64 = start_n.to(tl.int64)
    k_ptrs = k_base + start64 * stride_kn + (offs_n[:, None] * stride_kn + offs_d[None, :])  # (BN, D)
    v_ptrs = v_base + start64 * stride_vn + (offs_n[:, None] * stride_vn + offs_d[None, :])  # (BN, D)
    if MASKED:
        k = tl.load(k_ptrs, mask=cols[:, None] < k_len, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < k_len, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = dot_acc(q, tl.trans(k), tl.full([BLOCK_M, BLOCK_N], 0, tl.float32), DOT_PRECISION, INTERPRETER) * qk_scale
    if MASKED:
        visible = (cols[None, :] >= lo_r[:, None]) & (cols[None, :] < hi_r[:, None])  # (BM, BN)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, reduce_max(s, 1, INTERPRETER))
        # A row with nothing visible so far keeps m = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, reduce_max(s, 1, INTERPRETER))
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)  # (BM,)
    p = tl.math.exp2(s - m_use[:, None])  # (BM, BN)
    l_i = l_i * alpha + reduce_sum(p, 1, INTERPRETER)
    acc = dot_acc(round_to(p, v.dtype, INTERPRETER), v, acc * alpha[:, None], DOT_PRECISION, INTERPRETER)
    return acc, m_new, l_i


@triton.jit
def attn_tiles(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len,
    start_a, end_a, start_b, end_b, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """`attn_step` over the key tiles of [start_a, end_a) then [start_b, end_b) (starts multiples of
    BLOCK_N). The masked edges on both sides of the interior share one loop (one copy of the loop body
    less to compile); the unmasked interior passes an empty second range.

    The interpreter (Triton 3.6 with NumPy >= 2.4) cannot use a runtime tensor as a `range` bound, so it
    walks the same tiles with a while loop; on the GPU the for loop is what gets software-pipelined.
    """
    n_a = (tl.maximum(end_a - start_a, 0) + BLOCK_N - 1) // BLOCK_N
    n_b = (tl.maximum(end_b - start_b, 0) + BLOCK_N - 1) // BLOCK_N
    if INTERPRETER:
        t = n_a * 0
        while t < n_a + n_b:
            start_n = tl.where(t < n_a, start_a + t * BLOCK_N, start_b + (t - n_a) * BLOCK_N)
            acc, m_i, l_i = attn_step(
                acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len, start_n, qk_scale,
                MASKED, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
            )
            t += 1
    elif MASKED:
        for t in range(0, n_a + n_b):
            start_n = tl.where(t < n_a, start_a + t * BLOCK_N, start_b + (t - n_a) * BLOCK_N)
            acc, m_i, l_i = attn_step(
                acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len, start_n, qk_scale,
                MASKED, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
            )
    else:
        for start_n in range(start_a, end_a, BLOCK_N):
            acc, m_i, l_i = attn_step(
                acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo_r, hi_r, k_len, start_n, qk_scale,
                MASKED, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, INTERPRETER,
            )
    return acc, m_i, l_i


@triton.jit
def rotated_halves(x1, x2, c1, c2, s1, s2, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """(x1 * c1 - x2 * s1, x2 * c2 + x1 * s2) in `dtype`, rounded where the torch ops round (see
    `rope._rotate_kernel`): the halves of a rotated row from float32 halves of x, cos and sin."""
    a1 = rounded(x1 * c1, dtype, INTERPRETER)
    b1 = rounded(x2 * s1, dtype, INTERPRETER)
    a2 = rounded(x2 * c2, dtype, INTERPRETER)
    b2 = rounded(x1 * s2, dtype, INTERPRETER)
    # exact: the operands are already rounded
    return rounded(a1 - b1, dtype, INTERPRETER).to(dtype), rounded(a2 + b2, dtype, INTERPRETER).to(dtype)


# True when triton was imported with TRITON_INTERPRET=1: kernels then run on CPU tensors (tests), with small
# fixed tiles and no autotuning. Fixed at import, like the kernel objects themselves.
INTERPRETED = isinstance(round_to, InterpretedFunction)


def cdiv(a: int, b: int) -> int:
    """triton.cdiv for host code: Triton 3.6 wraps its own in a constexpr-function dispatcher that costs a few
    microseconds per call, and the wrappers make ~6 such calls per execution block and layer."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """triton.next_power_of_2 for host code (see cdiv), the same values (0 for n <= 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def check_device(device: torch.device) -> None:
    if device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            "the Triton ops need CUDA tensors; CPU tensors run only under the Triton interpreter "
            "(TRITON_INTERPRET=1 set before triton is imported). Use inf_llm.kernels.reference on CPU."
        )
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"the Triton ops support CUDA tensors, got a tensor on {device}")


def check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_tensors(named, like_name: str, like) -> None:
    """Each (name, tensor, ndim) of `named`: a tensor of that rank, on the device of `like` (one of them,
    called `like_name`), contiguous in its last dimension."""
    for name, t, ndim in named:
        check_tensor(name, t, ndim)
    for name, t, _ in named:
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device}; expected {like.device} like {like_name}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def check_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
    """Shapes, dtypes, devices and strides shared by the attention ops (v None for window_key_scores)."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        check_tensor(name, t, 4)
    if q.dtype not in DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    check_device(q.device)
    b, hq, _, d = q.shape
    if v is not None and v.shape != k.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch size or head dim")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if d < MIN_HEAD_DIM or d > MAX_HEAD_DIM or d & (d - 1):
        raise ValueError(
            f"head dim {d} is not supported: need a power of two in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
        )
    for name, t in named:
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)}); "
                             f"call .contiguous() first")


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def check_window(q_offset, window, lq: int) -> tuple[int, int]:
    """Validate q_offset/window and return (q_offset, window) as int32-safe ints with the same mask.

    A window of None (causal, unbounded) or larger than every query position becomes max(pos) + 1; a window
    <= 0 hides every key, as in the reference.
    """
    if isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
        raise ValueError(f"q_offset must be an int, got {q_offset!r}")
    if abs(int(q_offset)) > MAX_POSITION:
        raise ValueError(f"q_offset {q_offset} out of range (|q_offset| <= {MAX_POSITION})")
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral)):
        raise ValueError(f"window must be an int or None, got {window!r}")
    q_offset = int(q_offset)
    reach = max(q_offset + lq, 0) + 1  # a window this long sees every key j >= 0 up to the last query
    win = reach if window is None else max(min(int(window), reach), 0)
    return q_offset, win


_NO_GUARD = contextlib.nullcontext()


@functools.cache
def _one_cuda_device() -> bool:
    return torch.cuda.device_count() <= 1


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device: switch to the tensors' device when it is another one.
    With one GPU there is no other (asking torch for the current device cost ~8 us per launch, and a prefill
    chunk makes thousands)."""
    if device.type == "cuda" and not _one_cuda_device() and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NO_GUARD


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index).multi_processor_count  # cached by torch, no sync
    return _INTERPRETER_SMS


def dot_precision(dtype: torch.dtype) -> str | None:
    """IEEE fp32 dots for float32 inputs (the test dtype; tf32 would cost ~1e-3); the default for 16-bit."""
    return "ieee" if dtype == torch.float32 else None


def check_on_or_pinned(name: str, k: torch.Tensor, v: torch.Tensor, device: torch.device) -> None:
    """K/V blocks a kernel reads or writes over the bus: on `device`, or in pinned host memory."""
    if k.device != device and not (k.is_pinned() and v.is_pinned()):
        raise ValueError(f"{name} on {k.device} must be pinned host memory (or on {device})")


_CODE_DTYPES = tuple(CODE_MAX)  # offload_dtype's codes (reference.encode_codes)


def scale_args(scales, placeholder: torch.Tensor) -> tuple[tuple, tuple]:
    """The kernels' ScaleK/ScaleV pointers and their strides (k_scale: block, head; v_scale: block, head,
    token) for `scales` (k_scale, v_scale); without a codec a placeholder pointer and zero strides (not read)."""
    if scales is None:
        return (placeholder, placeholder), (0,) * 5
    k_scale, v_scale = scales
    return (k_scale, v_scale), (*k_scale.stride()[:2], *v_scale.stride()[:3])


def check_scales(scales, src_k: torch.Tensor, src_v: torch.Tensor, device: torch.device) -> None:
    """`scales` (k_scale, v_scale) of a store of codes: float32, keys per channel (N, Hkv, 1, D), values per
    token (N, Hkv, bs, 1), where the codes are (on the device or pinned), contiguous in their last dimension."""
    if not isinstance(scales, tuple) or len(scales) != 2:
        raise ValueError("scales must be a (k_scale, v_scale) tuple")
    n, hkv, bs, d = src_k.shape
    if src_k.dtype not in _CODE_DTYPES or src_v.dtype != src_k.dtype:
        raise ValueError(f"with scales, src_k/src_v must hold fp8 (e4m3) or int8 codes, got {src_k.dtype}/"
                         f"{src_v.dtype}")
    for name, t, shape in (("k_scale", scales[0], (n, hkv, 1, d)), ("v_scale", scales[1], (n, hkv, bs, 1))):
        check_tensor(name, t, 4)
        if tuple(t.shape) != shape or t.dtype != torch.float32 or (t.numel() and t.stride(-1) != 1):
            raise ValueError(f"{name} must be {shape} float32, contiguous in its last dimension; got "
                             f"{tuple(t.shape)} {t.dtype}")
    check_on_or_pinned("scales", scales[0], scales[1], device)
