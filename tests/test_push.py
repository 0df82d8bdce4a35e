"""exporter.push: the same families pushed to a Pushgateway for jobs that cannot be scraped.

Against a real Pushgateway (Debian `prometheus-pushgateway`) scraped by a real Prometheus
(gradmon.tools.localstack), with the shipped rules' windows scaled to seconds: a run that
ends cleanly says so and pages nobody; a run killed with SIGKILL stops pushing and
GradmonPushStale fires; a Pushgateway killed mid-run costs training nothing, is counted in
gradmon_agent_errors_total{stage="push"}, and pushing resumes once it is back.
Without the binaries these tests skip, or fail when CI is set.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from prometheus_client import CollectorRegistry

import gradmon
from gradmon import Config, GradmonError
from gradmon.config import PushConfig
from gradmon.export.push import grouping_key
from gradmon.ops.rules import render
from gradmon.tools.demo.rules import demo_options
from gradmon.tools.localstack import (
    LocalStack,
    MissingBinaryError,
    Pushgateway,
    find_binary,
)
from tests.conftest import SmallNet, train_step

HOST = "node-test"  # grouping instance, so that groups are told apart from this host's


def _binaries(*names: str) -> None:
    try:
        for name in names:
            find_binary(name)
    except MissingBinaryError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc}; CI is set, so the push checks cannot be skipped")
        pytest.skip(str(exc))


def _wait(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def _samples(url: str) -> dict[str, float]:
    """The Pushgateway's /metrics (what Prometheus scrapes), sample line -> value."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _value(samples: dict[str, float], metric: str, /, **labels: str) -> float | None:
    for key, value in samples.items():
        if key.split("{")[0] == metric:
            found = dict(re.findall(r'(\w+)="([^"]*)"', key))
            if all(found.get(k) == v for k, v in labels.items()):
                return value
    return None


def _push_config(url: str, **extra: Any) -> dict[str, Any]:
    push = {"url": url, "interval_seconds": 0.2, "grouping": {"instance": HOST}, **extra}
    return {"exporter": {"enabled": False, "push": push}}


# ------------------------------------------------------------------ no binaries needed
@pytest.mark.parametrize(
    ("push", "match"),
    [
        ({"url": "ftp://gw:9091"}, "exporter.push.url"),
        ({"url": "http://gw:9091", "grouping": {"job": "x"}}, "exporter.push.grouping"),
        ({"url": "http://gw:9091", "grouping": {"run": ""}}, "exporter.push.grouping"),
        ({"url": "http://gw:9091", "interval_seconds": 0}, "exporter.push.interval_seconds"),
        ({"url": "http://gw:9091", "basic_auth": {"username": "u"}}, "exporter.push.basic_auth"),
        (
            {"url": "http://gw:9091", "basic_auth": {"username": "u", "password_file": "/no"}},
            "exporter.push.basic_auth.password_file",
        ),
        ({"url": "https://gw:9091", "tls": {"certfile": "/c.pem"}}, "exporter.push.tls"),
    ],
)
def test_bad_push_config_fails_at_attach_naming_the_key(
    net: SmallNet, push: dict[str, Any], match: str
) -> None:
    with pytest.raises(GradmonError, match=re.escape(match)):
        gradmon.attach(net, config={"exporter": {"enabled": False, "push": push}})


def test_grouping_is_host_user_labels_and_rank() -> None:
    cfg = PushConfig(url="http://gw:9091", grouping={"run": "4242"})
    assert grouping_key(cfg, None, host="n1") == {"instance": "n1", "run": "4242"}
    assert grouping_key(cfg, 3, host="n1") == {"instance": "n1", "run": "4242", "rank": "3"}
    mine = PushConfig(url="http://gw:9091", grouping={"instance": "job-17"})
    assert grouping_key(mine, None, host="n1") == {"instance": "job-17"}


def test_env_sets_the_grouping_as_a_slurm_script_would(
    monkeypatch: pytest.MonkeyPatch, net: SmallNet
) -> None:
    monkeypatch.setenv("GRADMON_EXPORTER__PUSH__URL", "http://127.0.0.1:9")  # nothing there
    monkeypatch.setenv("GRADMON_EXPORTER__PUSH__GROUPING__RUN", "123456")
    monkeypatch.setenv("GRADMON_EXPORTER__ENABLED", "false")
    with gradmon.attach(net) as mon:
        assert mon.config.exporter.push.grouping == {"run": "123456"}


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str, str | None]]] = []

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append((self.command, self.path, self.headers.get("Authorization")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def https_recorder(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS server on 127.0.0.1 that records PUTs; its CA certificate."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates")
    key, cert = tmp_path / "server.key", tmp_path / "server.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(key), "-out", str(cert))  # fmt: skip
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()


def test_push_with_basic_auth_over_tls(
    https_recorder: tuple[str, Path], tmp_path: Path, net: SmallNet
) -> None:
    url, ca = https_recorder
    secret = tmp_path / "password"
    secret.write_text("s3cret\n", encoding="utf-8")
    push = {
        "basic_auth": {"username": "trainer", "password_file": str(secret)},
        "tls": {"cafile": str(ca)},
        "grouping": {"instance": HOST, "run": "7"},
        "job": "gradmon-batch",
    }
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with gradmon.attach(net, opt, config=_push_config(url, **push)):
        train_step(net, opt)
        _wait("a push", lambda: bool(_Recorder.seen))
    method, path, auth = _Recorder.seen[-1]
    assert method == "PUT"
    assert path == f"/metrics/job/gradmon-batch/instance/{HOST}/run/7"
    assert auth == "Basic dHJhaW5lcjpzM2NyZXQ="  # trainer:s3cret, the newline dropped


# --------------------------------------------------------------- a real Pushgateway
@pytest.fixture
def gateway() -> Iterator[Pushgateway]:
    _binaries("pushgateway")
    with Pushgateway() as gw:
        yield gw


def test_same_families_pushed_and_a_clean_finish_said(gateway: Pushgateway) -> None:
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    registry = CollectorRegistry()
    with gradmon.attach(net, opt, config=_push_config(gateway.url), registry=registry) as mon:
        for _ in range(3):
            train_step(net, opt)
        mon.log(loss=0.5)
        mon.snapshot(wait=True)
        group = {"job": "gradmon", "instance": HOST}

        # A push from before mon.log() can already say 3 steps: wait for one after it.
        def pushed_all() -> bool:
            samples = _samples(gateway.url)
            steps = _value(samples, "gradmon_steps_total", **group)
            return steps == 3 and _value(samples, "gradmon_scalar", name="loss", **group) == 0.5

        _wait("3 steps and the logged loss in the Pushgateway", pushed_all)
        pushed = _samples(gateway.url)
        served = {
            s.name for m in registry.collect() for s in m.samples if s.name.startswith("gradmon_")
        }
        assert len(served) > 20
        for name in served:
            assert any(k.startswith(name + "{") and 'job="gradmon"' in k for k in pushed), name
        assert _value(pushed, "gradmon_grad_norm", layer="fc1.weight", **group) is not None
        assert _value(pushed, "gradmon_scalar", name="loss", **group) == 0.5
        assert _value(pushed, "gradmon_run_finished", **group) == 0
        assert _value(pushed, "gradmon_push_interval_seconds", **group) == 0.2
        assert _value(pushed, "push_time_seconds", **group)
    # close(): one more push, saying the run finished.
    assert _value(_samples(gateway.url), "gradmon_run_finished", **group) == 1


def test_with_block_ending_in_an_exception_is_no_clean_finish(gateway: Pushgateway) -> None:
    net = SmallNet()
    with pytest.raises(RuntimeError), gradmon.attach(net, config=_push_config(gateway.url)):
        raise RuntimeError("training failed")
    assert _value(_samples(gateway.url), "gradmon_run_finished", instance=HOST) == 0


EXITING_RUN = """
import sys, torch, gradmon
net = torch.nn.Linear(4, 1)
config = {"exporter": {"enabled": False, "push": {
    "url": sys.argv[1], "interval_seconds": 60, "grouping": {"instance": sys.argv[2]}}}}
mon = gradmon.attach(net, config=config)  # never closed: closed at interpreter exit
if sys.argv[2] == "crashed":
    raise RuntimeError("out of data")
"""


def test_exit_without_close_finishes_unless_an_exception_killed_it(
    gateway: Pushgateway,
) -> None:
    repo = Path(__file__).resolve().parents[1]
    for instance, code in (("ended", 0), ("crashed", 1)):
        done = subprocess.run(
            [sys.executable, "-c", EXITING_RUN, gateway.url, instance],
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == code, done.stderr
    pushed = _samples(gateway.url)
    assert _value(pushed, "gradmon_run_finished", instance="ended") == 1
    assert _value(pushed, "gradmon_run_finished", instance="crashed") == 0


KILLED_RUN = """
import sys, time, torch, gradmon
net = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(net.parameters(), lr=0.01)
config = {"exporter": {"enabled": False, "push": {
    "url": sys.argv[1], "interval_seconds": 0.5, "grouping": {"instance": "killed"}}}}
mon = gradmon.attach(net, opt, config=config)
while True:
    opt.zero_grad(); net(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
    time.sleep(0.05)
"""


@pytest.mark.slow
def test_killed_run_pages_killed_pushgateway_costs_training_nothing(
    gateway: Pushgateway, tmp_path: Path
) -> None:
    _binaries("prometheus", "alertmanager")
    rules = tmp_path / "rules.yml"
    # The shipped rules, windows 60x shorter (GradmonPushStale: `for` 1s).
    rules.write_text(render(Config(), options=demo_options()), encoding="utf-8")
    with LocalStack([rules], pushgateways=[gateway.address]) as stack:
        # A run whose Pushgateway dies mid-run, comes back, and that ends cleanly.
        net = SmallNet()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        registry = CollectorRegistry()
        mine = {"instance": HOST}
        with gradmon.attach(net, opt, config=_push_config(gateway.url), registry=registry):
            for _ in range(3):
                train_step(net, opt)
            _wait("a push", lambda: _pushed_steps(gateway, HOST) == 3)
            gateway.kill()
            steps_before = registry.get_sample_value("gradmon_steps_total") or 0
            started = time.monotonic()
            while time.monotonic() - started < 1.0:  # several pushes fail meanwhile
                train_step(net, opt)
                time.sleep(0.01)
            errors = registry.get_sample_value("gradmon_agent_errors_total", {"stage": "push"})
            assert errors is not None and errors >= 2
            assert (registry.get_sample_value("gradmon_steps_total") or 0) > steps_before + 10
            gateway.start()  # the same port, empty (no persistence)
            steps = registry.get_sample_value("gradmon_steps_total")
            _wait("pushing to resume", lambda: _pushed_steps(gateway, HOST) == steps)
        assert _value(_samples(gateway.url), "gradmon_run_finished", **mine) == 1

        # A run killed with SIGKILL: no last push, so its group goes stale.
        repo = Path(__file__).resolve().parents[1]
        killed = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUN, gateway.url],
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait("the doomed run's pushes", lambda: _pushed_steps(gateway, "killed"), timeout=60)
        finally:
            killed.send_signal(signal.SIGKILL)
            killed.wait(timeout=10)

        def firing() -> set[str]:
            return {
                a["labels"].get("instance", "?")
                for a in stack.alerts()
                if a["labels"]["alertname"] == "GradmonPushStale" and a["state"] == "firing"
            }

        seen: set[str] = set()

        def killed_pages() -> bool:
            seen.update(firing())
            return "killed" in seen

        _wait("GradmonPushStale for the killed run", killed_pages, timeout=60)
        # The clean run's group has not moved for longer, and does not page.
        assert HOST not in seen and HOST not in firing(), seen


def _pushed_steps(gateway: Pushgateway, instance: str) -> float | None:
    return _value(_samples(gateway.url), "gradmon_steps_total", instance=instance)


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, None),
        ({"RANK": "3", "WORLD_SIZE": "8"}, 3),
        ({"RANK": "0", "WORLD_SIZE": "1"}, None),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, 5),
        ({"RANK": "x", "WORLD_SIZE": "8"}, None),
    ],
)
def test_push_groups_by_the_launchers_rank_before_a_process_group_exists(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], rank: int | None
) -> None:
    from gradmon.agent.distributed import launch_rank

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch_rank() == rank
