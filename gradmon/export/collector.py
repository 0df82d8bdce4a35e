"""Prometheus exposition: a custom Collector over the monitor's latest state, and its server.

`collect()` runs on the scrape thread and only reads a copy of the state that the monitor
takes under its lock; it never computes statistics and never touches the training thread.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from gradmon.snapshot import Snapshot

log = logging.getLogger("gradmon")

AGENT_STAGES = ("hook", "collect", "publish", "scaler", "sink", "export")


def log_buckets(lo_exp: int, hi_exp: int, per_decade: int) -> tuple[float, ...]:
    """Upper bounds 10**lo_exp .. 10**hi_exp, `per_decade` per power of ten."""
    n = (hi_exp - lo_exp) * per_decade
    return tuple(float(f"{10 ** (lo_exp + i / per_decade):.3g}") for i in range(n + 1))


GLOBAL_NORM_BUCKETS = log_buckets(-8, 8, 2)
DURATION_BUCKETS = log_buckets(-5, 1, 3)


class Histogram:
    """A cumulative histogram the monitor observes into and the exporter copies."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        if math.isnan(value):
            return  # a NaN has no bucket; non-finite steps are counted elsewhere
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def copy(self) -> Histogram:
        h = Histogram(self.bounds)
        h.counts = list(self.counts)
        h.total = self.total
        return h

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((repr(bound), float(running)))
        out.append(("+Inf", float(running + self.counts[-1])))
        return out


@dataclass
class ExportState:
    """A consistent copy of everything /metrics shows, taken under the monitor's lock."""

    version: str
    run_id: str
    rank: int | None
    steps_total: int = 0
    collections_total: int = 0
    nonfinite_steps_total: int = 0
    skipped_steps_total: int = 0
    snapshot: Snapshot | None = None
    layer_names: list[str] = field(default_factory=list)  # exported layers, capped
    anomalies_total: dict[tuple[str, str], int] = field(default_factory=dict)
    layer_nonfinite_total: dict[str, int] = field(default_factory=dict)
    errors_total: dict[str, int] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    loss_scale: float | None = None
    global_norm_hist: Histogram | None = None
    duration_hist: Histogram | None = None
    per_layer: bool = True
    activation_names: list[str] = field(default_factory=list)  # exported modules, capped
    activation_nonfinite_total: dict[str, int] = field(default_factory=dict)


class GradmonCollector(Collector):
    """The gradmon families. With `on_error`, a failure while building them is reported
    there (counted under stage `export`) and the families built so far are served, so a
    scrape still answers 200 with everything else (process metrics, other collectors)."""

    def __init__(
        self,
        state_fn: Callable[[], ExportState],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._state_fn = state_fn
        self._on_error = on_error
        # The per-layer families rendered once per published snapshot (see exposition()).
        self._layer_cache: dict[str, tuple[tuple[object, ...], bytes]] = {}
        self._cache_lock = threading.Lock()

    def describe(self) -> list[Metric]:
        # Empty: the families depend on the run, and registering must not call collect().
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._families()
        except Exception as exc:
            if self._on_error is None:
                raise
            self._on_error(exc)

    def exposition(self, registry: Collector, accept: str) -> tuple[bytes, str]:
        """The registry's exposition for a scrape, with the per-layer families (the bulk:
        thousands of samples) rendered once per published snapshot and reused: scrapers
        hammering /metrics then hold the GIL, which the training thread needs, for the
        small live part only (counters, scalars, loss scale, process metrics)."""
        encoder, content_type = choose_encoder(accept)
        _render.apart, _render.state = True, None
        try:
            live = encoder(registry)
            st: ExportState | None = _render.state
        finally:
            _render.apart, _render.state = False, None
        if st is None or not st.per_layer or st.snapshot is None:
            return live, content_type
        snap = st.snapshot
        key = (id(snap), snap.step, st.collections_total, st.rank, len(st.layer_names))
        with self._cache_lock:  # one scraper renders, the others wait and reuse
            cached = self._layer_cache.get(content_type)
            if cached is None or cached[0] != key:
                try:
                    rank_names = ["rank"] if st.rank is not None else []
                    rank_values = [str(st.rank)] if st.rank is not None else []
                    families = list(_layer_families(st, snap, rank_names, rank_values))
                    cached = (key, encoder(_Families(families)))
                except Exception as exc:
                    if self._on_error is None:
                        raise
                    self._on_error(exc)
                    return live, content_type
                self._layer_cache[content_type] = cached
        eof = b"# EOF\n"  # OpenMetrics ends once, after the last family
        if live.endswith(eof) and cached[1].endswith(eof):
            live = live[: -len(eof)]
        return live + cached[1], content_type

    def _families(self) -> Iterator[Metric]:
        st = self._state_fn()
        if getattr(_render, "apart", False):
            _render.state = st  # exposition(): the layer families come from its cache
        rank_names = ["rank"] if st.rank is not None else []
        rank_values = [str(st.rank)] if st.rank is not None else []

        def gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
            if value is not None:
                g = GaugeMetricFamily(name, doc, labels=rank_names)
                g.add_metric(rank_values, value)
                yield g

        def counter(name: str, doc: str, value: float) -> Metric:
            c = CounterMetricFamily(name, doc, labels=rank_names)
            c.add_metric(rank_values, value)
            return c

        info = GaugeMetricFamily(
            "gradmon_info",
            "Identity of the monitored run (value 1).",
            labels=["version", "run_id", *rank_names],
        )
        info.add_metric([st.version, st.run_id, *rank_values], 1.0)
        yield info
        yield counter(
            "gradmon_steps", "Optimizer steps seen, skipped ones included.", st.steps_total
        )
        yield counter(
            "gradmon_collections", "Steps whose statistics were computed.", st.collections_total
        )
        yield counter(
            "gradmon_nonfinite_steps",
            "Collected steps with any NaN/Inf gradient entry.",
            st.nonfinite_steps_total,
        )
        yield counter(
            "gradmon_skipped_steps",
            "Optimizer steps skipped by the GradScaler for inf/NaN gradients.",
            st.skipped_steps_total,
        )
        snap = st.snapshot
        if snap is not None:
            yield from gauge("gradmon_step", "Training step of the latest snapshot.", snap.step)
            yield from gauge(
                "gradmon_last_collection_timestamp_seconds",
                "Wall time of the latest snapshot.",
                snap.timestamp,
            )
            yield from gauge(
                "gradmon_grad_global_norm",
                "L2 norm over the finite entries of all monitored gradients.",
                snap.global_norm,
            )
        yield from gauge("gradmon_loss_scale", "GradScaler loss scale.", st.loss_scale)
        for name, doc, hist in (
            (
                "gradmon_grad_global_norm_per_step",
                "Global gradient norm observed at every collected step.",
                st.global_norm_hist,
            ),
            (
                "gradmon_collect_duration_seconds",
                "Host time the agent spent per collection.",
                st.duration_hist,
            ),
        ):
            if hist is not None:
                h = HistogramMetricFamily(name, doc, labels=rank_names)
                h.add_metric(rank_values, hist.buckets(), sum_value=hist.total)
                yield h

        anomalies = CounterMetricFamily(
            "gradmon_anomalies",
            "Health events by layer and kind (vanishing, exploding, nonfinite, dead, spike).",
            labels=["layer", "kind", *rank_names],
        )
        for (layer, kind), n in sorted(st.anomalies_total.items()):
            anomalies.add_metric([layer, kind, *rank_values], n)
        yield anomalies

        errors = CounterMetricFamily(
            "gradmon_agent_errors",
            "Failures inside the agent; training went on.",
            labels=["stage", *rank_names],
        )
        for stage, n in sorted(st.errors_total.items()):
            errors.add_metric([stage, *rank_values], n)
        yield errors

        scalars = GaugeMetricFamily(
            "gradmon_scalar", "Values given to Monitor.log().", labels=["name", *rank_names]
        )
        for name, value in sorted(st.scalars.items()):
            scalars.add_metric([name, *rank_values], value)
        yield scalars

        if st.per_layer and snap is not None and not getattr(_render, "apart", False):
            yield from _layer_families(st, snap, rank_names, rank_values)


# Per scrape thread: set while GradmonCollector.exposition() renders the live part.
_render = threading.local()


class _Families:
    """Families already built, for an encoder that wants a registry."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


_LAYER_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("gradmon_grad_norm", "norm", "L2 norm of the layer's gradient (finite entries)."),
    ("gradmon_grad_rms", "rms", "Gradient norm / sqrt(finite numel)."),
    ("gradmon_grad_abs_max", "abs_max", "Largest absolute finite gradient entry."),
    ("gradmon_grad_zero_ratio", "zero_ratio", "Fraction of exactly-zero gradient entries."),
    (
        "gradmon_grad_sum_squares",
        "sum_squares",
        "Sum of squares of the gradient: an additive partial for cross-rank sums.",
    ),
    ("gradmon_param_norm", "param_norm", "L2 norm of the parameter."),
)


def _gauges(
    items: Sequence[tuple[str, object]],
    gauges: tuple[tuple[str, str, str], ...],
    labels: list[str],
    rank_values: list[str],
) -> Iterator[Metric]:
    """One gauge family per (metric, attribute, help) over (name, statistics) items."""
    for metric, attr, doc in gauges:
        g = GaugeMetricFamily(metric, doc, labels=labels)
        for name, stats in items:
            g.add_metric([name, *rank_values], getattr(stats, attr))
        yield g


def _counter(
    metric: str,
    doc: str,
    names: list[str],
    counts: dict[str, int],
    labels: list[str],
    rank_values: list[str],
) -> Metric:
    c = CounterMetricFamily(metric, doc, labels=labels)
    for name in names:
        c.add_metric([name, *rank_values], counts.get(name, 0))
    return c


def _layer_families(
    st: ExportState, snap: Snapshot, rank_names: list[str], rank_values: list[str]
) -> Iterator[Metric]:
    labels = ["layer", *rank_names]
    layers = [(n, snap.layers[n]) for n in st.layer_names if n in snap.layers]
    yield from _gauges(layers, _LAYER_GAUGES, labels, rank_values)
    # Opt-in (collect.update_ratio_every): only layers measured so far have a value.
    ratios = [(n, s) for n, s in layers if s.update_ratio is not None]
    if ratios:
        yield from _gauges(ratios, _UPDATE_RATIO, labels, rank_values)
    yield _counter(
        "gradmon_layer_nonfinite_steps",
        "Collected steps where this layer's gradient had NaN/Inf entries.",
        st.layer_names,
        st.layer_nonfinite_total,
        labels,
        rank_values,
    )
    # Part of the per-snapshot bulk that GradmonCollector.exposition() caches.
    if st.activation_names:
        yield from _activation_families(st, snap, rank_names, rank_values)


_UPDATE_RATIO = (
    (
        "gradmon_update_ratio",
        "update_ratio",
        "||dw||/||w|| of the layer at the last sampled optimizer step that measured it.",
    ),
)


_ACTIVATION_GAUGES: tuple[tuple[str, str, str], ...] = (
    (
        "gradmon_activation_rms",
        "rms",
        "RMS of the module's forward output (finite entries), over the forwards before the "
        "latest collected step.",
    ),
    ("gradmon_activation_mean", "mean", "Mean of the module's forward output (finite entries)."),
    (
        "gradmon_activation_zero_ratio",
        "zero_ratio",
        "Fraction of exactly-zero entries of the module's forward output (dead ReLUs).",
    ),
)


def _activation_families(
    st: ExportState, snap: Snapshot, rank_names: list[str], rank_values: list[str]
) -> Iterator[Metric]:
    """collect.activations: one series per exported module that ran before the snapshot."""
    labels = ["layer", *rank_names]
    modules = [(n, snap.activations[n]) for n in st.activation_names if n in snap.activations]
    yield from _gauges(modules, _ACTIVATION_GAUGES, labels, rank_values)
    yield _counter(
        "gradmon_activation_nonfinite",
        "Collected steps where this module's forward output had NaN/Inf entries.",
        st.activation_names,
        st.activation_nonfinite_total,
        labels,
        rank_values,
    )


class RankLabelled(Collector):
    """Another collector's families (process, platform) with `rank` added to every sample
    under several ranks, so that every series of a rank's target carries it."""

    def __init__(self, inner: Collector, rank_fn: Callable[[], int | None]) -> None:
        self._inner = inner
        self._rank_fn = rank_fn

    def collect(self) -> Iterator[Metric]:
        rank = self._rank_fn()
        for family in self._inner.collect():
            if rank is None:
                yield family
                continue
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(
                    s.name, {**s.labels, "rank": str(rank)}, s.value, s.timestamp, s.exemplar
                )
            yield out


def scalar_value(value: object) -> float:
    """A float from a Python number or a one-element tensor (read on the scrape thread)."""
    item = getattr(value, "item", None)
    return float(item() if callable(item) else value)  # type: ignore[arg-type]
