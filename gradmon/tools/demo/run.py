"""`run_demo()`: one scenario trained with the agent attached, shown, summarized."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

import gradmon
from gradmon.config import merge_dicts, read_yaml
from gradmon.errors import GradmonError
from gradmon.tools.demo.loop import DemoResult, Progress, train
from gradmon.tools.demo.rules import EXPECTED_ALERTS
from gradmon.tools.demo.scenarios import DEFAULT_STEPS, SCENARIOS, build
from gradmon.tools.demo.stack import beside_prometheus
from gradmon.tools.demo.view import shown, summary
from gradmon.tools.localstack import LocalStack

__all__ = ["ALERT_WAIT_SECONDS", "PACED_SECONDS", "run_demo"]

# with_prometheus and no step_delay: pace a run to last about this long, so that 1 s
# scrapes see its course and its alert (demo rules: `for` 1-15 s) fires while it runs.
PACED_SECONDS = 45.0
# with_prometheus: after the last step, wait at most this long for Alertmanager to
# deliver the scenario's alert (a short or unpaced run ends before its `for` has passed).
ALERT_WAIT_SECONDS = 60.0


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
    alert_wait: float = ALERT_WAIT_SECONDS,
) -> DemoResult:
    """Train one scenario on the CPU with gradmon attached; return what it detected.

    steps: None for the scenario's default. port: where /metrics is served (0: any free
    port). config: a YAML path or a dict on top of the demo's settings. live: a live
    terminal view when stdout is a terminal; otherwise (or live=False) progress lines.

    step_delay: each training step lasts at least this many seconds (None: no pacing, or
    with with_prometheus about PACED_SECONDS for the whole run). with_prometheus: True
    starts a local Prometheus + Alertmanager for the run (see gradmon.tools.localstack); a
    started LocalStack gets the run as a target (job `gradmon-<scenario>`) until the run
    ends. Training starts once Prometheus has scraped the run. The local stack's rules are
    the production ones with time-scaled windows (gradmon.tools.demo.rules). alert_wait:
    with a local stack of its own, after the last step wait up to this many seconds for
    Alertmanager to deliver the scenario's alert (EXPECTED_ALERTS). hold: then keep
    serving /metrics (and the local stack) this many seconds.
    """
    _check_arguments(scenario, steps, step_delay, hold, with_prometheus)
    _check_seconds("alert_wait", alert_wait)
    merged = _config(port, config, with_prometheus is not False)
    n_steps = steps if steps is not None else DEFAULT_STEPS[scenario]
    if step_delay is None:
        step_delay = PACED_SECONDS / n_steps if with_prometheus is not False else 0.0

    # fork_rng: seed for a reproducible run without touching the caller's RNG state.
    with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as resources:
        torch.manual_seed(seed)
        setup = build(scenario, torch.Generator().manual_seed(seed), n_steps)
        mon = gradmon.attach(setup.model, setup.optimizer, config=merged)
        resources.callback(mon.close)  # the last thing to go: after the local stack
        served = mon.port
        addr = mon.config.exporter.addr
        url = f"http://{addr}:{served}/metrics" if served is not None else None
        watch = None
        if with_prometheus is not False:
            watch = beside_prometheus(with_prometheus, mon, scenario, step_delay, resources)
        progress = Progress(scenario, n_steps, url, watch=watch)
        started = time.perf_counter()
        with shown(progress, live) as show:
            train(setup, mon, progress, show, step_delay)
            seconds = time.perf_counter() - started
            _await_alert(progress, show, alert_wait)
        _hold(hold)

    result = progress.result(served, seconds)
    print(summary(result), flush=True)
    return result


def _check_arguments(
    scenario: str,
    steps: int | None,
    step_delay: float | None,
    hold: float,
    with_prometheus: bool | LocalStack,
) -> None:
    """run_demo()'s arguments, each checked before anything starts."""
    if scenario not in SCENARIOS:
        raise GradmonError(f"unknown demo scenario {scenario!r}; choose one of {SCENARIOS}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise GradmonError(f"run_demo(steps=...) needs a positive int or None, not {steps!r}")
    _check_seconds("step_delay", step_delay)
    _check_seconds("hold", hold)
    if not isinstance(with_prometheus, bool | LocalStack):
        raise GradmonError(
            "run_demo(with_prometheus=...) needs True/False or a started LocalStack, "
            f"not {type(with_prometheus).__name__}"
        )


def _check_seconds(name: str, value: float | None) -> None:
    if value is not None and (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise GradmonError(f"run_demo({name}=...) needs seconds >= 0, not {value!r}")


def _await_alert(progress: Progress, show: Callable[[bool], None], timeout: float) -> None:
    """With deliveries in view: wait (bounded) for the scenario's alert to be delivered,
    the view still updating, the exporter still serving the run's last state."""
    watch, expected = progress.watch, EXPECTED_ALERTS.get(progress.scenario)
    if watch is None or not watch.sees_deliveries or expected is None or timeout <= 0:
        return
    seen = watch.seen().get(expected)
    if seen is not None and seen.delivered_after is not None:
        return
    print(
        f"training done; waiting up to {timeout:g} s for Alertmanager to deliver {expected} "
        "(its `for` has not passed yet)",
        flush=True,
    )
    if not watch.wait_delivered(expected, timeout, tick=lambda: show(False)):
        state = seen.state if (seen := watch.seen().get(expected)) else "never pending"
        print(f"{expected} was not delivered within {timeout:g} s ({state})", flush=True)
    show(True)


def _hold(seconds: float) -> None:
    if seconds <= 0:
        return
    print(f"training done; holding for {seconds:g} s (Ctrl-C to stop now)", flush=True)
    deadline = time.monotonic() + seconds
    with contextlib.suppress(KeyboardInterrupt):
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))


def _config(
    port: int,
    config: str | os.PathLike[str] | Mapping[str, Any] | None,
    local_prometheus: bool = False,
) -> dict[str, Any]:
    """The demo's own settings, with the user's config (a YAML path or a dict) on top:
    a port written in the user's config wins over the `port` argument. With a local
    Prometheus, whose target is gone (or the stack stopped) before the monitor closes,
    close() does not wait for a final scrape (exporter.linger_seconds 0)."""
    base: dict[str, Any] = {"exporter": {"port": port}}
    if local_prometheus:
        base["exporter"]["linger_seconds"] = 0
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
