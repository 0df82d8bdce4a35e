"""`gradmon-overview`: global gradient norm (gauge and per-step histogram), NaN/Inf and
skipped steps, loss scale, anomalies by kind and layer, where NaN started, logged scalars,
agent health."""

from __future__ import annotations

from gradmon.export import schema
from gradmon.ops.dashboards.builders import (
    RATE,
    SEL,
    SOURCE,
    bargauge_b,
    common_b,
    common_m,
    dash_b,
    dash_m,
    dashboard,
    heatmap_b,
    heatmap_m,
    panel,
    prom_m,
    series,
    stat,
    stat_b,
    ts_b,
)
from gradmon.ops.rule_parts import since

__all__ = ["overview"]


def _self_check() -> stat_b.Panel:
    """The global norm from the ranks' global shares against the one from their per-layer
    shares (the recording rule gradmon:grad_global_norm:layers_relative_error, inline)."""
    combined = f"sqrt(sum({schema.GLOBAL_SUM_SQUARES.series}{{{SEL}}}))"
    from_layers = f"sqrt(sum({schema.GRAD_SUM_SQUARES.series}{{{SEL}}}))"
    check = stat(
        "Global norm self-check",
        "Relative difference between the global grad norm combined from every rank's global "
        "share and the one combined from the per-layer shares. 0 when each distinct shard "
        "of each layer is exported by exactly one rank; above 1e-6 when a replica is "
        "counted twice (exporter.per_layer_ranks: all), layers are missing (per_layer_ranks: "
        "first under sharding, a subset of ranks selected) or go past exporter.max_layers.",
        f"abs({from_layers} - {combined}) / ({combined} > 0)",
        unit="percentunit",
        w=3,
    )
    check.thresholds(
        dash_b.ThresholdsConfig()
        .mode(dash_m.ThresholdsMode.ABSOLUTE)
        .steps(
            [
                dash_m.Threshold(value=None, color="green"),
                dash_m.Threshold(value=1e-6, color="red"),
            ]
        )
    ).color_mode(common_m.BigValueColorMode.BACKGROUND)
    return check


def _origin_since(window: str) -> str:
    """Per series, what gradmon_nonfinite_origin_total added over `window` (the agent
    creates a layer's series at its first count, which increase() would miss)."""
    return since(f"{schema.NONFINITE_ORIGIN.series}{{{SEL}}}", window)


def _nan_origin() -> list[bargauge_b.Panel | ts_b.Panel]:
    """Where NaN/Inf started (Snapshot.nonfinite_origin): steps by origin over the
    dashboard's range, and when each layer was the origin."""
    desc = (
        "the first layer in backward order whose gradient held NaN/Inf (with "
        "collect.activations: the first module in forward order whose output did), counted "
        "per collected step with NaN/Inf (gradmon_nonfinite_origin_total)"
    )
    ranking = panel(
        bargauge_b.Panel(),
        "Where NaN started",
        f"Collected steps over the dashboard's time range whose NaN/Inf started in each "
        f"layer: {desc}. The top bar is where to look first; its neighbours in the model "
        "only received the NaN. Empty when no step held NaN/Inf.",
        [
            (
                f"sort_desc(topk(20, sum by (layer) {_origin_since('$__range')} > 0))",
                "{{layer}}",
            )
        ],
        unit="short",
        w=8,
        instant=True,
    )
    ranking.orientation(common_m.VizOrientation.HORIZONTAL).min(0)
    ranking.display_mode(common_m.BarGaugeDisplayMode.BASIC)
    ranking.value_mode(common_m.BarGaugeValueMode.TEXT)
    ranking.name_placement(common_m.BarGaugeNamePlacement.LEFT).show_unfilled(True)
    ranking.sizing(common_m.BarGaugeSizing.AUTO)
    ranking.min_viz_width(8).min_viz_height(16).max_viz_height(300)
    ranking.reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    ranking.legend(  # Grafana's bar gauge options require one; the bars carry the names
        common_b.VizLegendOptions()
        .display_mode(common_m.LegendDisplayMode.LIST)
        .placement(common_m.LegendPlacement.BOTTOM)
        .show_legend(False)
        .calcs([])
    )
    over_time = series(
        "Where NaN started, over time",
        f"Per rate window, the collected steps whose NaN/Inf started in each layer: {desc}. "
        "The last bars are the most recent origin.",
        [(f"sum by (layer) {_origin_since(RATE)} > 0", "{{layer}}")],
        unit="short",
        w=16,
        bars=True,
    )
    return [ranking, over_time]


def overview() -> dash_m.Dashboard:
    g = schema.GLOBAL_NORM.series
    hist = f"sum by (le) (rate({schema.GLOBAL_NORM_PER_STEP.bucket}{{{SEL}}}[{RATE}]))"
    duration = f"sum by (le) (rate({schema.COLLECT_DURATION.bucket}{{{SEL}}}[{RATE}]))"
    up = 'up{job=~"$job", instance=~"$instance"}'  # a target label set: no rank
    up_stat = stat(
        "Targets up",
        "Prometheus could scrape the agent (1) or not (0), per target. Down: the training "
        "process exited or hangs, the port is unreachable, or a scrape exceeded sample_limit.",
        up,
        legend="{{instance}}",
    )
    up_stat.mappings(
        [
            dash_m.ValueMap(
                options={
                    "0": dash_m.ValueMappingResult(text="DOWN", color="red", index=0),
                    "1": dash_m.ValueMappingResult(text="UP", color="green", index=1),
                }
            )
        ]
    ).color_mode(common_m.BigValueColorMode.BACKGROUND)
    age_stat = stat(
        "Since last collection",
        "Seconds since the newest snapshot of any selected target. Grows between "
        "collections (collect.every_n_steps) and when training stalls.",
        f"time() - max({schema.LAST_COLLECTION.series}{{{SEL}}})",
        unit="s",
        w=4,
    )
    age_stat.thresholds(
        dash_b.ThresholdsConfig()
        .mode(dash_m.ThresholdsMode.ABSOLUTE)
        .steps(
            [
                dash_m.Threshold(value=None, color="green"),
                dash_m.Threshold(value=120, color="orange"),
                dash_m.Threshold(value=600, color="red"),
            ]
        )
    ).color_mode(common_m.BigValueColorMode.VALUE)

    per_step = panel(
        heatmap_b.Panel(),
        "Global grad norm per step (histogram)",
        "Collected steps per second by global gradient norm bucket (half-decade buckets). "
        "Sees every collected step, also spikes between two scrapes.",
        [(hist, "{{le}}")],
        unit="none",
        w=12,
        fmt=prom_m.PromQueryFormat.HEATMAP,
    )
    per_step.calculate(False).y_axis(heatmap_b.YAxisConfig().unit("none")).color(
        heatmap_b.HeatmapColorOptions()
        .mode(heatmap_m.HeatmapColorMode.SCHEME)
        .scheme("Oranges")
        .fill("dark-orange")
        .scale(heatmap_m.HeatmapColorScale.EXPONENTIAL)
        .exponent(0.5)
        .steps(64)
    )

    return dashboard(
        "gradmon-overview",
        "gradmon / Overview",
        "Gradient health of a PyTorch training job monitored by gradmon: global norm, "
        "NaN/Inf and skipped steps, loss scale, anomalies, where NaN started, logged scalars, "
        "agent health.",
        [
            (
                "Run",
                [
                    up_stat,
                    stat(
                        "Training step",
                        "Training step of the latest snapshot (the largest over the "
                        "selected targets).",
                        f"max({schema.STEP.series}{{{SEL}}})",
                        w=3,
                    ),
                    stat(
                        "Steps / s",
                        "Optimizer steps per second, skipped steps included (ranks step "
                        "together: the largest rate over the selected targets).",
                        f"max(rate({schema.STEPS.series}{{{SEL}}}[{RATE}]))",
                        unit="short",
                        w=3,
                    ),
                    stat(
                        "Global grad norm",
                        "L2 norm over all monitored gradients at the latest collection, "
                        "combined over the selected ranks: the square root of the sum of "
                        "their shares of the global sum of squares, each distinct shard "
                        "counted once (exact under DDP, FSDP, HSDP, tensor and pipeline "
                        "parallelism when every rank is selected).",
                        f"sqrt(sum({schema.GLOBAL_SUM_SQUARES.series}{{{SEL}}}))",
                    ),
                    _self_check(),
                    age_stat,
                    # Every stage is exported from 0, so this is 0 on a healthy run; it is
                    # empty only until the rate window of a new run holds two scrapes.
                    stat(
                        "Agent errors / s",
                        "Failures inside the agent per second, all stages. Training goes on; "
                        "see the agent's log and 'Agent errors by stage'.",
                        f"sum(rate({schema.AGENT_ERRORS.series}{{{SEL}}}[{RATE}]))",
                        unit="short",
                        w=3,
                    ).no_value("0"),
                ],
            ),
            (
                "Gradients",
                [
                    series(
                        "Global grad norm",
                        "L2 norm over the finite entries of all monitored gradients, sampled "
                        "at each scrape (log scale). Under several ranks each rank shows the "
                        "norm of its own gradients (its shard under FSDP).",
                        [(f"{g}{{{SEL}}}", SOURCE)],
                        log=10,
                    ),
                    per_step,
                    series(
                        "Global grad norm quantiles (per step)",
                        "Quantiles of the global norm over the collected steps in each rate "
                        "window, from the per-step histogram (values are bucket-interpolated; "
                        "'max' is the upper bound of the largest step's bucket).",
                        [
                            (f"histogram_quantile(0.5, {hist})", "p50"),
                            (f"histogram_quantile(0.99, {hist})", "p99"),
                            (f"histogram_quantile(1, {hist})", "max"),
                        ],
                        log=10,
                    ),
                    series(
                        "Non-finite and skipped steps",
                        "Collected steps with NaN/Inf gradients, and optimizer steps skipped "
                        "(by a GradScaler or the loop), per rate window. Occasional skips are "
                        "healthy AMP; non-finite steps that are not skipped reach the "
                        "optimizer.",
                        [
                            (
                                f"max by (job) (increase({schema.NONFINITE_STEPS.series}"
                                f"{{{SEL}}}[{RATE}]))",
                                "non-finite {{job}}",
                            ),
                            (
                                f"max by (job) (increase({schema.SKIPPED_STEPS.series}"
                                f"{{{SEL}}}[{RATE}]))",
                                "skipped {{job}}",
                            ),
                        ],
                        bars=True,
                    ),
                    series(
                        "Loss scale",
                        "GradScaler loss scale (log2 axis); only when a scaler is attached. "
                        "Repeated halvings mean steps keep overflowing.",
                        [(f"{schema.LOSS_SCALE.series}{{{SEL}}}", SOURCE)],
                        log=2,
                    ),
                    series(
                        "Logged scalars",
                        "Values given to Monitor.log() (loss, learning rate...).",
                        [(f"{schema.SCALAR.series}{{{SEL}}}", "{{name}} {{instance}} {{rank}}")],
                    ),
                ],
            ),
            (
                "Anomalies",
                [
                    series(
                        "Anomalies by kind",
                        "Health events per rate window by kind: vanishing, exploding, "
                        "nonfinite, dead, spike. Persistent conditions count at every "
                        "collection while they last.",
                        [
                            (
                                f"sum by (kind) (increase({schema.ANOMALIES.series}"
                                f"{{{SEL}}}[{RATE}]))",
                                "{{kind}}",
                            )
                        ],
                        bars=True,
                    ),
                    series(
                        "Anomalies by layer",
                        "Health events per rate window by layer and kind (only layers that "
                        "had any; layer 'global' is the global-norm spike).",
                        [
                            (
                                f"sum by (layer, kind) (increase({schema.ANOMALIES.series}"
                                f"{{{SEL}}}[{RATE}])) > 0",
                                "{{layer}} {{kind}}",
                            )
                        ],
                        bars=True,
                    ),
                    *_nan_origin(),
                ],
            ),
            (
                "Agent health",
                [
                    series(
                        "Steps and collections / s",
                        "Optimizer steps (skipped ones included) and collections (steps "
                        "whose statistics were computed) per second.",
                        [
                            (
                                f"max by (job) (rate({schema.STEPS.series}{{{SEL}}}[{RATE}]))",
                                "steps {{job}}",
                            ),
                            (
                                f"max by (job) (rate({schema.COLLECTIONS.series}"
                                f"{{{SEL}}}[{RATE}]))",
                                "collections {{job}}",
                            ),
                        ],
                        unit="short",
                        w=6,
                    ),
                    series(
                        "Collection time",
                        "Host time the agent spent per collection: quantiles from the "
                        "histogram, and the mean.",
                        [
                            (f"histogram_quantile(0.5, {duration})", "p50"),
                            (f"histogram_quantile(0.99, {duration})", "p99"),
                            (
                                f"sum(rate({schema.COLLECT_DURATION.sum}{{{SEL}}}"
                                f"[{RATE}])) / sum(rate({schema.COLLECT_DURATION.count}"
                                f"{{{SEL}}}[{RATE}]))",
                                "mean",
                            ),
                        ],
                        unit="s",
                        w=6,
                    ),
                    series(
                        "Agent errors by stage",
                        # The stages from the schema: the panel cannot miss a new one.
                        "Failures inside the agent per second, by stage "
                        f"({', '.join(schema.AGENT_STAGES)}). Training goes on; the agent "
                        "logs the first failure of each stage (sink and push: of each "
                        "failure episode).",
                        [
                            (
                                f"sum by (stage) (rate({schema.AGENT_ERRORS.series}"
                                f"{{{SEL}}}[{RATE}]))",
                                "{{stage}}",
                            )
                        ],
                        unit="short",
                        w=6,
                    ),
                    series(
                        "Last collection age",
                        "Seconds since each target's newest snapshot.",
                        [
                            (
                                f"time() - {schema.LAST_COLLECTION.series}{{{SEL}}}",
                                SOURCE,
                            )
                        ],
                        unit="s",
                        w=6,
                    ),
                ],
            ),
        ],
    )
