"""Session 12: host cost of one Triton launch, by layer of the launch path (global_stage_into at the Mistral-7B
exec-block shape, small store): the op (check=False), JITFunction[grid](...), binder + cache key + kernel.run,
and kernel.run alone. Run from the repository root with PYTHONPATH=. on a GPU machine (calls 3-7; call 3's copy
lacked the grid padding, calls 3-5 the launcher path; reformatted since, same code)."""
import math
import time

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime import jit as tjit

from inf_llm.kernels import triton_attn as ta

dev = torch.device("cuda")
torch.manual_seed(0)
hq, hkv, d, lq = 32, 8, 128, 512
q = torch.randn(hq, lq, d, device=dev).bfloat16()
out = torch.randn(hq, lq, d, device=dev).bfloat16()
lse = torch.randn(hq, lq, device=dev)
sink_k = torch.randn(hkv, 128, d, device=dev).bfloat16()
sink_v = torch.randn(hkv, 128, d, device=dev).bfloat16()
store_k = torch.randn(32, hkv, 128, d, device=dev).bfloat16()
store_v = torch.randn(32, hkv, 128, d, device=dev).bfloat16()
ids = torch.randperm(32, device=dev)[:16][None].int()
rem_k = torch.randn(hkv, 384, d, device=dev).bfloat16()
rem_v = torch.randn(hkv, 384, d, device=dev).bfloat16()


def call():
    ta.global_stage_into(q, out, lse, sink_k, sink_v, store_k, store_v, ids, rem_k, rem_v, rem_offset=-128,
                         scale=1 / math.sqrt(d), check=False)


captured = {}
orig_run = ta._global_stage_kernel.run
def spy(*args, grid, warmup, **kwargs):
    captured.update(args=args, grid=grid, kwargs=kwargs)
    return orig_run(*args, grid=grid, warmup=warmup, **kwargs)
ta._global_stage_kernel.run = spy
call()
torch.cuda.synchronize()
ta._global_stage_kernel.run = orig_run
args, grid, kwargs = captured["args"], captured["grid"], captured["kwargs"]
grid = tuple(grid) + (1,) * (3 - len(grid))
fn = ta._global_stage_kernel
def jit_path():
    fn[grid](*args, **kwargs)
device = driver.active.get_current_device()
kernel_cache, kernel_key_cache, target, backend, binder = fn.device_caches[device]
kw = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
def binder_path():
    stream = driver.active.get_current_stream(device)
    bound, spec, options = binder(*args, **kw)
    key = tjit.compute_cache_key(kernel_key_cache, spec, options)
    k = kernel_cache[key]
    k.run(grid[0], grid[1], grid[2], stream, k.function, k.packed_metadata, None, None, None, *bound.values())
bound, spec, options = binder(*args, **kw)
kern = kernel_cache[tjit.compute_cache_key(kernel_key_cache, spec, options)]
vals = tuple(bound.values())
def direct_path():
    stream = torch.cuda.current_stream().cuda_stream
    kern.run(grid[0], grid[1], grid[2], stream, kern.function, kern.packed_metadata, None, None, None, *vals)
def binder_only():
    binder(*args, **kw)
def key_only():
    tjit.compute_cache_key(kernel_key_cache, spec, options)
def stream_only():
    driver.active.get_current_stream(device)
def launcher_path():
    ta._global_stage[grid](*args, **kwargs)
for name, f in (("op", call), ("launcher", launcher_path), ("jit", jit_path), ("binder+run", binder_path),
                ("run", direct_path), ("binder", binder_only), ("key", key_only), ("stream", stream_only)):
    for rep in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(300):
            f()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"{name:12s} host {1e6 * (t1 - t0) / 300:7.1f} us/launch   wall {1e6 * (t2 - t0) / 300:7.1f} us/launch")
print("args", len(args), "bound", len(vals), "kept", len(ta._global_stage._kernels))
