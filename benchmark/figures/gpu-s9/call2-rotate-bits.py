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
# emulate on CPU in float64 with explicit bf16 roundings
xc, cc, sc = x.float().cpu(), cos.float().cpu(), sin.float().cpu()
def r(t): return t.to(torch.bfloat16).float()
x1, x2 = xc[..., :half], xc[..., half:]
c1, c2, s1, s2 = cc[:, :half], cc[:, half:], sc[:, :half], sc[:, half:]
two_round = torch.cat([r(r(x1 * c1) - r(x2 * s1)), r(r(x2 * c2) + r(x1 * s2))], -1)
one_round = torch.cat([r(x1 * c1 - x2 * s1), r(x2 * c2 + x1 * s2)], -1)
fma_a = torch.cat([r(r(x1 * c1).double() - (x2 * s1).double()).float(), r(r(x2 * c2).double() + (x1 * s2).double()).float()], -1)
for name, emu in (("two_round", two_round), ("one_round", one_round), ("fma_a", fma_a)):
    print(name, "== triton:", int((emu != got.float().cpu()).sum()), " == torch:", int((emu != ref.float().cpu()).sum()))
for i in bad[:5].tolist():
    hh, l, dd = i
    print(i, "x", x[hh, l, dd].item(), x[hh, l, (dd + half) % d].item(), "cos", cos[l, dd].item(), "sin", sin[l, dd].item(),
          "triton", got[hh, l, dd].item(), "torch", ref[hh, l, dd].item())
# torch's own ops: is x*cos the rounded product?
p = (x * cos)
print("torch mul == r(x*c):", int((p.float().cpu() != r(xc * cc)).sum()))
q = x[..., half:] * sin[:, :half]
print("torch mul2 == r:", int((q.float().cpu() != r(x2 * s1)).sum()))
