"""`AlertWatch`: the demo run's alerts as Prometheus and Alertmanager see them, for the
live view, the progress lines and the summary.

A daemon thread asks Prometheus for the run's pending and firing alerts every POLL_SECONDS;
Alertmanager's webhook deliveries come in through `delivered()` (the WebhookReceiver's
callback), which also prints each one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from gradmon.tools.localstack import LocalStack, LocalStackError

__all__ = ["POLL_SECONDS", "AlertSeen", "AlertWatch"]

POLL_SECONDS = 1.0  # Prometheus evaluates the rules every second


@dataclass(frozen=True)
class AlertSeen:
    """One alert rule's alerts of the run (one per layer for the per-layer rules): the
    latest state in Prometheus ("firing" when any of them fires, else "pending", or
    "inactive" once none is listed), how many fire, and when Alertmanager first delivered
    one (seconds since the demo began)."""

    name: str
    state: str
    severity: str = ""
    delivered_after: float | None = None
    firing: int = 0  # alerts of this rule firing at the last poll (e.g. layers)
    fired: bool = False  # firing at some poll (or delivered)


class AlertWatch:
    """The alerts of Prometheus job `job` on `stack` (set_stack), polled on a thread."""

    def __init__(self, job: str, *, sees_deliveries: bool) -> None:
        self.job = job
        self.sees_deliveries = sees_deliveries  # our own webhook: deliveries are seen
        self.started = time.monotonic()
        self.error: str | None = None  # the last failed poll, shown until one works
        self._stack: LocalStack | None = None
        self._seen: dict[str, AlertSeen] = {}
        self._printed: set[tuple[str, str]] = set()  # (labels, status) already printed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the poller
    def start(self, stack: LocalStack) -> AlertWatch:
        self._stack = stack
        self._thread = threading.Thread(target=self._run, name="gradmon-demo-alerts", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.poll()

    def poll(self) -> None:
        """Ask Prometheus once; alerts no longer listed become "inactive"."""
        if self._stack is None:
            return
        try:
            listed = [a for a in self._stack.alerts() if a["labels"].get("job") == self.job]
        except (LocalStackError, KeyError, TypeError) as exc:
            self.error = str(exc)
            return
        self.error = None
        by_name: dict[str, list[dict[str, Any]]] = {}
        for alert in listed:
            by_name.setdefault(alert["labels"].get("alertname", "?"), []).append(alert)
        with self._lock:
            for name, seen in list(self._seen.items()):
                if name not in by_name:
                    self._seen[name] = replace(seen, state="inactive", firing=0)
            for name, alerts in by_name.items():
                firing = sum(a.get("state") == "firing" for a in alerts)
                self._seen[name] = replace(
                    self._seen.get(name, AlertSeen(name, "")),
                    state="firing" if firing else "pending",
                    severity=alerts[0]["labels"].get("severity", ""),
                    firing=firing,
                )
                if firing:
                    self._seen[name] = replace(self._seen[name], fired=True)

    # -- Alertmanager's deliveries
    def delivered(self, payload: dict[str, Any]) -> None:
        """The webhook's callback: note each alert of the run it delivers, and print it
        the first time (Alertmanager sends the whole group again when it changes)."""
        after = time.monotonic() - self.started
        for alert in payload.get("alerts", []):
            labels = alert.get("labels", {})
            name, status = labels.get("alertname", "?"), alert.get("status", "?")
            key = (repr(sorted(labels.items())), status)
            if key not in self._printed:
                self._printed.add(key)
                print(
                    f"alertmanager -> webhook: [{status}] {name}: "
                    f"{alert.get('annotations', {}).get('summary', '')}",
                    flush=True,
                )
            if labels.get("job") != self.job or status != "firing":
                continue
            with self._lock:
                old = replace(self._seen.get(name, AlertSeen(name, "firing")), fired=True)
                if old.delivered_after is None:
                    old = replace(old, delivered_after=after)
                self._seen[name] = replace(old, severity=labels.get("severity", old.severity))

    # -- what the view and the summary read
    def seen(self) -> dict[str, AlertSeen]:
        with self._lock:
            return dict(self._seen)

    def wait_delivered(
        self, name: str, timeout: float, tick: Callable[[], None] = lambda: None
    ) -> bool:
        """Wait up to `timeout` s for `name` to be delivered; tick() every 0.25 s."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.seen().get(name)
            if seen is not None and seen.delivered_after is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            tick()
            time.sleep(0.25)
