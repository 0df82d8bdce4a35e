"""Benchmark: the C kernel's 8-column pass against `torch._foreach_norm` on real grads.

Reference workload: the grads of a 6-layer TransformerEncoder (d_model 256, ff 1024) with
an Embedding(1000, 256) and a Linear(256, 1000) head: 75 tensors, ~5.25M fp32 elements.
Not a test; run `python bench/cpu_kernel.py` after `python setup.py build_ext --inplace`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from gradmon.stats import cpu

REPS = 50


class Model(nn.Module):
    def __init__(self, vocab: int = 1000, d_model: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=8, dim_feedforward=1024, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder(self.embed(tokens)))
        return out


def reference_grads() -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Model()
    tokens = torch.randint(0, 1000, (16, 128))
    logits = model(tokens)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 1000), tokens.reshape(-1))
    loss.backward()
    return [p.grad for p in model.parameters() if p.grad is not None]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    grads = reference_grads()
    total = sum(g.numel() for g in grads)
    print(f"{len(grads)} tensors, {total / 1e6:.2f}M elements, {torch.get_num_threads()} threads")
    out = torch.empty((len(grads), 8), dtype=torch.float64)
    cases: dict[str, Callable[[], object]] = {
        "foreach_norm": lambda: torch._foreach_norm(grads),
        "compute_partials": lambda: cpu.compute_partials(grads),
        "compute_partials(out=)": lambda: cpu.compute_partials(grads, out=out),
        "compute_partials(1 thread)": lambda: cpu.compute_partials(grads, out=out, nthreads=1),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        for _ in range(5):
            fn()
    for _ in range(REPS):  # interleaved, so drifts in clock or cache state hit all alike
        for name, fn in cases.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, m in med.items():
        print(f"{name:28s} {m:7.3f} ms   ratio {m / med['foreach_norm']:.2f}")


if __name__ == "__main__":
    main()
