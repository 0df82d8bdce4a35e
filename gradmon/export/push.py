"""exporter.push: the families /metrics serves, pushed to a Prometheus Pushgateway for jobs
that Prometheus cannot scrape (batch and SLURM jobs, spot instances: no service discovery,
gone before the next scrape).

A daemon thread pushes (HTTP PUT: the group's metrics are replaced) at start and every
`interval_seconds`; `close()` pushes once more. The registry's `gradmon_run_finished` is 1
by then when the run ended cleanly (the monitor says so before closing the pusher), so a
finished run is told apart from one that died (the Pushgateway keeps the last push of
both; `push_time_seconds` stops moving for both). The stale-push alert (GradmonPushStale,
gradmon/ops/rules.py) pages for the second kind only.

The group: `job` (exporter.push.job), `instance` (this host's name), the user's
`grouping` labels, and `rank` under several ranks, so ranks and hosts never overwrite each
other, and a restarted run (same host, same labels) takes its group over.

A failed push never reaches the training thread: it is counted in
gradmon_agent_errors_total{stage="push"}, logged once per failure episode (and again
when pushing works again), and the next push is tried at the next interval.
"""

from __future__ import annotations

import base64
import logging
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, push_to_gateway
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gradmon.config import PushConfig
from gradmon.errors import GradmonError
from gradmon.export import schema

__all__ = ["Pusher", "grouping_key"]

log = logging.getLogger("gradmon")

Handler = Callable[[str, str, float | None, list[tuple[str, str]], bytes], Callable[[], None]]


def grouping_key(cfg: PushConfig, rank: int | None, host: str | None = None) -> dict[str, str]:
    """instance (this host), the user's labels (which may replace it), rank under several
    ranks."""
    key = {"instance": host or socket.gethostname(), **cfg.grouping}
    if rank is not None:
        key["rank"] = str(rank)
    return key


def _read_password(path: str) -> str:
    try:
        secret = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise GradmonError(
            f"exporter.push.basic_auth.password_file {path}: cannot read it ({exc})"
        ) from None
    if not secret:
        raise GradmonError(f"exporter.push.basic_auth.password_file {path} is empty")
    return secret


def _tls_context(cfg: PushConfig) -> ssl.SSLContext | None:
    tls = cfg.tls
    if bool(tls.certfile) != bool(tls.keyfile):
        raise GradmonError("exporter.push.tls needs both certfile and keyfile, or neither")
    if not (tls.cafile or tls.certfile):
        return None  # urllib's default context for https://
    try:
        context = ssl.create_default_context(cafile=tls.cafile)
        if tls.certfile and tls.keyfile:
            context.load_cert_chain(tls.certfile, tls.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise GradmonError(f"exporter.push.tls: cannot load the files ({exc})") from None
    return context


def _handler(cfg: PushConfig) -> Handler:
    """prometheus_client's push handler, with basic auth and TLS like the exporter's."""
    auth = cfg.basic_auth
    if bool(auth.username) != bool(auth.password_file):
        raise GradmonError(
            "exporter.push.basic_auth needs both username and password_file, or neither"
        )
    header = None
    if auth.username and auth.password_file:
        token = f"{auth.username}:{_read_password(auth.password_file)}".encode()
        header = "Basic " + base64.b64encode(token).decode("ascii")
    context = _tls_context(cfg)

    def handler(
        url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes
    ) -> Callable[[], None]:
        def send() -> None:
            request = urllib.request.Request(url, data=data, method=method)
            for name, value in headers:
                request.add_header(name, value)
            if header is not None:
                request.add_header("Authorization", header)
            with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
                if response.status >= 400:
                    raise OSError(f"HTTP {response.status} from {url}")

        return send

    return handler


class _Payload(Collector):
    """What one push holds: the monitor's registry (gradmon_run_finished included) and the
    push interval, which the stale-push alert measures staleness in."""

    def __init__(self, source: CollectorRegistry, interval: float):
        self._source = source
        self._interval = interval

    def collect(self) -> Iterator[Metric]:
        yield from self._source.collect()
        family = schema.PUSH_INTERVAL
        yield GaugeMetricFamily(family.name, family.help, value=self._interval)


class Pusher:
    """Pushes `registry` to cfg.url from a daemon thread until close()."""

    def __init__(
        self,
        cfg: PushConfig,
        registry: CollectorRegistry,
        *,
        rank: Callable[[], int | None],
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        if cfg.url is None:
            raise GradmonError("exporter.push.url is not set")
        self.url = cfg.url
        self._cfg = cfg
        self._rank = rank
        self._on_error = on_error
        self._handler = _handler(cfg)  # reads the password, loads the TLS files: errors now
        self._payload = CollectorRegistry(auto_describe=False)
        self._payload.register(_Payload(registry, cfg.interval_seconds))
        self._lock = threading.Lock()  # one push at a time
        self._failures = 0
        self.pushes = 0  # successful pushes (tests, diagnostics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradmon-push", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.push()
        while not self._stop.wait(self._cfg.interval_seconds):
            self.push()

    def push(self) -> bool:
        """One push now; False (counted, logged once per episode) when it failed."""
        with self._lock:
            grouping = grouping_key(self._cfg, self._rank())
            try:
                push_to_gateway(
                    self.url,
                    job=self._cfg.job,
                    registry=self._payload,
                    grouping_key=grouping,
                    timeout=self._cfg.timeout_seconds,
                    handler=self._handler,
                )
            except Exception as exc:
                self._failures += 1
                self._on_error("push", exc)
                if self._failures == 1:
                    log.warning(
                        "gradmon: push to %s failed (counted in gradmon_agent_errors_total"
                        '{stage="push"}; training goes on, retried every %g s): %r',
                        self.url,
                        self._cfg.interval_seconds,
                        exc,
                    )
                return False
            if self._failures:
                log.warning(
                    "gradmon: pushing to %s again (%d pushes failed meanwhile)",
                    self.url,
                    self._failures,
                )
                self._failures = 0
            self.pushes += 1
            return True

    def close(self) -> None:
        """Stop the thread and push once more: the registry's final state, which says
        whether the run finished cleanly (gradmon_run_finished)."""
        self._stop.set()
        self._thread.join(timeout=self._cfg.interval_seconds + self._cfg.timeout_seconds)
        self.push()

    def drop(self) -> None:
        """In a forked child: no thread was copied; push nothing, ever."""
        self._stop.set()
