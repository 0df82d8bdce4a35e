"""`LocalStack`: Prometheus and Alertmanager processes on loopback, their config, their
targets (file_sd) and the queries the demo and the tests ask them."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from gradmon.tools.localstack.common import (
    HTTP_TIMEOUT,
    LOOPBACK,
    OPENER,
    LocalStackError,
    Served,
    Target,
    duration,
    find_binary,
    free_port,
    http_json,
    is_loopback,
    tail,
    terminate,
)

__all__ = ["LocalStack"]


# -------------------------------------------------------------------------- the stack
# Strong references: a started stack that its owner dropped is still stopped at exit.
_RUNNING: set[LocalStack] = set()


@atexit.register
def _stop_all() -> None:
    for stack in list(_RUNNING):
        stack.stop()


class LocalStack(Served):
    """Prometheus + Alertmanager on 127.0.0.1, for one process's lifetime at most.

    rules_files: Prometheus rule files to load. targets: scrape targets at start (more with
    set_target). webhook_url: where Alertmanager sends every alert (None: nowhere; the
    alerts are still listed in its UI/API). inhibit_rules: Alertmanager inhibit_rules
    (e.g. the shipped alertmanager.yml's). pushgateways: `host:port`s scraped as job
    `pushgateway` with honor_labels (the pushed job and grouping labels are kept).
    Intervals are seconds.
    """

    def __init__(
        self,
        rules_files: Sequence[str | os.PathLike[str]] = (),
        *,
        targets: Sequence[Target] = (),
        webhook_url: str | None = None,
        scrape_interval: float = 1.0,
        evaluation_interval: float = 1.0,
        group_wait: float = 1.0,
        group_interval: float = 1.0,
        repeat_interval: float = 3600.0,
        group_by: Sequence[str] = ("alertname", "job"),
        inhibit_rules: Sequence[Mapping[str, Any]] = (),
        sample_limit: int = 6000,
        pushgateways: Sequence[str] = (),
        prometheus_bin: str | os.PathLike[str] | None = None,
        alertmanager_bin: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.rules_files = [Path(p).resolve() for p in rules_files]
        for path in self.rules_files:
            if not path.is_file():
                raise LocalStackError(f"rules file {path} does not exist")
        if webhook_url is not None and not is_loopback(urllib.parse.urlsplit(webhook_url).hostname):
            raise LocalStackError(
                f"webhook_url {webhook_url!r}: the local stack only talks to loopback"
            )
        self.webhook_url = webhook_url
        for target in targets:
            _check_target(target)
        self._initial_targets = list(targets)
        self.scrape_interval = duration(scrape_interval)
        self.evaluation_interval = duration(evaluation_interval)
        self._am_timers = {
            "group_wait": duration(group_wait),
            "group_interval": duration(group_interval),
            "repeat_interval": duration(repeat_interval),
        }
        self.group_by = list(group_by)
        self.inhibit_rules = [dict(r) for r in inhibit_rules]
        self.sample_limit = sample_limit
        for address in pushgateways:
            _check_target(Target(address))
        self.pushgateways = list(pushgateways)
        self._bins = (prometheus_bin, alertmanager_bin)
        self.startup_timeout = startup_timeout
        self.workdir: Path | None = None
        self.prometheus_port: int | None = None
        self.alertmanager_port: int | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._alerts_page: str | None = None

    # -- addresses
    @property
    def prometheus_url(self) -> str:
        if self.prometheus_port is None:
            raise LocalStackError("the local stack is not started")
        return f"http://{LOOPBACK}:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        if self.alertmanager_port is None:
            raise LocalStackError("the local stack is not started")
        return f"http://{LOOPBACK}:{self.alertmanager_port}"

    @property
    def alerts_page_url(self) -> str:
        """Prometheus' alerts page: /alerts, or /classic/alerts where the build has only
        the classic UI (Debian's package)."""
        base = self.prometheus_url
        if self._alerts_page is None:
            self._alerts_page = f"{base}/alerts"
            with contextlib.suppress(urllib.error.URLError, OSError):
                with OPENER.open(f"{base}/classic/alerts", timeout=HTTP_TIMEOUT):
                    pass
                try:
                    with OPENER.open(self._alerts_page, timeout=HTTP_TIMEOUT):
                        pass
                except urllib.error.HTTPError:
                    self._alerts_page = f"{base}/classic/alerts"
        return self._alerts_page

    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs.values())

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items()}

    # -- lifecycle
    def start(self) -> LocalStack:
        if self._procs:
            return self
        prometheus = find_binary("prometheus", self._bins[0])
        alertmanager = find_binary("alertmanager", self._bins[1])
        self.workdir = Path(tempfile.mkdtemp(prefix="gradmon-localstack-"))
        (self.workdir / "targets").mkdir()
        _RUNNING.add(self)
        try:
            for target in self._initial_targets:
                self.set_target(target)
            self._start_alertmanager(alertmanager)
            self._start_prometheus(prometheus)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_alertmanager(self, binary: str) -> None:
        assert self.workdir is not None
        receiver: dict[str, Any] = {"name": "gradmon"}
        if self.webhook_url is not None:
            receiver["webhook_configs"] = [{"url": self.webhook_url, "send_resolved": True}]
        config: dict[str, Any] = {
            "route": {"receiver": "gradmon", "group_by": self.group_by, **self._am_timers},
            "receivers": [receiver],
        }
        if self.inhibit_rules:
            config["inhibit_rules"] = self.inhibit_rules
        path = self.workdir / "alertmanager.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        (self.workdir / "alertmanager").mkdir()

        def argv(port: int) -> list[str]:
            return [
                binary,
                f"--config.file={path}",
                f"--storage.path={self.workdir}/alertmanager",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--cluster.listen-address=",  # no clustering, no gossip port
                "--log.level=warn",
            ]

        self.alertmanager_port = self._spawn("alertmanager", argv)

    def _start_prometheus(self, binary: str) -> None:
        assert self.workdir is not None and self.alertmanager_port is not None
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "rule_files": [str(p) for p in self.rules_files],
            "alerting": {
                "alertmanagers": [
                    {"static_configs": [{"targets": [f"{LOOPBACK}:{self.alertmanager_port}"]}]}
                ]
            },
            "scrape_configs": [
                {
                    # The rules select up{job=~"gradmon.*"}; targets set their own job.
                    "job_name": "gradmon",
                    "sample_limit": self.sample_limit,
                    "file_sd_configs": [
                        {"files": [str(self.workdir / "targets" / "*.json")]},
                    ],
                }
            ],
        }
        if self.pushgateways:
            config["scrape_configs"].append(
                {
                    "job_name": "pushgateway",
                    "honor_labels": True,  # keep the pushed job/instance/grouping labels
                    "static_configs": [{"targets": self.pushgateways}],
                }
            )
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        (self.workdir / "prometheus").mkdir()

        def argv(port: int) -> list[str]:
            return [
                binary,
                f"--config.file={path}",
                f"--storage.tsdb.path={self.workdir}/prometheus",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--log.level=warn",
            ]

        self.prometheus_port = self._spawn("prometheus", argv)

    def _spawn(self, name: str, argv: Callable[[int], list[str]]) -> int:
        """Start `name` on a free port, wait for /-/ready; a few tries if the port is
        taken between choosing and binding it."""
        assert self.workdir is not None
        log = self.workdir / f"{name}.log"
        for attempt in range(3):
            port = free_port()
            with log.open("ab") as out:
                proc = subprocess.Popen(
                    argv(port), stdin=subprocess.DEVNULL, stdout=out, stderr=out
                )
            self._procs[name] = proc
            url = f"http://{LOOPBACK}:{port}/-/ready"
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                try:
                    with OPENER.open(url, timeout=1.0) as response:
                        if response.status == 200:
                            return port
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.1)
            terminate(proc)
            del self._procs[name]
            log_tail = tail(log)
            if "address already in use" in log_tail and attempt < 2:
                continue
            reason = (
                f"exited with code {proc.returncode}"
                if proc.returncode not in (None, -15, -9)
                else f"not ready within {self.startup_timeout:g} s"
            )
            raise LocalStackError(f"{name} {reason}; the end of {log}:\n{log_tail}")
        raise LocalStackError(f"{name}: no free port")  # pragma: no cover

    def stop(self) -> None:
        """Terminate both processes (kill after STOP_TIMEOUT) and remove the workdir."""
        with self._lock:
            procs, self._procs = self._procs, {}
            # Prometheus first: it would otherwise keep sending to a stopped Alertmanager.
            for name in ("prometheus", "alertmanager"):
                if name in procs:
                    terminate(procs[name])
            self._alerts_page = None
            self.prometheus_port = self.alertmanager_port = None
            workdir, self.workdir = self.workdir, None
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            _RUNNING.discard(self)

    # -- targets
    def set_target(self, target: Target) -> None:
        """Scrape `target` (replacing an earlier one of the same job)."""
        if self.workdir is None:
            raise LocalStackError("the local stack is not started")
        _check_target(target)
        path = self.workdir / "targets" / f"{_safe(target.job)}.json"
        tmp = path.with_suffix(".tmp")  # not *.json: file_sd never reads a half-written file
        tmp.write_text(json.dumps([target.group()]), encoding="utf-8")
        os.replace(tmp, path)

    def remove_target(self, job: str, wait: float = 0.0) -> bool:
        """Stop scraping the target of `job`; its series go stale once Prometheus drops it
        (about 5 s). wait: up to this many seconds for that; True when it has."""
        if self.workdir is None:
            return True
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / "targets" / f"{_safe(job)}.json").unlink()
        deadline = time.monotonic() + wait
        while True:
            try:
                if not self.targets(job):
                    return True
            except LocalStackError:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    # -- Prometheus' and Alertmanager's HTTP APIs
    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET Prometheus' /api/v1/<path> and return its `data`."""
        body = http_json(f"{self.prometheus_url}/api/v1/{path}", params)
        if not isinstance(body, dict) or body.get("status") != "success":
            raise LocalStackError(f"Prometheus /api/v1/{path}: {body!r}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query (at a Unix time, default now); the result's series."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", params)
        kind, result = data["resultType"], data["result"]
        if kind in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        series: list[dict[str, Any]] = result
        return series

    def targets(self, job: str | None = None) -> list[dict[str, Any]]:
        """Prometheus' active targets, of one job or all."""
        active: list[dict[str, Any]] = self.api("targets", {"state": "active"})["activeTargets"]
        return [t for t in active if job is None or t.get("labels", {}).get("job") == job]

    def wait_for_scrape(self, job: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until Prometheus has scraped `job`'s target successfully; return it."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            seen = self.targets(job)
            for target in seen:
                if target.get("health") == "up":
                    return target
            time.sleep(0.2)
        state = ", ".join(
            f"{t.get('scrapeUrl')}: {t.get('lastError') or t.get('health')}" for t in seen
        )
        raise LocalStackError(
            f"Prometheus has not scraped job {job!r} within {timeout:g} s "
            f"({state or 'not discovered yet'})"
        )

    def alerts(self) -> list[dict[str, Any]]:
        """Prometheus' pending and firing alerts (/api/v1/alerts)."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def alertmanager_alerts(self) -> list[dict[str, Any]]:
        """The alerts Alertmanager holds (/api/v2/alerts), inhibited ones included."""
        alerts: list[dict[str, Any]] = http_json(f"{self.alertmanager_url}/api/v2/alerts")
        return alerts


def _check_target(target: Target) -> None:
    host = urllib.parse.urlsplit(f"//{target.address}").hostname
    if not is_loopback(host):
        raise LocalStackError(
            f"target {target.address!r}: the local stack only scrapes loopback addresses "
            "(127.0.0.1:PORT, localhost:PORT, [::1]:PORT)"
        )


def _safe(job: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in job) or "_"
