"""`gradmon demo --with-prometheus`: the run as a target of a local Prometheus and
Alertmanager (gradmon.tools.localstack), with the production alert rules rendered with
time-scaled windows (demo/rules.py) and a webhook that prints each alert Alertmanager
delivers; an AlertWatch follows the run's alerts for the view and the summary."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gradmon
from gradmon.config import Config, read_yaml
from gradmon.errors import GradmonError
from gradmon.tools.demo.alerts import AlertWatch
from gradmon.tools.demo.rules import (
    EXPECTED_ALERTS,
    TIME_SCALE,
    demo_options,
    differences,
    write_rules,
)
from gradmon.tools.localstack import LOOPBACK, LocalStack, Target, WebhookReceiver

__all__ = ["SCRAPE_WAIT_SECONDS", "beside_prometheus"]

SCRAPE_WAIT_SECONDS = 30.0  # the first scrape must come within this

REPO = Path(__file__).resolve().parents[3]
SHIPPED_RULES = REPO / "deploy" / "prometheus" / "rules" / "gradmon.rules.yml"
SHIPPED_ALERTMANAGER = REPO / "deploy" / "alertmanager" / "alertmanager.yml"


def _shipped_inhibit_rules() -> list[dict[str, Any]]:
    """The shipped Alertmanager config's inhibit rules (none outside a checkout)."""
    if not SHIPPED_ALERTMANAGER.is_file():
        return []
    rules = read_yaml(SHIPPED_ALERTMANAGER).get("inhibit_rules") or []
    return [dict(r) for r in rules if isinstance(r, Mapping)]


def _target_host(addr: str) -> str:
    """Where Prometheus reaches an exporter bound to `addr`."""
    if addr in ("", "0.0.0.0", "::", "localhost"):
        return LOOPBACK
    return f"[{addr}]" if ":" in addr else addr


def _check_exporter(mon: gradmon.Monitor) -> None:
    if mon.port is None:
        raise GradmonError(
            "run_demo(with_prometheus=...): the exporter is disabled (exporter.enabled: "
            "false), so there is nothing for Prometheus to scrape"
        )
    exporter = mon.config.exporter
    if exporter.tls.certfile is not None or exporter.basic_auth.username is not None:
        raise GradmonError(
            "run_demo(with_prometheus=...): the local Prometheus scrapes plain HTTP without "
            "credentials; leave exporter.tls and exporter.basic_auth unset for the demo"
        )


def _rules_note(config: Config, scenario: str, rules: Path) -> str:
    """What the output says about the demo's rules and how production's differ."""
    production = SHIPPED_RULES if SHIPPED_RULES.is_file() else "`gradmon rules`"
    expected = EXPECTED_ALERTS.get(scenario)
    expect = (
        f"this scenario should fire {expected}"
        if expected
        else "this scenario should fire no alert"
    )
    return (
        f"alert rules: the production rules (gradmon/ops/rules.py, this run's health "
        f"thresholds) with every `for` and range window {TIME_SCALE}x shorter, so that "
        f"alerts fire within the demo (1 min in production = 1 s here): {rules}\n"
        f"how the production rules ({production}) differ:\n"
        f"{differences(config, demo_options())}\n"
        f"{expect}"
    )


def beside_prometheus(
    with_prometheus: bool | LocalStack,
    mon: gradmon.Monitor,
    scenario: str,
    step_delay: float,
    resources: contextlib.ExitStack,
) -> AlertWatch:
    """Have Prometheus scrape the run: a stack of our own, or the caller's; wait for the
    first scrape, so the run's first steps are seen. The AlertWatch follows the run's
    alerts (and, with a stack of our own, Alertmanager's deliveries) until the run ends."""
    _check_exporter(mon)
    target = Target(
        f"{_target_host(mon.config.exporter.addr)}:{mon.port}", job=f"gradmon-{scenario}"
    )
    watch = AlertWatch(target.job, sees_deliveries=not isinstance(with_prometheus, LocalStack))
    if isinstance(with_prometheus, LocalStack):
        stack = with_prometheus
        stack.set_target(target)
        # Closing the exporter while Prometheus still scrapes it would be a target down.
        resources.callback(stack.remove_target, target.job, SCRAPE_WAIT_SECONDS)
    else:
        config = mon.config
        workdir = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="gradmon-")))
        rules = write_rules(workdir / "gradmon-demo.rules.yml", config, demo_options())
        receiver = resources.enter_context(WebhookReceiver(on_payload=watch.delivered))
        stack = LocalStack(
            [rules],
            targets=[target],
            webhook_url=receiver.url,
            inhibit_rules=_shipped_inhibit_rules(),
        )
        resources.enter_context(stack)
        print(
            f"Prometheus:   {stack.alerts_page_url}  (scrapes {target.address} every "
            f"{stack.scrape_interval})\n"
            f"Alertmanager: {stack.alertmanager_url}/#/alerts  (delivers to {receiver.url})\n"
            f"{_rules_note(config, scenario, rules)}\n"
            f"pacing: at least {step_delay:.3g} s per step; --hold SECONDS keeps everything "
            "up after the run\n"
            "waiting for Prometheus' first scrape (up to ~10 s) ...",
            flush=True,
        )
    resources.callback(watch.stop)  # before the stack stops (callbacks run in reverse)
    watch.start(stack)
    stack.wait_for_scrape(target.job, timeout=SCRAPE_WAIT_SECONDS)
    return watch
