"""What the rules need besides `Config.health`: selectors, windows and `for` durations
(RuleOptions), checked when made. gradmon/ops/rules.py renders the rules from both."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from gradmon.errors import GradmonError

__all__ = ["RUNBOOK_URL", "RuleOptions", "is_duration", "seconds"]

RUNBOOK_URL = "https://github.com/gradmon/gradmon/blob/main/docs/runbook.md"

_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class RuleOptions:
    """Everything the rules need besides `Config.health`: selectors, windows, `for`s.

    Durations are Prometheus durations ("30s", "5m", "1h30m").
    """

    # `up` is the one series not from the agent: this selects the agent's scrape jobs.
    job_selector: str = 'job=~"gradmon.*"'
    # Labels that identify one training run; its ranks (instance, pod, rank) are combined.
    run_labels: tuple[str, ...] = ("namespace", "job")
    runbook_url: str = RUNBOOK_URL
    target_down_for: str = "5m"
    # How far back the last scraped gradmon_run_finished of a target is looked for: longer
    # than the scrape interval (GradmonTargetDown spares targets whose run finished).
    finished_window: str = "10m"
    stalled_window: str = "10m"  # no optimizer step in this window: stalled
    stalled_for: str = "5m"
    nonfinite_window: str = "5m"
    nonfinite_for: str = "1m"
    exploding_window: str = "2m"  # max_over_time: one healthy scrape must not reset `for`
    exploding_for: str = "5m"
    vanishing_for: str = "15m"
    dead_for: str = "15m"
    spike_window: str = "5m"  # the recent window judged ...
    spike_baseline: str = "30m"  # ... against the median of this window, which ends
    spike_baseline_offset: str = "5m"  # this long ago (>= spike_window: no overlap)
    spike_for: str = "1m"
    loss_scale_floor: float = 1.0
    loss_scale_max_halvings: int = 10  # net halvings below the recent maximum
    loss_scale_window: str = "30m"
    loss_scale_for: str = "5m"
    # A collapse that fired lasts while a step was skipped in this window and the scale
    # has not grown in it (a scale pinned at a floor halves no more).
    loss_scale_skipping_window: str = "5m"
    # exporter.push: a pushed run is stale after this many of its push intervals without a
    # push (the interval is pushed with the metrics) and no clean finish.
    push_stale_intervals: int = 3
    push_stale_for: str = "1m"
    k8s_name: str = "gradmon"
    # kube-prometheus-stack's Prometheus selects PrometheusRules (and PodMonitors) whose
    # `release` label is the Helm release name; "kube-prometheus-stack" is the usual one.
    k8s_labels: dict[str, str] = field(
        default_factory=lambda: {
            "app.kubernetes.io/name": "gradmon",
            "release": "kube-prometheus-stack",
        }
    )

    def __post_init__(self) -> None:
        for name in (
            "target_down_for",
            "finished_window",
            "stalled_window",
            "stalled_for",
            "nonfinite_window",
            "nonfinite_for",
            "exploding_window",
            "exploding_for",
            "vanishing_for",
            "dead_for",
            "spike_window",
            "spike_baseline",
            "spike_baseline_offset",
            "spike_for",
            "loss_scale_window",
            "loss_scale_for",
            "loss_scale_skipping_window",
            "push_stale_for",
        ):
            value = getattr(self, name)
            if not is_duration(value):
                raise GradmonError(
                    f"RuleOptions.{name}: {value!r} is not a Prometheus duration "
                    "(allowed: e.g. '30s', '5m', '1h30m')"
                )
        if seconds(self.spike_window) > seconds(self.spike_baseline_offset):
            raise GradmonError(
                f"RuleOptions.spike_window {self.spike_window!r} is longer than "
                f"spike_baseline_offset {self.spike_baseline_offset!r}: the baseline would "
                "hold the spike it is judged against"
            )
        if not self.run_labels or not all(_LABEL.match(x) for x in self.run_labels):
            raise GradmonError(
                f"RuleOptions.run_labels: {self.run_labels!r} must be one or more label names"
            )
        if not (math.isfinite(self.loss_scale_floor) and self.loss_scale_floor > 0):
            raise GradmonError(
                f"RuleOptions.loss_scale_floor: {self.loss_scale_floor!r} must be finite and > 0"
            )
        if self.push_stale_intervals < 1:
            raise GradmonError(
                f"RuleOptions.push_stale_intervals: {self.push_stale_intervals!r} must be >= 1"
            )
        if self.loss_scale_max_halvings < 1:
            raise GradmonError(
                f"RuleOptions.loss_scale_max_halvings: {self.loss_scale_max_halvings!r} "
                "must be >= 1"
            )


def seconds(duration: str) -> float:
    """A Prometheus duration ("1h30m") in seconds."""
    return sum(
        int(n) * _UNIT_SECONDS[unit]
        for n, unit in re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)", duration)
    )


def is_duration(value: object) -> bool:
    """Whether `value` is a Prometheus duration string ("30s", "1h30m")."""
    return isinstance(value, str) and bool(_DURATION.match(value))
