"""Grafana dashboards: generated in sync, valid, and querying what the agent exports.

Grafana itself cannot run here. The JSON is checked three ways: a focused JSON Schema
(draft 2020-12) of what Grafana needs from a dashboard; a round trip through the typed
models of grafana-foundation-sdk (generated from Grafana's own schema), which drop any
field they do not know; and every query run by promtool against series scraped from a
real agent, so a wrong metric or label name shows up as an empty panel here.
Also: the compose stack and the Grafana provisioning files, statically.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dash_m
from prometheus_client.parser import text_string_to_metric_families

from gradmon.export.schema import AGENT_STAGES
from gradmon.ops.dashboards import DASHBOARD_FILES, build, render
from gradmon.ops.rules import recording_rules
from gradmon.tools.cli import main as cli_main

from ..exposition import full_exposition

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
DEPLOY = REPO / "deploy"
REGENERATE = "gradmon dashboards generate"
UIDS = sorted(DASHBOARD_FILES)
VARIABLES = ["datasource", "job", "instance", "rank", "layer"]
# Per dashboard: `module` (activation statistics) only where activation panels are.
DASHBOARD_VARIABLES = {"gradmon-overview": VARIABLES, "gradmon-layers": [*VARIABLES, "module"]}
# The label each query variable lists: `module` lists the activation series' `layer`.
VARIABLE_LABELS = {name: name for name in VARIABLES[1:]} | {"module": "layer"}


def load(uid: str) -> dict[str, Any]:
    return json.loads((DASHBOARDS / DASHBOARD_FILES[uid]).read_text(encoding="utf-8"))


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows included (collapsed rows hold theirs inside)."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in panels(dash)
        for t in p.get("targets", [])
    ]
    out += [
        (f"variable {v['name']!r}", v["query"])
        for v in dash["templating"]["list"]
        if v["type"] == "query"
    ]
    return out


ALL_QUERIES = [(uid, where, expr) for uid in UIDS for where, expr in queries(load(uid))]


# ------------------------------------------------------------------ in sync
@pytest.mark.parametrize("uid", UIDS)
def test_committed_json_is_what_the_generator_writes(uid: str) -> None:
    path = DASHBOARDS / DASHBOARD_FILES[uid]
    assert path.is_file(), f"{path} is missing: run `{REGENERATE}`"
    assert path.read_text(encoding="utf-8") == render(build()[uid]), (
        f"{path.relative_to(REPO)} differs from gradmon/ops/dashboards/: run `{REGENERATE}` "
        "and commit the result"
    )


def test_generate_command_writes_every_dashboard(tmp_path: Path) -> None:
    out = tmp_path / "new"
    assert cli_main(["dashboards", "generate", "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(DASHBOARD_FILES.values())
    for uid, name in DASHBOARD_FILES.items():
        assert (out / name).read_text(encoding="utf-8") == render(build()[uid])


def test_generate_into_a_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["dashboards", "generate", "--output-dir", str(blocker)]) == 2
    assert "--output-dir" in capsys.readouterr().err


# ------------------------------------------------------------------ JSON Schema
# What Grafana needs of a dashboard it imports (its dashboard kind, schemaVersion 36+),
# limited to the parts gradmon emits. Extra fields stay allowed: Grafana keeps them.
_DATASOURCE = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"type": "string"}, "uid": {"type": "string", "minLength": 1}},
}
DASHBOARD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "tags": {"type": "array", "items": {"type": "string"}},
        "editable": {"type": "boolean"},
        "timezone": {"type": "string"},
        "graphTooltip": {"enum": [0, 1, 2]},
        "refresh": {"anyOf": [{"type": "string"}, {"const": False}]},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "annotations": {"type": "object"},
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["title", "type"],
                "properties": {"type": {"enum": ["link", "dashboards"]}},
            },
        },
        "panels": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/panel"}},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"type": "array", "items": {"$ref": "#/$defs/variable"}}},
        },
    },
    "$defs": {
        "gridPos": {
            "type": "object",
            "required": ["h", "w", "x", "y"],
            "properties": {
                "h": {"type": "integer", "minimum": 1},
                "w": {"type": "integer", "minimum": 1, "maximum": 24},
                "x": {"type": "integer", "minimum": 0, "maximum": 23},
                "y": {"type": "integer", "minimum": 0},
            },
        },
        "target": {
            "type": "object",
            "required": ["refId", "expr"],
            "properties": {
                "refId": {"type": "string", "minLength": 1},
                "expr": {"type": "string", "minLength": 1},
                "legendFormat": {"type": "string"},
                "format": {"enum": ["time_series", "table", "heatmap"]},
                "instant": {"type": "boolean"},
                "range": {"type": "boolean"},
                "datasource": _DATASOURCE,
            },
        },
        "panel": {
            "type": "object",
            "required": ["type", "id", "title", "gridPos"],
            "properties": {
                "type": {
                    "enum": [
                        "row",
                        "timeseries",
                        "stat",
                        "gauge",
                        "heatmap",
                        "state-timeline",
                        "status-history",
                        "bargauge",
                        "table",
                        "text",
                    ]
                },
                "id": {"type": "integer", "minimum": 1},
                "title": {"type": "string", "minLength": 1},
                "description": {"type": "string"},
                "gridPos": {"$ref": "#/$defs/gridPos"},
                "datasource": _DATASOURCE,
                "targets": {"type": "array", "items": {"$ref": "#/$defs/target"}},
                "options": {"type": "object"},
                "fieldConfig": {
                    "type": "object",
                    "required": ["defaults", "overrides"],
                    "properties": {
                        "defaults": {
                            "type": "object",
                            "properties": {"unit": {"type": "string"}},
                        },
                        "overrides": {"type": "array"},
                    },
                },
                "collapsed": {"type": "boolean"},
                "panels": {"type": "array", "items": {"$ref": "#/$defs/panel"}},
            },
            "if": {"properties": {"type": {"const": "row"}}},
            "then": {"required": ["collapsed", "panels"]},
            "else": {
                "required": ["datasource", "targets", "fieldConfig", "options"],
                "properties": {"targets": {"minItems": 1}},
            },
        },
        "variable": {
            "type": "object",
            "required": ["type", "name"],
            "properties": {
                "type": {
                    "enum": [
                        "query",
                        "adhoc",
                        "constant",
                        "datasource",
                        "interval",
                        "textbox",
                        "custom",
                        "system",
                    ]
                },
                "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                "label": {"type": "string"},
                "hide": {"enum": [0, 1, 2]},
                "refresh": {"enum": [0, 1, 2]},
                "sort": {"enum": [0, 1, 2, 3, 4, 5, 6, 7, 8]},
                "multi": {"type": "boolean"},
                "includeAll": {"type": "boolean"},
                "allValue": {"type": "string"},
                "datasource": _DATASOURCE,
            },
            "allOf": [
                {
                    "if": {"properties": {"type": {"const": "query"}}},
                    "then": {
                        "required": ["datasource", "query", "refresh"],
                        "properties": {"query": {"type": "string", "minLength": 1}},
                    },
                },
                {
                    "if": {"properties": {"type": {"const": "datasource"}}},
                    "then": {
                        "required": ["query"],
                        "properties": {"query": {"type": "string", "minLength": 1}},
                    },
                },
            ],
        },
    },
}
VALIDATOR = jsonschema.Draft202012Validator(DASHBOARD_SCHEMA)


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(DASHBOARD_SCHEMA)


@pytest.mark.parametrize("uid", UIDS)
def test_dashboard_matches_the_schema(uid: str) -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in VALIDATOR.iter_errors(load(uid))
    ]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("breakage", "path"),
    [
        (lambda d: d["panels"][1].pop("gridPos"), "panels/1"),
        (lambda d: d["panels"][1]["targets"][0].pop("refId"), "panels/1/targets/0"),
        (lambda d: d["panels"][1].__setitem__("targets", []), "panels/1/targets"),
        (lambda d: d["panels"][1]["gridPos"].__setitem__("w", 25), "panels/1/gridPos/w"),
        (lambda d: d["templating"]["list"][1].__setitem__("type", "qry"), "templating/list/1/type"),
        (lambda d: d["templating"]["list"][1].pop("datasource"), "templating/list/1"),
        (lambda d: d.__setitem__("schemaVersion", 27), "schemaVersion"),
        (lambda d: d.pop("uid"), ""),
    ],
    ids=[
        "no-gridPos",
        "no-refId",
        "no-targets",
        "too-wide",
        "bad-variable-type",
        "variable-without-datasource",
        "old-schemaVersion",
        "no-uid",
    ],
)
def test_schema_rejects_broken_dashboards(breakage: Any, path: str) -> None:
    dash = load("gradmon-overview")
    breakage(dash)
    errors = ["/".join(map(str, e.absolute_path)) for e in VALIDATOR.iter_errors(dash)]
    assert path in errors


@pytest.mark.parametrize("uid", UIDS)
def test_grafana_sdk_models_read_every_field(uid: str) -> None:
    """The SDK's models (generated from Grafana's schema) keep only the fields they know:
    a misspelt or misplaced option would be lost in the round trip."""
    plugins.register_default_plugins()  # the panel and query types' own models
    data = load(uid)
    parsed = dash_m.Dashboard.from_json(data)
    back = json.loads(json.dumps(parsed, cls=JSONEncoder))
    for p in panels(back):  # the parser adds an empty `custom` where there was none
        if p.get("fieldConfig", {}).get("defaults", {}).get("custom") == {}:
            del p["fieldConfig"]["defaults"]["custom"]
    # ... and the interval variables' auto fields to every variable (kept off the others:
    # Grafana's own VariableModel has none of them, tests/ops/test_dashboard_types.py).
    for v in back.get("templating", {}).get("list", []):
        if v.get("type") != "interval":
            for key in ("auto", "auto_count", "auto_min"):
                v.pop(key, None)
    assert back == data


# ------------------------------------------------------------------ conventions
@pytest.mark.parametrize("uid", UIDS)
def test_identity_and_variables(uid: str) -> None:
    dash = load(uid)
    assert dash["uid"] == uid
    assert dash["schemaVersion"] >= 39
    assert "gradmon" in dash["tags"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(variables) == DASHBOARD_VARIABLES[uid]
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for name in DASHBOARD_VARIABLES[uid][1:]:
        v = variables[name]
        assert v["type"] == "query", name
        assert v["query"].startswith("label_values("), name
        assert v["query"].endswith(f", {VARIABLE_LABELS[name]})"), name
        assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
        assert v["includeAll"] and v["multi"], name
    # A single-rank run has no rank label: All must be a regex that matches its absence.
    assert variables["rank"]["allValue"] == ".*"
    assert variables["layer"]["allValue"] == ".*"
    if "module" in variables:
        assert variables["module"]["allValue"] == ".*"
        assert variables["module"]["query"].startswith("label_values(gradmon_activation_rms{")


@pytest.mark.parametrize(("uid", "where", "expr"), ALL_QUERIES)
def test_activation_series_are_narrowed_by_module(uid: str, where: str, expr: str) -> None:
    """Activation series name modules (`fc1`), gradient series layers (`fc1.weight` by
    default): each family is filtered by its own variable."""
    if not where.startswith("panel"):
        return
    for name, matchers in re.findall(r"(gradmon_[a-z_]+)\{([^}]*)\}", expr):
        if name.startswith("gradmon_activation_"):
            assert 'layer=~"$module"' in matchers, f"{where}: {name} without $module"
        assert "$module" not in matchers or name.startswith("gradmon_activation_"), where


def test_activation_panels_are_in_a_collapsed_row() -> None:
    dash = load("gradmon-layers")
    (row,) = [p for p in dash["panels"] if p["title"] == "Activations (collect.activations)"]
    assert row["type"] == "row" and row["collapsed"]
    exprs = [t["expr"] for p in row["panels"] for t in p["targets"]]
    assert len(exprs) == 4 and all("gradmon_activation_" in e for e in exprs), exprs
    for p in row["panels"]:
        assert "collect.activations" in p["description"], p["title"]


@pytest.mark.parametrize("uid", UIDS)
def test_every_panel_and_target_uses_the_datasource_variable(uid: str) -> None:
    for p in panels(load(uid)):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]


@pytest.mark.parametrize("uid", UIDS)
def test_panels_are_described_and_have_units(uid: str) -> None:
    units = {"none", "short", "percentunit", "s"}
    for p in panels(load(uid)):
        if p["type"] == "row":
            continue
        assert len(p.get("description", "")) > 20, p["title"]
        unit = p["fieldConfig"]["defaults"].get("unit")
        assert unit in units, (p["title"], unit)
        exprs = " ".join(t["expr"] for t in p["targets"])
        if "zero_ratio" in exprs:
            assert unit == "percentunit", p["title"]
        if ("_seconds" in exprs and "histogram_quantile" in exprs) or "time() -" in exprs:
            assert unit == "s", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_agent_errors_panel_names_every_stage() -> None:
    (panel,) = [
        p for p in panels(load("gradmon-overview")) if p["title"] == "Agent errors by stage"
    ]
    named = re.search(r"by stage \(([^)]*)\)", panel["description"])
    assert named, panel["description"]
    assert named.group(1).split(", ") == list(AGENT_STAGES)


@pytest.mark.parametrize("uid", UIDS)
def test_panel_ids_are_unique_and_panels_do_not_overlap(uid: str) -> None:
    all_panels = panels(load(uid))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), ids
    boxes = [(p["title"], p["gridPos"]) for p in all_panels]
    for title, g in boxes:
        assert g["x"] + g["w"] <= 24, title
    for (a, ga), (b, gb) in itertools.combinations(boxes, 2):
        apart = (
            ga["x"] + ga["w"] <= gb["x"]
            or gb["x"] + gb["w"] <= ga["x"]
            or ga["y"] + ga["h"] <= gb["y"]
            or gb["y"] + gb["h"] <= ga["y"]
        )
        assert apart, f"{a!r} {ga} overlaps {b!r} {gb}"


@pytest.mark.parametrize(("uid", "where", "expr"), ALL_QUERIES)
def test_rate_windows_are_the_rate_interval(uid: str, where: str, expr: str) -> None:
    # Every range selector, so also every rate()/increase() window.
    assert all(w == "$__rate_interval" for w in re.findall(r"\[([^\]]*)\]", expr)), where
    for fn in re.findall(r"\b(rate|increase|irate|delta|idelta|deriv)\s*\(", expr):
        assert "[$__rate_interval]" in expr, f"{where}: {fn}() without $__rate_interval"


@pytest.mark.parametrize(("uid", "where", "expr"), ALL_QUERIES)
def test_selectors_filter_on_every_variable(uid: str, where: str, expr: str) -> None:
    """Each agent series in a panel is filtered by job, instance and rank, tolerating a
    missing rank (the variables filter on those above them only)."""
    if not where.startswith("panel"):
        return
    for name, matchers in re.findall(r"(gradmon_[a-z_]+)\{([^}]*)\}", expr):
        for label in ("job", "instance", "rank"):
            assert f'{label}=~"${label}"' in matchers, f"{where}: {name} lacks ${label}"
    assert 'rank="' not in expr and "rank!=" not in expr, where


# PromQL words that are not metric names.
_PROMQL_WORDS = {"bool", "and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression (or label_values(...) query) selects."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range windows
    e = re.sub(r"\$\w+", "", e)  # Grafana variables (an offset $__range)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r",\s*[a-zA-Z_]\w*\s*\)\s*$", ")", e) if expr.startswith("label_values(") else e
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        names.add(word)
    return names


def test_metric_name_parser() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"$job"}[$__rate_interval])))'
    ) == {"a_bucket"}
    assert metric_names('time() - max(b_seconds{x=~"y"}) or c > 1e-3') == {"b_seconds", "c"}
    assert metric_names('label_values(gradmon_info{job=~"$job"}, instance)') == {"gradmon_info"}
    assert metric_names("d - d offset $__range or d") == {"d"}
    assert metric_names("topk(10, gradmon:layer_grad_norm:combined{})") == {
        "gradmon:layer_grad_norm:combined"
    }


@pytest.fixture(scope="module")
def exposition() -> str:
    """/metrics of a real agent with every family present."""
    return full_exposition()


def exported_names(text: str) -> set[str]:
    """Every sample name the exposition can hold, from its families and their types."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in suffixes.get(family.type, [""])
    }


def test_queries_only_use_exported_or_recorded_metrics(exposition: str) -> None:
    known = exported_names(exposition) | {r["record"] for r in recording_rules()} | {"up"}
    used = {name: where for uid, where, expr in ALL_QUERIES for name in metric_names(expr)}
    unknown = {n: where for n, where in used.items() if n not in known}
    assert not unknown, f"metrics neither exported by the agent nor recorded: {unknown}"
    # Every family of the contract that a dashboard should show is shown.
    shown = set(used)
    for name in (
        "gradmon_grad_global_norm",
        "gradmon_grad_global_norm_per_step_bucket",
        "gradmon_nonfinite_steps_total",
        "gradmon_skipped_steps_total",
        "gradmon_loss_scale",
        "gradmon_anomalies_total",
        "gradmon_nonfinite_origin_total",
        "gradmon_scalar",
        "gradmon_agent_errors_total",
        "gradmon_collect_duration_seconds_bucket",
        "gradmon_steps_total",
        "gradmon_last_collection_timestamp_seconds",
        "gradmon_grad_norm",
        "gradmon_grad_rms",
        "gradmon_grad_zero_ratio",
        "gradmon_param_norm",
        "gradmon_update_ratio",
        "gradmon_activation_rms",
        "gradmon_activation_mean",
        "gradmon_activation_zero_ratio",
        "gradmon_activation_nonfinite_total",
        "up",
    ):
        assert name in shown, name


# ------------------------------------------------------------------ queries in Prometheus
def tool(name: str) -> str:
    """The path of a Prometheus tool; missing fails under CI and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH (Debian: apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI is set, so the query checks cannot be skipped")
        pytest.skip(message)
    return path


# One value per variable, as Grafana would send it: a misspelt label in a matcher then
# selects nothing. Rank is All: a single-rank run has no rank label. A layer is a
# parameter (collect.granularity: parameter), a module has activation statistics.
SUBSTITUTE = {
    "$__rate_interval": "1m",
    "$__range": "10m",  # the whole series: promtool evaluates at 10m
    "$job": "gradmon",
    "$instance": "127.0.0.1:9400",
    "$rank": ".*",
    "$layer": "fc1.weight",
    "$module": "fc1",
}


def as_promql(expr: str) -> str:
    for var, value in SUBSTITUTE.items():
        expr = expr.replace(var, value)
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", expr, re.S)
    return f"count by ({m.group(2)}) ({m.group(1)})" if m else expr


def input_series(text: str, minutes: int = 15) -> list[dict[str, str]]:
    """promtool input series from an exposition: scraped as job gradmon every 15 s, gauges
    flat, counters and histograms growing (each bucket by its own count, so they stay
    cumulative)."""
    n = minutes * 4
    series = [{"series": 'up{job="gradmon", instance="127.0.0.1:9400"}', "values": f"1+0x{n}"}]
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = {**s.labels, "job": "gradmon", "instance": "127.0.0.1:9400"}
            matchers = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
            growing = family.type in ("counter", "histogram")
            step = abs(s.value) + 1 if growing else 0
            series.append(
                {"series": f"{s.name}{{{matchers}}}", "values": f"{s.value!r}+{step!r}x{n}"}
            )
    return series


def test_every_query_returns_data_in_prometheus(exposition: str, tmp_path: Path) -> None:
    """Each panel and variable query, with All selected, against a real agent's series
    (single rank, so no rank label): promtool alerts on any that comes back empty."""
    promtool = tool("promtool")
    checked = {
        f"DashboardQuery{i}": (uid, where, as_promql(expr))
        for i, (uid, where, expr) in enumerate(ALL_QUERIES)
    }
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"alert": name, "expr": f"absent(\n{expr}\n)"}
                    for name, (_, _, expr) in checked.items()
                ],
            }
        ]
    }
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules), encoding="utf-8")
    shutil.copy(DEPLOY / "prometheus" / "rules" / "gradmon.rules.yml", tmp_path / "rec.yml")
    test = {
        "rule_files": ["rec.yml", "queries.yml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": input_series(exposition),
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": name, "exp_alerts": []} for name in checked
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test), encoding="utf-8")
    result = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "test.yml")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    failed = set(re.findall(r"alertname: (DashboardQuery\d+),", output))
    empty = [
        f"{uid} {where}: {expr}" for name, (uid, where, expr) in checked.items() if name in failed
    ]
    assert result.returncode == 0, "queries returning no data:\n" + "\n".join(empty) + "\n" + output


# ------------------------------------------------------------------ compose + provisioning
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    return doc


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source of each volume ("./x:/y:ro" short syntax)."""
    out = {}
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        out[target] = source
    return out


def test_compose_images_are_pinned() -> None:
    services = compose()["services"]
    assert set(services) == {"prometheus", "alertmanager", "pushgateway", "grafana"}
    for name, service in services.items():
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: {image} not pinned"
    assert services["prometheus"]["image"].startswith("prom/prometheus:v2.53.")
    assert services["alertmanager"]["image"].startswith("prom/alertmanager:v0.27.")
    assert services["pushgateway"]["image"].startswith("prom/pushgateway:v1.")
    assert services["grafana"]["image"].startswith("grafana/grafana:11.")


def test_compose_mounts_exist_in_the_repo() -> None:
    doc = compose()
    for name, service in doc["services"].items():
        for target, source in mounts(service).items():
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} -> {target} missing"
            else:
                assert source in doc["volumes"], f"{name}: volume {source} not declared"
        for arg in service.get("command", []):
            if arg.startswith("--config.file="):
                path = arg.split("=", 1)[1]
                directory, _, file = path.rpartition("/")
                assert (DEPLOY / mounts(service)[directory] / file).is_file(), (name, path)


def test_compose_prometheus_scrapes_the_host_and_alerts_alertmanager() -> None:
    prom = compose()["services"]["prometheus"]
    assert "host.docker.internal:host-gateway" in prom["extra_hosts"]
    path = DEPLOY / "prometheus" / "prometheus.compose.yml"
    conf = yaml.safe_load(path.read_text(encoding="utf-8"))
    job, gateway = conf["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["host.docker.internal:9400"]
    assert gateway["static_configs"][0]["targets"] == ["pushgateway:9091"]
    am = conf["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am == ["alertmanager:9093"]
    # Apart from the addresses, the same as the no-Docker config.
    plain = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text("utf-8"))
    for conf_ in (conf, plain):
        for scrape in conf_["scrape_configs"]:
            del scrape["static_configs"]
        del conf_["alerting"]
    assert conf == plain
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_compose() -> None:
    grafana = compose()["services"]["grafana"]
    by_target = mounts(grafana)
    assert by_target["/etc/grafana/provisioning"] == "./grafana/provisioning"
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text("utf-8"))
    (prometheus,) = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert prometheus["uid"] == "gradmon-prometheus"
    assert prometheus["url"] == "http://prometheus:9090" and prometheus["isDefault"]
    providers = yaml.safe_load((prov / "dashboards" / "gradmon.yml").read_text("utf-8"))
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path == "/var/lib/grafana/dashboards"
    assert (DEPLOY / by_target[path]).resolve() == DASHBOARDS
