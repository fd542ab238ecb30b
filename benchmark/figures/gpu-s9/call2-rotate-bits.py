"""Session 9, GPU call 2: the Triton rotation against the torch one at Mistral-7B's prefill shape, and which
rounding formula each matches (emulated on the CPU with explicit bf16 roundings). Output: call2-rotate-bits.txt."""
import torch

from inf_llm.kernels import reference, triton_attn
from inf_llm.memory import RotaryTable

torch.manual_seed(4)
h, length, d = 32, 8191, 128
dt = torch.bfloat16
x = (torch.randn(length, h, d, device="cuda") * 8).to(dt).transpose(0, 1)
rope = RotaryTable((1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).cuda(), d)
cos, sin = rope.cos_sin(1000, 1000 + length, dt)
got = triton_attn.rotate(x, cos, sin)
ref = reference.rotate(x, cos, sin)
bad = (got != ref).nonzero()
print("mismatches", bad.shape[0], "of", got.numel())
half = d // 2
xc, cc, sc = x.float().cpu(), cos.float().cpu(), sin.float().cpu()


def r(t):
    return t.to(torch.bfloat16).float()


x1, x2 = xc[..., :half], xc[..., half:]
c1, c2, s1, s2 = cc[:, :half], cc[:, half:], sc[:, :half], sc[:, half:]
two_round = torch.cat([r(r(x1 * c1) - r(x2 * s1)), r(r(x2 * c2) + r(x1 * s2))], -1)
one_round = torch.cat([r(x1 * c1 - x2 * s1), r(x2 * c2 + x1 * s2)], -1)
fma_a = torch.cat([r(r(x1 * c1).double() - (x2 * s1).double()).float(),
                   r(r(x2 * c2).double() + (x1 * s2).double()).float()], -1)
for name, emu in (("two_round", two_round), ("one_round", one_round), ("fma_a", fma_a)):
    print(name, "== triton:", int((emu != got.float().cpu()).sum()),
          " == torch:", int((emu != ref.float().cpu()).sum()))
for hh, row, dd in bad[:5].tolist():
    print([hh, row, dd], "x", x[hh, row, dd].item(), x[hh, row, (dd + half) % d].item(), "cos", cos[row, dd].item(),
          "sin", sin[row, dd].item(), "triton", got[hh, row, dd].item(), "torch", ref[hh, row, dd].item())
print("torch mul == r(x*c):", int(((x * cos).float().cpu() != r(xc * cc)).sum()))
print("torch mul2 == r:", int(((x[..., half:] * sin[:, :half]).float().cpu() != r(x2 * s1)).sum()))
