"""A local Prometheus and Alertmanager on loopback, for `gradmon demo --with-prometheus`
and the end-to-end tests.

    with LocalStack(["deploy/prometheus/rules/gradmon.rules.yml"],
                    targets=[Target("127.0.0.1:9400", job="gradmon")],
                    webhook_url=receiver.url) as stack:
        print(stack.prometheus_url, stack.alertmanager_url)

Both servers listen on 127.0.0.1 only, on free ports, with their storage in a temporary
directory that is removed on stop. Prometheus scrapes every `scrape_interval` (1 s by
default, far shorter than a production setup: a demo run lasts seconds to minutes) and
evaluates the rules as often; its targets come from a file_sd directory, so targets can
be added and removed while it runs (`set_target`, `remove_target`), which picks them up
within about 10 s (Prometheus throttles discovery updates to one per 5 s twice over).
Alertmanager routes every alert to one webhook (or nowhere) with short group timers.

The processes are stopped by `stop()`, the context manager, or at interpreter exit
(atexit), whichever comes first: terminate, wait, kill.

`WebhookReceiver` is an HTTP server on 127.0.0.1 that collects the JSON Alertmanager POSTs.
"""

from __future__ import annotations

import atexit
import contextlib
import http.server
import ipaddress
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from gradmon.errors import GradmonError

__all__ = [
    "LOOPBACK",
    "LocalStack",
    "LocalStackError",
    "MissingBinaryError",
    "Target",
    "WebhookReceiver",
    "find_binary",
]

LOOPBACK = "127.0.0.1"

# binary -> (names to look for on PATH, Debian/Ubuntu package). Debian installs
# Alertmanager as `prometheus-alertmanager`; upstream tarballs call it `alertmanager`.
_BINARIES: dict[str, tuple[tuple[str, ...], str]] = {
    "prometheus": (("prometheus",), "prometheus"),
    "alertmanager": (("alertmanager", "prometheus-alertmanager"), "prometheus-alertmanager"),
}

STOP_TIMEOUT = 10.0  # seconds from SIGTERM to SIGKILL
_HTTP_TIMEOUT = 5.0
# Never through a proxy from the environment: everything here is on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LocalStackError(GradmonError):
    """The local Prometheus/Alertmanager could not be started or asked."""


class MissingBinaryError(LocalStackError):
    """A binary the local stack needs is not on PATH."""

    def __init__(self, binary: str, names: Sequence[str], package: str) -> None:
        self.binary = binary
        self.package = package
        looked = " or ".join(f"`{n}`" for n in names)
        super().__init__(
            f"{binary} is not installed: no {looked} on PATH. Install it (Debian/Ubuntu: "
            f"`apt-get install {package}`)"
        )


def find_binary(binary: str, path: str | os.PathLike[str] | None = None) -> str:
    """The path of `prometheus` or `alertmanager`; MissingBinaryError names the package."""
    if binary not in _BINARIES:
        raise LocalStackError(f"unknown binary {binary!r}; one of {', '.join(_BINARIES)}")
    names, package = _BINARIES[binary]
    if path is not None:
        found = shutil.which(os.fspath(path))
        if found is None:
            raise LocalStackError(f"{binary}_bin={os.fspath(path)!r} is not an executable")
        return found
    for name in names:
        found = shutil.which(name)
        if found is not None:
            return found
    raise MissingBinaryError(binary, names, package)


@dataclass(frozen=True)
class Target:
    """A scrape target: `host:port` of a gradmon agent, its job label and extra labels."""

    address: str
    job: str = "gradmon"
    labels: Mapping[str, str] = field(default_factory=dict)

    def group(self) -> dict[str, Any]:
        """The file_sd target group. Target-group labels win over the scrape job's name."""
        return {"targets": [self.address], "labels": {**self.labels, "job": self.job}}


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _duration(value: float) -> str:
    """Seconds as a Prometheus duration (whole milliseconds)."""
    if not (math.isfinite(value) and value > 0):
        raise LocalStackError(f"a duration must be a positive number of seconds, not {value!r}")
    ms = max(1, round(value * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def http_json(
    url: str,
    params: Mapping[str, str] | None = None,
    *,
    data: bytes | None = None,
    timeout: float = _HTTP_TIMEOUT,
) -> Any:
    """GET (or POST `data`) a loopback URL and decode its JSON (None for an empty body);
    errors name the URL (without its query) and what failed."""
    full = f"{url}?{urllib.parse.urlencode(params)}" if params else url
    request = urllib.request.Request(full, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            text = response.read().decode("utf-8")
            return json.loads(text) if text.strip() else None
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", errors="replace")
        try:
            detail = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            detail = body
        raise LocalStackError(f"{url}: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LocalStackError(f"{url}: {exc}") from exc


# ------------------------------------------------------------------------ the webhook
class WebhookReceiver:
    """Collects Alertmanager's webhook POSTs (JSON) on http://127.0.0.1:<port>/.

    on_payload(payload) is called on the server's thread for each POST.
    """

    def __init__(self, on_payload: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._payloads: list[dict[str, Any]] = []
        self._on_payload = on_payload
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> WebhookReceiver:
        if self._server is not None:
            return self
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    payload = json.loads(body.decode("utf-8"))
                except ValueError:
                    self.send_response(400)
                    self.end_headers()
                    return
                receiver._received(payload)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # no access log on stderr

        self._server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="gradmon-webhook", daemon=True
        )
        self._thread.start()
        return self

    def _received(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        with self._lock:
            self._payloads.append(payload)
        if self._on_payload is not None:
            self._on_payload(payload)

    @property
    def url(self) -> str:
        if self._server is None:
            raise LocalStackError("the webhook receiver is not started")
        return f"http://{LOOPBACK}:{self._server.server_address[1]}/"

    @property
    def payloads(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._payloads)

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert of every payload so far, each with its `status` at delivery."""
        return [a for p in self.payloads for a in p.get("alerts", []) if isinstance(a, dict)]

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT)
            self._thread = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -------------------------------------------------------------------------- the stack
# Strong references: a started stack that its owner dropped is still stopped at exit.
_RUNNING: set[LocalStack] = set()


@atexit.register
def _stop_all() -> None:
    for stack in list(_RUNNING):
        stack.stop()


class LocalStack:
    """Prometheus + Alertmanager on 127.0.0.1, for one process's lifetime at most.

    rules_files: Prometheus rule files to load. targets: scrape targets at start (more with
    set_target). webhook_url: where Alertmanager sends every alert (None: nowhere; the
    alerts are still listed in its UI/API). inhibit_rules: Alertmanager inhibit_rules
    (e.g. the shipped alertmanager.yml's). Intervals are seconds.
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
        prometheus_bin: str | os.PathLike[str] | None = None,
        alertmanager_bin: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.rules_files = [Path(p).resolve() for p in rules_files]
        for path in self.rules_files:
            if not path.is_file():
                raise LocalStackError(f"rules file {path} does not exist")
        if webhook_url is not None and not _is_loopback(
            urllib.parse.urlsplit(webhook_url).hostname
        ):
            raise LocalStackError(
                f"webhook_url {webhook_url!r}: the local stack only talks to loopback"
            )
        self.webhook_url = webhook_url
        for target in targets:
            _check_target(target)
        self._initial_targets = list(targets)
        self.scrape_interval = _duration(scrape_interval)
        self.evaluation_interval = _duration(evaluation_interval)
        self._am_timers = {
            "group_wait": _duration(group_wait),
            "group_interval": _duration(group_interval),
            "repeat_interval": _duration(repeat_interval),
        }
        self.group_by = list(group_by)
        self.inhibit_rules = [dict(r) for r in inhibit_rules]
        self.sample_limit = sample_limit
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
                with _OPENER.open(f"{base}/classic/alerts", timeout=_HTTP_TIMEOUT):
                    pass
                try:
                    with _OPENER.open(self._alerts_page, timeout=_HTTP_TIMEOUT):
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
        config = {
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
            port = _free_port()
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
                    with _OPENER.open(url, timeout=1.0) as response:
                        if response.status == 200:
                            return port
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.1)
            _terminate(proc)
            del self._procs[name]
            tail = _tail(log)
            if "address already in use" in tail and attempt < 2:
                continue
            reason = (
                f"exited with code {proc.returncode}"
                if proc.returncode not in (None, -15, -9)
                else f"not ready within {self.startup_timeout:g} s"
            )
            raise LocalStackError(f"{name} {reason}; the end of {log}:\n{tail}")
        raise LocalStackError(f"{name}: no free port")  # pragma: no cover

    def stop(self) -> None:
        """Terminate both processes (kill after STOP_TIMEOUT) and remove the workdir."""
        with self._lock:
            procs, self._procs = self._procs, {}
            # Prometheus first: it would otherwise keep sending to a stopped Alertmanager.
            for name in ("prometheus", "alertmanager"):
                if name in procs:
                    _terminate(procs[name])
            self._alerts_page = None
            self.prometheus_port = self.alertmanager_port = None
            workdir, self.workdir = self.workdir, None
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            _RUNNING.discard(self)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

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
    if not _is_loopback(host):
        raise LocalStackError(
            f"target {target.address!r}: the local stack only scrapes loopback addresses "
            "(127.0.0.1:PORT, localhost:PORT, [::1]:PORT)"
        )


def _safe(job: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in job) or "_"


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
