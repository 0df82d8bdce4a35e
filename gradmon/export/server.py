"""The /metrics HTTP server: prometheus_client's WSGI app behind optional TLS and basic auth.

prometheus_client's start_http_server has TLS but no authentication, so the server is
built here from the same parts: a threading WSGI server, its app, an SSL context. Secrets
(the password) are read once at start, compared in constant time, and never logged.

Clients that fail at the edge (a TLS handshake refused, a reset, a timeout) are counted
in gradmon_exporter_connection_errors_total{reason} and logged at most once a minute,
never as socketserver's traceback per connection: a port scan must not fill the
training log.
"""

from __future__ import annotations

import base64
import binascii
import errno
import gzip
import hmac
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import gzip_accepted
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gradmon.agent import distributed
from gradmon.config import ExporterConfig
from gradmon.errors import GradmonError
from gradmon.export.scrapes import Scrapes, observed

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

log = logging.getLogger("gradmon")

CONNECTION_ERRORS = "gradmon_exporter_connection_errors"
# tls: the handshake (or a later TLS record) failed, e.g. a client without a certificate
# under mutual TLS, or plain HTTP to the TLS port; reset: the client closed the connection
# abruptly; timeout: it said nothing for _QuietHandler.timeout seconds; other: the rest.
CONNECTION_ERROR_REASONS = ("tls", "reset", "timeout", "other")


def connection_error_reason(exc: BaseException) -> str:
    """The `reason` label of a failed client connection."""
    if isinstance(exc, TimeoutError):  # before OSError: socket.timeout is one
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, (ConnectionError, EOFError)):  # reset, aborted, broken pipe
        return "reset"
    return "other"


class ConnectionErrors(Collector):
    """Counts client connections that failed before an answer was sent, and logs them at
    most once per `log_interval` seconds (the first at once, later ones summed up)."""

    def __init__(
        self,
        log_interval: float = 60.0,
        rank: Callable[[], int | None] = distributed.rank_label,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counts = dict.fromkeys(CONNECTION_ERROR_REASONS, 0)
        self._unlogged = dict.fromkeys(CONNECTION_ERROR_REASONS, 0)
        self._lock = threading.Lock()
        self._log_interval = log_interval
        self._logged_at: float | None = None
        self._rank = rank
        self._clock = clock

    def record(self, exc: BaseException, peer: object) -> None:
        reason = connection_error_reason(exc)
        now = self._clock()
        with self._lock:
            self._counts[reason] += 1
            self._unlogged[reason] += 1
            if self._logged_at is not None and now - self._logged_at < self._log_interval:
                return
            self._logged_at = now
            summary = ", ".join(f"{r}: {n}" for r, n in self._unlogged.items() if n)
            total = sum(self._unlogged.values())
            self._unlogged = dict.fromkeys(CONNECTION_ERROR_REASONS, 0)
        log.warning(
            "gradmon: %d client connection(s) to the metrics endpoint failed (%s); "
            "the latest from %s: %s: %s (counted in %s_total; logged at most every %.0f s)",
            total,
            summary,
            _peer(peer),
            type(exc).__name__,
            exc,
            CONNECTION_ERRORS,
            self._log_interval,
        )

    def collect(self) -> Iterator[Metric]:
        rank = self._rank()
        names = ["reason"] + (["rank"] if rank is not None else [])
        family = CounterMetricFamily(
            CONNECTION_ERRORS,
            "Client connections to the metrics endpoint that failed before an answer "
            "(TLS handshake, reset, timeout)",
            labels=names,
        )
        with self._lock:
            counts = dict(self._counts)
        for reason, count in counts.items():
            family.add_metric([reason] + ([str(rank)] if rank is not None else []), count)
        yield family


def _peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hung scraper must never keep the training process alive
    connection_errors: ConnectionErrors

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that failed (no certificate, reset, silent) is counted and logged
        once a minute; socketserver would print a traceback for each connection."""
        exc = sys.exc_info()[1]
        if exc is not None:
            self.connection_errors.record(exc, client_address)


class _QuietHandler(WSGIRequestHandler):
    timeout = 30  # seconds a connection may idle; a stuck client frees its thread

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


def _read_password(path: str) -> bytes:
    try:
        secret = Path(path).read_bytes()
    except OSError as exc:
        raise GradmonError(
            f"exporter.basic_auth.password_file {path}: cannot read it ({exc.strerror or exc})"
        ) from None
    secret = secret.rstrip(b"\r\n")
    if not secret:
        raise GradmonError(f"exporter.basic_auth.password_file {path} is empty")
    return secret


def basic_auth(app: WSGIApp, username: str, password: bytes) -> WSGIApp:
    """Wrap a WSGI app: 401 unless the request carries these credentials."""
    expected_user = username.encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, encoded = header.partition(" ")
        ok = False
        if scheme.lower() == "basic":
            try:
                user, _, given = base64.b64decode(encoded, validate=True).partition(b":")
            except (binascii.Error, ValueError):
                user, given = b"", b""
            # Both compared, always: the time taken does not tell which one was wrong.
            user_ok = hmac.compare_digest(user, expected_user)
            password_ok = hmac.compare_digest(given, password)
            ok = user_ok and password_ok
        if ok:
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", 'Basic realm="gradmon"'), ("Content-Type", "text/plain")],
        )
        return [b"401 Unauthorized\n"]

    return guarded


def counted(app: WSGIApp, on_error: Callable[[BaseException], None]) -> WSGIApp:
    """Wrap a WSGI app: a failure while rendering is answered with a 500 and reported to
    `on_error` (counted, logged once) instead of wsgiref's traceback on stderr."""

    def safe(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return list(app(environ, start_response))
        except Exception as exc:
            on_error(exc)
            start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/plain")],
                sys.exc_info(),
            )
            return [b"gradmon: scrape failed (counted in gradmon_agent_errors_total)\n"]

    return safe


def cached_app(full: WSGIApp, render: Callable[[str], tuple[bytes, str]]) -> WSGIApp:
    """/metrics from `render(accept)` (GradmonCollector.exposition); what it does not
    cover (a `name[]` filter, other paths) goes to prometheus_client's app as before."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("QUERY_STRING") or environ.get("PATH_INFO") == "/favicon.ico":
            return full(environ, start_response)
        body, content_type = render(environ.get("HTTP_ACCEPT", ""))
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(body, compresslevel=1)  # 9x faster than 9 here, 12% larger
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return app


def throttled(app: WSGIApp, max_per_second: float) -> WSGIApp:
    """At most `max_per_second` requests handled per second, one at a time.

    The agent lives in the training process: every scrape's Python work (parsing the
    request, rendering the live families) takes the GIL from the training thread. Scrapers
    hammering /metrics would otherwise starve training (measured, bench/load.py, 1000
    layers: 9.6x slower steps with 6 busy scrapers and no limit); here the surplus waits on
    a lock or in sleep(), which holds no GIL, and only sees a slower answer. The limit
    bounds the harm, it does not make it small: at the default 10 a second the same run's
    steps took 1.56x as long; at 1 a second, 1.01-1.06x. Sending the body happens after
    the lock.
    """
    if max_per_second <= 0:
        return app
    interval = 1.0 / max_per_second
    lock = threading.Lock()
    next_at = 0.0

    def limited(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        nonlocal next_at
        with lock:
            wait = next_at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            next_at = time.monotonic() + interval
            return list(app(environ, start_response))

    return limited


def _tls_context(config: ExporterConfig) -> ssl.SSLContext | None:
    tls = config.tls
    if not (tls.certfile or tls.keyfile or tls.client_cafile):
        return None
    if not (tls.certfile and tls.keyfile):
        raise GradmonError(
            "exporter.tls needs both certfile and keyfile (client_cafile alone is not enough)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.certfile, tls.keyfile)
        if tls.client_cafile:
            context.load_verify_locations(cafile=tls.client_cafile)
            context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
    except (OSError, ssl.SSLError) as exc:
        raise GradmonError(
            f"exporter.tls: cannot load certfile {tls.certfile} / keyfile {tls.keyfile}"
            + (f" / client_cafile {tls.client_cafile}" if tls.client_cafile else "")
            + f": {exc}"
        ) from None
    return context


class MetricsServer:
    """Serves a registry on (addr, port) in a daemon thread, until close()."""

    def __init__(
        self,
        config: ExporterConfig,
        port: int,
        registry: CollectorRegistry,
        on_error: Callable[[BaseException], None] | None = None,
        render: Callable[[str], tuple[bytes, str]] | None = None,
        client_timeout: float = 30.0,  # seconds a connection may idle before it is dropped
    ) -> None:
        app: WSGIApp = make_wsgi_app(registry)
        if render is not None:
            app = cached_app(app, render)
        if on_error is not None:
            app = counted(app, on_error)
        auth = config.basic_auth
        if bool(auth.username) != bool(auth.password_file):
            raise GradmonError(
                "exporter.basic_auth needs both username and password_file, or neither"
            )
        if auth.username and auth.password_file:
            app = basic_auth(app, auth.username, _read_password(auth.password_file))
        app = throttled(app, config.max_scrapes_per_second)  # 401s count too
        self.scrapes = Scrapes()  # who scraped, how often: what close(linger) waits on
        app = observed(app, self.scrapes)  # outermost: a scrape counts once it was sent
        context = _tls_context(config)

        connection_errors = ConnectionErrors()

        class Server(_ThreadingServer):
            pass

        class Handler(_QuietHandler):
            pass

        # socketserver takes any number of seconds; its stub says int.
        Handler.timeout = client_timeout  # type: ignore[assignment]

        Server.connection_errors = connection_errors

        try:
            infos = socket.getaddrinfo(
                config.addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            Server.address_family = infos[0][0]
            httpd = make_server(str(infos[0][4][0]), port, app, Server, handler_class=Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise GradmonError(
                    f"exporter.port {port} on {config.addr} is already in use; choose another "
                    "port, or 0 for an ephemeral one (GRADMON_EXPORTER__PORT=0)"
                ) from None
            raise GradmonError(
                f"cannot serve metrics on {config.addr}:{port} (exporter.addr/port): {exc}"
            ) from None
        if context is not None:
            # Handshake lazily, in the request's own thread: done in accept(), one silent
            # client would block every other scrape.
            httpd.socket = context.wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server = httpd
        self._registry = registry
        self._connection_errors: ConnectionErrors | None = connection_errors
        try:
            registry.register(connection_errors)
        except ValueError:  # another server's counter is on this registry already
            self._connection_errors = None
        self.port: int = httpd.server_port
        self.tls = context is not None
        self._thread = threading.Thread(
            # Polled every 0.1 s for shutdown (the default 0.5 s is close()'s latency);
            # a wakeup costs a few microseconds.
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="gradmon-metrics",
            daemon=True,
        )
        self._closed = threading.Event()
        self._thread.start()

    def close(self, linger: float = 0.0) -> None:
        """Stop serving and free the port; the serve thread is joined (bounded).

        linger: first keep serving until every scraper still scraping has scraped once
        more (so it has seen what the registry shows now), at most this many seconds,
        and not at all when nothing scraped (scrapes.py)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if linger > 0:
            since = self.scrapes.clock()
            expected = self.scrapes.expected(since, linger)
            if expected:
                log.info(
                    "gradmon: serving /metrics until the final scrape by %s (at most %g s, "
                    "exporter.linger_seconds)",
                    ", ".join(expected),
                    linger,
                )
            missed = self.scrapes.wait_for_final(since, linger)
            if missed:
                log.info(
                    "gradmon: stopped serving /metrics without a final scrape by %s "
                    "(waited %.1f s)",
                    ", ".join(missed),
                    self.scrapes.clock() - since,
                )
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self._connection_errors is not None:
            self._registry.unregister(self._connection_errors)
            self._connection_errors = None

    def close_in_child(self) -> None:
        """In a forked child: close this process's copy of the listening socket only.

        No shutdown(): the serve thread is not in this process (shutdown() would wait
        for it forever), and shutdown(2) on the shared socket would stop the parent's.
        """
        self._closed = threading.Event()  # its lock may have been held at fork time
        self._closed.set()
        self._server.socket.close()
