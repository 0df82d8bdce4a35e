"""The demo's training loop, written as a user would write it, and its tally of what
gradmon reported along the way."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import gradmon
from gradmon.snapshot import Snapshot
from gradmon.tools.demo.alerts import AlertSeen, AlertWatch
from gradmon.tools.demo.scenarios import Scenario

__all__ = ["DemoResult", "Progress", "train"]


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
    # with_prometheus: the run's alerts as Prometheus/Alertmanager saw them, by name
    alerts: dict[str, AlertSeen] = field(default_factory=dict)
    watched: bool = False  # whether alerts were watched (with_prometheus)


@dataclass
class Progress:
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
    watch: AlertWatch | None = None  # with_prometheus: the run's alerts

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

    def result(self, port: int | None, seconds: float) -> DemoResult:
        return DemoResult(
            scenario=self.scenario,
            steps=self.steps,
            detected=self.detected,
            anomaly_counts=self.counts,
            final_loss=self.loss,
            port=port,
            seconds=seconds,
            initial_loss=self.initial_loss,
            first_detection=self.first,
            alerts=self.watch.seen() if self.watch is not None else {},
            watched=self.watch is not None,
        )


def train(
    setup: Scenario,
    mon: gradmon.Monitor,
    progress: Progress,
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
