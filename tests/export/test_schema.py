"""export/schema.py is what the agent serves, and what the rules and dashboards select.

The schema is the one source of metric names; these tests hold it to the agent's real
/metrics (a fresh registry, every opt-in family on) and hold the rule and dashboard
expressions to it, so a name changed on one side only fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import gradmon
from gradmon.export import schema
from gradmon.ops.rules import groups

from ..exposition import full_exposition

RECORDED = r"gradmon:[a-z_:0-9]+"


@pytest.fixture(scope="module")
def served() -> dict[str, object]:
    """The agent's families with every family the schema lists present."""
    return {f.name: f for f in text_string_to_metric_families(full_exposition())}


@pytest.mark.parametrize("family", schema.FAMILIES, ids=lambda f: f.name)
def test_every_schema_family_is_served_as_declared(
    family: schema.Family, served: dict[str, object]
) -> None:
    got = served.get(family.name)
    assert got is not None, f"{family.name} is in the schema but not in /metrics"
    assert got.type == family.type  # type: ignore[attr-defined]
    assert got.documentation == family.help  # type: ignore[attr-defined]
    samples = got.samples  # type: ignore[attr-defined]
    assert samples, family.name
    for s in samples:
        assert set(s.labels) - {"le"} == set(family.labels), (family.name, s.labels)


def test_the_agent_serves_nothing_the_schema_does_not_list(served: dict[str, object]) -> None:
    ours = {name for name in served if name.startswith("gradmon_")}
    assert ours == {f.name for f in schema.FAMILIES}


def test_layer_gauges_name_a_statistic() -> None:
    from gradmon.snapshot import ActivationStats, LayerStats

    for f in (*schema.LAYER_GAUGES, schema.UPDATE_RATIO):
        assert f.attr in LayerStats.__dataclass_fields__, f.name
    for f in schema.ACTIVATION_GAUGES:
        assert f.attr in ActivationStats.__dataclass_fields__, f.name


def test_series_names_follow_prometheus_conventions() -> None:
    for f in (*schema.FAMILIES, *schema.PUSH_FAMILIES):
        assert f.series.startswith("gradmon_"), f.name
        assert f.series.endswith("_total") == (f.type == "counter"), f.name
        assert not f.name.endswith("_total"), f.name  # prometheus_client adds it
        assert f.help.endswith("."), f.name
    assert schema.GLOBAL_NORM_PER_STEP.bucket == "gradmon_grad_global_norm_per_step_bucket"
    assert list(schema.GLOBAL_NORM_BUCKETS) == sorted(schema.GLOBAL_NORM_BUCKETS)
    assert schema.DURATION_BUCKETS[0] == 1e-5 and schema.DURATION_BUCKETS[-1] == 10.0


def test_rules_select_only_schema_series() -> None:
    """Every metric name in an alert or recording rule is a series of the schema, a
    recording rule's own output, or `up`."""
    known = {"up"}
    for f in (*schema.FAMILIES, *schema.PUSH_FAMILIES):
        known |= {f.series, f.bucket, f.sum, f.count} if f.type == "histogram" else {f.series}
    config = gradmon.Config()
    rules = [r for g in groups(config) for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    for rule in rules:
        expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', rule["expr"])  # label values
        used = set(re.findall(r"\bgradmon_[a-z_]+\b", expr)) | set(re.findall(RECORDED, expr))
        unknown = used - known - recorded
        assert not unknown, (rule.get("alert") or rule.get("record"), unknown)


# Where the agent names a stage of gradmon_agent_errors_total: guard("x"), count_error("x",
# ...), partial(counters.count, "x"), on_error("x", ...), errors["x"], errors_total["x"].
_STAGE_USES = re.compile(
    r'(?:\bguard|\bcount_error|\bcount|_on_error)\(\s*"(\w+)"'
    r'|partial\(\s*[\w.]+\.count(?:_error)?,\s*"(\w+)"'
    r'|\berrors(?:_total)?\["(\w+)"\]'
)


def test_every_stage_the_agent_counts_is_declared_and_every_declared_one_is_used() -> None:
    """AGENT_STAGES is what the dashboard panel and docs/reference.md list: a stage counted
    under a name it lacks would be served but never described."""
    package = Path(gradmon.__file__).parent
    used: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for match in _STAGE_USES.finditer(path.read_text(encoding="utf-8")):
            stage = next(g for g in match.groups() if g)
            used.setdefault(stage, set()).add(str(path.relative_to(package)))
    assert set(used) == set(schema.AGENT_STAGES), used
