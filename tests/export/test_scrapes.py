"""A run that finished cleanly stays on /metrics until its scrapers have seen
gradmon_run_finished 1 (so GradmonTargetDown does not page for it), bounded, and only
when something scrapes it: real HTTP scrapes of a real monitor on port 0, and a real
Prometheus (gradmon.tools.localstack) with the shipped rules, time-scaled."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gradmon
from gradmon import GradmonError
from gradmon.export.scrapes import Scrapes
from gradmon.ops.rules import render
from gradmon.tools.demo.rules import demo_options
from gradmon.tools.localstack import LocalStack, MissingBinaryError, Target, find_binary
from tests.conftest import SmallNet, train_step

FINISHED = re.compile(r"^gradmon_run_finished ([0-9.]+)$", re.M)


def finished_in(body: str) -> float | None:
    found = FINISHED.search(body)
    return float(found.group(1)) if found else None


class Scraper:
    """Scrapes a port every `interval` seconds from a thread, keeping each answer."""

    def __init__(self, port: int, interval: float) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.bodies: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        while len(self.bodies) < 3:  # two equal intervals: a periodic scraper
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    self.bodies.append(response.read().decode())
            except (urllib.error.URLError, OSError):
                return  # the server is gone
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def config(**exporter: Any) -> dict[str, Any]:
    return {"exporter": {"port": 0, **exporter}}


@pytest.fixture
def run() -> Iterator[tuple[SmallNet, torch.optim.Optimizer]]:
    net = SmallNet()
    yield net, torch.optim.SGD(net.parameters(), lr=0.01)


def timed_close(mon: gradmon.Monitor) -> float:
    started = time.monotonic()
    mon.close()
    return time.monotonic() - started


def test_unscraped_run_closes_at_once_and_says_it_finished(run: Any) -> None:
    net, opt = run
    mon = gradmon.attach(net, opt, config=config())
    train_step(net, opt)
    assert mon.registry.get_sample_value("gradmon_run_finished") == 0
    assert timed_close(mon) < 0.5  # nothing scraped: no lingering, whatever linger_seconds
    assert mon.registry.get_sample_value("gradmon_run_finished") == 1


def test_a_one_off_fetch_is_no_scraper_to_wait_for(run: Any) -> None:
    """A person's curl, a script reading /metrics once or twice: close() does not wait."""
    net, opt = run
    mon = gradmon.attach(net, opt, config=config())
    train_step(net, opt)
    for pause in (0.05, 0.3):
        with urllib.request.urlopen(f"http://127.0.0.1:{mon.port}/metrics", timeout=5) as r:
            assert finished_in(r.read().decode()) == 0
        time.sleep(pause)
    assert timed_close(mon) < 0.3


def test_close_waits_for_the_scrape_that_sees_the_finish(run: Any) -> None:
    net, opt = run
    mon = gradmon.attach(net, opt, config=config())
    assert mon.port is not None
    with Scraper(mon.port, interval=0.3) as scraper:
        train_step(net, opt)
        before = len(scraper.bodies)
        took = timed_close(mon)
        scraper.stop()
    assert all(finished_in(b) == 0 for b in scraper.bodies[:before])
    assert finished_in(scraper.bodies[-1]) == 1  # the final scrape saw the clean finish
    assert took <= 3 * 0.3 + 0.5  # the next scrape: at most two intervals (+ one)


def test_a_scraper_that_stopped_costs_two_of_its_intervals_at_most(
    run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    net, opt = run
    mon = gradmon.attach(net, opt, config=config())
    assert mon.port is not None
    with Scraper(mon.port, interval=0.2):
        train_step(net, opt)
    # e.g. the target was removed from Prometheus: nobody comes, close() gives up soon,
    # not after exporter.linger_seconds (60 s), and says so.
    with caplog.at_level(logging.INFO, logger="gradmon"):
        assert 0.1 < timed_close(mon) < 3 * 0.2 + 0.5
    said = [r.getMessage() for r in caplog.records]
    assert any("until the final scrape by 127.0.0.1 (at most 60 s" in m for m in said), said
    assert any("without a final scrape by 127.0.0.1" in m for m in said), said


def test_linger_seconds_bounds_the_wait_and_zero_turns_it_off(run: Any) -> None:
    net, opt = run
    for linger, bound in ((0.3, 0.8), (0, 0.3)):
        mon = gradmon.attach(net, opt, config=config(linger_seconds=linger))
        assert mon.port is not None
        with Scraper(mon.port, interval=0.5) as scraper:
            # Its next scrape is 30 s away, though two of its intervals would be 1.5 s.
            scraper.interval = 30.0
            time.sleep(0.6)
            assert timed_close(mon) < bound


def test_a_run_that_ended_in_an_exception_is_not_finished_and_does_not_linger(
    run: Any,
) -> None:
    net, opt = run
    mon = gradmon.attach(net, opt, config=config())
    assert mon.port is not None
    with Scraper(mon.port, interval=0.1) as scraper:
        started = time.monotonic()
        with pytest.raises(RuntimeError), mon:
            raise RuntimeError("training failed")
        took = time.monotonic() - started
    assert took < 0.5
    assert finished_in(scraper.bodies[-1]) == 0
    assert mon.registry.get_sample_value("gradmon_run_finished") == 0


@pytest.mark.parametrize("value", [-1, "forever", 1e9, float("nan")])
def test_bad_linger_seconds_is_an_error_naming_the_key(value: object) -> None:
    with pytest.raises(GradmonError, match=r"exporter\.linger_seconds"):
        gradmon.attach(SmallNet(), config=config(linger_seconds=value))


def test_every_scraper_that_is_still_scraping_is_waited_for() -> None:
    """A Prometheus HA pair scrapes from two addresses: each must see the finish."""
    scrapes = Scrapes()
    now = scrapes.clock()
    for t in (now - 0.6, now - 0.4, now - 0.2):
        scrapes.completed("10.0.0.1", t)
        scrapes.completed("10.0.0.2", t)
    scrapes.completed("10.0.0.3", now - 0.1)  # seen once: no schedule to wait for
    since = scrapes.clock()

    def second_prometheus() -> None:
        time.sleep(0.1)
        scrapes.completed("10.0.0.1", since + 0.001)
        time.sleep(0.15)
        scrapes.completed("10.0.0.2", since + 0.001)

    threading.Thread(target=second_prometheus, daemon=True).start()
    started = time.monotonic()
    assert scrapes.wait_for_final(since, limit=10) == []
    assert 0.2 < time.monotonic() - started < 1.0
    # A scrape that started before the finish does not count.
    scrapes.completed("10.0.0.1", since - 0.01)
    assert scrapes.wait_for_final(scrapes.clock(), limit=0.2) == ["10.0.0.1", "10.0.0.2"]


# ----------------------------------------------------------- a real Prometheus scraping
def _stack(tmp_path: Path) -> LocalStack:
    try:
        find_binary("prometheus")
        find_binary("alertmanager")
    except MissingBinaryError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc}; CI is set, so the end-to-end check cannot be skipped")
        pytest.skip(str(exc))
    rules = tmp_path / "rules.yml"
    # The shipped rules, windows 60x shorter: GradmonTargetDown `for` 5s, the finish kept
    # past a 10 s finished_window.
    rules.write_text(render(gradmon.Config(), options=demo_options()), encoding="utf-8")
    return LocalStack([rules])


def _one(stack: LocalStack, expr: str) -> float | None:
    result = stack.query(expr)
    return float(result[0]["value"][1]) if result else None


@pytest.mark.slow
def test_prometheus_sees_the_finish_and_pages_only_for_the_run_that_died(
    tmp_path: Path,
) -> None:
    with _stack(tmp_path) as stack:
        runs = {}
        for name in ("finished", "crashed"):
            net = SmallNet()
            opt = torch.optim.SGD(net.parameters(), lr=0.01)
            mon = gradmon.attach(net, opt, config=config())
            stack.set_target(Target(f"127.0.0.1:{mon.port}", job=f"gradmon-{name}"))
            runs[name] = (mon, net, opt)
        try:
            for name, (_, net, opt) in runs.items():
                stack.wait_for_scrape(f"gradmon-{name}")
                train_step(net, opt)
            # Scraped at 1 s for a while, stepped: the scrape interval is known.
            deadline = time.monotonic() + 30
            while (_one(stack, 'sum(count_over_time(up{job=~"gradmon-.*"}[1m]))') or 0) < 6:
                assert time.monotonic() < deadline, "Prometheus does not scrape the runs"
                time.sleep(0.2)
            finished, crashed = runs["finished"][0], runs["crashed"][0]
            assert timed_close(finished) < 2 * 1.0 + 1.0 + 0.5  # the next 1 s scrape
            with pytest.raises(RuntimeError), crashed:
                raise RuntimeError("training failed")
            closed = time.monotonic()
            # The final scrape of the clean run said so; the crashed run's last said 0.
            last = 'last_over_time(gradmon_run_finished{{job="gradmon-{}"}}[1m])'
            assert _one(stack, last.format("finished")) == 1
            assert _one(stack, last.format("crashed")) == 0
            # GradmonTargetDown (for: 5s) fires for the crashed run, never for the finished
            # one, also once its final scrape is older than finished_window (10 s).
            states: dict[str, set[str]] = {"gradmon-finished": set(), "gradmon-crashed": set()}
            while time.monotonic() < closed + 20:
                for alert in stack.alerts():
                    if alert["labels"]["alertname"] == "GradmonTargetDown":
                        states[alert["labels"]["job"]].add(alert["state"])
                time.sleep(0.5)
            assert "firing" in states["gradmon-crashed"], states
            assert "firing" not in states["gradmon-finished"], states
            assert _one(stack, 'up{job="gradmon-finished"}') == 0
            assert _one(stack, 'gradmon:run_finished:last{job="gradmon-finished"}') == 1
        finally:
            for name, (mon, _, _) in runs.items():
                mon.close()
                stack.remove_target(f"gradmon-{name}")
