"""`gradmon bench --peers`: gradmon beside the gradient loggers people use today.

Every variant trains its own copy of the reference model (same init, same batch); their
steps are interleaved so machine noise hits all alike, and each is reported as a median
step-time ratio against the copy with no monitoring, measured in the same run.
A peer whose package is not installed is listed as such, not silently dropped.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import gradmon
from gradmon.tools.bench import ReferenceModel

AfterBackward = Callable[[nn.Module], None]


@dataclass
class PeerResult:
    name: str
    step_ms: float | None  # None: not available here
    ratio: float | None
    note: str = ""


def _naive_item(model: nn.Module) -> None:
    # The per-layer logger people write by hand: one kernel and one host sync per value.
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad
            _ = (g.norm().item(), g.abs().max().item(), g.mean().item())
            _ = ((g == 0).float().mean().item(), torch.isnan(g).sum().item())


def _foreach_norm(model: nn.Module) -> None:
    # What clip_grad_norm_ does: norms only, one foreach kernel, one read-back.
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch.stack(torch._foreach_norm(grads)).tolist()


def _tensorboard_histograms(logdir: str) -> tuple[AfterBackward, Callable[[], None]]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(logdir)
    step = [0]

    def log(model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if p.grad is not None:
                writer.add_histogram(f"grad/{name}", p.grad, step[0])
        step[0] += 1

    return log, writer.close


def _lightning_grad_norm() -> AfterBackward:
    from lightning.pytorch.utilities import grad_norm

    def log(model: nn.Module) -> None:
        grad_norm(model, norm_type=2)

    return log


def _wandb_watch(model: nn.Module, logdir: str) -> Callable[[], None]:
    import wandb

    # Offline and silent: the benchmark never reaches the network or prints a banner.
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        mode="offline", dir=logdir, project="gradmon-bench", settings=wandb.Settings(silent=True)
    )
    wandb.watch(model, log="gradients", log_freq=1)
    finish: Callable[[], None] = run.finish
    return finish


def run_peers(steps: int = 10, warmup: int = 2, seed: int = 0) -> list[PeerResult]:
    torch.manual_seed(seed)
    reference = ReferenceModel()
    tokens = torch.randint(0, 1000, (16, 128))
    loss_fn = nn.CrossEntropyLoss()
    tmp = tempfile.TemporaryDirectory(prefix="gradmon-peers-")
    closers: list[Callable[[], None]] = [tmp.cleanup]
    variants: list[tuple[str, Callable[[], None]]] = []
    missing: list[PeerResult] = []

    def make_step(
        after_backward: AfterBackward | None = None,
    ) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
        model = copy.deepcopy(reference)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(tokens).flatten(0, 1), tokens.flatten())
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            opt.step()

        return model, opt, step

    variants.append(("no monitoring", make_step()[2]))
    model, opt, step = make_step()
    mon = gradmon.attach(model, opt, config={"exporter": {"port": 0}})
    closers.append(mon.close)
    variants.append(("gradmon (every step, all statistics, exporter on)", step))
    variants.append(("per-layer .item() statistics", make_step(_naive_item)[2]))
    variants.append(("torch._foreach_norm (norms only)", make_step(_foreach_norm)[2]))
    try:
        log, close = _tensorboard_histograms(f"{tmp.name}/tb")
        closers.append(close)
        variants.append(("TensorBoard add_histogram per layer", make_step(log)[2]))
    except ImportError as exc:
        missing.append(PeerResult("TensorBoard add_histogram per layer", None, None, str(exc)))
    try:
        variants.append(("Lightning grad_norm", make_step(_lightning_grad_norm())[2]))
    except ImportError as exc:
        missing.append(PeerResult("Lightning grad_norm", None, None, str(exc)))
    try:
        model, _, step = make_step()
        closers.append(_wandb_watch(model, tmp.name))
        variants.append(('wandb.watch(log="gradients", log_freq=1), offline', step))
    except ImportError as exc:
        missing.append(PeerResult("wandb.watch (offline)", None, None, f"not installed ({exc})"))

    try:
        times: list[list[float]] = [[] for _ in variants]
        for rep in range(warmup + steps):
            for i, (_, fn) in enumerate(variants):
                t0 = time.perf_counter()
                fn()
                if rep >= warmup:
                    times[i].append(time.perf_counter() - t0)
    finally:
        for close in reversed(closers):
            close()
    base = statistics.median(times[0])
    results = [
        PeerResult(
            name, round(statistics.median(t) * 1e3, 1), round(statistics.median(t) / base, 3)
        )
        for (name, _), t in zip(variants, times, strict=True)
    ]
    return results + missing


def format_peers(results: list[PeerResult]) -> str:
    lines = ["step time, reference model, interleaved medians (ratio vs no monitoring):"]
    for r in results:
        if r.step_ms is None:
            lines.append(f"  {r.name:<55} n/a   {r.note}")
        else:
            lines.append(f"  {r.name:<55} {r.step_ms:8.1f} ms  {r.ratio:.3f}x")
    return "\n".join(lines)
