"""`gradmon bench`: what the agent costs, as ratios against a baseline in the same process.

The reference model is an nn.TransformerEncoder (6 layers, d_model 256, ff 1024, 4 heads)
with an embedding and head of 1000, batch 16x128, AdamW, on the CPU. Two identical copies
train side by side, one with the agent attached (every step, all statistics, exporter
on); their steps are interleaved so machine noise hits both alike, and medians are
reported. The statistics pass is timed against one `torch._foreach_norm` of the same grads.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

import gradmon
from gradmon.stats import select_backend
from gradmon.stats import torch as torch_stats


class ReferenceModel(nn.Module):
    def __init__(self, vocab: int = 1000, d_model: int = 256, layers: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        block = nn.TransformerEncoderLayer(d_model, 4, 1024, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder(self.embed(tokens)))
        return out


@dataclass
class BenchResult:
    steps: int
    step_ms_baseline: float
    step_ms_agent: float
    step_overhead: float  # agent / baseline
    foreach_norm_ms: float
    stats_ms: float
    stats_over_foreach_norm: float
    torch_backend_ms: float
    backend: str
    params: int
    tensors: int
    threads: int


def _median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1e3


def _interleaved(fns: Sequence[Callable[[], object]], reps: int) -> list[list[float]]:
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return times


def run_bench(steps: int = 30, warmup: int = 3, stats_reps: int = 50, seed: int = 0) -> BenchResult:
    torch.manual_seed(seed)
    base = ReferenceModel()
    watched = copy.deepcopy(base)
    opt_base = torch.optim.AdamW(base.parameters(), lr=1e-4)
    opt_watched = torch.optim.AdamW(watched.parameters(), lr=1e-4)
    tokens = torch.randint(0, 1000, (16, 128))
    loss_fn = nn.CrossEntropyLoss()

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            logits = model(tokens)
            loss = loss_fn(logits.flatten(0, 1), tokens.flatten())
            loss.backward()
            opt.step()

        return run

    config = {"exporter": {"port": 0}}
    with gradmon.attach(watched, opt_watched, config=config) as mon:
        fns = [step(base, opt_base), step(watched, opt_watched)]
        _interleaved(fns, warmup)
        base_t, agent_t = _interleaved(fns, steps)
        mon.log(bench=1.0)
        collections = mon.snapshot()
        assert collections is not None, "the agent collected nothing"

    grads = [p.grad for p in watched.parameters() if p.grad is not None]
    backend = select_backend("auto", grads[0].device, grads[0].dtype)

    def foreach_norm() -> None:
        torch._foreach_norm(grads)

    def fast() -> None:
        backend(grads)

    def plain() -> None:
        torch_stats.compute_partials(grads)

    _interleaved([foreach_norm, fast, plain], 3)
    norm_t, fast_t, plain_t = _interleaved([foreach_norm, fast, plain], stats_reps)
    base_ms, agent_ms = _median_ms(base_t), _median_ms(agent_t)
    norm_ms, fast_ms = _median_ms(norm_t), _median_ms(fast_t)
    return BenchResult(
        steps=steps,
        step_ms_baseline=round(base_ms, 2),
        step_ms_agent=round(agent_ms, 2),
        step_overhead=round(agent_ms / base_ms, 4),
        foreach_norm_ms=round(norm_ms, 3),
        stats_ms=round(fast_ms, 3),
        stats_over_foreach_norm=round(fast_ms / norm_ms, 3),
        torch_backend_ms=round(_median_ms(plain_t), 3),
        backend=f"{backend.__module__}.{backend.__name__}",
        params=sum(g.numel() for g in grads),
        tensors=len(grads),
        threads=torch.get_num_threads(),
    )


def format_result(r: BenchResult) -> str:
    return "\n".join(
        [
            f"reference model: {r.params:,} params in {r.tensors} tensors, "
            f"{r.threads} torch threads, {r.steps} interleaved steps (medians)",
            f"  step time   baseline {r.step_ms_baseline:8.2f} ms   with gradmon "
            f"{r.step_ms_agent:8.2f} ms   ratio {r.step_overhead:.4f}  (target <= 1.02)",
            f"  stats pass  foreach_norm {r.foreach_norm_ms:6.3f} ms   gradmon {r.stats_ms:6.3f} ms"
            f"   ratio {r.stats_over_foreach_norm:.3f}  (target <= 2)  [{r.backend}]",
            f"  plain torch backend {r.torch_backend_ms:.3f} ms",
        ]
    )


def main(steps: int = 30, as_json: bool = False) -> BenchResult:
    result = run_bench(steps=steps)
    print(json.dumps(asdict(result), indent=2) if as_json else format_result(result))
    return result
