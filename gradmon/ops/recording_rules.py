"""Prometheus recording rules: cross-rank combinations, rates, and the last
gradmon_run_finished of each target (which GradmonTargetDown reads). Rendered with the
alerts by gradmon/ops/rules.py; `RuleOptions.run_labels` tell the runs apart."""

from __future__ import annotations

from typing import Any

from gradmon.export import schema
from gradmon.ops.rule_options import RuleOptions

__all__ = ["FINISHED", "recording_rules", "target_labels"]

# The recording rule GradmonTargetDown reads: the last gradmon_run_finished of each target.
FINISHED = "gradmon:run_finished:last"


def recording_rules(options: RuleOptions | None = None) -> list[dict[str, Any]]:
    """Cross-rank combinations and rates, for dashboards and ad-hoc queries."""
    o = options or RuleOptions()
    run = ", ".join(o.run_labels)
    return [
        {
            # Exact under every layout: each distinct shard of a layer is exported by one
            # rank, replicas by none (agent/placement.py), so a plain sum over ranks is the
            # unsharded sum of squares.
            "record": "gradmon:layer_grad_norm:combined",
            "expr": f"sqrt(sum by ({run}, layer) ({schema.GRAD_SUM_SQUARES.series}))",
        },
        {
            "record": "gradmon:layer_grad_norm:max",
            "expr": f"max by ({run}, layer) ({schema.GRAD_NORM.series})",
        },
        {
            # The same count-each-shard-once shares of the global sum of squares, so layers
            # past exporter.max_layers count too.
            "record": "gradmon:grad_global_norm:combined",
            "expr": f"sqrt(sum by ({run}) ({schema.GLOBAL_SUM_SQUARES.series}))",
        },
        {
            # The self-check: the global norm again, from the per-layer shares ...
            "record": "gradmon:grad_global_norm:from_layers",
            "expr": f"sqrt(sum by ({run}) ({schema.GRAD_SUM_SQUARES.series}))",
        },
        {
            # ... and how far apart the two are. 0 (to rounding) when every layer is
            # exported once per shard; above 0 when a replica is counted twice
            # (per_layer_ranks: all), a rank's layers are missing (per_layer_ranks: first
            # under sharding), or layers go past exporter.max_layers. Alert on `> 1e-6`.
            "record": "gradmon:grad_global_norm:layers_relative_error",
            "expr": (
                "abs(gradmon:grad_global_norm:from_layers - gradmon:grad_global_norm:combined)\n"
                "/\n"
                "(gradmon:grad_global_norm:combined > 0)"
            ),
        },
        {
            # Ranks step together: max, not sum.
            "record": "gradmon:steps:rate5m",
            "expr": f"max by ({run}) (rate({schema.STEPS.series}[5m]))",
        },
        {
            "record": "gradmon:skipped_steps:ratio_rate5m",
            "expr": (
                f"max by ({run}) (rate({schema.SKIPPED_STEPS.series}[5m]))\n"
                f"/\n"
                f"(max by ({run}) (rate({schema.STEPS.series}[5m])) > 0)"
            ),
        },
        {
            "record": "gradmon:anomalies:rate5m",
            "expr": f"sum by ({run}, kind) (rate({schema.ANOMALIES.series}[5m]))",
        },
        {
            # Only layers that had NaN/Inf: which layer went first.
            "record": "gradmon:layer_nonfinite_steps:increase5m",
            "expr": (
                f"sum by ({run}, layer) (increase({schema.LAYER_NONFINITE_STEPS.series}[5m])) > 0"
            ),
        },
        _finished_rule(o),
    ]


def target_labels(o: RuleOptions) -> str:
    """The labels that tell one scrape target from another: the run's and `instance`."""
    return ", ".join((*o.run_labels, "instance"))


def _finished_rule(o: RuleOptions) -> dict[str, Any]:
    """The gradmon_run_finished each target was last scraped with, kept while it is down.

    The agent serves 0 while the run goes on and 1 in its final scrape after a clean
    Monitor.close() (export/scrapes.py), then stops serving. `last_over_time` takes the
    latest sample, not the largest: a new run on the same target scrapes 0 again, and if
    it dies the target pages. Once that sample has left `finished_window`, the rule keeps
    its own value for as long as the target stays down (a static scrape config keeps a
    finished target for ever), and drops it when the target is gone from the config.
    """
    target = target_labels(o)
    w = o.finished_window
    return {
        "record": FINISHED,
        "expr": (
            f"last_over_time({schema.RUN_FINISHED.series}[{w}])\n"
            f"or\n"
            f"(\n"
            f"  last_over_time({FINISHED}[{w}])\n"
            f"  and on ({target})\n"
            f"  up{{{o.job_selector}}} == 0\n"
            f")"
        ),
    }
