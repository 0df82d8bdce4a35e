"""What the demo shows: a live view in a terminal, progress lines otherwise, a summary."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gradmon.snapshot import ANOMALY_KINDS
from gradmon.tools.demo.alerts import AlertSeen, AlertWatch
from gradmon.tools.demo.loop import DemoResult, Progress
from gradmon.tools.demo.rules import EXPECTED_ALERTS
from gradmon.tools.demo.scenarios import DESCRIPTIONS

__all__ = ["line", "render", "shown", "summary"]

REFRESH_SECONDS = 0.25  # live view: a few redraws per second, whatever the step rate
PRINT_LINES = 10  # without a terminal: about this many progress lines per run


@contextlib.contextmanager
def shown(progress: Progress, live: bool) -> Iterator[Callable[[bool], None]]:
    """The training loop's `show(final)`: a live view when `live` and stdout is a
    terminal, otherwise about PRINT_LINES progress lines."""
    if live and sys.stdout.isatty():
        with Live(render(progress), auto_refresh=False) as view:
            last = [0.0]

            def redraw(final: bool) -> None:
                # Redraw a few times per second, not every step: a render (~4 ms)
                # costs more than a training step of the MLP scenarios.
                now = time.perf_counter()
                if final or now - last[0] >= REFRESH_SECONDS:
                    view.update(render(progress), refresh=True)
                    last[0] = now

            yield redraw
        return
    print(
        f"gradmon demo '{progress.scenario}': {DESCRIPTIONS[progress.scenario]}; "
        f"metrics: {progress.url or 'exporter disabled'}",
        flush=True,
    )
    every = max(1, progress.steps // PRINT_LINES)
    printed = [-1]  # the step of the last line: after the run, show() may come again

    def report(final: bool) -> None:
        if (final or progress.step % every == 0) and progress.step != printed[0]:
            printed[0] = progress.step
            print(line(progress), flush=True)

    yield report


def line(progress: Progress) -> str:
    """One progress line: step, loss, global norm, health events so far."""
    p = progress
    norm = p.snapshot.global_norm if p.snapshot is not None else math.nan
    events = ", ".join(f"{k} {n}" for k, n in p.counts.items()) or "none"
    alerts = ""
    if p.watch is not None:
        shown = [
            f"{a.name} {_state(a)}" + (" (delivered)" if a.delivered_after is not None else "")
            for a in p.watch.seen().values()
        ]
        alerts = f"  alerts: {', '.join(shown) or 'none'}"
    return (
        f"[{p.scenario}] step {p.step}/{p.steps}  loss {p.loss:.4g}  "
        f"grad norm {norm:.3g}  events: {events}{alerts}"
    )


def _state(alert: AlertSeen) -> str:
    """ "firing", "firing x3" (three alerts of the rule: layers), "pending", "inactive"."""
    return f"{alert.state} x{alert.firing}" if alert.firing > 1 else alert.state


def _alerts_table(watch: AlertWatch) -> Table:
    """The run's alerts in the local Prometheus (demo rules) and their delivery."""
    table = Table(title="alerts (local Prometheus, demo rules)", title_justify="left")
    table.add_column("alert")
    table.add_column("severity")
    table.add_column("state")
    table.add_column("Alertmanager -> webhook")
    style = {"pending": "yellow", "firing": "bold red", "inactive": "dim"}
    for a in sorted(watch.seen().values(), key=lambda a: a.name):
        if a.delivered_after is not None:
            delivery = f"delivered at {a.delivered_after:.1f} s"
        else:
            delivery = "not yet" if watch.sees_deliveries else "(not watched)"
        table.add_row(a.name, a.severity, Text(_state(a), style=style.get(a.state, "")), delivery)
    if table.row_count == 0:
        table.add_row(Text("none pending or firing", style="green"), "", "", "")
    if watch.error:
        table.caption = f"Prometheus: {watch.error}"
    return table


def render(progress: Progress) -> Group:
    """The live view: the run, the smallest and largest layer norms, events by kind."""
    p = progress
    snap = p.snapshot
    norm = snap.global_norm if snap is not None else math.nan
    head = Table.grid(padding=(0, 2))
    head.add_row(
        Text(f"gradmon demo: {p.scenario}", style="bold"),
        f"step {p.step}/{p.steps}",
        f"{time.perf_counter() - p.started:.1f} s",
    )
    head.add_row(f"loss {p.loss:.4g}", f"global grad norm {norm:.4g}", "")
    head.add_row(f"metrics: {p.url or 'exporter disabled'}", "", "")

    layers = Table(title="per-layer gradient norm", title_justify="left")
    layers.add_column("smallest")
    layers.add_column("norm", justify="right")
    layers.add_column("largest")
    layers.add_column("norm", justify="right")
    if snap is not None:
        ranked = sorted((s.norm, name) for name, s in snap.layers.items() if s.received)
        for (lo, lo_name), (hi, hi_name) in zip(ranked[:3], ranked[::-1][:3], strict=False):
            layers.add_row(lo_name, f"{lo:.3g}", hi_name, f"{hi:.3g}")

    events = Table(title="health events so far", title_justify="left")
    events.add_column("kind")
    events.add_column("events", justify="right")
    events.add_column("layers")
    for kind in ANOMALY_KINDS:
        n = p.counts.get(kind, 0)
        names = sorted(p.detected.get(kind, ()))
        shown = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
        events.add_row(kind, Text(str(n), style="bold red" if n else "green"), shown)
    parts: list[RenderableType] = [
        head,
        Text(DESCRIPTIONS[p.scenario], style="dim"),
        layers,
        events,
    ]
    if p.watch is not None:
        parts.append(_alerts_table(p.watch))
    return Group(*parts)


def summary(result: DemoResult) -> str:
    """A few lines: the run, and what gradmon detected (kind -> layers, counts)."""
    lines = [
        f"gradmon demo '{result.scenario}': {result.steps} steps in {result.seconds:.1f} s, "
        f"loss {result.initial_loss:.4g} -> {result.final_loss:.4g}"
    ]
    if not result.anomaly_counts:
        lines.append("  no anomalies detected")
    for kind in ANOMALY_KINDS:
        if kind not in result.anomaly_counts:
            continue
        layers = sorted(result.detected.get(kind, ()))
        shown = ", ".join(layers[:4]) + (f" (+{len(layers) - 4} more)" if len(layers) > 4 else "")
        step = result.first_detection.get(kind)
        since = f", first at step {step}" if step is not None else ""
        lines.append(
            f"  {kind}: {result.anomaly_counts[kind]} events in {len(layers)} layer(s){since}: "
            f"{shown}"
        )
    if result.watched:
        lines.extend(_alert_lines(result))
    return "\n".join(lines)


def _alert_lines(result: DemoResult) -> list[str]:
    """The run's alerts: the one the scenario should fire first, delivered or not."""
    expected = EXPECTED_ALERTS.get(result.scenario)
    if not result.alerts:
        return [f"  alerts: none{f' ({expected} did not fire)' if expected else ''}"]
    out = []
    order = sorted(result.alerts.values(), key=lambda a: (a.name != expected, a.name))
    for a in order:
        if a.delivered_after is not None:
            delivered = f"delivered by Alertmanager {a.delivered_after:.1f} s into the run"
        elif a.fired:
            delivered = "not delivered (inhibited, or the run ended first)"
        else:
            delivered = "was pending, never fired"
        out.append(f"  alert {a.name} ({a.severity or '?'}): {_state(a)}, {delivered}")
    if expected and expected not in result.alerts:
        out.append(f"  alert {expected}: did not fire")
    return out
