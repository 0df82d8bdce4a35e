"""The metrics endpoint's security: basic auth and (mutual) TLS, with real handshakes."""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from gradmon import GradmonError
from gradmon.config import ExporterConfig
from gradmon.export.server import MetricsServer

SECRET = "s3cret-Passw0rd"


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("gradmon_test_events", "test", registry=reg).inc()
    return reg


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
