"""The gradmon families, built from the agent's state handed in at each scrape.

`collect()` runs on the scrape thread: it asks `state_fn` for a consistent copy of what
/metrics shows (an ExportState, taken under the agent's lock) and builds the families from
it; it never computes statistics and never touches the training thread.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from gradmon.export import schema
from gradmon.export.schema import AGENT_STAGES, DURATION_BUCKETS, GLOBAL_NORM_BUCKETS, Family
from gradmon.snapshot import Snapshot

__all__ = [
    "AGENT_STAGES",
    "DURATION_BUCKETS",
    "GLOBAL_NORM_BUCKETS",
    "ExportState",
    "GradmonCollector",
    "Histogram",
    "RankLabelled",
]


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
    nonfinite_origin_total: dict[str, int] = field(default_factory=dict)
    structurally_zero: tuple[str, ...] = ()  # HealthRules.structurally_zero()
    # This rank's additive shares (agent/placement.py): of the global sum of squares, and
    # of the layers that mix exported and replicated parameters (their other values are
    # this rank's view).
    global_sum_squares: float | None = None
    layer_sum_squares: dict[str, float] = field(default_factory=dict)
    run_finished: bool = False  # Monitor.close() ran, and no exception ended the run


_FAMILY_TYPES: dict[str, Callable[..., Metric]] = {
    "gauge": GaugeMetricFamily,
    "counter": CounterMetricFamily,
    "histogram": HistogramMetricFamily,
}


class _Rank:
    """The `rank` label every sample carries under several ranks (none under one)."""

    def __init__(self, rank: int | None) -> None:
        self.names = [schema.RANK] if rank is not None else []
        self.values = [str(rank)] if rank is not None else []

    def family(self, f: Family) -> Metric:
        """An empty family of `f`, its labels followed by the rank's."""
        return _FAMILY_TYPES[f.type](f.name, f.help, labels=[*f.labels, *self.names])

    def single(self, f: Family, value: float) -> Metric:
        """A family of one sample with no labels but the rank's."""
        m = self.family(f)
        m.add_metric(self.values, value)  # type: ignore[attr-defined]
        return m


@dataclass
class _Bulk:
    """The per-layer families of one published snapshot and their rendered bytes, by
    content type: thousands of samples, built and encoded once per snapshot."""

    key: tuple[object, ...]
    families: list[Metric]
    rendered: dict[str, bytes] = field(default_factory=dict)


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
        self._bulk: _Bulk | None = None  # the latest snapshot's per-layer families
        self._bulk_lock = threading.Lock()

    def describe(self) -> list[Metric]:
        # Empty: the families depend on the run, and registering must not call collect().
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            st = self._state_fn()
            yield from _live_families(st)
            bulk = self._bulk_of(st)
            if bulk is not None:
                yield from bulk.families
        except Exception as exc:
            if self._on_error is None:
                raise
            self._on_error(exc)

    def exposition(self, registry: Collector, accept: str) -> tuple[bytes, str]:
        """The registry's exposition for a scrape, byte for byte what prometheus_client
        renders, with the per-layer families (the bulk: thousands of samples) encoded once
        per published snapshot and reused: scrapers hammering /metrics then hold the GIL,
        which the training thread needs, for the small live part only (counters, scalars,
        loss scale, process metrics)."""
        encoder, content_type = choose_encoder(accept)
        parts: list[bytes] = []
        batch: list[Metric] = []
        skip = 0
        for metric in registry.collect():
            if skip:  # the rest of the bulk, already in parts
                skip -= 1
                continue
            # The bulk's families are the very objects collect() handed out, one after
            # the other. (A scrape beside this one may have replaced the bulk since: its
            # families are then encoded like the others below, still correct.)
            bulk = self._bulk
            if bulk is not None and bulk.families and metric is bulk.families[0]:
                if batch:
                    parts.append(_strip_eof(encoder(_Families(batch))))
                    batch = []
                parts.append(self._rendered(bulk, encoder, content_type))
                skip = len(bulk.families) - 1
            else:
                batch.append(metric)
        if batch:
            parts.append(_strip_eof(encoder(_Families(batch))))
        return b"".join(parts) + _eof(encoder), content_type

    def _bulk_of(self, st: ExportState) -> _Bulk | None:
        snap = st.snapshot
        if not st.per_layer or snap is None:
            return None
        # The structural layers change only at a collection, and are read with it.
        n, structural = len(st.layer_names), st.structurally_zero
        key = (id(snap), snap.step, st.collections_total, st.rank, n, structural)
        with self._bulk_lock:  # one scraper builds, the others wait and reuse
            if self._bulk is None or self._bulk.key != key:
                self._bulk = None
                self._bulk = _Bulk(key, list(_layer_families(st, snap, _Rank(st.rank))))
            return self._bulk

    def _rendered(
        self, bulk: _Bulk, encoder: Callable[[Collector], bytes], content_type: str
    ) -> bytes:
        """The bulk's bytes in this format, encoded on first use. A family that cannot
        be encoded (a value that is no number) is reported to `on_error` and left out."""
        with self._bulk_lock:
            text = bulk.rendered.get(content_type)
            if text is None:
                try:
                    text = _strip_eof(encoder(_Families(bulk.families)))
                except Exception as exc:
                    if self._on_error is None:
                        raise
                    self._on_error(exc)
                    return b""
                bulk.rendered[content_type] = text
            return text


_EOF = b"# EOF\n"  # OpenMetrics ends once, after the last family


def _strip_eof(text: bytes) -> bytes:
    return text[: -len(_EOF)] if text.endswith(_EOF) else text


def _eof(encoder: Callable[[Collector], bytes]) -> bytes:
    """What the encoder puts after the last family (OpenMetrics: `# EOF`; text: nothing)."""
    return encoder(_Families([]))


class _Families:
    """Families already built, for an encoder that wants a registry."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def _live_families(st: ExportState) -> Iterator[Metric]:
    """The run-level families: small, and built fresh at every scrape."""
    r = _Rank(st.rank)
    info = r.family(schema.INFO)
    info.add_metric([st.version, st.run_id, *r.values], 1.0)  # type: ignore[attr-defined]
    yield info
    yield r.single(schema.STEPS, st.steps_total)
    yield r.single(schema.COLLECTIONS, st.collections_total)
    yield r.single(schema.NONFINITE_STEPS, st.nonfinite_steps_total)
    yield r.single(schema.SKIPPED_STEPS, st.skipped_steps_total)
    snap = st.snapshot
    if snap is not None:
        yield r.single(schema.STEP, snap.step)
        yield r.single(schema.LAST_COLLECTION, snap.timestamp)
        yield r.single(schema.GLOBAL_NORM, snap.global_norm)
        if st.global_sum_squares is not None:
            yield r.single(schema.GLOBAL_SUM_SQUARES, st.global_sum_squares)
    if st.loss_scale is not None:
        yield r.single(schema.LOSS_SCALE, st.loss_scale)
    for f, hist in (
        (schema.GLOBAL_NORM_PER_STEP, st.global_norm_hist),
        (schema.COLLECT_DURATION, st.duration_hist),
    ):
        if hist is not None:
            h = r.family(f)
            h.add_metric(r.values, hist.buckets(), sum_value=hist.total)  # type: ignore[attr-defined]
            yield h
    yield _labelled(r, schema.ANOMALIES, sorted(st.anomalies_total.items()))
    yield _labelled(r, schema.AGENT_ERRORS, sorted(((k,), n) for k, n in st.errors_total.items()))
    yield _labelled(r, schema.SCALAR, sorted(((k,), v) for k, v in st.scalars.items()))
    yield r.single(schema.RUN_FINISHED, 1.0 if st.run_finished else 0.0)


def _labelled(r: _Rank, f: Family, items: Iterable[tuple[tuple[str, ...], float]]) -> Metric:
    """A family with one sample per (label values, value)."""
    m = r.family(f)
    for values, value in items:
        m.add_metric([*values, *r.values], value)  # type: ignore[attr-defined]
    return m


def _gauges(
    r: _Rank,
    families: Sequence[Family],
    items: Sequence[tuple[str, object]],
    shares: Mapping[str, Mapping[str, float]] | None = None,
) -> Iterator[Metric]:
    """One gauge family per schema family over (name, statistics) items: the value of
    each is the statistics' attribute the family names, or where `shares` has one for
    the family and name, that (a rank's share of an additive family)."""
    for f in families:
        assert f.attr is not None, f.name
        g = r.family(f)
        own = (shares or {}).get(f.name, {})
        for name, stats in items:
            value = own[name] if name in own else getattr(stats, f.attr)
            g.add_metric([name, *r.values], value)  # type: ignore[attr-defined]
        yield g


def _counts(r: _Rank, f: Family, names: list[str], counts: dict[str, int]) -> Metric:
    return _labelled(r, f, (((name,), counts.get(name, 0)) for name in names))


def _layer_families(st: ExportState, snap: Snapshot, r: _Rank) -> Iterator[Metric]:
    """The per-layer (and per-module) families of one snapshot: the bulk of a scrape."""
    layers = [(n, snap.layers[n]) for n in st.layer_names if n in snap.layers]
    shares = {schema.GRAD_SUM_SQUARES.name: st.layer_sum_squares}
    yield from _gauges(r, schema.LAYER_GAUGES, layers, shares)
    # Opt-in (collect.update_ratio_every): only layers measured so far have a value.
    ratios = [(n, s) for n, s in layers if s.update_ratio is not None]
    if ratios:
        yield from _gauges(r, (schema.UPDATE_RATIO,), ratios)
    yield _counts(r, schema.LAYER_NONFINITE_STEPS, st.layer_names, st.layer_nonfinite_total)
    # Where NaN/Inf started (Snapshot.nonfinite_origin): a layer, or a module under
    # collect.activations; bounded by the exported names.
    exported = {*st.layer_names, *st.activation_names}
    origins = [n for n in sorted(st.nonfinite_origin_total) if n in exported]
    yield _counts(r, schema.NONFINITE_ORIGIN, origins, st.nonfinite_origin_total)
    # Layers the health rules found structurally zero (said once, then neither vanishing
    # nor dead): 1 each, no series for the others.
    structural = set(st.structurally_zero)
    flagged = [n for n in st.layer_names if n in structural]
    yield _labelled(r, schema.GRAD_STRUCTURALLY_ZERO, (((n,), 1.0) for n in flagged))
    # collect.activations: one series per exported module that ran before the snapshot.
    if st.activation_names:
        modules = [(n, snap.activations[n]) for n in st.activation_names if n in snap.activations]
        yield from _gauges(r, schema.ACTIVATION_GAUGES, modules)
        yield _counts(
            r, schema.ACTIVATION_NONFINITE, st.activation_names, st.activation_nonfinite_total
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
                    s.name, {**s.labels, schema.RANK: str(rank)}, s.value, s.timestamp, s.exemplar
                )
            yield out
