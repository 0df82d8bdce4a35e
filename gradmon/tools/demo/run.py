"""`run_demo()`: one scenario trained with the agent attached, shown, summarized."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

import gradmon
from gradmon.config import merge_dicts, read_yaml
from gradmon.errors import GradmonError
from gradmon.tools.demo.loop import DemoResult, Progress, train
from gradmon.tools.demo.scenarios import DEFAULT_STEPS, SCENARIOS, build
from gradmon.tools.demo.stack import beside_prometheus
from gradmon.tools.demo.view import shown, summary
from gradmon.tools.localstack import LocalStack

__all__ = ["PACED_SECONDS", "run_demo"]

# with_prometheus and no step_delay: pace a run to last about this long, so that 1 s
# scrapes see its course and the alerts with short `for`s can fire while it runs.
PACED_SECONDS = 120.0


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
    starts a local Prometheus + Alertmanager for the run (see gradmon.tools.localstack); a
    started LocalStack gets the run as a target (job `gradmon-<scenario>`) until the run
    ends. Training starts once Prometheus has scraped the run. hold: keep serving
    /metrics (and the local stack) this many seconds after the last step.
    """
    _check_arguments(scenario, steps, step_delay, hold, with_prometheus)
    merged = _config(port, config)
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
        if with_prometheus is not False:
            beside_prometheus(with_prometheus, mon, scenario, step_delay, resources)
        progress = Progress(scenario, n_steps, url)
        started = time.perf_counter()
        with shown(progress, live) as show:
            train(setup, mon, progress, show, step_delay)
        seconds = time.perf_counter() - started
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


def _hold(seconds: float) -> None:
    if seconds <= 0:
        return
    print(f"training done; holding for {seconds:g} s (Ctrl-C to stop now)", flush=True)
    deadline = time.monotonic() + seconds
    with contextlib.suppress(KeyboardInterrupt):
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))


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
