"""deploy/compose.yaml is safe by default: every port on loopback unless GRADMON_BIND says
otherwise, no default Grafana password (compose refuses to start without one), no
Prometheus lifecycle or admin API. The compose Prometheus scrapes the Pushgateway
(exporter.push) the way the README says. (Pinned images, mounts and the agent's scrape
job: tests/ops/test_dashboards.py.)

Compose's variable interpolation (`${VAR:-default}`, `${VAR:?error}`) is applied here as
compose documents it, so the checks hold without Docker (Docker's compose plugin is not a
Debian package, and Debian's docker-compose 1.x cannot read a current compose file).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_PROMETHEUS = DEPLOY / "prometheus" / "prometheus.compose.yml"

_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


class MissingVariable(ValueError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of one parsed value (strings inside lists and dicts)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        have = env.get(name)
        unset_or_empty = not have if op and op.startswith(":") else have is None
        if op in (":-", "-"):
            return arg if unset_or_empty else str(have)
        if op in (":?", "?"):
            if unset_or_empty:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return str(have)
        return have or ""

    return _VAR.sub(sub, value)


def compose(**env: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return dict(interpolate(doc, env))


OK = {"GRAFANA_ADMIN_PASSWORD": "a-password-the-user-chose"}


def published(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host ip, host port, container port) of each short-syntax port."""
    out = []
    for port in service.get("ports", []):
        parts = str(port).split(":")
        assert len(parts) == 3, f"{port!r}: publish with an explicit host address"
        out.append((parts[0], parts[1], parts[2]))
    return out


def test_every_port_is_on_loopback_by_default() -> None:
    services = compose(**OK)["services"]
    ports = {name: published(s) for name, s in services.items()}
    assert {name: [p[1] for p in ps] for name, ps in ports.items()} == {
        "prometheus": ["9090"],
        "alertmanager": ["9093"],
        "pushgateway": ["9091"],
        "grafana": ["3000"],
    }
    for name, ps in ports.items():
        for host_ip, _, _ in ps:
            assert host_ip == "127.0.0.1", f"{name} published on {host_ip}"
        assert "network_mode" not in services[name]  # host networking would bypass it


def test_exposing_the_ports_is_one_documented_variable() -> None:
    services = compose(**OK, GRADMON_BIND="0.0.0.0")["services"]
    for service in services.values():
        assert all(host_ip == "0.0.0.0" for host_ip, _, _ in published(service))
    text = COMPOSE.read_text(encoding="utf-8")
    assert "GRADMON_BIND=0.0.0.0 docker compose" in text


def test_grafana_has_no_default_password() -> None:
    with pytest.raises(MissingVariable, match="GRAFANA_ADMIN_PASSWORD"):
        compose()  # compose refuses to start
    with pytest.raises(MissingVariable, match="GRAFANA_ADMIN_PASSWORD"):
        compose(GRAFANA_ADMIN_PASSWORD="")
    env = compose(**OK)["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == OK["GRAFANA_ADMIN_PASSWORD"]
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]["grafana"]
    for key, value in raw["environment"].items():
        if "PASSWORD" in key or "SECRET" in key:
            assert str(value).startswith("${"), f"{key}: a literal secret in compose.yaml"
    assert "admin/admin" not in COMPOSE.read_text(encoding="utf-8")


def test_prometheus_has_no_lifecycle_or_admin_api() -> None:
    for name, service in compose(**OK)["services"].items():
        for arg in service.get("command", []):
            assert not arg.startswith("--web.enable-lifecycle"), name
            assert not arg.startswith("--web.enable-admin-api"), name
            assert not arg.startswith("--web.listen-address"), name
    # The reload that replaces POST /-/reload is documented.
    assert "kill -s SIGHUP prometheus" in COMPOSE.read_text(encoding="utf-8")


def _scrape_jobs() -> dict[str, dict[str, Any]]:
    conf = yaml.safe_load(COMPOSE_PROMETHEUS.read_text(encoding="utf-8"))
    return {job["job_name"]: job for job in conf["scrape_configs"]}


def test_prometheus_scrapes_the_pushgateway_service_with_honor_labels() -> None:
    services = compose(**OK)["services"]
    mounted = services["prometheus"]["volumes"][0].split(":")
    assert mounted[0] == "./prometheus" and mounted[1] == "/etc/prometheus"
    command = services["prometheus"]["command"]
    assert f"--config.file=/etc/prometheus/{COMPOSE_PROMETHEUS.name}" in command
    jobs = _scrape_jobs()
    assert set(jobs) == {"gradmon", "pushgateway"}
    # The pushed job/instance/grouping labels stay the run's: the rules select on them.
    gateway = jobs["pushgateway"]
    assert gateway["honor_labels"] is True
    ((host, port),) = [t.split(":") for t in gateway["static_configs"][0]["targets"]]
    assert host in services, f"{host} is no compose service"
    assert [p[2] for p in published(services[host])] == [port]


def test_pushgateway_keeps_its_groups_across_restarts() -> None:
    """A run that died before the Pushgateway restarted must still page GradmonPushStale."""
    service = compose(**OK)["services"]["pushgateway"]
    (store,) = [
        a.split("=", 1)[1] for a in service["command"] if a.startswith("--persistence.file=")
    ]
    volumes = dict(v.split(":", 1) for v in service["volumes"])
    assert any(store.startswith(path + "/") for path in volumes.values()), (store, volumes)
    assert all(name in compose(**OK)["volumes"] for name in volumes), volumes
