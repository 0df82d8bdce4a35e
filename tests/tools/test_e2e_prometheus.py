"""End to end with the real binaries: a local Prometheus scrapes paced `gradmon demo` runs
(1 s scrapes and rule evaluations, on 127.0.0.1), evaluates the alert rules, and a local
Alertmanager delivers to a webhook in this process; every dashboard panel's query returns
data.

One stack serves the whole module. Each scenario runs in a thread on it as its own job
(`gradmon-<scenario>`, exporter on an ephemeral port), added to Prometheus through file_sd
and removed when the run ends, while the test polls Prometheus' HTTP API.

The shipped rules wait minutes (`for: 5m` on GradmonExplodingGradients, a 35-minute
history for the spike baseline, ...): the stack here loads the same rules rendered with
`E2E_OPTIONS`, the shipped expressions with windows and `for`s scaled to seconds.

Without `prometheus`/`alertmanager` on PATH the e2e tests skip, or fail when CI is set.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradmon import Config, GradmonError
from gradmon.ops.rules import RuleOptions, render
from gradmon.tools.cli import main as cli_main
from gradmon.tools.demo import DemoResult, run_demo
from gradmon.tools.localstack import (
    LocalStack,
    LocalStackError,
    MissingBinaryError,
    Target,
    WebhookReceiver,
    find_binary,
    http_json,
)

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
ALERTMANAGER_CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"
IN_CI = bool(os.environ.get("CI"))

# The shipped RuleOptions with every window and `for` scaled from minutes to seconds, so
# that alerts fire (and, for the healthy run, could fire) within a run of 15-25 s.
E2E_OPTIONS = RuleOptions(
    target_down_for="5s",
    stalled_window="15s",
    stalled_for="5s",
    nonfinite_window="30s",
    nonfinite_for="3s",
    exploding_window="10s",
    exploding_for="3s",
    vanishing_for="10s",
    dead_for="10s",
    spike_window="5s",
    spike_baseline="15s",
    spike_baseline_offset="5s",
    spike_for="3s",
    loss_scale_window="30s",
    loss_scale_for="5s",
)

STEP_DELAY = 0.1  # seconds per step: ~10 steps per 1 s scrape
POLL = 0.5  # seconds between looks at Prometheus' API
SCRAPE_WAIT = 30.0  # file_sd + Prometheus' 5 s discovery throttles: ~6 s seen
DELIVERY_WAIT = 30.0  # from firing in Prometheus to the webhook (group_wait 1 s)

# Dashboard variables -> values for a run; $job/$instance come from the run's target.
RATE_INTERVAL = "30s"  # 1 s scrapes: a 30 s rate has data 2 s into a run
GRAFANA_VALUES = {
    "rank": ".*",
    "layer": ".*",
    "module": ".*",
    "datasource": "prometheus",
    "__rate_interval": RATE_INTERVAL,
    "__interval": "5s",
    "__interval_ms": "5000",
    "__range": "1m",
    "__range_s": "60",
    "__range_ms": "60000",
}
# Panels that legitimately have no data in a short CPU run, by a metric their query reads.
NO_DATA_OK = {
    "gradmon_loss_scale": "no GradScaler in the demo (CPU, fp32)",
    "GradmonLossScaleCollapse": "no GradScaler in the demo",
}


def _binaries() -> None:
    """Fail under CI, skip elsewhere, when a binary is missing."""
    try:
        find_binary("prometheus")
        find_binary("alertmanager")
    except MissingBinaryError as exc:
        if IN_CI:
            pytest.fail(f"{exc}; CI is set, so the end-to-end checks cannot be skipped")
        pytest.skip(str(exc))


def _wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL)


def _stack_processes() -> set[str]:
    """Prometheus/Alertmanager processes that are children of this one (Linux /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        comm = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and ("prometheus" in comm or "alertmanager" in comm):
            found.add(f"{comm} (pid {stat.parent.name})")
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------- the stack
@pytest.fixture(scope="module")
def webhook() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def stack(
    webhook: WebhookReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    _binaries()
    rules = tmp_path_factory.mktemp("rules") / "gradmon.rules.yml"
    rules.write_text(render(Config(), "prometheus", options=E2E_OPTIONS), encoding="utf-8")
    # The shipped inhibit rules: what is delivered here is what the shipped config pages.
    shipped = yaml.safe_load(ALERTMANAGER_CONFIG.read_text(encoding="utf-8"))
    assert shipped["inhibit_rules"], f"{ALERTMANAGER_CONFIG} has no inhibit_rules"
    local = LocalStack([rules], webhook_url=webhook.url, inhibit_rules=shipped["inhibit_rules"])
    with local:
        pids = local.pids
        assert set(pids) == {"prometheus", "alertmanager"}
        yield local
    assert not local.running
    assert not [name for name, pid in pids.items() if _alive(pid)], "processes left behind"


@dataclass
class Run:
    """What Prometheus showed while a paced demo run went on."""

    scenario: str
    job: str
    result: DemoResult | None = None
    target: dict[str, Any] = field(default_factory=dict)  # /api/v1/targets, once up
    up: list[float] = field(default_factory=list)  # `up` of the job at every poll
    states: dict[str, set[str]] = field(default_factory=dict)  # alertname -> states
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)  # firing ones
    live_at: list[float] = field(default_factory=list)  # times the target was up
    # Alertmanager's view at every poll: alertname -> states ("active", "suppressed"...)
    # of the job's alerts it held then.
    am_polls: list[dict[str, set[str]]] = field(default_factory=list)

    @property
    def firing(self) -> set[str]:
        return {name for name, states in self.states.items() if "firing" in states}


def _paced_run(stack: LocalStack, scenario: str, steps: int) -> Run:
    """run_demo(scenario) paced at STEP_DELAY in a thread, registered on `stack`; poll
    Prometheus until the run (and its deregistration) is over."""
    run = Run(scenario, f"gradmon-{scenario}")
    errors: list[BaseException] = []

    def train() -> None:
        try:
            run.result = run_demo(
                scenario,
                steps=steps,
                port=0,
                live=False,
                step_delay=STEP_DELAY,
                with_prometheus=stack,
                # The opt-in families too, so that their dashboard panels are checked.
                config={"collect": {"activations": True, "update_ratio_every": 1}},
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=train, name=f"demo-{scenario}", daemon=True)
    thread.start()
    # Discovery, the run, then the removal of its target (~5 s).
    deadline = time.monotonic() + 2 * SCRAPE_WAIT + steps * STEP_DELAY + 30
    while thread.is_alive() and time.monotonic() < deadline:
        now = time.time()
        for sample in stack.query(f'up{{job="{run.job}"}}'):
            run.up.append(float(sample["value"][1]))
            if run.up[-1] == 1:
                run.live_at.append(now)
                if not run.target:
                    run.target = stack.targets(run.job)[0]
        for alert in stack.alerts():
            if alert["labels"].get("job") == run.job:
                name = alert["labels"]["alertname"]
                run.states.setdefault(name, set()).add(alert["state"])
                if alert["state"] == "firing":
                    run.alerts.setdefault(name, alert)
        held: dict[str, set[str]] = {}
        for alert in stack.alertmanager_alerts():
            if alert["labels"].get("job") == run.job:
                held.setdefault(alert["labels"]["alertname"], set()).add(alert["status"]["state"])
        if held:
            run.am_polls.append(held)
        time.sleep(POLL)
    thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not thread.is_alive(), f"the {scenario} run did not end within its time"
    if errors:
        raise errors[0]
    return run


# Paced runs: >= 20 s healthy (long enough for the scaled TargetDown/Stalled/Vanishing/Dead
# `for`s to have fired had their condition held), ~15 s for the faulty ones, whose alerts
# fire within ~6 s (exploding from step 11, the first NaN batch at step 20).
@pytest.fixture(scope="module")
def healthy(stack: LocalStack) -> Run:
    return _paced_run(stack, "healthy", 200)


@pytest.fixture(scope="module")
def exploding(stack: LocalStack) -> Run:
    return _paced_run(stack, "exploding", 150)


@pytest.fixture(scope="module")
def nonfinite(stack: LocalStack) -> Run:
    return _paced_run(stack, "nonfinite", 150)


def _delivered(webhook: WebhookReceiver, job: str) -> dict[str, set[str]]:
    """alertname -> statuses the webhook received for `job`."""
    out: dict[str, set[str]] = {}
    for alert in webhook.alerts():
        labels = alert.get("labels", {})
        if labels.get("job") == job:
            out.setdefault(labels.get("alertname", "?"), set()).add(alert.get("status", "?"))
    return out


# ------------------------------------------------------------------- e2e tests
@pytest.mark.slow
def test_target_is_scraped_and_up(stack: LocalStack, healthy: Run) -> None:
    assert healthy.result is not None and healthy.result.port
    target = healthy.target
    assert target, f"Prometheus never had job {healthy.job} up: {healthy.up}"
    assert target["health"] == "up" and target["lastError"] == ""
    assert target["scrapeUrl"] == f"http://127.0.0.1:{healthy.result.port}/metrics"
    assert target["labels"]["instance"] == f"127.0.0.1:{healthy.result.port}"
    # up == 1 at every poll while the run was registered, bar the start: a few polls at 0
    # would be the run's target announced before its exporter listened, never the case.
    assert healthy.up and set(healthy.up) == {1.0}, healthy.up
    assert len(healthy.live_at) >= 20  # polls at 0.5 s over a 20 s run
    # The series carry the target's labels and the run's identity.
    at = healthy.live_at[-1]
    info = stack.query(f'gradmon_info{{job="{healthy.job}"}}', at=at)
    assert len(info) == 1 and info[0]["metric"]["instance"] == target["labels"]["instance"]
    steps = stack.query(f'gradmon_steps_total{{job="{healthy.job}"}}', at=at)
    assert 0 < float(steps[0]["value"][1]) <= healthy.result.steps


@pytest.mark.slow
def test_healthy_run_fires_no_alert(healthy: Run, webhook: WebhookReceiver) -> None:
    assert healthy.result is not None
    assert healthy.result.anomaly_counts == {}  # the agent saw nothing either
    # The scaled `for`s (5-10 s) were shorter than the run, so a rule whose condition held
    # in a healthy run (TargetDown and TrainingStalled included) would have fired.
    assert healthy.firing == set(), healthy.states
    # Pending is allowed for TrainingStalled only: under load the first step can end after
    # two scrapes have seen gradmon_steps_total at 0 (an increase of 0 over the window).
    assert set(healthy.states) <= {"GradmonTrainingStalled"}, healthy.states
    time.sleep(2)  # group_wait 1 s: anything firing would have been delivered by now
    assert _delivered(webhook, healthy.job) == {}


@pytest.mark.slow
def test_exploding_run_fires_and_is_delivered(exploding: Run, webhook: WebhookReceiver) -> None:
    assert exploding.result is not None
    assert {"exploding", "spike"} & set(exploding.result.anomaly_counts)
    # The norm passes 1e3 from step 11 and settles near 1e20 (the loss overflows, the
    # loop skips every later step): GradmonExplodingGradients fires after its `for`.
    # GradNormSpike's global scope needs a baseline older than the run; its layer scope
    # (the agent's per-layer spikes) may fire at the onset, and is inhibited below.
    assert "GradmonExplodingGradients" in exploding.firing, exploding.states
    alert = exploding.alerts["GradmonExplodingGradients"]
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"].endswith(f"({exploding.job})")
    assert float(alert["value"]) > 1e3
    _wait_for(
        "Alertmanager to deliver GradmonExplodingGradients",
        lambda: "firing" in _delivered(webhook, exploding.job).get("GradmonExplodingGradients", ()),
        DELIVERY_WAIT,
    )
    # It pages as exploding: nothing suppressed it in Alertmanager at any poll.
    held = [
        p["GradmonExplodingGradients"]
        for p in exploding.am_polls
        if "GradmonExplodingGradients" in p
    ]
    assert held and not any("suppressed" in s for s in held), exploding.am_polls
    # The gradients stayed finite (the loss overflowed, the loop skipped every later
    # step): no NaN/Inf alert, not even pending, and none delivered.
    if "nonfinite" not in exploding.result.anomaly_counts:
        assert "GradmonNonFiniteGradients" not in exploding.states, exploding.states
        assert "GradmonNonFiniteGradients" not in _delivered(webhook, exploding.job)
    # Its debris (tanh saturation leaves dead layers below) is inhibited while it fires,
    # and so is the spike: that may be delivered once before, at the onset (a warning
    # naming the layers that jumped first), never while GradmonExplodingGradients fires.
    delivered = _delivered(webhook, exploding.job)
    for name in ("GradmonDeadLayer", "GradmonVanishingGradients", "GradmonGradNormSpike"):
        if name != "GradmonGradNormSpike":
            assert "firing" not in delivered.get(name, ()), (name, delivered)
        beside = [
            p[name]
            for p in exploding.am_polls
            if name in p and "active" in p.get("GradmonExplodingGradients", ())
        ]
        assert not beside or any("suppressed" in s for s in beside), (name, exploding.am_polls)


@pytest.mark.slow
def test_nonfinite_run_fires_and_is_delivered(nonfinite: Run, webhook: WebhookReceiver) -> None:
    assert nonfinite.result is not None
    assert nonfinite.result.first_detection.get("nonfinite") == 20
    assert "GradmonNonFiniteGradients" in nonfinite.firing, nonfinite.states
    alert = nonfinite.alerts["GradmonNonFiniteGradients"]
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == f"NaN/Inf gradients in {nonfinite.job}"
    # No GradScaler in the demo: the NaN steps the loop skipped count as they are.
    assert float(alert["value"]) >= 1
    assert "no active scaler" in alert["annotations"]["description"]
    # The NaN steps were skipped: the weights stayed finite, no magnitude alert follows.
    assert nonfinite.firing == {"GradmonNonFiniteGradients"}, nonfinite.states
    _wait_for(
        "Alertmanager to deliver GradmonNonFiniteGradients",
        lambda: "firing" in _delivered(webhook, nonfinite.job).get("GradmonNonFiniteGradients", ()),
        DELIVERY_WAIT,
    )


# ------------------------------------------------------------------ dashboards
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def _panels(node: Any) -> Iterator[dict[str, Any]]:
    """Every panel with query targets, rows and nested panels included."""
    if isinstance(node, dict):
        if isinstance(node.get("targets"), list):
            yield node
        for value in node.values():
            if isinstance(value, dict | list):
                yield from _panels(value)
    elif isinstance(node, list):
        for item in node:
            yield from _panels(item)


def _template_values(dashboard: dict[str, Any]) -> dict[str, str]:
    """The current values of the dashboard's own custom/constant/interval variables."""
    out: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") in ("custom", "constant", "interval", "textbox"):
            value = (var.get("current") or {}).get("value", var.get("query", ""))
            out[var["name"]] = "|".join(value) if isinstance(value, list) else str(value)
    return out


def _dashboard_queries() -> list[tuple[str, str, str, dict[str, str]]]:
    """(file, panel title, expr, the dashboard's own variable values) of every query."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        dashboard = doc.get("dashboard", doc)  # the API's wrapper, or a bare dashboard
        own = _template_values(dashboard)
        for panel in _panels(dashboard.get("panels", []) + dashboard.get("rows", [])):
            for target in panel["targets"]:
                expr = target.get("expr") if isinstance(target, dict) else None
                if expr and not target.get("hide"):
                    out.append((path.name, str(panel.get("title", "?")), expr, own))
    return out


def _substitute(expr: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise KeyError(name)
        return values[name]

    return _VARIABLE.sub(value, expr)


@pytest.mark.slow
def test_every_dashboard_panel_returns_data(
    stack: LocalStack, healthy: Run, exploding: Run, nonfinite: Run
) -> None:
    if not DASHBOARDS.is_dir():
        message = f"{DASHBOARDS.relative_to(REPO)}/ does not exist: no dashboards to check"
        if IN_CI:
            pytest.fail(f"{message}; CI is set, so this check cannot be skipped")
        pytest.skip(message)
    queries = _dashboard_queries()
    assert queries, f"no panel queries (targets[].expr) in {DASHBOARDS}/*.json"
    runs = [healthy, exploding, nonfinite]
    problems: list[str] = []
    for file, title, expr, own in queries:
        results = []
        for run in runs:
            assert run.target and len(run.live_at) > 4, f"{run.job} was never scraped"
            values = {
                **own,
                **GRAFANA_VALUES,
                "job": run.job,
                "instance": run.target["labels"]["instance"],
            }
            try:
                promql = _substitute(expr, values)
            except KeyError as exc:
                problems.append(f"{file} / {title}: unknown variable ${exc.args[0]} in {expr}")
                break
            try:
                # Near the end of the run, while its target was still up.
                results.append(stack.query(promql, at=run.live_at[-2]))
            except LocalStackError as exc:
                problems.append(f"{file} / {title}: {promql}: {exc}")
                break
        else:
            allowed = [m for m in NO_DATA_OK if m in expr]
            if not any(results) and not allowed:
                problems.append(
                    f"{file} / {title}: no data in the healthy, exploding and nonfinite "
                    f"runs: {expr}"
                )
    assert not problems, "\n".join(problems)


# ----------------------------------------------------- the CLI's own local stack
# `gradmon demo --with-prometheus --scenario S`, as a user runs it: its own stack with the
# demo rules (production rules, windows 60x shorter); the scenario's alert is delivered
# before the demo ends. Short unpaced-ish runs: the demo waits (--alert-wait) for the
# delivery after its last step, the exporter still serving the run's last state.
CLI_RUNS = {
    # scenario: (steps, the alert, the line that says when the production rule would fire)
    "exploding": (25, "GradmonExplodingGradients", "for 5s (production 5m)"),
    "nonfinite": (25, "GradmonNonFiniteGradients", "for 1s (production 1m)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(CLI_RUNS))
def test_cli_demo_with_prometheus_delivers_the_scenarios_alert(
    scenario: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _binaries()
    steps, alert, scaled = CLI_RUNS[scenario]
    before = _stack_processes()
    argv = ["demo", "--scenario", scenario, "--steps", str(steps), "--port", "0"]
    argv += ["--no-live", "--with-prometheus", "--step-delay", str(STEP_DELAY)]
    code = cli_main([*argv, "--alert-wait", str(DELIVERY_WAIT)])
    out = capsys.readouterr().out
    assert code == 0, out
    prometheus = re.search(r"Prometheus: +(http://127\.0\.0\.1:\d+/(classic/)?alerts)", out)
    alertmanager = re.search(r"Alertmanager: +(http://127\.0\.0\.1:\d+)/#/alerts", out)
    assert prometheus and alertmanager, out
    # It says that its rules are time-scaled, and how production's differ.
    assert "every `for` and range window 60x shorter" in out, out
    assert re.search(rf"^  {alert} +{re.escape(scaled)}", out, re.M), out
    assert f"this scenario should fire {alert}" in out
    assert f"[{scenario}] step {steps}/{steps}" in out
    # Delivered by Alertmanager while the demo ran, and said so in the summary.
    assert f"alertmanager -> webhook: [firing] {alert}: " in out, out
    assert re.search(rf"^  alert {alert} \(critical\): \w.*, delivered by Alertmanager", out, re.M)
    # Stopped with the run: nothing listens any more, no process is left.
    with pytest.raises(LocalStackError):
        http_json(f"{alertmanager.group(1)}/-/ready", timeout=1)
    assert _stack_processes() <= before


# ------------------------------------------- fast checks: no binaries, no waiting
def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(MissingBinaryError, match="apt-get install prometheus-alertmanager"):
        find_binary("alertmanager")
    with pytest.raises(MissingBinaryError, match="apt-get install prometheus`"):
        LocalStack().start()


def test_stack_is_loopback_only() -> None:
    with pytest.raises(LocalStackError, match="loopback"):
        LocalStack(webhook_url="http://example.com:5001/")
    with pytest.raises(LocalStackError, match="loopback"):
        LocalStack(targets=[Target("10.0.0.1:9400")])
    LocalStack(targets=[Target("localhost:1"), Target("[::1]:2"), Target("127.0.0.2:3")])
    with pytest.raises(LocalStackError, match="does not exist"):
        LocalStack(["/nonexistent/rules.yml"])
    with pytest.raises(LocalStackError, match="not started"):
        LocalStack().set_target(Target("127.0.0.1:1"))
    assert Target("127.0.0.1:1", job="gradmon-x", labels={"job": "no"}).group() == {
        "targets": ["127.0.0.1:1"],
        "labels": {"job": "gradmon-x"},
    }


def test_webhook_receiver_collects_posts() -> None:
    got: list[dict[str, Any]] = []
    with WebhookReceiver(on_payload=got.append) as receiver:
        payload = {"alerts": [{"status": "firing", "labels": {"alertname": "A"}}]}
        http_json(receiver.url, data=b"{}")  # an empty payload is collected too
        assert receiver.payloads == [{}]
        request = urllib.request.Request(receiver.url, data=json.dumps(payload).encode())
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        assert receiver.payloads == [{}, payload] and got == [{}, payload]
        assert receiver.alerts() == payload["alerts"]
    with pytest.raises(LocalStackError, match="not started"):
        _ = receiver.url


def test_step_delay_paces_the_run() -> None:
    steps, delay = 6, 0.05
    result = run_demo("nonfinite", steps=steps, port=0, live=False, step_delay=delay)
    assert result.seconds >= steps * delay
    assert math.isfinite(result.final_loss)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step_delay": -1}, "step_delay"),
        ({"step_delay": math.nan}, "step_delay"),
        ({"hold": -0.5}, "hold"),
        ({"with_prometheus": "yes"}, "with_prometheus"),
        ({"with_prometheus": True, "config": {"exporter": {"enabled": False}}}, "disabled"),
    ],
)
def test_demo_prometheus_arguments_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(GradmonError, match=match):
        run_demo("healthy", steps=1, port=0, live=False, **kwargs)


def test_demo_with_prometheus_needs_a_plain_exporter(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n", encoding="utf-8")
    auth = {"username": "u", "password_file": str(secret)}
    with pytest.raises(GradmonError, match="plain HTTP"):
        run_demo(
            "healthy",
            steps=1,
            port=0,
            live=False,
            config={"exporter": {"basic_auth": auth}},
            with_prometheus=True,
        )
