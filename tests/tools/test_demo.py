"""The demo: every scenario is real CPU training, and gradmon must see what it is built to show.

Short runs (40 steps for the faulty scenarios) keep this file fast; the faulty dynamics are
designed to appear within the first 30 steps. The default-length runs are marked slow.
"""

from __future__ import annotations

import io
import math
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from rich.console import Console

import gradmon
from gradmon.errors import GradmonError
from gradmon.tools.demo import DEFAULT_STEPS, SCENARIOS, DemoResult, run_demo, summary
from gradmon.tools.demo.loop import Progress
from gradmon.tools.demo.view import render

SHORT = 40  # steps for the faulty scenarios in the fast tests

# What each faulty scenario must trigger; exploding may show as either rule.
EXPECTED = {
    "exploding": {"exploding", "spike"},
    "vanishing": {"vanishing"},
    "nonfinite": {"nonfinite"},
    "dead": {"dead"},
}


def _demo(scenario: str, steps: int | None) -> DemoResult:
    return run_demo(scenario, steps=steps, port=0, live=False)


def test_scenarios_are_the_documented_ones() -> None:
    assert SCENARIOS == ("healthy", "exploding", "vanishing", "nonfinite", "dead")
    assert set(DEFAULT_STEPS) == set(SCENARIOS)


def test_healthy_short_run_learns_without_anomalies() -> None:
    result = _demo("healthy", 200)
    assert result.anomaly_counts == {}
    assert result.detected == {}
    assert result.final_loss < 0.9 * result.initial_loss
    assert result.steps == 200
    assert result.port is not None and result.port > 0  # served on an ephemeral port


@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_faulty_scenario_is_detected_in_a_short_run(scenario: str) -> None:
    result = _demo(scenario, SHORT)
    assert EXPECTED[scenario] & set(result.anomaly_counts), result.anomaly_counts
    for kind in EXPECTED[scenario] & set(result.anomaly_counts):
        assert result.detected[kind], kind
        assert result.first_detection[kind] < SHORT


def test_vanishing_is_on_the_first_layers() -> None:
    result = _demo("vanishing", SHORT)
    layers = result.detected["vanishing"]
    assert {"0.weight", "0.bias"} <= layers
    assert "16.weight" not in layers  # the output layer still learns


def test_dead_is_the_penalised_branch_only() -> None:
    result = _demo("dead", SHORT)
    assert set(result.anomaly_counts) == {"dead"}
    assert result.detected["dead"] == {"side_in.weight", "side_in.bias", "side_out.weight"}


def test_nonfinite_training_goes_on_after_the_poisoned_batch() -> None:
    result = _demo("nonfinite", SHORT)
    assert set(result.anomaly_counts) == {"nonfinite"}
    assert result.first_detection["nonfinite"] == 20
    assert math.isfinite(result.final_loss)  # the NaN step was skipped, not applied
    assert result.final_loss < result.initial_loss


def test_config_dict_and_yaml_are_merged(tmp_path: Path) -> None:
    path = tmp_path / "gradmon.yaml"
    path.write_text("exporter:\n  enabled: false\nhealth:\n  dead_window: 1\n", encoding="utf-8")
    result = run_demo("dead", steps=30, port=0, config=str(path), live=False)
    assert result.port is None  # the file's exporter.enabled won over the demo's defaults
    # dead_window 1 reports each all-zero step, so more events than the default's (20).
    assert result.anomaly_counts["dead"] > _demo("dead", 30).anomaly_counts.get("dead", 0)

    off = run_demo("healthy", steps=5, port=0, config={"exporter": {"enabled": False}}, live=False)
    assert off.port is None


def test_bad_arguments_are_errors() -> None:
    with pytest.raises(GradmonError, match="unknown demo scenario"):
        run_demo("nope", port=0, live=False)
    with pytest.raises(GradmonError, match="steps"):
        run_demo("healthy", steps=0, port=0, live=False)
    with pytest.raises(GradmonError, match="unknown key"):
        run_demo("healthy", steps=1, port=0, config={"health": {"nope": 1}}, live=False)


def test_progress_lines_and_summary_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    # live=True, but pytest's stdout is not a terminal: plain progress lines instead.
    result = run_demo("nonfinite", steps=30, port=0, live=True)
    out = capsys.readouterr().out
    assert "[nonfinite] step 30/30" in out
    assert "nonfinite: 6 events in 6 layer(s), first at step 20" in out
    assert summary(result) in out


def test_metrics_are_served_while_training() -> None:
    """A scraper beside the run, as Prometheus would be: the last scrape before the run
    ends (it holds its server up for a moment after training) shows the final state."""
    with socket.socket() as s:  # a free port, so the scraper knows where to look
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scraped: list[str] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    scraped.append(r.read().decode())
            except OSError:
                pass  # not up yet, or closed
            time.sleep(0.05)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        result = run_demo("nonfinite", steps=25, port=port, live=False, hold=1.0)
    finally:
        done.set()
        scraper.join(timeout=10)
    assert scraped and result.port == port
    samples = {
        line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
        for line in scraped[-1].splitlines()
        if line.startswith("gradmon_")
    }
    assert samples['gradmon_anomalies_total{kind="nonfinite",layer="0.weight"}'] == 1
    assert samples["gradmon_nonfinite_steps_total"] == 1
    assert samples["gradmon_steps_total"] == 25
    assert samples['gradmon_scalar{name="loss"}'] == pytest.approx(result.final_loss)


def test_live_view_in_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    result = run_demo("dead", steps=30, port=0, live=True)
    text = out.getvalue()
    assert "health events so far" in text  # the rich view was drawn...
    assert "[dead] step" not in text  # ...instead of progress lines
    assert summary(result) in text


def test_live_view_renders() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with gradmon.attach(model, config={"exporter": {"enabled": False}}) as mon:
        model(torch.randn(3, 4)).sum().backward()
        mon.collect()
        snap = mon.snapshot()
    progress = Progress("vanishing", 5, "http://127.0.0.1:9400/metrics", counts={"dead": 2})
    progress.step, progress.loss, progress.snapshot = 1, 0.25, snap
    console = Console(file=io.StringIO(), width=120, force_terminal=True, record=True)
    console.print(render(progress))
    text = console.export_text()
    assert "gradmon demo: vanishing" in text
    assert "step 1/5" in text and "loss 0.25" in text
    assert "http://127.0.0.1:9400/metrics" in text
    assert "0.weight" in text and "2.bias" in text  # smallest / largest grad norms
    assert "dead" in text and "spike" in text


def test_summary_without_anomalies() -> None:
    result = DemoResult("healthy", 10, {}, {}, 0.5, 9400, 1.0, initial_loss=2.0)
    assert "no anomalies detected" in summary(result)
    assert "loss 2 -> 0.5" in summary(result)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_faulty_scenario_default_run(scenario: str) -> None:
    result = _demo(scenario, None)
    assert result.steps == DEFAULT_STEPS[scenario]
    assert EXPECTED[scenario] & set(result.anomaly_counts), result.anomaly_counts


@pytest.mark.slow
def test_healthy_longer_run_stays_clean() -> None:
    result = _demo("healthy", 1500)
    assert result.anomaly_counts == {}
    assert result.final_loss < 0.5 * result.initial_loss
