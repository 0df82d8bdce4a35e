"""`gradmon demo`: a real CPU training run with the agent attached.

Every scenario is a small model trained for real; the faulty ones break through genuine
training dynamics (a learning rate that is too high, a saturating activation, a corrupt
sample, an over-strong penalty), never through gradients written by hand:

- healthy:   a tiny Transformer learns to sort tokens with AdamW; no anomaly at all.
- exploding: a deep ReLU MLP without normalization, plain SGD with a learning rate far
             too high: the gradient norm grows step after step (exploding, spike).
- vanishing: a deep stack of sigmoid layers: the gradient shrinks by ~4x or more per layer
             on its way back, so the first layers get almost nothing (vanishing).
- nonfinite: a healthy MLP fed a corrupt sample (a NaN feature) every so often; the loss
             and every gradient become NaN. Like most training loops, the demo skips the
             optimizer step when the loss is not finite, and calls `mon.collect()` so the
             agent still sees those gradients (nonfinite).
- dead:      an MLP with a side branch whose ReLU units carry an L1 activity penalty that
             is far too strong: it drives every unit negative, after which the branch's
             input layer gets exact-zero gradients forever (dead).

`run_demo()` serves /metrics while it runs, shows a live view in a terminal, and returns
what gradmon detected.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn

import gradmon
from gradmon.config import read_yaml
from gradmon.errors import GradmonError
from gradmon.snapshot import ANOMALY_KINDS, Snapshot

__all__ = ["SCENARIOS", "DemoResult", "run_demo", "summary"]

SCENARIOS: tuple[str, ...] = ("healthy", "exploding", "vanishing", "nonfinite", "dead")

REFRESH_SECONDS = 0.25  # live view: a few redraws per second, whatever the step rate
PRINT_LINES = 10  # without a terminal: about this many progress lines per run


@dataclass
class DemoResult:
    scenario: str
    steps: int
    detected: dict[str, set[str]]  # anomaly kind -> layers that had it
    anomaly_counts: dict[str, int]  # anomaly kind -> number of events
    final_loss: float
    port: int | None
    seconds: float
    initial_loss: float = math.nan
    first_detection: dict[str, int] = field(default_factory=dict)  # kind -> first step


# ---------------------------------------------------------------------------- scenarios
Batch = tuple[Tensor, Tensor]


@dataclass
class _Scenario:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], Batch]  # step -> (inputs, targets)
    loss: Callable[[Tensor, Tensor], Tensor]  # (inputs, targets) -> scalar loss
    default_steps: int


class _SortTransformer(nn.Module):
    """Encoder-only Transformer: reads a sequence of tokens, emits it sorted."""

    def __init__(self, vocab: int, length: int, width: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            nhead=4,
            dim_feedforward=2 * width,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        # Pre-norm layers cannot use the nested-tensor fast path; say so to avoid a warning.
        self.encoder = nn.TransformerEncoder(
            layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        out: Tensor = self.head(self.encoder(self.embed(tokens) + self.position))
        return out


def _mlp(sizes: list[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _regression_task(
    gen: torch.Generator, n_in: int = 16, n_out: int = 4
) -> Callable[[int], Batch]:
    """A fixed random teacher y = tanh(x A) B: smooth, learnable, targets of order one."""
    a = torch.randn(n_in, 32, generator=gen) / math.sqrt(n_in)
    b = torch.randn(32, n_out, generator=gen) / math.sqrt(32)

    def batch(step: int) -> Batch:
        x = torch.randn(128, n_in, generator=gen)
        return x, torch.tanh(x @ a) @ b

    return batch


def _healthy(gen: torch.Generator) -> _Scenario:
    vocab, length = 16, 10
    model = _SortTransformer(vocab, length)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def batch(step: int) -> Batch:
        tokens = torch.randint(0, vocab, (64, length), generator=gen)
        return tokens, tokens.sort(dim=1).values

    def loss(tokens: Tensor, target: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model(tokens).flatten(0, 1), target.flatten())

    return _Scenario(model, opt, batch, loss, default_steps=600)


def _exploding(gen: torch.Generator) -> _Scenario:
    model = _mlp([16] + [64] * 8 + [4], nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    task = _regression_task(gen)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(x), y)

    return _Scenario(model, opt, task, loss, default_steps=300)


def _vanishing(gen: torch.Generator) -> _Scenario:
    model = _mlp([16] + [32] * 16 + [4], nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    task = _regression_task(gen)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(x), y)

    return _Scenario(model, opt, task, loss, default_steps=300)


POISON_FIRST, POISON_EVERY = 20, 100  # nonfinite: steps whose batch holds a corrupt sample


def _nonfinite(gen: torch.Generator) -> _Scenario:
    model = _mlp([16, 64, 64, 4], nn.ReLU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    task = _regression_task(gen)

    def batch(step: int) -> Batch:
        x, y = task(step)
        if step >= POISON_FIRST and (step - POISON_FIRST) % POISON_EVERY == 0:
            x[0, 0] = math.nan  # one sensor reading came through as NaN
        return x, y

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(x), y)

    return _Scenario(model, opt, batch, loss, default_steps=300)


class _SideBranch(nn.Module):
    """A main MLP plus a ReLU side branch whose activity carries an L1 penalty."""

    def __init__(self) -> None:
        super().__init__()
        self.main = _mlp([16, 64, 64, 4], nn.ReLU)
        self.side_in = nn.Linear(16, 32)
        self.side_out = nn.Linear(32, 4)
        self.activity = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.relu(self.side_in(x))
        self.activity = hidden.mean()
        out: Tensor = self.main(x) + self.side_out(hidden)
        return out


def _dead(gen: torch.Generator) -> _Scenario:
    model = _SideBranch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    task = _regression_task(gen)
    penalty = 10.0  # meant to make the branch sparse; strong enough to switch it off

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(x), y) + penalty * model.activity

    return _Scenario(model, opt, task, loss, default_steps=300)


_BUILDERS: dict[str, Callable[[torch.Generator], _Scenario]] = {
    "healthy": _healthy,
    "exploding": _exploding,
    "vanishing": _vanishing,
    "nonfinite": _nonfinite,
    "dead": _dead,
}


# ------------------------------------------------------------------------------ running
def _config(port: int, config: str | os.PathLike[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """The demo's own settings, with the user's config (a YAML path or a dict) on top:
    a port written in the user's config wins over the `port` argument."""
    base: dict[str, Any] = {"exporter": {"port": port}}
    if config is None:
        return base
    if isinstance(config, Mapping):
        user = dict(config)
    elif isinstance(config, str | os.PathLike):
        user = read_yaml(config)
    else:
        raise GradmonError(
            f"run_demo(config=...) needs a YAML path, a dict or None, not {type(config).__name__}"
        )
    return _merge(base, user)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


@dataclass
class _Progress:
    """What the live view and the progress lines show."""

    scenario: str
    steps: int
    url: str | None
    step: int = 0
    loss: float = math.nan
    snapshot: Snapshot | None = None
    counts: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def line(self) -> str:
        norm = self.snapshot.global_norm if self.snapshot is not None else math.nan
        events = ", ".join(f"{k} {n}" for k, n in self.counts.items()) or "none"
        return (
            f"[{self.scenario}] step {self.step}/{self.steps}  loss {self.loss:.4g}  "
            f"grad norm {norm:.3g}  events: {events}"
        )

    def render(self) -> Group:
        head = Table.grid(padding=(0, 2))
        head.add_row(
            Text(f"gradmon demo: {self.scenario}", style="bold"),
            f"step {self.step}/{self.steps}",
            f"{time.perf_counter() - self.started:.1f} s",
        )
        snap = self.snapshot
        norm = snap.global_norm if snap is not None else math.nan
        head.add_row(f"loss {self.loss:.4g}", f"global grad norm {norm:.4g}", "")
        head.add_row(f"metrics: {self.url or 'exporter disabled'}", "", "")

        layers = Table(title="per-layer gradient norm", title_justify="left", expand=False)
        layers.add_column("smallest")
        layers.add_column("norm", justify="right")
        layers.add_column("largest")
        layers.add_column("norm", justify="right")
        if snap is not None:
            ranked = sorted(
                ((s.norm, name) for name, s in snap.layers.items() if s.received),
                key=lambda item: item[0],
            )
            low, high = ranked[:3], ranked[::-1][:3]
            for (lo_norm, lo_name), (hi_norm, hi_name) in zip(low, high, strict=False):
                layers.add_row(lo_name, f"{lo_norm:.3g}", hi_name, f"{hi_norm:.3g}")

        events = Table(title="health events so far", title_justify="left")
        events.add_column("kind")
        events.add_column("events", justify="right")
        for kind in ANOMALY_KINDS:
            n = self.counts.get(kind, 0)
            events.add_row(kind, Text(str(n), style="bold red" if n else "green"))
        return Group(head, layers, events)


def run_demo(
    scenario: str = "healthy",
    steps: int | None = None,
    port: int = 9400,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    live: bool = True,
    seed: int = 0,
) -> DemoResult:
    """Train one scenario on the CPU with gradmon attached; return what it detected.

    steps: None for the scenario's default. port: where /metrics is served (0: any free
    port). live: a live terminal view when stdout is a terminal, else progress lines.
    """
    if scenario not in _BUILDERS:
        raise GradmonError(f"unknown demo scenario {scenario!r}; choose one of {SCENARIOS}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise GradmonError(f"run_demo(steps=...) needs a positive int or None, not {steps!r}")
    merged = _config(port, config)

    # fork_rng: the demo seeds torch for a reproducible run without changing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        setup = _BUILDERS[scenario](torch.Generator().manual_seed(seed))
    n_steps = steps if steps is not None else setup.default_steps

    detected: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    initial_loss = math.nan
    console = Console()
    use_live = live and sys.stdout.isatty()
    print_every = max(1, n_steps // PRINT_LINES)
    started = time.perf_counter()

    mon = gradmon.attach(setup.model, setup.optimizer, config=merged)
    try:
        served = mon.port
        addr = mon.config.exporter.addr
        url = f"http://{addr}:{served}/metrics" if served is not None else None
        progress = _Progress(scenario, n_steps, url, counts=counts)
        seen: Snapshot | None = None
        with (
            Live(progress.render(), console=console, auto_refresh=False, transient=False)
            if use_live
            else _nothing() as view
        ):
            last_draw = 0.0
            for step in range(n_steps):
                x, y = setup.batch(step)
                loss = setup.loss(x, y)
                setup.optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                value = loss.item()  # sync-ok: CPU demo, and the loop branches on it
                if math.isfinite(value):
                    setup.optimizer.step()  # gradmon collects in the step pre-hook
                else:
                    # Skip the update, as training loops do, but let gradmon see the grads.
                    mon.collect()
                mon.log(loss=value)
                if step == 0:
                    initial_loss = value

                snap = mon.snapshot()
                if snap is not None and snap is not seen:  # count each collection once
                    seen = snap
                    for a in snap.anomalies:
                        detected.setdefault(a.kind, set()).add(a.layer)
                        counts[a.kind] = counts.get(a.kind, 0) + 1
                        first.setdefault(a.kind, step)
                progress.step, progress.loss, progress.snapshot = step + 1, value, snap

                now = time.perf_counter()
                if view is not None and (now - last_draw >= REFRESH_SECONDS or step + 1 == n_steps):
                    view.update(progress.render(), refresh=True)
                    last_draw = now
                elif view is None and ((step + 1) % print_every == 0 or step + 1 == n_steps):
                    console.print(progress.line(), highlight=False)
    finally:
        mon.close()

    result = DemoResult(
        scenario=scenario,
        steps=n_steps,
        detected=detected,
        anomaly_counts=counts,
        final_loss=value,
        port=served,
        seconds=time.perf_counter() - started,
        initial_loss=initial_loss,
        first_detection=first,
    )
    console.print(summary(result), highlight=False)
    return result


class _nothing:
    """A context manager yielding None: the live view's stand-in without a terminal."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def summary(result: DemoResult) -> str:
    """A few lines: the run, and what gradmon detected (kind -> layers, counts)."""
    lines = [
        f"gradmon demo '{result.scenario}': {result.steps} steps in {result.seconds:.1f} s, "
        f"loss {result.initial_loss:.4g} -> {result.final_loss:.4g}"
    ]
    if not result.anomaly_counts:
        lines.append("  no anomalies detected")
    for kind in ANOMALY_KINDS:
        if kind not in result.anomaly_counts:
            continue
        layers = sorted(result.detected.get(kind, ()))
        shown = ", ".join(layers[:4]) + (f" (+{len(layers) - 4} more)" if len(layers) > 4 else "")
        step = result.first_detection.get(kind)
        since = f", first at step {step}" if step is not None else ""
        lines.append(
            f"  {kind}: {result.anomaly_counts[kind]} events in {len(layers)} layer(s){since}: "
            f"{shown}"
        )
    return "\n".join(lines)
