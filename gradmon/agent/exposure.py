"""What /metrics shows of one monitor: its registry, the gradmon collector, the server.

The collector gets an `ExportState` built here from the parts' public state (counters,
steps, layers, features) on the scrape thread; it never reaches into the monitor.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from gradmon.agent import distributed
from gradmon.agent.counters import Counters
from gradmon.agent.features import Feature
from gradmon.agent.layers import LayerIndex
from gradmon.agent.placement import Placement, Sums
from gradmon.agent.steps import Steps
from gradmon.config import Config
from gradmon.export.collector import ExportState, GradmonCollector, RankLabelled
from gradmon.export.server import MetricsServer
from gradmon.health import HealthRules
from gradmon.snapshot import LayerTable
from gradmon.stats.torch import to_float
from gradmon.version import __version__

__all__ = ["Exposure", "Sources"]


@dataclass
class Sources:
    """The state one monitor exposes."""

    run_id: str
    counters: Counters
    steps: Steps
    index: LayerIndex
    features: Sequence[Feature]
    scaler: Any  # a GradScaler, or None: its scale is read at scrape time
    placement: Placement  # which (layer, shard)s this rank exports
    health: HealthRules  # its structurally zero layers, read at scrape time


class Exposure:
    def __init__(self, cfg: Config, sources: Sources, registry: CollectorRegistry | None) -> None:
        self._cfg = cfg.exporter
        self._src = sources
        self._rank: int | None = None  # read lazily: the group may be initialised later
        self._position = {n: i for i, n in enumerate(sources.index.layer_names)}
        self._exported: tuple[int | None, list[str]] | None = None  # (rank, its layers)
        self._sums: tuple[int, int | None, Sums] | None = None  # (snapshot id, rank, sums)
        self._own_registry = registry is None
        self._finished = False  # gradmon_run_finished: set by finish()
        self.registry = registry if registry is not None else _default_registry(self)
        on_error = functools.partial(sources.counters.count_error, "export")
        self._collector = GradmonCollector(self.export_state, on_error)
        self.registry.register(self._collector)
        self.server: MetricsServer | None = None
        if self._cfg.enabled:
            port = distributed.metrics_port(self._cfg.port)
            render = functools.partial(self._collector.exposition, self.registry)
            self.server = MetricsServer(
                self._cfg, port, self.registry, on_error=on_error, render=render
            )

    def rank(self) -> int | None:
        """The rank label; looked up until a process group of several ranks exists."""
        if self._rank is None:
            self._rank = distributed.rank_label()
        return self._rank

    def exported_layers(self, rank: int | None) -> list[str]:
        """The layers whose per-layer families this rank exports (exporter.per_layer and
        exporter.per_layer_ranks; fixed once the rank is known).

        - auto: the layers holding a shard this rank exports (placement.py), so that a sum
          over ranks counts every distinct shard once;
        - first: every layer from rank 0 only (exact for replicas, i.e. DDP);
        - all: every layer from every rank (each rank's own view; replicas add up twice).
        """
        cached = self._exported
        if cached is not None and cached[0] == rank:
            return cached[1]
        cfg, names = self._cfg, self._src.index.exported
        if not cfg.per_layer:
            names = []
        elif rank is not None and cfg.per_layer_ranks == "first":
            names = names if rank == 0 else []
        elif rank is not None and cfg.per_layer_ranks == "auto":
            mine = self._src.placement.shares(rank).exported
            names = [n for n, exported in zip(names, mine, strict=False) if exported]
        self._exported = (rank, names)
        return names

    def _shares(self, state: ExportState) -> None:
        """This rank's additive shares of the state's snapshot (cached per snapshot)."""
        snap, rank = state.snapshot, state.rank
        if snap is None:
            return
        cached = self._sums
        if cached is None or cached[0] != id(snap) or cached[1] != rank:
            if rank is None:  # one rank: everything is its own
                sums = Sums(_sum_squares(snap.layers), {})
            else:
                sums = self._src.placement.shares(rank).sums(snap.layers, self._position)
            cached = self._sums = (id(snap), rank, sums)
        sums = cached[2]
        state.global_sum_squares = sums.global_sum_squares
        if self._cfg.per_layer_ranks == "auto":
            state.layer_sum_squares = sums.layer_sum_squares

    def export_state(self) -> ExportState:
        src = self._src
        rank = self.rank()
        extra: dict[str, Any] = {}
        for feature in src.features:
            extra.update(feature.export_fields())
        state = src.counters.export_state(
            version=__version__,
            run_id=src.run_id,
            rank=rank,
            steps_total=src.steps.total,
            skipped_steps_total=src.steps.skipped_total,
            **extra,
        )
        state.run_finished = self._finished
        state.layer_names = self.exported_layers(rank)
        state.structurally_zero = src.health.structurally_zero()
        state.per_layer = bool(state.layer_names)
        with src.counters.guard("export"):
            self._shares(state)
        state.errors_total["hook"] += sum(f.errors for f in src.features)
        # Tensor scalars and the loss scale are read here, on the scrape thread: on CUDA
        # that read waits for the GPU on this thread only, never on the training thread.
        with src.counters.guard("export"):
            scalars = src.counters.current_scalars()
            state.scalars = {k: to_float(v) for k, v in scalars.items()}
            if src.scaler is not None:
                state.loss_scale = float(src.scaler.get_scale())
        return state

    def finish(self) -> None:
        """The run ended cleanly: gradmon_run_finished is 1 from the next scrape (or push)."""
        self._finished = True

    def close(self, linger: bool = False) -> None:
        """Stop the server; with `linger`, once the final state has been scraped (bounded:
        exporter.linger_seconds, see export/scrapes.py). A registry of the user's own stops
        showing this monitor; ours keeps its final values readable (Monitor.registry)."""
        if self.server is not None:
            self.server.close(linger=self._cfg.linger_seconds if linger else 0.0)
        if not self._own_registry:
            with suppress(KeyError):
                self.registry.unregister(self._collector)

    def close_in_child(self) -> None:
        """In a forked child: close only this process's copy of the listening socket."""
        if self.server is not None:
            self.server.close_in_child()


def _sum_squares(layers: Any) -> float:
    if isinstance(layers, LayerTable):
        return float(layers.column("sum_squares").sum())
    return float(sum(s.sum_squares for s in layers.values()))


def _default_registry(exposure: Exposure) -> CollectorRegistry:
    """A registry of the monitor's own, so attach/close/attach never collides on names.
    The process and platform series get `rank` too under several ranks."""
    registry = CollectorRegistry(auto_describe=False)
    me = weakref.ref(exposure)  # the registry must not keep it alive

    def rank() -> int | None:
        target = me()
        return target.rank() if target is not None else None

    registry.register(RankLabelled(ProcessCollector(registry=None), rank))
    registry.register(RankLabelled(PlatformCollector(registry=None), rank))
    return registry
