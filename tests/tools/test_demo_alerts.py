"""`gradmon demo --with-prometheus`'s rules and alert view, without the binaries: the demo
rules are the production rules with every duration scaled, and the live view, the
progress lines and the summary show each alert's state and delivery. (The real stack:
tests/tools/test_e2e_prometheus.py.)"""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from gradmon import Config
from gradmon.ops.rules import ALERT_NAMES, RuleOptions, alert_rules
from gradmon.tools.demo import EXPECTED_ALERTS, SCENARIOS, summary
from gradmon.tools.demo.alerts import AlertWatch
from gradmon.tools.demo.loop import DemoResult, Progress
from gradmon.tools.demo.rules import TIME_SCALE, demo_options, differences, write_rules
from gradmon.tools.demo.view import line, render

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def _seconds(duration: str) -> float:
    return sum(int(n) * UNITS[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


def test_every_faulty_scenario_has_its_alert() -> None:
    assert set(EXPECTED_ALERTS) == set(SCENARIOS) - {"healthy"}
    assert set(EXPECTED_ALERTS.values()) <= set(ALERT_NAMES)


def test_demo_rules_are_production_rules_with_durations_scaled() -> None:
    production, demo = RuleOptions(), demo_options()
    assert TIME_SCALE == 60
    changed = 0
    for f in dataclasses.fields(RuleOptions):
        before, after = getattr(production, f.name), getattr(demo, f.name)
        if isinstance(before, str) and re.fullmatch(r"(\d+(ms|s|m|h))+", before):
            assert _seconds(after) == max(1.0, _seconds(before) / TIME_SCALE), f.name
            changed += 1
        else:
            assert after == before, f.name  # selectors, labels, thresholds: production's
    assert changed >= 15
    # Same expressions but for the durations, same labels and annotations' structure.
    config = Config()
    for prod, here in zip(alert_rules(config), alert_rules(config, demo), strict=True):
        assert prod["alert"] == here["alert"] and prod["labels"] == here["labels"]
        strip = re.compile(r"\[\w+\]|offset \w+")
        assert strip.sub("D", prod["expr"]) == strip.sub("D", here["expr"])


def test_differences_name_every_alert_with_both_durations() -> None:
    text = differences(Config(), demo_options())
    for name in ALERT_NAMES:
        assert re.search(rf"^  {name} +for \d+m?s \(production \d+m\)", text, re.M), name
    assert "GradmonExplodingGradients   for 5s (production 5m); windows [2s] (production [2m])" in (
        text
    )


def test_demo_rules_with_the_runs_thresholds_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    config = Config.model_validate({"health": {"exploding_norm": 1e4}})
    path = write_rules(tmp_path / "demo.rules.yml", config, demo_options())
    assert "> 10000.0" in path.read_text(encoding="utf-8")
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


class _Stack:
    """What AlertWatch asks of a LocalStack: Prometheus' /api/v1/alerts."""

    def __init__(self) -> None:
        self.listed: list[dict[str, Any]] = []

    def alerts(self) -> list[dict[str, Any]]:
        return self.listed


def _alert(name: str, state: str, layer: str, job: str = "gradmon-exploding") -> dict[str, Any]:
    labels = {"alertname": name, "job": job, "layer": layer, "severity": "critical"}
    return {"labels": labels, "state": state}


def _text(progress: Progress) -> str:
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(render(progress))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def test_view_lines_and_summary_show_alert_states_and_delivery(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stack = _Stack()
    watch = AlertWatch("gradmon-exploding", sees_deliveries=True)
    watch.start(stack)  # type: ignore[arg-type]
    watch.stop()  # polled by hand below
    progress = Progress("exploding", 10, None, watch=watch)
    assert "none pending or firing" in _text(progress)
    assert line(progress).endswith("alerts: none")

    stack.listed = [
        _alert("GradmonExplodingGradients", "pending", "0.weight"),
        _alert("GradmonDeadLayer", "pending", "0.weight", job="another-run"),
    ]
    watch.poll()
    assert re.search(
        r"GradmonExplodingGradients +│ critical +│ pending +│ not yet", _text(progress)
    )

    stack.listed = [
        _alert("GradmonExplodingGradients", "firing", "0.weight"),
        _alert("GradmonExplodingGradients", "firing", "2.weight"),
    ]
    watch.poll()
    labels = stack.listed[0]["labels"]
    firing = {"status": "firing", "labels": labels, "annotations": {"summary": "s"}}
    watch.delivered({"alerts": [firing]})
    watch.delivered({"alerts": [firing]})  # the group sent again: printed once
    printed = capsys.readouterr().out
    assert printed.count("alertmanager -> webhook: [firing] GradmonExplodingGradients: s") == 1
    view = _text(progress)
    assert re.search(r"GradmonExplodingGradients +│ critical +│ firing x2 +│ delivered at", view)
    assert "GradmonDeadLayer" not in view  # another job's
    assert "alerts: GradmonExplodingGradients firing x2 (delivered)" in line(progress)

    stack.listed = []
    watch.poll()
    result = progress.result(port=None, seconds=1.0)
    assert result.watched and result.alerts["GradmonExplodingGradients"].state == "inactive"
    assert re.search(
        r"^  alert GradmonExplodingGradients \(critical\): inactive, delivered by Alertmanager "
        r"\d+\.\d s into the run$",
        summary(result),
        re.M,
    )


def test_summary_tells_pending_only_alerts_from_undelivered_ones() -> None:
    stack = _Stack()
    watch = AlertWatch("gradmon-healthy", sees_deliveries=True)
    stack.listed = [_alert("GradmonTrainingStalled", "pending", "", job="gradmon-healthy")]
    watch.start(stack)  # type: ignore[arg-type]
    watch.stop()
    watch.poll()
    stack.listed = [_alert("GradmonDeadLayer", "firing", "x", job="gradmon-healthy")]
    watch.poll()
    text = summary(Progress("healthy", 1, None, watch=watch).result(port=None, seconds=1.0))
    assert "alert GradmonTrainingStalled (critical): inactive, was pending, never fired" in text
    assert "alert GradmonDeadLayer (critical): firing, not delivered (inhibited" in text


def test_summary_says_when_the_scenarios_alert_did_not_fire() -> None:
    result = DemoResult("dead", 5, {}, {}, 0.1, None, 1.0, watched=True)
    assert "  alerts: none (GradmonDeadLayer did not fire)" in summary(result)
    unwatched = DemoResult("dead", 5, {}, {}, 0.1, None, 1.0)
    assert "alert" not in summary(unwatched)
