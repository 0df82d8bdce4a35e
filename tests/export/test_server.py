"""The metrics endpoint's security: basic auth and (mutual) TLS, with real handshakes."""

from __future__ import annotations

import base64
import logging
import re
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from gradmon import GradmonError
from gradmon.config import ExporterConfig
from gradmon.export.server import ConnectionErrors, MetricsServer

SECRET = "s3cret-Passw0rd"


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("gradmon_test_events", "test", registry=reg).inc()
    return reg


def connection_errors(registry: CollectorRegistry, reason: str, within: float = 10.0) -> float:
    """gradmon_exporter_connection_errors_total{reason} once it is counted (the server's
    thread counts it), or its value after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = registry.get_sample_value(
            "gradmon_exporter_connection_errors_total", {"reason": reason}
        )
        if value or time.monotonic() > deadline:
            return value or 0.0
        time.sleep(0.05)


def get(
    url: str, auth: tuple[str, str] | None = None, context: ssl.SSLContext | None = None
) -> int:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            assert b"gradmon_test_events_total 1.0" in resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_basic_auth(
    tmp_path: Path, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(SECRET + "\n")  # a trailing newline, as editors leave it
    config = ExporterConfig(
        port=0, basic_auth={"username": "prom", "password_file": str(password_file)}
    )
    server = MetricsServer(config, 0, registry)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        assert get(url) == 401
        assert get(url, ("prom", "wrong")) == 401
        assert get(url, ("other", SECRET)) == 401
        assert get(url, ("prom", SECRET)) == 200
        request = urllib.request.Request(url, headers={"Authorization": "Basic !!notbase64"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 401
        assert err.value.headers["WWW-Authenticate"] == 'Basic realm="gradmon"'
    finally:
        server.close()
    assert SECRET not in caplog.text


def test_basic_auth_config_errors_never_show_the_secret(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    with pytest.raises(GradmonError, match="needs both username and password_file"):
        MetricsServer(ExporterConfig(port=0, basic_auth={"username": "prom"}), 0, registry)
    missing = tmp_path / "nope"
    with pytest.raises(GradmonError, match=r"password_file .*nope: cannot read it"):
        MetricsServer(
            ExporterConfig(basic_auth={"username": "u", "password_file": str(missing)}), 0, registry
        )
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(GradmonError, match="is empty"):
        MetricsServer(
            ExporterConfig(basic_auth={"username": "u", "password_file": str(empty)}), 0, registry
        )


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = str(d / "ca.key"), str(d / "ca.pem")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=gradmon test CA", "-keyout", ca_key, "-out", ca)  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))  # fmt: skip
    return d


def test_tls_handshake(pki: Path, registry: CollectorRegistry) -> None:
    config = ExporterConfig(
        port=0, tls={"certfile": str(pki / "server.pem"), "keyfile": str(pki / "server.key")}
    )
    server = MetricsServer(config, 0, registry)
    try:
        assert server.tls
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        assert get(f"https://127.0.0.1:{server.port}/metrics", context=context) == 200
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to TLS
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    finally:
        server.close()


def test_mutual_tls(pki: Path, registry: CollectorRegistry) -> None:
    config = ExporterConfig(
        port=0,
        tls={
            "certfile": str(pki / "server.pem"),
            "keyfile": str(pki / "server.key"),
            "client_cafile": str(pki / "ca.pem"),
        },
    )
    server = MetricsServer(config, 0, registry)
    url = f"https://127.0.0.1:{server.port}/metrics"
    try:
        anonymous = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            get(url, context=anonymous)
        with_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with_cert.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        assert get(url, context=with_cert) == 200
    finally:
        server.close()


def test_tls_config_errors(tmp_path: Path, registry: CollectorRegistry) -> None:
    with pytest.raises(GradmonError, match="needs both certfile and keyfile"):
        MetricsServer(ExporterConfig(tls={"certfile": "/x.pem"}), 0, registry)
    with pytest.raises(GradmonError, match=r"cannot load certfile .*missing\.pem"):
        MetricsServer(
            ExporterConfig(tls={"certfile": str(tmp_path / "missing.pem"), "keyfile": "/k"}),
            0,
            registry,
        )


def test_silent_client_does_not_block_tls_scrapes(pki: Path, registry: CollectorRegistry) -> None:
    import socket

    config = ExporterConfig(
        port=0, tls={"certfile": str(pki / "server.pem"), "keyfile": str(pki / "server.key")}
    )
    server = MetricsServer(config, 0, registry)
    try:
        with socket.create_connection(("127.0.0.1", server.port)):  # connects, says nothing
            context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
            assert get(f"https://127.0.0.1:{server.port}/metrics", context=context) == 200
    finally:
        server.close()


def test_scrapes_beyond_the_rate_limit_wait_and_still_succeed(registry: CollectorRegistry) -> None:
    """exporter.max_scrapes_per_second: a client hammering /metrics is slowed down (the
    surplus waits without the GIL), never refused; 0 lifts the limit."""
    import threading
    import time

    limited = MetricsServer(ExporterConfig(port=0, max_scrapes_per_second=20), 0, registry)
    try:
        url = f"http://127.0.0.1:{limited.port}/metrics"
        codes: list[int] = []
        started = time.monotonic()
        threads = [
            threading.Thread(target=lambda: codes.extend(get(url) for _ in range(3)))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        limited.close()
    assert codes == [200] * 12
    # 12 answers at 20 per second: at least 11 intervals of 50 ms (a lower bound: the
    # limiter sleeps; no upper bound is asserted on a shared machine).
    assert elapsed >= 11 * 0.05 * 0.95
    with pytest.raises(ValueError):
        ExporterConfig(max_scrapes_per_second=-1)
    free = MetricsServer(ExporterConfig(port=0, max_scrapes_per_second=0), 0, registry)
    try:
        assert get(f"http://127.0.0.1:{free.port}/metrics") == 200
    finally:
        free.close()


def _sample(server: MetricsServer, name: str, labels: str, context: ssl.SSLContext) -> float:
    url = f"https://127.0.0.1:{server.port}/metrics"
    with urllib.request.urlopen(url, timeout=10, context=context) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def test_clients_without_a_certificate_are_counted_not_printed(
    pki: Path,
    registry: CollectorRegistry,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: under mutual TLS each client without a certificate printed a full
    traceback (PEER_DID_NOT_RETURN_A_CERTIFICATE) on the training process's stderr."""
    config = ExporterConfig(
        port=0,
        tls={
            "certfile": str(pki / "server.pem"),
            "keyfile": str(pki / "server.key"),
            "client_cafile": str(pki / "ca.pem"),
        },
    )
    caplog.set_level(logging.WARNING, logger="gradmon")
    server = MetricsServer(config, 0, registry)
    url = f"https://127.0.0.1:{server.port}/metrics"
    with_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with_cert.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    name = "gradmon_exporter_connection_errors_total"
    try:
        assert _sample(server, name, 'reason="tls"', with_cert) == 0
        anonymous = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        for _ in range(5):
            with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
                get(url, context=anonymous)
        deadline = time.monotonic() + 10  # the server thread may count after the client gave up
        while _sample(server, name, 'reason="tls"', with_cert) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sample(server, name, 'reason="tls"', with_cert) == 5
        assert _sample(server, name, 'reason="reset"', with_cert) == 0
    finally:
        server.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err
    records = [r for r in caplog.records if "metrics endpoint failed" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in records]  # once a minute, not 5 times
    message = records[0].getMessage()
    assert "127.0.0.1:" in message and "tls: 1" in message, message
    assert records[0].exc_info is None


def test_a_client_reset_mid_request_is_counted(
    registry: CollectorRegistry, capfd: pytest.CaptureFixture[str]
) -> None:
    import socket
    import struct

    server = MetricsServer(ExporterConfig(port=0), 0, registry)
    try:
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the headers never end
        time.sleep(0.2)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST, not FIN
        assert connection_errors(registry, "reset") == 1
    finally:
        server.close()
    assert "Traceback" not in capfd.readouterr().err
    # close() takes the counter off the registry with the server
    assert (
        registry.get_sample_value("gradmon_exporter_connection_errors_total", {"reason": "tls"})
        is None
    )


def test_a_silent_client_is_counted_as_a_timeout(
    registry: CollectorRegistry, capfd: pytest.CaptureFixture[str]
) -> None:
    import socket

    server = MetricsServer(ExporterConfig(port=0), 0, registry, client_timeout=0.3)
    try:
        with socket.create_connection(("127.0.0.1", server.port)):  # says nothing
            assert connection_errors(registry, "timeout") == 1
    finally:
        server.close()
    assert "Traceback" not in capfd.readouterr().err


def test_connection_errors_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    errors = ConnectionErrors(log_interval=60, rank=lambda: 3, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="gradmon")
    errors.record(ssl.SSLError(1, "PEER_DID_NOT_RETURN_A_CERTIFICATE"), ("10.0.0.7", 40000))
    now[0] = 30
    errors.record(TimeoutError("timed out"), ("10.0.0.8", 40001))
    errors.record(ConnectionResetError(104, "reset"), ("fd00::1", 40002))
    assert len(caplog.records) == 1 and "10.0.0.7:40000" in caplog.records[0].getMessage()
    now[0] = 61
    errors.record(OSError("odd"), ("10.0.0.9", 40003))
    assert len(caplog.records) == 2
    second = caplog.records[1].getMessage()
    assert "3 client connection(s)" in second, second
    assert "reset: 1, timeout: 1, other: 1" in second and "10.0.0.9:40003" in second, second
    (family,) = errors.collect()
    counts = {s.labels["reason"]: s.value for s in family.samples}
    assert counts == {"tls": 1, "reset": 1, "timeout": 1, "other": 1}
    assert {s.labels["rank"] for s in family.samples} == {"3"}
