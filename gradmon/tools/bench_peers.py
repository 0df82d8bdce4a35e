"""`gradmon bench --peers`: gradmon beside the gradient loggers people use today.

Every variant trains its own copy of the reference model (same init, same batch); one step
of each per round, the order forward on even rounds and reversed on odd ones, so machine
noise hits all alike; each is reported as a median (and mean) step-time ratio against the
copy with no monitoring, measured in the same run. gradmon runs as shipped (every step,
all statistics, exporter on), with /metrics scraped over HTTP every 1 s and every 15 s
(`IntervalScraper`), and with the TensorBoard sink writing a histogram of every layer at
every step (`histogram_every: 1`: what the histogram peers compute).
A peer whose package is not installed is listed as such, not silently dropped.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import gradmon
from gradmon.tools.bench import (
    SCRAPE_INTERVALS,
    Arm,
    IntervalScraper,
    ReferenceModel,
    _interleaved,
    arms_from_times,
    format_arm,
    scraped,
)

AfterBackward = Callable[[nn.Module], None]


GRADMON = "gradmon (every step, all statistics, exporter on)"


@dataclass
class PeerResult:
    name: str
    step_ms: float | None  # median; None: not available here
    ratio: float | None  # median / the median of no monitoring
    note: str = ""
    arm: Arm | None = None  # the whole reading (means, scrapes) where measured


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


class _Variants:
    """The copies of the reference model, each with its step; what to close after."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.reference = ReferenceModel()
        self.tokens = torch.randint(0, 1000, (16, 128))
        self.loss_fn = nn.CrossEntropyLoss()
        self.tmp = tempfile.TemporaryDirectory(prefix="gradmon-peers-")
        self.closers: list[Callable[[], None]] = [self.tmp.cleanup]
        self.steps: list[tuple[str, Callable[[], None]]] = []
        self.scrapers: dict[str, IntervalScraper] = {}
        self.missing: list[PeerResult] = []

    def make_step(
        self, after_backward: AfterBackward | None = None
    ) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
        model = copy.deepcopy(self.reference)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens, loss_fn = self.tokens, self.loss_fn

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(tokens).flatten(0, 1), tokens.flatten())
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            opt.step()

        return model, opt, step

    def add(self, name: str, after_backward: AfterBackward | None = None) -> None:
        self.steps.append((name, self.make_step(after_backward)[2]))

    def add_gradmon(
        self, name: str, config: dict[str, Any], scrape_every: float | None = None
    ) -> None:
        model, opt, step = self.make_step()
        mon = gradmon.attach(model, opt, config={"exporter": {"port": 0}, **config})
        self.closers.append(mon.close)
        if scrape_every is not None:
            scraper = IntervalScraper(f"http://127.0.0.1:{mon.port}/metrics", scrape_every)
            self.closers.append(scraper.close)
            self.scrapers[name] = scraper
            step = scraped(step, scraper)
        self.steps.append((name, step))

    def add_peer(self, name: str, add: Callable[[], None], why: str = "") -> None:
        """`add()` adds the variant, or raises ImportError (a peer's package is missing) or
        GradmonError (gradmon's TensorBoard sink without tensorboard): listed as n/a."""
        try:
            add()
        except (ImportError, gradmon.GradmonError) as exc:
            self.missing.append(PeerResult(name, None, None, f"{why}{exc}"))

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


def run_peers(
    steps: int = 10,
    warmup: int = 2,
    seed: int = 0,
    scrape_intervals: Sequence[float] = SCRAPE_INTERVALS,
) -> list[PeerResult]:
    v = _Variants(seed)
    tmp = v.tmp.name
    try:
        v.add("no monitoring")
        v.add_gradmon(GRADMON, {})
        for interval in scrape_intervals:
            v.add_gradmon(f"gradmon, /metrics scraped every {interval:g} s", {}, interval)
        tb_config = {"tensorboard": {"logdir": f"{tmp}/gradmon-tb", "histogram_every": 1}}
        name = "gradmon + TensorBoard histogram_every: 1"
        v.add_peer(name, lambda: v.add_gradmon(name, tb_config))
        v.add("per-layer .item() statistics", _naive_item)
        v.add("torch._foreach_norm (norms only)", _foreach_norm)

        def tensorboard() -> None:
            log, close = _tensorboard_histograms(f"{tmp}/tb")
            v.closers.append(close)
            v.add("TensorBoard add_histogram per layer", log)

        def wandb() -> None:
            model, _, step = v.make_step()
            v.closers.append(_wandb_watch(model, tmp))
            v.steps.append(('wandb.watch(log="gradients", log_freq=1), offline', step))

        v.add_peer("TensorBoard add_histogram per layer", tensorboard)
        v.add_peer(
            "Lightning grad_norm", lambda: v.add("Lightning grad_norm", _lightning_grad_norm())
        )
        v.add_peer("wandb.watch (offline)", wandb, why="not installed: ")

        fns = [fn for _, fn in v.steps]
        _interleaved(fns, warmup)
        for scraper in v.scrapers.values():
            scraper.reset()  # count the timed steps' scrapes only
        times = _interleaved(fns, steps)
        arms = arms_from_times([name for name, _ in v.steps], times, v.scrapers)
    finally:
        v.close()
    return [PeerResult(a.name, a.step_ms, a.ratio, arm=a) for a in arms] + v.missing


def format_peers(results: list[PeerResult]) -> str:
    lines = [
        "step time, reference model, one step of each per round, arm order alternating "
        "(median, ratio vs no monitoring; mean, ratio):"
    ]
    for r in results:
        if r.arm is None:
            lines.append(f"  {r.name:<52} n/a   {r.note}")
        else:
            lines.append(format_arm(r.arm, width=52))
    return "\n".join(lines)
