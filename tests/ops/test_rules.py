"""Alert rules: rendered from the config, shipped in sync, unit-tested with promtool."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradmon import Config, GradmonError
from gradmon.config import ExporterConfig
from gradmon.ops.rules import ALERT_NAMES, RUNBOOK_URL, RuleOptions, render
from gradmon.tools.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
RULES_FILE = PROM / "rules" / "gradmon.rules.yml"
K8S_RULE_FILE = REPO / "deploy" / "k8s" / "base" / "prometheusrule.yaml"
PROMTOOL_TESTS = sorted((PROM / "tests").glob("*.yml"))
DESIGN_ALERTS = {
    "GradmonTargetDown",
    "GradmonTrainingStalled",
    "GradmonNonFiniteGradients",
    "GradmonExplodingGradients",
    "GradmonVanishingGradients",
    "GradmonGradNormSpike",
    "GradmonDeadLayer",
    "GradmonLossScaleCollapse",
    # exporter.push (issue 15): not yet in /work/shared/DESIGN.md's list
    "GradmonPushStale",
}


def tool(name: str) -> str:
    """The path of a Prometheus tool; missing fails under CI and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = (
            f"{name} is not on PATH (Debian: apt-get install prometheus prometheus-alertmanager)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI is set, so the rule checks cannot be skipped")
        pytest.skip(message)
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, check=False
    )


def alerts(text: str, fmt: str = "prometheus") -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(text)
    groups = doc["spec"]["groups"] if fmt == "k8s" else doc["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


# ------------------------------------------------------------------ generated files
@pytest.mark.parametrize(
    ("fmt", "path"), [("prometheus", RULES_FILE), ("k8s", K8S_RULE_FILE)], ids=["plain", "k8s"]
)
def test_shipped_rules_match_default_config(fmt: str, path: Path) -> None:
    expected = render(Config(), fmt)  # type: ignore[arg-type]
    shipped = path.read_text(encoding="utf-8") if path.exists() else ""
    rel = path.relative_to(REPO)
    assert shipped == expected, (
        f"{rel} is out of date with gradmon/ops/rules.py; regenerate it with\n"
        f"    gradmon rules --format {fmt} --output {rel}"
    )


def test_render_is_byte_stable_and_safe_yaml() -> None:
    first = render(Config())
    assert first == render(Config())
    assert yaml.safe_load(first) == yaml.safe_load(render(Config()))
    assert "!!python" not in first


def test_k8s_is_a_prometheusrule_with_the_same_groups() -> None:
    plain = yaml.safe_load(render(Config(), "prometheus"))
    k8s = yaml.safe_load(render(Config(), "k8s"))
    assert k8s["apiVersion"] == "monitoring.coreos.com/v1"
    assert k8s["kind"] == "PrometheusRule"
    assert k8s["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert k8s["spec"]["groups"] == plain["groups"]


# ------------------------------------------------------------------ contract
def test_every_design_alert_with_for_severity_and_annotations() -> None:
    rendered = alerts(render(Config()))
    assert set(rendered) == DESIGN_ALERTS == set(ALERT_NAMES)
    for name, rule in rendered.items():
        assert re.fullmatch(r"[0-9]+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        assert notes["runbook_url"] == f"{RUNBOOK_URL}#{name.lower()}"
        assert "{{ $labels." in notes["summary"] + notes["description"], name


def test_every_runbook_anchor_exists() -> None:
    text = (REPO / "docs" / "runbook.md").read_text(encoding="utf-8")
    # GitHub's anchor for "## GradmonTargetDown" is "#gradmontargetdown".
    anchors = {h.strip().lower() for h in re.findall(r"^## (.+)$", text, flags=re.M)}
    assert {name.lower() for name in ALERT_NAMES} <= anchors


def test_expressions_avoid_grafana_variables_and_nan_compares() -> None:
    for name, rule in alerts(render(Config())).items():
        assert "$__" not in rule["expr"], name
    nonfinite = alerts(render(Config()))["GradmonNonFiniteGradients"]["expr"]
    assert "increase(gradmon_nonfinite_steps_total" in nonfinite


def test_nonfinite_fires_on_nonfinite_steps_only() -> None:
    """NaN/Inf gradients are spared only where an active GradScaler skipped steps; how
    many steps a loop skips (its loss overflowed, its grads finite) is no NaN."""
    expr = alerts(render(Config()))["GradmonNonFiniteGradients"]["expr"]
    first, _, spared = expr.partition("unless on (namespace, job)")
    assert first.strip() == (
        "max by (namespace, job) (increase(gradmon_nonfinite_steps_total[5m])) > 0"
    )
    assert "increase(gradmon_skipped_steps_total[5m])) > 0" in spared
    assert "(gradmon_loss_scale) != 1" in spared  # GradScaler(enabled=False) reads 1.0
    assert "gradmon_steps_total" not in expr
    assert not hasattr(RuleOptions(), "nonfinite_max_skipped_ratio")


# ------------------------------------------------------------------ config flows in
def test_thresholds_flow_from_config() -> None:
    default = alerts(render(Config()))
    custom = alerts(
        render(
            Config.model_validate(
                {
                    "health": {
                        "exploding_norm": 250.0,
                        "vanishing_rms": 1e-6,
                        "vanishing_ratio": 1e-3,
                        "spike_factor": 4,
                    }
                }
            )
        )
    )
    assert "> 1000000.0" in default["GradmonExplodingGradients"]["expr"]
    explode = custom["GradmonExplodingGradients"]
    assert "> 250.0" in explode["expr"] and "1000000.0" not in explode["expr"]
    assert "exploding_norm = 250.0" in explode["annotations"]["description"]
    assert "< 1e-06" in custom["GradmonVanishingGradients"]["expr"]
    assert "(0.001 * quantile by" in custom["GradmonVanishingGradients"]["expr"]
    assert custom["GradmonGradNormSpike"]["expr"].count("> 4.0") == 2
    unchanged = set(ALERT_NAMES) - {
        "GradmonExplodingGradients",
        "GradmonVanishingGradients",
        "GradmonGradNormSpike",
    }
    assert all(custom[n] == default[n] for n in unchanged)


def test_rule_options_flow_into_expressions() -> None:
    opts = RuleOptions(
        job_selector='job="trainer"',
        run_labels=("cluster", "job"),
        stalled_window="30m",
        runbook_url="https://runbooks.example/gradmon.md",
        k8s_labels={"release": "monitoring"},
    )
    rendered = alerts(render(Config(), options=opts))
    assert rendered["GradmonTargetDown"]["expr"] == (
        'up{job="trainer"} == 0\nunless on (cluster, job, instance)\ngradmon:run_finished:last == 1'
    )
    stalled = rendered["GradmonTrainingStalled"]["expr"]
    assert "[30m]" in stalled and "by (cluster, job)" in stalled
    url = rendered["GradmonDeadLayer"]["annotations"]["runbook_url"]
    assert url == "https://runbooks.example/gradmon.md#gradmondeadlayer"
    k8s = yaml.safe_load(render(Config(), "k8s", options=opts))
    assert k8s["metadata"]["labels"] == {"release": "monitoring"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"stalled_window": "10 minutes"}, "stalled_window"),
        ({"spike_window": "10m"}, "spike_window"),
        ({"run_labels": ("job", "bad-label")}, "run_labels"),
        ({"loss_scale_floor": 0.0}, "loss_scale_floor"),
        ({"loss_scale_max_halvings": 0}, "loss_scale_max_halvings"),
        ({"loss_scale_skipping_window": "5 minutes"}, "loss_scale_skipping_window"),
    ],
)
def test_bad_options_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(GradmonError, match=field):
        RuleOptions(**kwargs)


def test_bad_format_and_infinite_threshold_are_errors() -> None:
    with pytest.raises(GradmonError, match="prometheus, k8s"):
        render(Config(), "json")  # type: ignore[arg-type]
    inf = Config.model_validate({"health": {"exploding_norm": float("inf")}})
    with pytest.raises(GradmonError, match=r"health\.exploding_norm"):
        render(inf)


def test_cli_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["rules"]) == 0
    assert capsys.readouterr().out == render(Config())
    out = tmp_path / "rule.yaml"
    assert cli_main(["rules", "--format", "k8s", "--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render(Config(), "k8s")
    cfg = tmp_path / "gradmon.yaml"
    cfg.write_text("health:\n  exploding_norm: 42\n")
    assert cli_main(["rules", "--config", str(cfg)]) == 0
    assert "> 42.0" in alerts(capsys.readouterr().out)["GradmonExplodingGradients"]["expr"]
    cfg.write_text("health:\n  exploding_norms: 42\n")
    assert cli_main(["rules", "--config", str(cfg)]) == 2
    assert "exploding_norms" in capsys.readouterr().err


# ------------------------------------------------------------------ promtool
def test_promtool_check_rules(tmp_path: Path) -> None:
    promtool = tool("promtool")
    # The PrometheusRule's spec is a rules file too.
    spec = yaml.safe_load(K8S_RULE_FILE.read_text(encoding="utf-8"))["spec"]
    k8s_spec = tmp_path / "k8s-spec.yml"
    k8s_spec.write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = run(promtool, "check", "rules", RULES_FILE, k8s_spec)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    promtool = tool("promtool")
    result = run(promtool, "test", "rules", *PROMTOOL_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def _seconds(duration: str | int) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    if isinstance(duration, int):
        return float(duration)
    return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h|d)", duration))


def test_promtool_tests_cover_every_alert() -> None:
    """Every alert has a firing case, a healthy case where it stays quiet, and a case
    where it resolves (an alert expected at one eval_time is gone at a later one)."""
    fires: set[str] = set()
    quiet: set[str] = set()
    resolves: set[str] = set()
    for path in PROMTOOL_TESTS:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["rule_files"] == ["../rules/gradmon.rules.yml"], path
        for case in doc["tests"]:
            by_alert: dict[str, list[tuple[float, set[frozenset[tuple[str, str]]]]]] = {}
            for check in case.get("alert_rule_test", []):
                expected = {frozenset(a["exp_labels"].items()) for a in check["exp_alerts"]}
                by_alert.setdefault(check["alertname"], []).append(
                    (_seconds(check["eval_time"]), expected)
                )
            for name, checks in by_alert.items():
                assert name in DESIGN_ALERTS, f"{path.name}: unknown alert {name}"
                if not any(expected for _, expected in checks):
                    quiet.add(name)
                    continue
                fires.add(name)
                for t, expected in checks:
                    if any(later > t and expected - after for later, after in checks):
                        resolves.add(name)
    assert fires == DESIGN_ALERTS, f"no firing case: {DESIGN_ALERTS - fires}"
    assert quiet == DESIGN_ALERTS, f"no healthy case: {DESIGN_ALERTS - quiet}"
    assert resolves == DESIGN_ALERTS, f"no resolving case: {DESIGN_ALERTS - resolves}"


# ------------------------------------------------------------------ deploy configs
def test_prometheus_config() -> None:
    conf = yaml.safe_load((PROM / "prometheus.yml").read_text(encoding="utf-8"))
    assert conf["rule_files"] == ["rules/gradmon.rules.yml"]
    job, gateway = conf["scrape_configs"]
    assert job["job_name"] == "gradmon" and job["scrape_interval"] == "15s"
    # exporter.push: the Pushgateway (Debian's listens on 9091), the pushed labels kept.
    assert gateway["job_name"] == "pushgateway" and gateway["honor_labels"] is True
    assert gateway["static_configs"][0]["targets"] == ["127.0.0.1:9091"]
    port = ExporterConfig().port
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{port}"]
    assert job["sample_limit"] >= 11 * ExporterConfig().max_layers + 80
    am = conf["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am == ["127.0.0.1:9093"]
    result = run(tool("promtool"), "check", "config", PROM / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_config() -> None:
    path = REPO / "deploy" / "alertmanager" / "alertmanager.yml"
    conf = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert conf["route"]["group_by"] == ["alertname", "job"]
    hooks = [h["url"] for r in conf["receivers"] for h in r.get("webhook_configs", [])]
    assert hooks == ["http://127.0.0.1:5001/"]
    result = run(tool("amtool"), "check-config", path)
    assert result.returncode == 0, result.stdout + result.stderr


def _matching(matchers: list[str]) -> set[str]:
    """The gradmon alerts an inhibit rule's alertname matchers select."""
    selected = set(ALERT_NAMES)
    for matcher in matchers:
        m = re.fullmatch(r'alertname\s*(=~|=)\s*"([^"]*)"', matcher)
        assert m, f"unexpected matcher {matcher!r}: only alertname= / alertname=~"
        op, value = m.groups()
        selected = {a for a in selected if (re.fullmatch(value, a) if op == "=~" else a == value)}
    return selected


def test_alertmanager_inhibit_rules() -> None:
    """NaN/Inf and a collapsed loss scale suppress the small-gradient debris only; an
    exploding run pages as exploding, nothing suppresses GradmonExplodingGradients."""
    path = REPO / "deploy" / "alertmanager" / "alertmanager.yml"
    rules = yaml.safe_load(path.read_text(encoding="utf-8"))["inhibit_rules"]
    inhibits: dict[str, set[str]] = {}
    for rule in rules:
        assert rule["equal"] == ["namespace", "job"], rule
        sources, targets = _matching(rule["source_matchers"]), _matching(rule["target_matchers"])
        assert sources and targets and not sources & targets, rule
        for source in sources:
            inhibits.setdefault(source, set()).update(targets)
    assert not any("GradmonExplodingGradients" in t for t in inhibits.values()), inhibits
    debris = {"GradmonVanishingGradients", "GradmonDeadLayer"}
    assert inhibits["GradmonNonFiniteGradients"] == debris
    assert inhibits["GradmonLossScaleCollapse"] == debris
    assert inhibits["GradmonExplodingGradients"] == debris | {"GradmonGradNormSpike"}


def test_layer_naming_annotations_query_the_alerts_own_run() -> None:
    """The descriptions that name layers run a query for the run of the alert, whatever
    RuleOptions.run_labels are (promtool tests: deploy/prometheus/tests)."""
    rendered = alerts(render(Config(), options=RuleOptions(run_labels=("cluster", "job"))))
    for name in ("GradmonNonFiniteGradients", "GradmonGradNormSpike"):
        text = rendered[name]["annotations"]["description"]
        assert "| query }}" in text, name
        assert "cluster=%[1]q, job=%[2]q" in text and "$labels.cluster $labels.job" in text, name
    origin = rendered["GradmonNonFiniteGradients"]["annotations"]["description"]
    assert "gradmon_nonfinite_origin_total{" in origin
    spike = rendered["GradmonGradNormSpike"]
    assert 'kind=~"spike|exploding", layer!="global"' in spike["expr"]
    assert 'kind=~"spike|exploding", layer!="global"' in spike["annotations"]["description"]


def test_loss_scale_collapse_lasts_only_once_it_fired() -> None:
    """The pinned-at-a-floor branch goes on from the alert's own firing state, so a
    disabled GradScaler (1.0) beside a loop that skips steps can never start it."""
    expr = alerts(render(Config()))["GradmonLossScaleCollapse"]["expr"]
    assert 'ALERTS{alertname="GradmonLossScaleCollapse", alertstate="firing"}' in expr
    assert "increase(gradmon_skipped_steps_total[5m])) > 0" in expr
    custom = alerts(render(Config(), options=RuleOptions(loss_scale_skipping_window="10m")))
    assert "min_over_time(gradmon_loss_scale[10m])" in custom["GradmonLossScaleCollapse"]["expr"]
