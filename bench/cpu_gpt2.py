"""CPU statistics pass on GPT-2-small-shaped fp32 grads (124M) vs torch._foreach_norm, and
the accuracy of sum of squares at 1e8 elements. Run: python bench/cpu_gpt2.py"""

import statistics
import time

import torch

from gradmon.stats import cpu
from gradmon.stats.layout import Col

torch.manual_seed(0)
shapes = [(50257, 768), (1024, 768)]
for _ in range(12):
    shapes += [
        (768,),
        (768,),
        (768, 2304),
        (2304,),
        (768, 768),
        (768,),
        (768,),
        (768,),
        (768, 3072),
        (3072,),
        (3072, 768),
        (768,),
    ]
shapes += [(768,), (768,)]
grads = [torch.randn(s) * 1e-3 for s in shapes]
print(len(grads), sum(g.numel() for g in grads))


def t(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


a, b = [], []
for _ in range(9):
    a.append(t(lambda: torch._foreach_norm(grads)))
    b.append(t(lambda: cpu.compute_partials(grads)))
fa, fb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
print(
    f"foreach_norm {fa:.1f} ms  gradmon cpu {fb:.1f} ms  ratio {fb / fa:.3f}  ({sum(g.numel() for g in grads) * 4 / fb / 1e6:.1f} GB/s)"
)
big = torch.randn(100_000_000)
p = cpu.compute_partials([big])[0, Col.SUM_SQ].item()
r = (big.double() ** 2).sum().item()
f = torch.linalg.vector_norm(big).item() ** 2
print(
    f"100M fp32: gradmon rel err {abs(p / r - 1):.2e}, plain fp32 norm rel err {abs(f / r - 1):.2e}"
)
