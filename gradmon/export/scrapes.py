"""Who scrapes /metrics and how often: what the exporter waits on at close, so that the
run's final state (gradmon_run_finished 1) is scraped before the endpoint goes away.

A scraper is a client address (a Prometheus HA pair scrapes from two). A scrape counts
once its whole answer was handed to the socket, and it saw what was current when it
started. A scraper is periodic once its last two intervals agree (Prometheus scrapes like
a clock; a person's curl or a script's one-off fetch does not). `wait_for_final(since,
limit)` waits until every periodic scraper still on its schedule has completed a scrape
that started after `since`: each for at most two of its intervals (+ up to 1 s) past its
latest scrape, all for at most `limit` seconds, and not at all when no periodic scraper
is on schedule. A scraper that stopped, or a target already removed from Prometheus,
costs that bound at most, and a script nobody scrapes never waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Scrapes", "observed"]

# Past a scraper's expected next scrape (its latest + its interval) it may be late by
# another interval (one missed scrape, e.g. a timeout) and this much jitter (or one more
# interval, when that is shorter).
_GRACE_SECONDS = 1.0
# Two intervals of one scraper agree when they differ by at most this fraction (+ 50 ms).
_PERIODIC_TOLERANCE = 0.25

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass
class _Scraper:
    last: float  # when its latest completed scrape started (clock seconds)
    interval: float | None = None  # between the starts of its latest two
    before: float | None = None  # the interval before that

    @property
    def period(self) -> float | None:
        """Its interval, when its last two agree (a scraper on a schedule)."""
        if self.interval is None or self.before is None:
            return None
        slack = _PERIODIC_TOLERANCE * max(self.interval, self.before) + 0.05
        return self.interval if abs(self.interval - self.before) <= slack else None


class Scrapes:
    """Completed scrapes by scraper, and a bounded wait for the final one of each."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._cond = threading.Condition()
        self._scrapers: dict[str, _Scraper] = {}
        self.total = 0  # completed scrapes, every scraper together

    def completed(self, scraper: str, started: float) -> None:
        """A scrape by `scraper` that started at `started` (self.clock) was answered."""
        with self._cond:
            seen = self._scrapers.get(scraper)
            if seen is None:
                self._scrapers[scraper] = _Scraper(started)
            elif started > seen.last:  # two scrapes of one client may end out of order
                seen.before, seen.interval = seen.interval, started - seen.last
                seen.last = started
            self.total += 1
            self._cond.notify_all()

    def _deadlines(self, since: float, limit: float) -> dict[str, float]:
        """The periodic scrapers still on their schedule at `since`, each with the time by
        which it should have scraped again."""
        out = {}
        for name, s in self._scrapers.items():
            period = s.period
            if period is None:
                continue
            deadline = s.last + 2 * period + min(period, _GRACE_SECONDS)
            if deadline > since:
                out[name] = min(deadline, since + limit)
        return out

    def expected(self, since: float, limit: float) -> list[str]:
        """The scrapers wait_for_final(since, limit) would wait for, by name."""
        with self._cond:
            return sorted(self._deadlines(since, limit))

    def wait_for_final(self, since: float, limit: float) -> list[str]:
        """Wait until every scraper expected to scrape again (see the module) has
        completed a scrape that started at or after `since`; at most `limit` seconds.
        Returns the scrapers that did not, by name."""
        with self._cond:
            deadlines = self._deadlines(since, limit)
            while True:
                late = {n: d for n, d in deadlines.items() if self._scrapers[n].last < since}
                now = self.clock()
                waiting = [d for d in late.values() if d > now]
                if not waiting:
                    return sorted(late)
                self._cond.wait(min(waiting) - now)


class _Sent(list[bytes]):
    """An answer whose `on_sent` runs once wsgiref has written all of it: it iterates the
    answer while writing and closes it afterwards (also after a failed write, which did
    not get to the end). A list, so that wsgiref still sets Content-Length."""

    def __init__(self, body: Iterable[bytes], on_sent: Callable[[], None]) -> None:
        super().__init__(body)
        self._on_sent = on_sent
        self._written = False

    def __iter__(self) -> Iterator[bytes]:
        yield from super().__iter__()
        self._written = True  # the handler asked for more after writing the last chunk

    def close(self) -> None:
        if self._written:
            self._written = False
            self._on_sent()


def observed(app: WSGIApp, scrapes: Scrapes) -> WSGIApp:
    """Wrap a WSGI app: a 200 answer with the whole exposition (no `name[]` filter, not
    the favicon) counts as a scrape by its client once it was sent."""

    def app_(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = scrapes.clock()
        status: list[str] = []

        def start(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status.append(line)
            return start_response(line, headers, exc_info)

        body = app(environ, start)
        whole = not environ.get("QUERY_STRING") and environ.get("PATH_INFO") != "/favicon.ico"
        if not (whole and status and status[-1].startswith("200")):
            return body
        client = str(environ.get("REMOTE_ADDR", "?"))
        return _Sent(body, lambda: scrapes.completed(client, started))

    return app_
