"""`gradmon demo`: a real CPU training run with the agent attached.

Every scenario is a small model trained for real; the faulty ones break through genuine
training dynamics, never through gradients written by hand:

- healthy:   a 2-layer Transformer learns to sort tokens with 10% label noise (AdamW,
             warm-up, cosine decay). gradmon must report nothing at all.
- exploding: an 8-layer tanh MLP without normalization, plain SGD at lr 2.0 (it trains at
             0.1 and diverges from about 1.5): after ten calm steps every update
             overshoots further, and the gradient norm grows by orders of magnitude
             (spike, exploding). Then the tanh units saturate: where tanh is exactly +-1
             its derivative is exactly 0, so the layers below get all-zero gradients
             (dead) while the loss overflows to inf.
- vanishing: an 8-layer sigmoid MLP: the gradient shrinks 4-8x per layer on its way
             back, so the first three layers get an rms below 1e-7 (vanishing).
- nonfinite: an MLP fed a corrupt sample (one NaN feature) at step 20 and every 100
             steps after; the loss and every gradient become NaN. As most training loops
             do, the demo skips the optimizer step when the loss is not finite, and calls
             `mon.collect()` so the agent still sees those gradients (nonfinite).
- dead:      an MLP with a ReLU side branch whose activity carries an L1 penalty that is
             far too strong: it drives every unit below zero for every input, after which
             the branch gets exactly zero gradient and never recovers (dead).

`run_demo()` serves /metrics while it runs, shows a live view in a terminal (progress
lines otherwise), prints a summary and returns what gradmon detected.

With `with_prometheus=True` (`gradmon demo --with-prometheus`) a local Prometheus and
Alertmanager (gradmon.localstack) run beside the training: Prometheus scrapes the run
every second and evaluates the alert rules, Alertmanager delivers to a webhook that
prints what it receives. The faulty scenarios finish in a second or two, far less than
the rules' `for` durations: `step_delay` paces the loop (each step lasts at least that
long), by default spreading a run over about PACED_SECONDS.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn

import gradmon
from gradmon.config import Config, HealthConfig, merge_dicts, read_yaml
from gradmon.errors import GradmonError
from gradmon.snapshot import ANOMALY_KINDS, Snapshot
from gradmon.tools.localstack import LOOPBACK, LocalStack, Target, WebhookReceiver

__all__ = [
    "DEFAULT_STEPS",
    "DESCRIPTIONS",
    "PACED_SECONDS",
    "SCENARIOS",
    "DemoResult",
    "run_demo",
    "summary",
]

SCENARIOS: tuple[str, ...] = ("healthy", "exploding", "vanishing", "nonfinite", "dead")

REFRESH_SECONDS = 0.25  # live view: a few redraws per second, whatever the step rate
PRINT_LINES = 10  # without a terminal: about this many progress lines per run
# with_prometheus and no step_delay: pace a run to last about this long, so that 1 s
# scrapes see its course and the alerts with short `for`s can fire while it runs.
PACED_SECONDS = 120.0
SCRAPE_WAIT_SECONDS = 30.0  # with_prometheus: the first scrape must come within this

REPO = Path(__file__).resolve().parents[3]
SHIPPED_RULES = REPO / "deploy" / "prometheus" / "rules" / "gradmon.rules.yml"
SHIPPED_ALERTMANAGER = REPO / "deploy" / "alertmanager" / "alertmanager.yml"

DESCRIPTIONS: dict[str, str] = {
    "healthy": "a 2-layer Transformer learns to sort 12 tokens (AdamW); expect no anomaly",
    "exploding": "an 8-layer tanh MLP, plain SGD at lr 2.0, far too high; expect exploding, spike",
    "vanishing": "an 8-layer sigmoid MLP; expect vanishing on the first layers",
    "nonfinite": "an MLP fed a NaN feature at step 20 and every 100 steps; expect nonfinite",
    "dead": "a ReLU side branch under a far too strong L1 penalty; expect dead",
}


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
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None


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
    gen: torch.Generator, pixels: bool = False, n_in: int = 16, n_out: int = 4
) -> Callable[[int], Batch]:
    """A fixed random teacher y = tanh(x A) B: smooth, learnable, targets of order one.

    Inputs are standard normal, or with pixels=True image-like intensities in [0, 1].
    """
    a = torch.randn(n_in, 32, generator=gen) / math.sqrt(n_in)
    b = torch.randn(32, n_out, generator=gen) / math.sqrt(32)

    def batch(step: int) -> Batch:
        if pixels:
            x = torch.rand(128, n_in, generator=gen)
            return x, torch.tanh((2 * x - 1) @ a) @ b
        x = torch.randn(128, n_in, generator=gen)
        return x, torch.tanh(x @ a) @ b

    return batch


LABEL_NOISE = 0.1  # healthy: fraction of target tokens replaced by random ones


def _healthy(gen: torch.Generator, steps: int) -> _Scenario:
    vocab, length = 16, 12
    model = _SortTransformer(vocab, length)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    # The usual Transformer recipe: a short linear warm-up, then cosine decay to zero.
    warmup = max(1, min(100, steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))),
    )

    def batch(step: int) -> Batch:
        tokens = torch.randint(0, vocab, (64, length), generator=gen)
        target = tokens.sort(dim=1).values
        # Label noise, as real data has: the loss keeps a floor (about 0.58 nats here)
        # instead of going to zero. At zero loss the gradient norm becomes heavy-tailed
        # (a rare wrong token gives 10-60x the median norm), which the spike rule flags.
        noisy = torch.rand(target.shape, generator=gen) < LABEL_NOISE
        random = torch.randint(0, vocab, target.shape, generator=gen)
        return tokens, torch.where(noisy, random, target)

    def loss(tokens: Tensor, target: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model(tokens).flatten(0, 1), target.flatten())

    return _Scenario(model, opt, batch, loss, scheduler)


def _exploding(gen: torch.Generator, steps: int) -> _Scenario:
    # No normalization and plain SGD at lr 2.0: this net trains at 0.1 and diverges from
    # about 1.5. Tanh rather than ReLU: a diverging deep ReLU net mostly switches its
    # units off and calms down again, a tanh net keeps overshooting.
    model = _mlp([16] + [64] * 8 + [4], nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    task = _regression_task(gen)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(x), y)

    return _Scenario(model, opt, task, loss)


def _vanishing(gen: torch.Generator, steps: int) -> _Scenario:
    # sigmoid' <= 1/4 and PyTorch's default init gives |W| < 1: each layer scales the
    # gradient down, and eight of them leave the first layers with almost nothing.
    model = _mlp([16] + [32] * 8 + [4], nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    task = _regression_task(gen)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(x), y)

    return _Scenario(model, opt, task, loss)


POISON_FIRST, POISON_EVERY = 20, 100  # nonfinite: steps whose batch holds a corrupt sample


def _nonfinite(gen: torch.Generator, steps: int) -> _Scenario:
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

    return _Scenario(model, opt, batch, loss)


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


def _dead(gen: torch.Generator, steps: int) -> _Scenario:
    model = _SideBranch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # Non-negative inputs: once a unit's weights and bias are all negative it is off for
    # every possible input, its gradient is exactly zero, and nothing can revive it.
    task = _regression_task(gen, pixels=True)
    penalty = 3.0  # meant to make the branch sparse; far too strong, it switches it off

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(x), y) + penalty * model.activity

    return _Scenario(model, opt, task, loss)


# Long enough to watch in a terminal: about a minute for healthy on two CPU cores; the
# faulty scenarios show their condition within their first 30 steps.
DEFAULT_STEPS = {"healthy": 5000, "exploding": 200, "vanishing": 300, "nonfinite": 300, "dead": 300}

_BUILDERS: dict[str, Callable[[torch.Generator, int], _Scenario]] = {
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
    return merge_dicts(base, user)


@dataclass
class _Progress:
    """The run so far: what the live view and the progress lines show, and the tally of
    health events that ends up in DemoResult."""

    scenario: str
    steps: int
    url: str | None
    step: int = 0
    loss: float = math.nan
    initial_loss: float = math.nan
    snapshot: Snapshot | None = None
    counts: dict[str, int] = field(default_factory=dict)
    detected: dict[str, set[str]] = field(default_factory=dict)
    first: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def record(self, step: int, loss: float, snap: Snapshot | None) -> None:
        if step == 0:
            self.initial_loss = loss
        self.step, self.loss = step + 1, loss
        # With collect.every_n_steps > 1 the same snapshot comes back for several steps:
        # count its anomalies once.
        if snap is not None and snap is not self.snapshot:
            for a in snap.anomalies:
                self.detected.setdefault(a.kind, set()).add(a.layer)
                self.counts[a.kind] = self.counts.get(a.kind, 0) + 1
                self.first.setdefault(a.kind, step)
            self.snapshot = snap

    def line(self) -> str:
        norm = self.snapshot.global_norm if self.snapshot is not None else math.nan
        events = ", ".join(f"{k} {n}" for k, n in self.counts.items()) or "none"
        return (
            f"[{self.scenario}] step {self.step}/{self.steps}  loss {self.loss:.4g}  "
            f"grad norm {norm:.3g}  events: {events}"
        )

    def render(self) -> Group:
        snap = self.snapshot
        norm = snap.global_norm if snap is not None else math.nan
        head = Table.grid(padding=(0, 2))
        head.add_row(
            Text(f"gradmon demo: {self.scenario}", style="bold"),
            f"step {self.step}/{self.steps}",
            f"{time.perf_counter() - self.started:.1f} s",
        )
        head.add_row(f"loss {self.loss:.4g}", f"global grad norm {norm:.4g}", "")
        head.add_row(f"metrics: {self.url or 'exporter disabled'}", "", "")

        layers = Table(title="per-layer gradient norm", title_justify="left")
        layers.add_column("smallest")
        layers.add_column("norm", justify="right")
        layers.add_column("largest")
        layers.add_column("norm", justify="right")
        if snap is not None:
            ranked = sorted((s.norm, name) for name, s in snap.layers.items() if s.received)
            for (lo, lo_name), (hi, hi_name) in zip(ranked[:3], ranked[::-1][:3], strict=False):
                layers.add_row(lo_name, f"{lo:.3g}", hi_name, f"{hi:.3g}")

        events = Table(title="health events so far", title_justify="left")
        events.add_column("kind")
        events.add_column("events", justify="right")
        events.add_column("layers")
        for kind in ANOMALY_KINDS:
            n = self.counts.get(kind, 0)
            names = sorted(self.detected.get(kind, ()))
            shown = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
            events.add_row(kind, Text(str(n), style="bold red" if n else "green"), shown)
        return Group(head, Text(DESCRIPTIONS[self.scenario], style="dim"), layers, events)


def _train(
    setup: _Scenario,
    mon: gradmon.Monitor,
    progress: _Progress,
    show: Callable[[bool], None],
    step_delay: float = 0.0,
) -> None:
    """The training loop, as a user would write it; show(final) after every step.

    step_delay: each step lasts at least this many seconds (the loop sleeps the rest).
    """
    for step in range(progress.steps):
        begun = time.perf_counter()
        x, y = setup.batch(step)
        loss = setup.loss(x, y)
        setup.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        value = loss.item()  # sync-ok: a CPU run, and the loop branches on the value
        if math.isfinite(value):
            setup.optimizer.step()  # gradmon collects in its step pre-hook
            if setup.scheduler is not None:
                setup.scheduler.step()
        else:
            # Skip the update, as training loops do, but let gradmon see the NaN/Inf grads:
            # without optimizer.step() its step hook does not run.
            mon.collect(skipped=True)
        mon.log(loss=value)
        progress.record(step, value, mon.snapshot())
        show(step + 1 == progress.steps)
        if step_delay > 0:
            rest = step_delay - (time.perf_counter() - begun)
            if rest > 0:
                time.sleep(rest)


def run_demo(
    scenario: str = "healthy",
    steps: int | None = None,
    port: int = 9400,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    live: bool = True,
    seed: int = 0,
    *,
    step_delay: float | None = None,
    with_prometheus: bool | LocalStack = False,
    hold: float = 0.0,
) -> DemoResult:
    """Train one scenario on the CPU with gradmon attached; return what it detected.

    steps: None for the scenario's default. port: where /metrics is served (0: any free
    port). config: a YAML path or a dict on top of the demo's settings. live: a live
    terminal view when stdout is a terminal; otherwise (or live=False) progress lines.

    step_delay: each training step lasts at least this many seconds (None: no pacing, or
    with with_prometheus about PACED_SECONDS for the whole run). with_prometheus: True
    starts a local Prometheus + Alertmanager for the run (see gradmon.localstack); a
    started LocalStack gets the run as a target (job `gradmon-<scenario>`) until the run
    ends. Training starts once Prometheus has scraped the run. hold: keep serving
    /metrics (and the local stack) this many seconds after the last step.
    """
    if scenario not in _BUILDERS:
        raise GradmonError(f"unknown demo scenario {scenario!r}; choose one of {SCENARIOS}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise GradmonError(f"run_demo(steps=...) needs a positive int or None, not {steps!r}")
    for name, value in (("step_delay", step_delay), ("hold", hold)):
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise GradmonError(f"run_demo({name}=...) needs seconds >= 0, not {value!r}")
    if not isinstance(with_prometheus, bool | LocalStack):
        raise GradmonError(
            "run_demo(with_prometheus=...) needs True/False or a started LocalStack, "
            f"not {type(with_prometheus).__name__}"
        )
    merged = _config(port, config)
    n_steps = steps if steps is not None else DEFAULT_STEPS[scenario]
    if step_delay is None:
        step_delay = PACED_SECONDS / n_steps if with_prometheus is not False else 0.0

    # fork_rng: seed for a reproducible run without touching the caller's RNG state.
    with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as resources:
        torch.manual_seed(seed)
        setup = _BUILDERS[scenario](torch.Generator().manual_seed(seed), n_steps)
        mon = gradmon.attach(setup.model, setup.optimizer, config=merged)
        resources.callback(mon.close)  # the last thing to go: after the local stack
        served = mon.port
        addr = mon.config.exporter.addr
        url = f"http://{addr}:{served}/metrics" if served is not None else None
        if with_prometheus is not False:
            _beside_prometheus(with_prometheus, mon, scenario, step_delay, resources)
        progress = _Progress(scenario, n_steps, url)
        started = time.perf_counter()
        if live and sys.stdout.isatty():
            with Live(progress.render(), auto_refresh=False) as view:
                last = [0.0]

                def redraw(final: bool) -> None:
                    # Redraw a few times per second, not every step: a render (~4 ms)
                    # costs more than a training step of the MLP scenarios.
                    now = time.perf_counter()
                    if final or now - last[0] >= REFRESH_SECONDS:
                        view.update(progress.render(), refresh=True)
                        last[0] = now

                _train(setup, mon, progress, redraw, step_delay)
        else:
            print(
                f"gradmon demo '{scenario}': {DESCRIPTIONS[scenario]}; "
                f"metrics: {url or 'exporter disabled'}",
                flush=True,
            )
            every = max(1, n_steps // PRINT_LINES)

            def report(final: bool) -> None:
                if final or progress.step % every == 0:
                    print(progress.line(), flush=True)

            _train(setup, mon, progress, report, step_delay)
        seconds = time.perf_counter() - started
        _hold(hold)

    result = DemoResult(
        scenario=scenario,
        steps=n_steps,
        detected=progress.detected,
        anomaly_counts=progress.counts,
        final_loss=progress.loss,
        port=served,
        seconds=seconds,
        initial_loss=progress.initial_loss,
        first_detection=progress.first,
    )
    print(summary(result), flush=True)
    return result


def _hold(seconds: float) -> None:
    if seconds <= 0:
        return
    print(f"training done; holding for {seconds:g} s (Ctrl-C to stop now)", flush=True)
    deadline = time.monotonic() + seconds
    with contextlib.suppress(KeyboardInterrupt):
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))


# ----------------------------------------------------------------- with_prometheus
def _rules_file(health: HealthConfig, resources: contextlib.ExitStack) -> Path:
    """The shipped rules file when this is a checkout and the run uses the default
    thresholds; otherwise rules rendered from the run's health config."""
    if SHIPPED_RULES.is_file() and health == Config().health:
        return SHIPPED_RULES
    from gradmon.ops.rules import render

    workdir = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="gradmon-rules-")))
    path = workdir / "gradmon.rules.yml"
    path.write_text(render(Config(health=health)), encoding="utf-8")
    return path


def _shipped_inhibit_rules() -> list[dict[str, Any]]:
    """The shipped Alertmanager config's inhibit rules (none outside a checkout)."""
    if not SHIPPED_ALERTMANAGER.is_file():
        return []
    rules = read_yaml(SHIPPED_ALERTMANAGER).get("inhibit_rules") or []
    return [dict(r) for r in rules if isinstance(r, Mapping)]


def _print_delivery(payload: dict[str, Any]) -> None:
    for alert in payload.get("alerts", []):
        labels = alert.get("labels", {})
        summary = alert.get("annotations", {}).get("summary", "")
        print(
            f"alertmanager -> webhook: [{alert.get('status', '?')}] "
            f"{labels.get('alertname', '?')}: {summary}",
            flush=True,
        )


def _target_host(addr: str) -> str:
    """Where Prometheus reaches an exporter bound to `addr`."""
    if addr in ("", "0.0.0.0", "::", "localhost"):
        return LOOPBACK
    return f"[{addr}]" if ":" in addr else addr


def _beside_prometheus(
    with_prometheus: bool | LocalStack,
    mon: gradmon.Monitor,
    scenario: str,
    step_delay: float,
    resources: contextlib.ExitStack,
) -> None:
    """Have Prometheus scrape the run: a stack of our own, or the caller's; wait for the
    first scrape, so the run's first steps are seen."""
    if mon.port is None:
        raise GradmonError(
            "run_demo(with_prometheus=...): the exporter is disabled (exporter.enabled: "
            "false), so there is nothing for Prometheus to scrape"
        )
    exporter = mon.config.exporter
    if exporter.tls.certfile is not None or exporter.basic_auth.username is not None:
        raise GradmonError(
            "run_demo(with_prometheus=...): the local Prometheus scrapes plain HTTP without "
            "credentials; leave exporter.tls and exporter.basic_auth unset for the demo"
        )
    target = Target(
        f"{_target_host(mon.config.exporter.addr)}:{mon.port}", job=f"gradmon-{scenario}"
    )
    if isinstance(with_prometheus, LocalStack):
        stack = with_prometheus
        stack.set_target(target)
        # Closing the exporter while Prometheus still scrapes it would be a target down.
        resources.callback(stack.remove_target, target.job, SCRAPE_WAIT_SECONDS)
    else:
        rules = _rules_file(mon.config.health, resources)
        receiver = resources.enter_context(WebhookReceiver(on_payload=_print_delivery))
        stack = LocalStack(
            [rules],
            targets=[target],
            webhook_url=receiver.url,
            inhibit_rules=_shipped_inhibit_rules(),
        )
        resources.enter_context(stack)
        print(
            f"Prometheus:   {stack.alerts_page_url}  (scrapes {target.address} every "
            f"{stack.scrape_interval}, rules {rules})\n"
            f"Alertmanager: {stack.alertmanager_url}/#/alerts  (delivers to {receiver.url})\n"
            f"pacing: at least {step_delay:.3g} s per step; an alert fires once its "
            "condition has held for the rule's `for` (1m to 15m in the shipped rules): "
            "--hold SECONDS keeps everything up after the run\n"
            "waiting for Prometheus' first scrape (up to ~10 s) ...",
            flush=True,
        )
    stack.wait_for_scrape(target.job, timeout=SCRAPE_WAIT_SECONDS)


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
