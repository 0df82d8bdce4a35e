"""The bench tools run end to end on tiny sizes, with the structure their numbers rest on:
every arm present, the arm order alternating, the scraper really scraping over HTTP.
Speed is reported by the tools, never asserted here."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gradmon.tools.bench import IntervalScraper, _interleaved, arm_order, format_result, run_bench
from gradmon.tools.bench_peers import GRADMON, format_peers, run_peers


def test_arm_order_alternates_between_rounds() -> None:
    calls: list[int] = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    times = _interleaved(fns, 4)
    assert calls == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0]
    assert [len(t) for t in times] == [4, 4, 4]
    assert arm_order(4, 0) == [0, 1, 2, 3] and arm_order(4, 1) == [3, 2, 1, 0]


class _Counting(http.server.BaseHTTPRequestHandler):
    """Answers like an exporter (gzip when asked) and counts the GETs."""

    gets = 0
    gzip_asked = 0
    delay = 0.0  # seconds before answering

    def do_GET(self) -> None:
        time.sleep(self.delay)
        type(self).gets += 1
        body = b"# a metric\nup 1\n"
        self.send_response(200)
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            type(self).gzip_asked += 1
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def _server(delay: float = 0.0) -> Iterator[tuple[str, type[_Counting]]]:
    handler = type("Handler", (_Counting,), {"gets": 0, "gzip_asked": 0, "delay": delay})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", handler
    finally:
        server.shutdown()
        server.server_close()


def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_scraper_gets_over_http_only_while_resumed() -> None:
    with _server() as (url, handler):
        scraper = IntervalScraper(url, interval=0.02, first_after=0.0)
        try:
            time.sleep(0.2)  # not resumed yet: no scrape
            assert handler.gets == 0 and scraper.scrapes == 0
            scraper.resume()
            _until(lambda: scraper.scrapes >= 3)
            scraper.pause()  # waits for a scrape in flight
            scraped = scraper.scrapes
            time.sleep(0.2)  # paused: no more
            assert scraper.scrapes == scraped == handler.gets == handler.gzip_asked
            assert scraper.failures == 0 and len(scraper.latencies) == scraped
            scraper.reset()
            assert scraper.scrapes == 0
        finally:
            scraper.close()


def test_scraper_pauses_when_scrapes_outlast_the_interval() -> None:
    # Regression: pause() waited for the scrape in flight while the thread, always due,
    # started the next one each time, so pause() never returned.
    with _server(delay=0.03) as (url, handler):
        scraper = IntervalScraper(url, interval=0.001, first_after=0.0)
        try:
            scraper.resume()
            _until(lambda: scraper.scrapes >= 2)
            pausing = threading.Thread(target=scraper.pause)
            pausing.start()
            pausing.join(timeout=10)
            assert not pausing.is_alive(), "pause() did not return"
            assert scraper.scrapes == handler.gets
        finally:
            scraper.close()


def test_scraper_counts_failures() -> None:
    with _server() as (url, _):
        pass  # closed: connections are refused
    scraper = IntervalScraper(url, interval=0.02, first_after=0.0, timeout=5.0)
    try:
        scraper.resume()
        _until(lambda: scraper.failures >= 2)
        scraper.pause()
        assert scraper.scrapes == 0
    finally:
        scraper.close()


def test_bench_reports_every_arm() -> None:
    result = run_bench(steps=2, warmup=0, stats_reps=2, scrape_intervals=(0.01, 30.0))
    assert result.tensors == 75 and result.params == 5_251_560
    names = [a.name for a in result.arms]
    assert names == [
        "no agent",
        "gradmon, not scraped",
        "gradmon, scraped every 0.01 s",
        "gradmon, scraped every 30 s",
    ]
    fast, slow = result.arms[2], result.arms[3]
    # Every timed step runs longer than 10 ms: at least one scrape each; none in 30 s.
    assert fast.scrapes is not None and fast.scrapes >= 2 and fast.failed_scrapes == 0
    assert slow.scrapes == 0 and result.arms[1].scrapes is None
    assert result.arms[0].ratio == 1.0 and all(a.ratio > 0 for a in result.arms)
    assert result.step_overhead == result.arms[1].ratio
    assert result.stats_over_foreach_norm > 0 and result.stats_over_foreach_norm_both > 0
    assert result.foreach_norm_both_ms > 0 and result.torch_backend_ms > 0
    text = format_result(result)
    assert "scraped every 0.01 s" in text and "weights' norms" in text


def test_peers_are_all_listed() -> None:
    results = run_peers(steps=1, warmup=0, scrape_intervals=(0.01,))
    names = [r.name for r in results]
    assert names[0] == "no monitoring" and results[0].ratio == 1.0
    assert GRADMON in names
    assert "gradmon + TensorBoard histogram_every: 1" in names
    (scraped,) = [r for r in results if "scraped every 0.01 s" in r.name]
    assert scraped.arm is not None and scraped.arm.scrapes and not scraped.arm.failed_scrapes
    assert any("wandb" in n for n in names)  # measured, or listed as not installed
    assert all(r.ratio is None or r.ratio > 0 for r in results)
    # The dev extra installs every peer, so in CI each one is measured, none only listed.
    if os.environ.get("CI"):
        assert all(r.ratio is not None for r in results), format_peers(results)
    assert "no monitoring" in format_peers(results)


def _run_script(name: str, *args: str) -> dict[str, Any]:
    """bench/<name> as a user runs it, with tiny sizes: it must not rot."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(root / "bench" / name), *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_load_bench_smoke() -> None:
    r = _run_script("load.py", "--layers", "30", "--scrapers", "2", "--rounds", "2", "--steps", "3")
    assert r["failed_scrapes"] == 0 and r["agent_errors"] == 0 and r["scrapes"] > 0
    assert r["control_failed_scrapes"] == 0 and r["control_scrapes"] > 0
    forward = ["baseline", "agent", "control", "scraped"]
    assert r["arm_order"] == forward + forward[::-1]
    assert r["scrape_ms"]["p50"] > 0 and r["scraped_over_control"] > 0
    assert r["exposition_bytes"] > 0


def test_activations_bench_smoke() -> None:
    r = _run_script("activations.py", "--steps", "2")
    assert (
        set(r["step_ms"])
        == set(r["step_ms_cycle_of_10"])
        == {
            "no_agent",
            "activations_off",
            "activations_on",
            "activations_off_every_10",
            "activations_on_every_10",
        }
    )
    assert r["hooked_modules"] > 0 and r["on_every_10_over_off_every_10"] > 0


def test_soak_bench_smoke() -> None:
    r = _run_script("soak.py", "--steps", "200", "--sample-every", "50", "--scrape-every", "20")
    assert r["failed_scrapes"] == 0 and r["agent_errors"] == 0 and r["scrapes"] == 10
    assert len(r["samples"]) == 4 and "rss_growth_mib" in r  # growth is judged in real runs
