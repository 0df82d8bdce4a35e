"""CPU statistics pass on GPT-2-small-shaped fp32 grads (124M) against torch._foreach_norm,
and the accuracy of the sum of squares at 1e8 elements. Run: python bench/cpu_gpt2.py"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from gradmon.stats import cpu
from gradmon.stats.layout import Col

BLOCK = [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,)]
BLOCK += [(768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
SHAPES = [(50257, 768), (1024, 768), *BLOCK * 12, (768,), (768,)]


def seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(s) * 1e-3 for s in SHAPES]
    numel = sum(g.numel() for g in grads)
    norm_t, ours_t = [], []
    for _ in range(9):  # interleaved, medians
        norm_t.append(seconds(lambda: torch._foreach_norm(grads)))
        ours_t.append(seconds(lambda: cpu.compute_partials(grads)))
    fa, fb = statistics.median(norm_t) * 1e3, statistics.median(ours_t) * 1e3
    print(f"GPT-2 small shapes: {len(grads)} tensors, {numel:,} fp32 elements")
    print(f"foreach_norm {fa:.1f} ms  gradmon cpu {fb:.1f} ms  ratio {fb / fa:.3f}  "
          f"({numel * 4 / fb / 1e6:.1f} GB/s read)")  # fmt: skip
    big = torch.randn(100_000_000)
    ours = cpu.compute_partials([big])[0, Col.SUM_SQ].item()
    exact = (big.double() ** 2).sum().item()
    plain = torch.linalg.vector_norm(big).item() ** 2
    print(f"1e8 fp32 sum of squares: gradmon rel err {abs(ours / exact - 1):.2e}, "
          f"plain fp32 norm rel err {abs(plain / exact - 1):.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
