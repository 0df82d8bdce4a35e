"""The demo's alert rules: the production rules (gradmon/ops/rules.py, the source of
deploy/prometheus/rules/gradmon.rules.yml) with every `for`, range window and offset
scaled down TIME_SCALE times, so that an alert whose condition holds fires within a demo
run instead of after 1 to 15 minutes (and the spike baseline needs 35 s of history, not
35 minutes). Expressions, thresholds (the run's `health` config), labels and annotations
are the production ones.

`differences()` says, alert by alert, what the scaling changed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from gradmon.config import Config
from gradmon.ops.rule_options import is_duration, seconds
from gradmon.ops.rules import RuleOptions, alert_rules, render

__all__ = [
    "EXPECTED_ALERTS",
    "MIN_SECONDS",
    "TIME_SCALE",
    "demo_options",
    "differences",
    "write_rules",
]

TIME_SCALE = 60  # one production minute is one demo second
MIN_SECONDS = 1.0  # no window or `for` below one scrape/evaluation interval (1 s)

# The alert each faulty scenario is built to fire (healthy: none).
EXPECTED_ALERTS: dict[str, str] = {
    "exploding": "GradmonExplodingGradients",
    "vanishing": "GradmonVanishingGradients",
    "nonfinite": "GradmonNonFiniteGradients",
    "dead": "GradmonDeadLayer",
}

# The durations an alert's expression selects: range windows and offsets.
_EXPR_DURATIONS = re.compile(r"\[([0-9a-z]+)\]|offset ([0-9a-z]+)")


def _duration(secs: float) -> str:
    ms = max(1, round(secs * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def demo_options(
    options: RuleOptions | None = None, scale: float = TIME_SCALE, minimum: float = MIN_SECONDS
) -> RuleOptions:
    """`options` (default: the production RuleOptions) with every duration field divided
    by `scale`, and none below `minimum` seconds."""
    base = options or RuleOptions()
    if not (math.isfinite(scale) and scale >= 1):
        raise ValueError(f"scale must be a finite number >= 1, not {scale!r}")
    scaled: dict[str, Any] = {
        f.name: _duration(max(minimum, seconds(value) / scale))
        for f in dataclasses.fields(base)
        if is_duration(value := getattr(base, f.name))
    }
    return dataclasses.replace(base, **scaled)


def write_rules(path: Path, config: Config, options: RuleOptions) -> Path:
    """The rules file for `config.health` and `options`, written to `path`."""
    path.write_text(render(config, "prometheus", options=options), encoding="utf-8")
    return path


def _windows(expr: str) -> list[str]:
    out: list[str] = []
    for window, offset in _EXPR_DURATIONS.findall(expr):
        shown = f"[{window}]" if window else f"offset {offset}"
        if shown not in out:
            out.append(shown)
    return out


def differences(config: Config, demo: RuleOptions, production: RuleOptions | None = None) -> str:
    """One line per alert: its `for` and windows in the demo rules and in production."""
    prod = {r["alert"]: r for r in alert_rules(config, production or RuleOptions())}
    lines = []
    for rule in alert_rules(config, demo):
        name, shipped = rule["alert"], prod[rule["alert"]]
        here, there = _windows(rule["expr"]), _windows(shipped["expr"])
        windows = f"; windows {' '.join(here)} (production {' '.join(there)})" if here else ""
        lines.append(f"  {name:<27} for {rule['for']} (production {shipped['for']}){windows}")
    return "\n".join(lines)
