"""`form_blocks`: new memory blocks written into the store's slots with their representatives, in one launch,
and for a store of `offload_dtype` codes their fp8/int8 encoding (bit for bit `reference.encode_codes`) in
that launch too. Knows nothing of lookups or of the device cache (`block_cache` decodes what this encodes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inf_llm.kernels.launcher import DirectLauncher
from inf_llm.kernels.reference import CODE_MAX
from inf_llm.kernels.triton.common import (
    INTERPRETED,
    INTERPRETER_BLOCK,
    MAX_HEAD_DIM,
    check_device,
    check_on_or_pinned,
    check_scales,
    check_tensors,
    device_guard,
    next_pow2,
    reduce_max,
    reduce_min,
    round_to,
    scale_args,
)


@triton.jit
def _encoded(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """float32 x, already divided by its scale -> an `offload_dtype` code, as `reference.encode_codes`: int8
    rounds half to even and clamps to +-127; fp8 e4m3 rounds to nearest even (|x| <= 448 up to rounding)."""
    if dtype == tl.int8:
        x = (x + 12582912.0) - 12582912.0  # 1.5 * 2**23: rounds |x| < 2**22 to an integer, half to even
        return tl.minimum(tl.maximum(x, -127.0), 127.0).to(dtype)
    return round_to(x, dtype, INTERPRETER)  # fp8: the interpreter's own conversion truncates


@triton.jit
def _form_blocks_kernel(
    K, V, Score, DstK, DstV, Repr, ScaleK, ScaleV,
    stride_kh, stride_kn, stride_kt, stride_vh, stride_vn, stride_vt,
    stride_sh, stride_sn,
    stride_dn, stride_dh, stride_dt, stride_dvn, stride_dvh, stride_dvt,
    stride_rn, stride_rh, stride_ksn, stride_ksh, stride_vsn, stride_vsh, stride_vst,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_P2: tl.constexpr, REPR_TOPK: tl.constexpr,
    BLOCK_T: tl.constexpr, CODEC: tl.constexpr, MAX_CODE: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """One new memory block of one KV head: its representative (the mean of the REPR_TOPK best-scored keys,
    float32) and its K/V copied into the store. CODEC: the store holds fp8/int8 codes, encoded here as
    `reference.encode_codes` encodes them (keys scaled per channel into ScaleK (n, Hkv, 1, D), values per
    token into ScaleV (n, Hkv, bs, 1); the keys are read twice, for their per-channel maxima first), so the
    codec's torch ops (a dozen launches per formation) are not needed. Grid (n, Hkv)."""
    j = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK_P2)
    s = tl.load(Score + h * stride_sh + j * stride_sn + t, mask=t < BLOCK_SIZE, other=float("-inf"))
    acc = tl.full([HEAD_DIM], 0, tl.float32)
    k_base = K + h * stride_kh + j * stride_kn
    for _ in tl.static_range(REPR_TOPK):  # top-k by repeated arg-max (the lowest index among equal scores)
        best = reduce_min(tl.where(s == reduce_max(s, 0, INTERPRETER), t, BLOCK_P2), 0, INTERPRETER)
        acc += tl.load(k_base + best.to(tl.int64) * stride_kt + offs_d).to(tl.float32)
        s = tl.where(t == best, float("-inf"), s)
    tl.store(Repr + j * stride_rn + h * stride_rh + offs_d, acc / REPR_TOPK)
    v_base = V + h * stride_vh + j * stride_vn
    tiny = 1.1754943508222875e-38  # float32's smallest normal: the scale of an all-zero group
    if CODEC:
        amax = tl.full([HEAD_DIM], 0, tl.float32)
        for t0 in range(0, BLOCK_SIZE, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            keys = tl.load(k_base + rows[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                           mask=(rows < BLOCK_SIZE)[:, None], other=0.0).to(tl.float32)
            amax = tl.maximum(amax, reduce_max(tl.abs(keys), 0, INTERPRETER))
        k_scale = tl.maximum(amax * (1.0 / MAX_CODE), tiny)  # as encode_codes: times the reciprocal
        tl.store(ScaleK + j * stride_ksn + h * stride_ksh + offs_d, k_scale)
    for t0 in range(0, BLOCK_SIZE, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        ok = (rows < BLOCK_SIZE)[:, None]
        r64 = rows[:, None].to(tl.int64)
        keys = tl.load(k_base + r64 * stride_kt + offs_d[None, :], mask=ok)
        values = tl.load(v_base + r64 * stride_vt + offs_d[None, :], mask=ok)
        if CODEC:
            keys = _encoded(tl.math.div_rn(keys.to(tl.float32), k_scale[None, :]), DstK.dtype.element_ty, INTERPRETER)
            values = values.to(tl.float32)
            v_amax = reduce_max(tl.abs(values), 1, INTERPRETER)
            v_scale = tl.maximum(v_amax * (1.0 / MAX_CODE), tiny)
            tl.store(ScaleV + j * stride_vsn + h * stride_vsh + rows.to(tl.int64) * stride_vst, v_scale,
                     mask=rows < BLOCK_SIZE)
            values = _encoded(tl.math.div_rn(values, v_scale[:, None]), DstV.dtype.element_ty, INTERPRETER)
        tl.store(DstK + j * stride_dn + h * stride_dh + r64 * stride_dt + offs_d[None, :], keys, mask=ok)
        tl.store(DstV + j * stride_dvn + h * stride_dvh + r64 * stride_dvt + offs_d[None, :], values, mask=ok)


# the op launches its kernel through this (see inf_llm.kernels.launcher)
_form_blocks = DirectLauncher(_form_blocks_kernel)


def form_blocks(
    keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, repr_topk: int,
    dst_k: torch.Tensor, dst_v: torch.Tensor, dst_repr: torch.Tensor, check: bool = True, scales=None,
) -> None:
    """New memory blocks into the store, as `reference.form_blocks`, in one launch (the torch version is a
    top-k, a gather, a mean and three copies: host launches bound the prefill's per-execution-block work).

    keys/values (Hkv, n, bs, D) and scores (Hkv, n, bs) float32, e.g. views of the tail; dst_k/dst_v
    (n, Hkv, bs, D) and dst_repr (n, Hkv, D) float32: the store's new slots, on the same device (K/V may
    also be pinned host memory, written by the GPU over the bus: offload_access: direct). Last dimensions
    contiguous. Among equal scores the lowest position is taken first. `scales` (k_scale (n, Hkv, 1, D),
    v_scale (n, Hkv, bs, 1), float32, beside dst_k): dst_k/dst_v hold fp8/int8 codes, encoded here bit for
    bit as `reference.encode_codes` encodes them. `check=False`: no argument checks.
    """
    hkv, n, bs, d = keys.shape
    if check:
        check_tensors((("keys", keys, 4), ("values", values, 4), ("scores", scores, 3), ("dst_repr", dst_repr, 3)),
                       "keys", keys)
        check_tensors((("dst_k", dst_k, 4), ("dst_v", dst_v, 4)), "dst_k", dst_k)
        check_on_or_pinned("dst_k/dst_v", dst_k, dst_v, keys.device)
        if values.shape != keys.shape or scores.shape != (hkv, n, bs):
            raise ValueError(f"values {tuple(values.shape)} / scores {tuple(scores.shape)} must match keys "
                             f"{tuple(keys.shape)} / {(hkv, n, bs)}")
        if dst_k.shape != (n, hkv, bs, d) or dst_v.shape != dst_k.shape or dst_repr.shape != (n, hkv, d):
            raise ValueError(f"dst_k {tuple(dst_k.shape)} / dst_v {tuple(dst_v.shape)} / dst_repr "
                             f"{tuple(dst_repr.shape)} must be {(n, hkv, bs, d)} / {(n, hkv, d)}")
        if scales is not None:
            check_scales(scales, dst_k, dst_v, keys.device)
        elif dst_k.dtype != keys.dtype or dst_v.dtype != values.dtype:
            raise ValueError(f"the store's dtype ({dst_k.dtype}) differs from the keys' ({keys.dtype})")
        if scores.dtype != torch.float32 or dst_repr.dtype != torch.float32:
            raise ValueError(f"scores ({scores.dtype}) and dst_repr ({dst_repr.dtype}) must be float32")
        if not 1 <= repr_topk <= bs:
            raise ValueError(f"repr_topk {repr_topk} must be in [1, block size {bs}]")
        if d & (d - 1) or d > MAX_HEAD_DIM:
            raise ValueError(f"head dim {d} is not supported: need a power of two <= {MAX_HEAD_DIM}")
        check_device(keys.device)
    if n == 0 or hkv == 0:
        return
    scale_ptrs, scale_strides = scale_args(scales, dst_k)
    with device_guard(keys.device):
        _form_blocks[(n, hkv)](
            keys, values, scores, dst_k, dst_v, dst_repr, *scale_ptrs,
            keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
            scores.stride(0), scores.stride(1),
            *dst_k.stride()[:3], *dst_v.stride()[:3], dst_repr.stride(0), dst_repr.stride(1), *scale_strides,
            HEAD_DIM=d, BLOCK_SIZE=bs, BLOCK_P2=next_pow2(bs), REPR_TOPK=repr_topk,
            BLOCK_T=INTERPRETER_BLOCK if INTERPRETED else 32, CODEC=scales is not None,
            MAX_CODE=CODE_MAX.get(dst_k.dtype, 0.0), INTERPRETER=INTERPRETED,
        )
