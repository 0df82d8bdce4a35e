"""What tests read of a monitor: the values a user reads from its registry (/metrics)."""

from __future__ import annotations

from typing import Any

STAGES = ("hook", "collect", "publish", "scaler", "sink", "export", "callback")


def value(mon: Any, metric: str, **labels: str) -> float:
    """One sample of the monitor's registry; 0.0 for a series that is not there (yet)."""
    got = mon.registry.get_sample_value(metric, labels)
    return 0.0 if got is None else float(got)


def steps(mon: Any) -> int:
    return int(value(mon, "gradmon_steps_total"))


def collections(mon: Any) -> int:
    return int(value(mon, "gradmon_collections_total"))


def nonfinite_steps(mon: Any) -> int:
    return int(value(mon, "gradmon_nonfinite_steps_total"))


def skipped_steps(mon: Any) -> int:
    return int(value(mon, "gradmon_skipped_steps_total"))


def errors(mon: Any) -> dict[str, int]:
    """gradmon_agent_errors_total by stage."""
    return {s: int(value(mon, "gradmon_agent_errors_total", stage=s)) for s in STAGES}


def loss_scale(mon: Any) -> float | None:
    return mon.registry.get_sample_value("gradmon_loss_scale")  # type: ignore[no-any-return]
