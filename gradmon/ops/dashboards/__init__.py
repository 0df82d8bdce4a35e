"""Grafana dashboards as code, built with Grafana's typed SDK (grafana-foundation-sdk).

Two dashboards, written to `dashboards/` by `gradmon dashboards generate` and kept in sync
with this module by tests/test_dashboards.py:

- `gradmon-overview`: global gradient norm (gauge and per-step histogram), NaN/Inf and
  skipped steps, loss scale, anomalies by kind and layer, logged scalars, agent health;
- `gradmon-layers`: log10 gradient norm as a layers x time heatmap, top/bottom layers,
  zero ratio, NaN/Inf layers, parameter norm, update ratio; and a collapsed row of
  activation statistics (`collect.activations`) by module.

Every panel and query variable reads the `datasource` variable, so the dashboards work on
any Prometheus data source. Selectors use `=~` throughout: `rank` only exists under
several ranks, and `rank=~".*"` (the All value) also matches a series without the label.
Activation series name a module in their `layer` label (`encoder.layers.0.linear1`), not a
layer of the gradient families (`...linear1.weight` by default), so they are narrowed by a
`module` variable of their own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from gradmon.errors import GradmonError

if TYPE_CHECKING:
    from typing import Self

try:
    from grafana_foundation_sdk.builders import common as common_b
    from grafana_foundation_sdk.builders import dashboard as dash_b
    from grafana_foundation_sdk.builders import heatmap as heatmap_b
    from grafana_foundation_sdk.builders import prometheus as prom_b
    from grafana_foundation_sdk.builders import stat as stat_b
    from grafana_foundation_sdk.builders import timeseries as ts_b
    from grafana_foundation_sdk.cog import builder as cog_b
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common as common_m
    from grafana_foundation_sdk.models import dashboard as dash_m
    from grafana_foundation_sdk.models import heatmap as heatmap_m
    from grafana_foundation_sdk.models import prometheus as prom_m
except ImportError as exc:  # an optional dependency: the `grafana` extra
    raise GradmonError(
        "gradmon dashboards need grafana-foundation-sdk: pip install 'gradmon[grafana]'"
    ) from exc

__all__ = ["DASHBOARD_FILES", "build", "render", "write"]

# uid -> file name under dashboards/
DASHBOARD_FILES = {
    "gradmon-overview": "gradmon-overview.json",
    "gradmon-layers": "gradmon-layers.json",
}

DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Every series of one training job: target labels plus rank (absent under one rank).
SEL = 'job=~"$job", instance=~"$instance", rank=~"$rank"'
LAYER_SEL = SEL + ', layer=~"$layer"'
MODULE_SEL = SEL + ', layer=~"$module"'  # activation families: `layer` holds a module name
RATE = "$__rate_interval"  # at least 4 scrape intervals: never an empty rate() window
SOURCE = "{{instance}} {{rank}}"  # legend of per-target series

Query = tuple[str, str]  # (PromQL, legend format)


class _PanelBuilder(Protocol):
    """What every SDK panel builder (timeseries, stat, heatmap...) has in common."""

    def title(self, title: str) -> Self: ...
    def description(self, description: str) -> Self: ...
    def datasource(self, datasource: dash_m.DataSourceRef) -> Self: ...
    def unit(self, unit: str) -> Self: ...
    def span(self, w: int) -> Self: ...
    def height(self, h: int) -> Self: ...
    def with_target(self, target: prom_b.Dataquery) -> Self: ...
    def build(self) -> dash_m.Panel: ...


P = TypeVar("P", bound=_PanelBuilder)


def _panel(
    builder: P,
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str,
    w: int,
    h: int = 8,
    fmt: prom_m.PromQueryFormat | None = None,
) -> P:
    """The one panel helper: title, description, unit, size, ${datasource} and queries."""
    builder.title(title).description(description).datasource(DATASOURCE)
    builder.unit(unit).span(w).height(h)
    for i, (expr, legend) in enumerate(queries):
        target = prom_b.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i))
        target.datasource(DATASOURCE).range()
        if fmt is not None:
            target.format(fmt)
        builder.with_target(target)
    return builder


def _series(
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str = "none",
    w: int = 12,
    log: int = 0,
    bars: bool = False,
    max_value: float | None = None,
) -> ts_b.Panel:
    """A time series panel; `log`: logarithmic y axis of that base; `bars`: event counts."""
    p = ts_b.Panel()
    p.tooltip(
        common_b.VizTooltipOptions()
        .mode(common_m.TooltipDisplayMode.MULTI)
        .sort(common_m.SortOrder.DESCENDING)
    )
    p.legend(
        common_b.VizLegendOptions()
        .display_mode(common_m.LegendDisplayMode.LIST)
        .placement(common_m.LegendPlacement.BOTTOM)
        .show_legend(True)
    )
    if log:
        p.scale_distribution(
            common_b.ScaleDistributionConfig().type(common_m.ScaleDistribution.LOG).log(log)
        )
    if bars:
        p.draw_style(common_m.GraphDrawStyle.BARS).fill_opacity(80)
    if max_value is not None:
        p.min(0).max(max_value)
    return _panel(p, title, description, queries, unit=unit, w=w)


def _stat(
    title: str, description: str, expr: str, *, unit: str = "none", legend: str = ""
) -> stat_b.Panel:
    """A single-value panel of the top row, with a sparkline."""
    p = stat_b.Panel().graph_mode(common_m.BigValueGraphMode.AREA)
    p.reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    return _panel(p, title, description, [(expr, legend)], unit=unit, w=4, h=4)


def _variables(*, modules: bool = False) -> list[cog_b.Builder[dash_m.VariableModel]]:
    """The variables of every dashboard; `modules`: also `module`, for activation panels."""

    def query(
        name: str, label: str, expr: str, *, all_value: str | None, description: str
    ) -> dash_b.QueryVariable:
        v = dash_b.QueryVariable(name).label(label).description(description)
        v.datasource(DATASOURCE).query(expr).refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
        v.sort(dash_m.VariableSort.NATURAL_ASC).multi(True).include_all(True)
        if all_value is not None:
            v.all_value(all_value)
        return v

    variables: list[cog_b.Builder[dash_m.VariableModel]] = [
        dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        # All = the values found (Grafana's default), so `up` stays on gradmon's jobs.
        query(
            "job",
            "Job",
            "label_values(gradmon_info, job)",
            all_value=None,
            description="Prometheus jobs that scrape a gradmon agent.",
        ),
        query(
            "instance",
            "Instance",
            'label_values(gradmon_info{job=~"$job"}, instance)',
            all_value=None,
            description="Scrape targets of the selected jobs (one per rank's metrics port).",
        ),
        query(
            "rank",
            "Rank",
            'label_values(gradmon_info{job=~"$job", instance=~"$instance"}, rank)',
            all_value=".*",  # also matches the series of a single-rank run (no rank label)
            description="Training ranks; empty for single-process runs, which have no rank "
            "label (All matches them).",
        ),
        query(
            "layer",
            "Layer",
            f"label_values(gradmon_grad_norm{{{SEL}}}, layer)",
            all_value=".*",  # not the list of hundreds of layers in every query
            description="Monitored layers (parameter or module names).",
        ),
    ]
    if modules:
        variables.append(
            query(
                "module",
                "Module",
                f"label_values(gradmon_activation_rms{{{SEL}}}, layer)",
                all_value=".*",
                description="Modules with activation statistics (collect.activations; "
                "named as in named_modules()). Empty while that is off.",
            )
        )
    return variables


def _dashboard(
    uid: str,
    title: str,
    description: str,
    rows: Sequence[tuple[str, Sequence[cog_b.Builder[dash_m.Panel]]]],
    *,
    collapsed: Sequence[tuple[str, Sequence[cog_b.Builder[dash_m.Panel]]]] = (),
    modules: bool = False,
) -> dash_m.Dashboard:
    """`collapsed`: rows after `rows`, closed: their queries run only once opened."""
    d = (
        dash_b.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["gradmon"])
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
        .variables(_variables(modules=modules))
        .link(
            dash_b.DashboardLink("gradmon")
            .type(dash_m.DashboardLinkType.DASHBOARDS)
            .tags(["gradmon"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
            .icon("external link")
        )
    )
    for row_title, panels in rows:
        d.with_row(dash_b.Row(row_title))  # the SDK lays panels out left to right, row by row
        for builder in panels:
            d.with_panel(builder)
    for row_title, panels in collapsed:
        row = dash_b.Row(row_title).collapsed(True)
        for builder in panels:
            row.with_panel(builder)  # a collapsed row holds its panels; the SDK places them
        d.with_row(row)
    dashboard = d.build()
    # The SDK leaves panel ids unset; Grafana wants them unique within a dashboard,
    # the panels inside collapsed rows included.
    every_panel: list[dash_m.Panel | dash_m.RowPanel] = []
    for panel in dashboard.panels or []:
        every_panel.append(panel)
        if isinstance(panel, dash_m.RowPanel):
            every_panel.extend(panel.panels)
    for panel_id, panel in enumerate(every_panel, start=1):
        panel.id_val = panel_id
    return dashboard


def overview() -> dash_m.Dashboard:
    g = "gradmon_grad_global_norm"
    hist = f"sum by (le) (rate({g}_per_step_bucket{{{SEL}}}[{RATE}]))"
    duration = f"sum by (le) (rate(gradmon_collect_duration_seconds_bucket{{{SEL}}}[{RATE}]))"
    up = 'up{job=~"$job", instance=~"$instance"}'  # a target label set: no rank
    up_stat = _stat(
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
    age_stat = _stat(
        "Since last collection",
        "Seconds since the newest snapshot of any selected target. Grows between "
        "collections (collect.every_n_steps) and when training stalls.",
        f"time() - max(gradmon_last_collection_timestamp_seconds{{{SEL}}})",
        unit="s",
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

    per_step = _panel(
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

    return _dashboard(
        "gradmon-overview",
        "gradmon / Overview",
        "Gradient health of a PyTorch training job monitored by gradmon: global norm, "
        "NaN/Inf and skipped steps, loss scale, anomalies, logged scalars, agent health.",
        [
            (
                "Run",
                [
                    up_stat,
                    _stat(
                        "Training step",
                        "Training step of the latest snapshot (the largest over the "
                        "selected targets).",
                        f"max(gradmon_step{{{SEL}}})",
                    ),
                    _stat(
                        "Steps / s",
                        "Optimizer steps per second, skipped steps included (ranks step "
                        "together: the largest rate over the selected targets).",
                        f"max(rate(gradmon_steps_total{{{SEL}}}[{RATE}]))",
                        unit="short",
                    ),
                    _stat(
                        "Global grad norm",
                        "L2 norm over all monitored gradients at the latest collection "
                        "(the largest over the selected targets).",
                        f"max({g}{{{SEL}}})",
                    ),
                    age_stat,
                    # Every stage is exported from 0, so this is 0 on a healthy run; it is
                    # empty only until the rate window of a new run holds two scrapes.
                    _stat(
                        "Agent errors / s",
                        "Failures inside the agent per second, all stages. Training goes on; "
                        "see the agent's log and 'Agent errors by stage'.",
                        f"sum(rate(gradmon_agent_errors_total{{{SEL}}}[{RATE}]))",
                        unit="short",
                    ).no_value("0"),
                ],
            ),
            (
                "Gradients",
                [
                    _series(
                        "Global grad norm",
                        "L2 norm over the finite entries of all monitored gradients, sampled "
                        "at each scrape (log scale). Under several ranks each rank shows the "
                        "norm of its own gradients (its shard under FSDP).",
                        [(f"{g}{{{SEL}}}", SOURCE)],
                        log=10,
                    ),
                    per_step,
                    _series(
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
                    _series(
                        "Non-finite and skipped steps",
                        "Collected steps with NaN/Inf gradients, and optimizer steps skipped "
                        "(by a GradScaler or the loop), per rate window. Occasional skips are "
                        "healthy AMP; non-finite steps that are not skipped reach the "
                        "optimizer.",
                        [
                            (
                                f"max by (job) (increase(gradmon_nonfinite_steps_total"
                                f"{{{SEL}}}[{RATE}]))",
                                "non-finite {{job}}",
                            ),
                            (
                                f"max by (job) (increase(gradmon_skipped_steps_total"
                                f"{{{SEL}}}[{RATE}]))",
                                "skipped {{job}}",
                            ),
                        ],
                        bars=True,
                    ),
                    _series(
                        "Loss scale",
                        "GradScaler loss scale (log2 axis); only when a scaler is attached. "
                        "Repeated halvings mean steps keep overflowing.",
                        [(f"gradmon_loss_scale{{{SEL}}}", SOURCE)],
                        log=2,
                    ),
                    _series(
                        "Logged scalars",
                        "Values given to Monitor.log() (loss, learning rate...).",
                        [(f"gradmon_scalar{{{SEL}}}", "{{name}} {{instance}} {{rank}}")],
                    ),
                ],
            ),
            (
                "Anomalies",
                [
                    _series(
                        "Anomalies by kind",
                        "Health events per rate window by kind: vanishing, exploding, "
                        "nonfinite, dead, spike. Persistent conditions count at every "
                        "collection while they last.",
                        [
                            (
                                f"sum by (kind) (increase(gradmon_anomalies_total"
                                f"{{{SEL}}}[{RATE}]))",
                                "{{kind}}",
                            )
                        ],
                        bars=True,
                    ),
                    _series(
                        "Anomalies by layer",
                        "Health events per rate window by layer and kind (only layers that "
                        "had any; layer 'global' is the global-norm spike).",
                        [
                            (
                                f"sum by (layer, kind) (increase(gradmon_anomalies_total"
                                f"{{{SEL}}}[{RATE}])) > 0",
                                "{{layer}} {{kind}}",
                            )
                        ],
                        bars=True,
                    ),
                ],
            ),
            (
                "Agent health",
                [
                    _series(
                        "Steps and collections / s",
                        "Optimizer steps (skipped ones included) and collections (steps "
                        "whose statistics were computed) per second.",
                        [
                            (
                                f"max by (job) (rate(gradmon_steps_total{{{SEL}}}[{RATE}]))",
                                "steps {{job}}",
                            ),
                            (
                                f"max by (job) (rate(gradmon_collections_total{{{SEL}}}[{RATE}]))",
                                "collections {{job}}",
                            ),
                        ],
                        unit="short",
                        w=6,
                    ),
                    _series(
                        "Collection time",
                        "Host time the agent spent per collection: quantiles from the "
                        "histogram, and the mean.",
                        [
                            (f"histogram_quantile(0.5, {duration})", "p50"),
                            (f"histogram_quantile(0.99, {duration})", "p99"),
                            (
                                f"sum(rate(gradmon_collect_duration_seconds_sum{{{SEL}}}"
                                f"[{RATE}])) / sum(rate(gradmon_collect_duration_seconds_count"
                                f"{{{SEL}}}[{RATE}]))",
                                "mean",
                            ),
                        ],
                        unit="s",
                        w=6,
                    ),
                    _series(
                        "Agent errors by stage",
                        "Failures inside the agent per second, by stage (hook, collect, "
                        "publish, scaler, log, export). Each stage logs its first failure.",
                        [
                            (
                                f"sum by (stage) (rate(gradmon_agent_errors_total"
                                f"{{{SEL}}}[{RATE}]))",
                                "{{stage}}",
                            )
                        ],
                        unit="short",
                        w=6,
                    ),
                    _series(
                        "Last collection age",
                        "Seconds since each target's newest snapshot.",
                        [
                            (
                                f"time() - gradmon_last_collection_timestamp_seconds{{{SEL}}}",
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


def layers() -> dash_m.Dashboard:
    def by_layer(metric: str) -> str:
        # One series per layer: the largest over the selected ranks (DDP ranks hold the
        # same gradient; pick one rank to see a single FSDP shard).
        return f"max by (layer) ({metric}{{{LAYER_SEL}}})"

    def by_module(metric: str, agg: str = "max") -> str:
        # One series per module. Ranks see different batches: pick one rank to see its own.
        return f"{agg} by (layer) ({metric}{{{MODULE_SEL}}})"

    opt_in = "Empty unless the agent runs with collect.activations: true."
    heat = _panel(
        heatmap_b.Panel(),
        "log10 grad norm, layers x time",
        "log10 of each layer's gradient L2 norm (one row per layer, the largest over the "
        "selected ranks). Blue: vanishing, red: exploding. Layers whose gradient is all "
        "zero (dead) are left blank.",
        [(f"log10({by_layer('gradmon_grad_norm')} > 0)", "{{layer}}")],
        unit="none",
        w=24,
        h=14,
    )
    heat.calculate(False).filter_values(heatmap_b.FilterValueRange())  # keep negative logs
    heat.color(
        heatmap_b.HeatmapColorOptions()
        .mode(heatmap_m.HeatmapColorMode.SCHEME)
        .scheme("Spectral")
        .reverse(True)
        .fill("dark-orange")
        .scale(heatmap_m.HeatmapColorScale.LINEAR)
        .exponent(0.5)
        .steps(64)
    ).y_axis(heatmap_b.YAxisConfig().unit("none")).cell_gap(0)

    return _dashboard(
        "gradmon-layers",
        "gradmon / Layers",
        "Per-layer gradient statistics exported by gradmon: norm heatmap, extreme layers, "
        "zero ratio, NaN/Inf layers, parameter norm and update ratio; activation statistics "
        "by module (collect.activations) in a collapsed row. Narrow with $layer and $module.",
        [
            ("Layers x time", [heat]),
            (
                "Extremes",
                [
                    _series(
                        "Top 10 layers by grad norm",
                        "The 10 layers with the largest gradient L2 norm at each point in "
                        "time (log scale): candidates for exploding gradients.",
                        [(f"topk(10, {by_layer('gradmon_grad_norm')})", "{{layer}}")],
                        log=10,
                    ),
                    _series(
                        "Bottom 10 layers by grad rms",
                        "The 10 layers with the smallest gradient rms (norm / sqrt(numel)) "
                        "at each point in time (log scale): candidates for vanishing "
                        "gradients.",
                        [(f"bottomk(10, {by_layer('gradmon_grad_rms')})", "{{layer}}")],
                        log=10,
                    ),
                    _series(
                        "Top 10 layers by zero ratio",
                        "Fraction of exactly-zero gradient entries; 100% for a layer that "
                        "got no gradient (dead, or frozen without requires_grad=False).",
                        [
                            (
                                f"topk(10, {by_layer('gradmon_grad_zero_ratio')})",
                                "{{layer}}",
                            )
                        ],
                        unit="percentunit",
                        max_value=1,
                    ),
                    _series(
                        "Layers with NaN/Inf gradients",
                        "Collected steps per rate window in which the layer's gradient had "
                        "NaN/Inf entries (only such layers): the earliest layer points at "
                        "the source.",
                        [
                            (
                                f"max by (layer) (increase(gradmon_layer_nonfinite_steps_total"
                                f"{{{LAYER_SEL}}}[{RATE}])) > 0",
                                "{{layer}}",
                            )
                        ],
                        bars=True,
                    ),
                ],
            ),
            (
                "Parameters",
                [
                    _series(
                        "Parameter norm",
                        "L2 norm of each selected layer's parameter (log scale).",
                        [(by_layer("gradmon_param_norm"), "{{layer}}")],
                        log=10,
                    ),
                    _series(
                        "Update ratio",
                        "||dw|| / ||w|| of the last sampled step per layer (log scale); "
                        "around 1e-3 is typical for Adam. Empty unless the agent runs with "
                        "collect.update_ratio_every > 0.",
                        [(by_layer("gradmon_update_ratio"), "{{layer}}")],
                        log=10,
                    ),
                    _series(
                        "Top 10 layers by grad norm, combined over ranks",
                        "sqrt of the sum over ranks of each layer's sum of squares "
                        "(recording rule gradmon:layer_grad_norm:combined): the exact norm "
                        "when ranks hold disjoint shards (FSDP). Needs gradmon's recording "
                        "rules in Prometheus; ignores the instance and rank selection.",
                        [
                            (
                                'topk(10, gradmon:layer_grad_norm:combined{job=~"$job", '
                                'layer=~"$layer"})',
                                "{{layer}}",
                            )
                        ],
                        log=10,
                    ),
                    _series(
                        "Top 10 layers by largest gradient entry",
                        "The largest absolute finite gradient entry per layer (log scale).",
                        [(f"topk(10, {by_layer('gradmon_grad_abs_max')})", "{{layer}}")],
                        log=10,
                    ),
                ],
            ),
        ],
        collapsed=[
            (
                "Activations (collect.activations)",
                [
                    _series(
                        "Activation rms by module",
                        "RMS of each selected module's forward output over the forwards "
                        "before the latest collected step (log scale; the largest over the "
                        "selected ranks). Activations that collapse or blow up often show here "
                        f"before the gradients do. {opt_in}",
                        [(by_module("gradmon_activation_rms"), "{{layer}}")],
                        log=10,
                    ),
                    _series(
                        "Top 10 modules by activation zero ratio",
                        "Fraction of exactly-zero entries of the module's forward output (the "
                        "largest over the selected ranks): near 100% after a ReLU means dead "
                        f"units. {opt_in}",
                        [
                            (
                                f"topk(10, {by_module('gradmon_activation_zero_ratio')})",
                                "{{layer}}",
                            )
                        ],
                        unit="percentunit",
                        max_value=1,
                    ),
                    _series(
                        "Activation mean by module",
                        "Mean of the finite entries of each selected module's forward output "
                        "(averaged over the selected ranks); a drift away from 0 after a "
                        f"normalization layer is a warning sign. {opt_in}",
                        [(by_module("gradmon_activation_mean", "avg"), "{{layer}}")],
                    ),
                    _series(
                        "Modules with NaN/Inf activations",
                        "Collected steps per rate window in which the module's forward output "
                        "had NaN/Inf entries (only such modules): the first module in model "
                        f"order is where they appear. {opt_in}",
                        [
                            (
                                f"max by (layer) (increase(gradmon_activation_nonfinite_total"
                                f"{{{MODULE_SEL}}}[{RATE}])) > 0",
                                "{{layer}}",
                            )
                        ],
                        bars=True,
                    ),
                ],
            )
        ],
        modules=True,
    )


def build() -> dict[str, dash_m.Dashboard]:
    """The dashboards by uid."""
    return {"gradmon-overview": overview(), "gradmon-layers": layers()}


def render(dashboard: dash_m.Dashboard) -> str:
    """A dashboard's JSON as committed under dashboards/ (stable key order)."""
    return json.dumps(dashboard, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def write(output_dir: str | Path) -> list[Path]:
    """Write every dashboard's JSON into `output_dir` (created if missing)."""
    out = Path(output_dir)
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for uid, dashboard in build().items():
            path = out / DASHBOARD_FILES[uid]
            path.write_text(render(dashboard), encoding="utf-8")
            written.append(path)
    except OSError as exc:
        raise GradmonError(
            f"cannot write dashboards to --output-dir {output_dir}: {exc.strerror or exc}"
        ) from exc
    return written
