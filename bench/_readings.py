"""What the bench scripts read of a monitor: what /metrics shows (its registry)."""

from __future__ import annotations

from typing import Any


def agent_errors(mon: Any) -> dict[str, float]:
    """gradmon_agent_errors_total by stage, the stages with any only."""
    return {
        s.labels["stage"]: s.value
        for family in mon.registry.collect()
        if family.name == "gradmon_agent_errors"
        for s in family.samples
        if s.name == "gradmon_agent_errors_total" and s.value
    }
