"""`gradmon demo --with-prometheus`: the run as a target of a local Prometheus and
Alertmanager (gradmon.tools.localstack), with the shipped alert rules and a webhook that
prints each alert Alertmanager delivers."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gradmon
from gradmon.config import Config, HealthConfig, read_yaml
from gradmon.errors import GradmonError
from gradmon.tools.localstack import LOOPBACK, LocalStack, Target, WebhookReceiver

__all__ = ["SCRAPE_WAIT_SECONDS", "beside_prometheus"]

SCRAPE_WAIT_SECONDS = 30.0  # the first scrape must come within this

REPO = Path(__file__).resolve().parents[3]
SHIPPED_RULES = REPO / "deploy" / "prometheus" / "rules" / "gradmon.rules.yml"
SHIPPED_ALERTMANAGER = REPO / "deploy" / "alertmanager" / "alertmanager.yml"


def _rules_file(health: HealthConfig, resources: contextlib.ExitStack) -> Path:
    """The shipped rules file when this is a checkout and the run uses the default
    thresholds; otherwise rules rendered from the run's health config."""
    if SHIPPED_RULES.is_file() and health == Config().health:
        return SHIPPED_RULES
    from gradmon.ops.rules import render

    workdir = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="gradmon-rules-")))
    path = workdir / "gradmon.rules.yml"
    path.write_text(render(Config(health=health)), encoding="utf-8")
    return path


def _shipped_inhibit_rules() -> list[dict[str, Any]]:
    """The shipped Alertmanager config's inhibit rules (none outside a checkout)."""
    if not SHIPPED_ALERTMANAGER.is_file():
        return []
    rules = read_yaml(SHIPPED_ALERTMANAGER).get("inhibit_rules") or []
    return [dict(r) for r in rules if isinstance(r, Mapping)]


def _print_delivery(payload: dict[str, Any]) -> None:
    for alert in payload.get("alerts", []):
        labels = alert.get("labels", {})
        summary = alert.get("annotations", {}).get("summary", "")
        print(
            f"alertmanager -> webhook: [{alert.get('status', '?')}] "
            f"{labels.get('alertname', '?')}: {summary}",
            flush=True,
        )


def _target_host(addr: str) -> str:
    """Where Prometheus reaches an exporter bound to `addr`."""
    if addr in ("", "0.0.0.0", "::", "localhost"):
        return LOOPBACK
    return f"[{addr}]" if ":" in addr else addr


def beside_prometheus(
    with_prometheus: bool | LocalStack,
    mon: gradmon.Monitor,
    scenario: str,
    step_delay: float,
    resources: contextlib.ExitStack,
) -> None:
    """Have Prometheus scrape the run: a stack of our own, or the caller's; wait for the
    first scrape, so the run's first steps are seen."""
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
    target = Target(
        f"{_target_host(mon.config.exporter.addr)}:{mon.port}", job=f"gradmon-{scenario}"
    )
    if isinstance(with_prometheus, LocalStack):
        stack = with_prometheus
        stack.set_target(target)
        # Closing the exporter while Prometheus still scrapes it would be a target down.
        resources.callback(stack.remove_target, target.job, SCRAPE_WAIT_SECONDS)
    else:
        rules = _rules_file(mon.config.health, resources)
        receiver = resources.enter_context(WebhookReceiver(on_payload=_print_delivery))
        stack = LocalStack(
            [rules],
            targets=[target],
            webhook_url=receiver.url,
            inhibit_rules=_shipped_inhibit_rules(),
        )
        resources.enter_context(stack)
        print(
            f"Prometheus:   {stack.alerts_page_url}  (scrapes {target.address} every "
            f"{stack.scrape_interval}, rules {rules})\n"
            f"Alertmanager: {stack.alertmanager_url}/#/alerts  (delivers to {receiver.url})\n"
            f"pacing: at least {step_delay:.3g} s per step; an alert fires once its "
            "condition has held for the rule's `for` (1m to 15m in the shipped rules): "
            "--hold SECONDS keeps everything up after the run\n"
            "waiting for Prometheus' first scrape (up to ~10 s) ...",
            flush=True,
        )
    stack.wait_for_scrape(target.job, timeout=SCRAPE_WAIT_SECONDS)
