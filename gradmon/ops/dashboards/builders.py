"""The small builders every gradmon dashboard is made of: panels, variables, the
dashboard frame, over Grafana's typed SDK (grafana-foundation-sdk, the `grafana` extra).

Every panel and query variable reads the `datasource` variable, so the dashboards work on
any Prometheus data source. Selectors use `=~` throughout: `rank` only exists under
several ranks, and `rank=~".*"` (the All value) also matches a series without the label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from gradmon.errors import GradmonError
from gradmon.export import schema

if TYPE_CHECKING:
    from typing import Self

try:
    from grafana_foundation_sdk.builders import bargauge as bargauge_b
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


# The SDK's modules are handed out from here too, imported once behind the extra's guard.
__all__ = [
    "DATASOURCE",
    "LAYER_SEL",
    "MODULE_SEL",
    "RATE",
    "SEL",
    "SOURCE",
    "JSONEncoder",
    "Query",
    "bargauge_b",
    "common_b",
    "common_m",
    "dash_b",
    "dash_m",
    "dashboard",
    "heatmap_b",
    "heatmap_m",
    "panel",
    "prom_m",
    "series",
    "stat",
    "stat_b",
    "ts_b",
    "variables",
]

DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Every series of one training job: target labels plus rank (absent under one rank).
SEL = f'job=~"$job", instance=~"$instance", {schema.RANK}=~"$rank"'
LAYER_SEL = f'{SEL}, {schema.LAYER}=~"$layer"'
MODULE_SEL = f'{SEL}, {schema.LAYER}=~"$module"'  # activations: `layer` holds a module name
RATE = "$__rate_interval"  # at least 4 scrape intervals: never an empty rate() window
SOURCE = "{{instance}} {{rank}}"  # legend of per-target series

Query = tuple[str, str]  # (PromQL, legend format)


class PanelBuilder(Protocol):
    """What every SDK panel builder (timeseries, stat, heatmap...) has in common."""

    def title(self, title: str) -> Self: ...
    def description(self, description: str) -> Self: ...
    def datasource(self, datasource: dash_m.DataSourceRef) -> Self: ...
    def unit(self, unit: str) -> Self: ...
    def span(self, w: int) -> Self: ...
    def height(self, h: int) -> Self: ...
    def with_target(self, target: prom_b.Dataquery) -> Self: ...
    def build(self) -> dash_m.Panel: ...


P = TypeVar("P", bound=PanelBuilder)


def panel(
    builder: P,
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str,
    w: int,
    h: int = 8,
    fmt: prom_m.PromQueryFormat | None = None,
    instant: bool = False,
) -> P:
    """The one panel helper: title, description, unit, size, ${datasource} and queries
    (range queries, or with `instant` one value per series at the end of the range)."""
    builder.title(title).description(description).datasource(DATASOURCE)
    builder.unit(unit).span(w).height(h)
    for i, (expr, legend) in enumerate(queries):
        target = prom_b.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i))
        target.datasource(DATASOURCE)
        if instant:
            target.instant()
        else:
            target.range()
        if fmt is not None:
            target.format(fmt)
        builder.with_target(target)
    return builder


def series(
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
    return panel(p, title, description, queries, unit=unit, w=w)


def stat(
    title: str,
    description: str,
    expr: str,
    *,
    unit: str = "none",
    legend: str = "",
    w: int = 4,
) -> stat_b.Panel:
    """A single-value panel of the top row, with a sparkline."""
    p = stat_b.Panel().graph_mode(common_m.BigValueGraphMode.AREA)
    p.reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    return panel(p, title, description, [(expr, legend)], unit=unit, w=w, h=4)


def variables(*, modules: bool = False) -> list[cog_b.Builder[dash_m.VariableModel]]:
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

    out: list[cog_b.Builder[dash_m.VariableModel]] = [
        dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        # All = the values found (Grafana's default), so `up` stays on gradmon's jobs.
        query(
            "job",
            "Job",
            f"label_values({schema.INFO.series}, job)",
            all_value=None,
            description="Prometheus jobs that scrape a gradmon agent.",
        ),
        query(
            "instance",
            "Instance",
            f'label_values({schema.INFO.series}{{job=~"$job"}}, instance)',
            all_value=None,
            description="Scrape targets of the selected jobs (one per rank's metrics port).",
        ),
        query(
            "rank",
            "Rank",
            f'label_values({schema.INFO.series}{{job=~"$job", instance=~"$instance"}}, rank)',
            all_value=".*",  # also matches the series of a single-rank run (no rank label)
            description="Training ranks; empty for single-process runs, which have no rank "
            "label (All matches them).",
        ),
        query(
            "layer",
            "Layer",
            f"label_values({schema.GRAD_NORM.series}{{{SEL}}}, layer)",
            all_value=".*",  # not the list of hundreds of layers in every query
            description="Monitored layers (parameter or module names).",
        ),
    ]
    if modules:
        out.append(
            query(
                "module",
                "Module",
                f"label_values({schema.ACTIVATION_RMS.series}{{{SEL}}}, layer)",
                all_value=".*",
                description="Modules with activation statistics (collect.activations; "
                "named as in named_modules()). Empty while that is off.",
            )
        )
    return out


def dashboard(
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
        .variables(variables(modules=modules))
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
    # The SDK gives every variable the interval variables' auto/auto_count/auto_min, which
    # Grafana's own VariableModel (@grafana/schema) does not have: keep them off the others
    # (tests/ops/test_dashboard_types.py).
    for variable in dashboard.templating.list_val or []:
        if variable.type_val != "interval":
            variable.auto = variable.auto_count = variable.auto_min = None
    return dashboard
