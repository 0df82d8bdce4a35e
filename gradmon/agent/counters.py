"""The agent's running totals: what the exporter reads, and agent errors counted, not raised.

Everything here is written by the training thread (or whoever publishes) and copied under
one lock by the scrape thread into an `ExportState`: the collector never reaches into the
monitor.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from gradmon.errors import GradmonError
from gradmon.export.collector import (
    AGENT_STAGES,
    DURATION_BUCKETS,
    GLOBAL_NORM_BUCKETS,
    ExportState,
    Histogram,
)
from gradmon.snapshot import LayerStats, LayerTable, Snapshot

__all__ = ["Counters", "checked_scalars"]

log = logging.getLogger("gradmon")


def checked_scalars(scalars: Mapping[str, Any]) -> dict[str, Any]:
    """mon.log()'s values: numbers, or one-element tensors kept as they are (read at scrape
    time on the exporter's thread, so no sync here). Anything else is a clear error."""
    out: dict[str, Any] = {}
    for name, value in scalars.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise GradmonError(
                    f"log({name}=...): a tensor must hold one element, got shape "
                    f"{tuple(value.shape)}"
                )
            value = value.detach()
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise GradmonError(
                f"log({name}=...): needs a number or a one-element tensor, "
                f"not {type(value).__name__}"
            )
        out[name] = value
    return out


def nonfinite_layers(layers: Mapping[str, LayerStats]) -> list[str]:
    """The layers whose gradient held NaN/Inf (from the columns of a LayerTable)."""
    if isinstance(layers, LayerTable):
        bad = np.flatnonzero(layers.column("nan_count") + layers.column("inf_count"))
        return [layers.names[i] for i in bad]
    return [n for n, s in layers.items() if s.nan_count or s.inf_count]


class Counters:
    """Totals, histograms, user scalars, skipped parameters and agent errors."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards everything the exporter copies
        self.snapshot: Snapshot | None = None
        self.collections = 0
        self.nonfinite_steps = 0
        self.anomalies: dict[tuple[str, str], int] = {}
        self.layer_nonfinite: dict[str, int] = {}
        self.activation_nonfinite: dict[str, int] = {}
        self.nonfinite_origin: dict[str, int] = {}
        self.errors: dict[str, int] = dict.fromkeys(AGENT_STAGES, 0)
        self.scalars: dict[str, Any] = {}
        self.norm_hist = Histogram(GLOBAL_NORM_BUCKETS)
        self.duration_hist = Histogram(DURATION_BUCKETS)
        self._errors_logged: set[str] = set()
        self._skipped: dict[str, str] = {}

    def after_fork(self) -> None:
        """In a forked child: a lock another thread held at fork time is never released."""
        self.lock = threading.Lock()

    # ------------------------------------------------------------ agent errors
    @contextlib.contextmanager
    def guard(self, stage: str) -> Iterator[None]:
        """Never let a failure inside the agent stop training: count it, warn once."""
        try:
            yield
        except Exception as exc:
            self.count_error(stage, exc)

    def count(self, stage: str, _exc: BaseException | None = None) -> None:
        """Count a failure that its own part has logged already (the sinks log each
        storage episode with its path and errno). Thread-safe, never blocks for long."""
        with self.lock:
            self.errors[stage] = self.errors.get(stage, 0) + 1

    def count_error(self, stage: str, exc: BaseException) -> None:
        with self.lock:
            self.errors[stage] = self.errors.get(stage, 0) + 1
            first = stage not in self._errors_logged
            self._errors_logged.add(stage)
        if first:
            log.warning(
                "gradmon: error in stage %r (counted in gradmon_agent_errors_total; "
                "training goes on, further errors of this stage are not logged): %r",
                stage,
                exc,
                exc_info=exc,
            )

    # ------------------------------------------------------------ skipped parameters
    def skip(self, name: str, reason: str, *, counted: bool = True) -> None:
        """Leave a parameter out: named in `skipped`, warned once and (unless `counted` is
        False: frozen parameters are no fault) counted under stage `collect`."""
        with self.lock:
            if name in self._skipped:
                return
            self._skipped[name] = reason
            if counted:
                self.errors["collect"] += 1
        if counted:
            log.warning(
                "gradmon: parameter %r is not monitored: %s (counted in "
                'gradmon_agent_errors_total{stage="collect"}; see Monitor.skipped)',
                name,
                reason,
            )

    def skipped(self) -> dict[str, str]:
        with self.lock:
            return dict(self._skipped)

    # ------------------------------------------------------------ per collection
    def log_scalars(self, scalars: Mapping[str, Any]) -> None:
        with self.lock:
            self.scalars.update(scalars)

    def current_scalars(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.scalars)

    def record(self, snap: Snapshot, duration_s: float) -> None:
        """A published snapshot: the latest state, and every total it adds to."""
        with self.lock:
            self.snapshot = snap
            self.collections += 1
            self.nonfinite_steps += snap.nonfinite
            for name in nonfinite_layers(snap.layers) if snap.nonfinite else ():
                self.layer_nonfinite[name] = self.layer_nonfinite.get(name, 0) + 1
            for name, act in snap.activations.items():
                if act.nan_count or act.inf_count:
                    self.activation_nonfinite[name] = self.activation_nonfinite.get(name, 0) + 1
            if snap.nonfinite_origin is not None:
                origin = snap.nonfinite_origin
                self.nonfinite_origin[origin] = self.nonfinite_origin.get(origin, 0) + 1
            for a in snap.anomalies:
                key = (a.layer, a.kind)
                self.anomalies[key] = self.anomalies.get(key, 0) + 1
            self.norm_hist.observe(snap.global_norm)
            self.duration_hist.observe(duration_s)

    def export_state(self, **identity: Any) -> ExportState:
        """A consistent copy for one scrape; `identity` fills the fields owned elsewhere
        (version, run id, rank, step totals, exported names)."""
        with self.lock:
            return ExportState(
                collections_total=self.collections,
                nonfinite_steps_total=self.nonfinite_steps,
                snapshot=self.snapshot,
                anomalies_total=dict(self.anomalies),
                layer_nonfinite_total=dict(self.layer_nonfinite),
                activation_nonfinite_total=dict(self.activation_nonfinite),
                nonfinite_origin_total=dict(self.nonfinite_origin),
                errors_total=dict(self.errors),
                global_norm_hist=self.norm_hist.copy(),
                duration_hist=self.duration_hist.copy(),
                **identity,
            )
