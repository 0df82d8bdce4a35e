"""Host tables -> Snapshot: per-layer columns, the global norm, health, the NaN origin.

Vectorised over the layer axis (numpy): a collection costs a few array operations, not a
Python loop over layers; LayerStats objects are built only when someone reads a layer
(snapshot.LayerTable).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradmon.agent.inflight import Ready
from gradmon.agent.layers import LayerIndex
from gradmon.agent.placement import OWNED_SUM_SQUARES
from gradmon.health import HealthRules
from gradmon.snapshot import TABLE_COLUMNS, LayerTable, Snapshot
from gradmon.stats import NCOLS, Col

__all__ = ["Publisher", "layer_columns"]

Array = np.ndarray[Any, Any]

# Partial columns by how they combine over a layer's parameters.
_ADDITIVE = [Col.SUM_SQ, Col.SUM, Col.ZERO_COUNT, Col.NAN_COUNT, Col.INF_COUNT]
_ADDITIVE_NAMES = ["sum_squares", "sum", "zero_count", "nan_count", "inf_count"]


class _Grouping:
    """Parameter rows -> layer rows, fixed at attach: a permutation that puts each
    layer's parameters next to each other, and where each layer starts."""

    def __init__(self, index: LayerIndex) -> None:
        layer_of = np.asarray(index.layer_of, dtype=np.int64)
        self.identity = len(index.layer_names) == len(layer_of) and bool(
            (layer_of == np.arange(len(layer_of))).all()
        )
        self.order = np.argsort(layer_of, kind="stable")
        counts = np.bincount(layer_of, minlength=len(index.layer_names))
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.numels = np.asarray(index.numels, dtype=np.float64)

    def add(self, values: Array) -> Array:
        return values if self.identity else np.add.reduceat(values[self.order], self.starts)

    def reduce(self, ufunc: np.ufunc, values: Array) -> Array:
        return values if self.identity else ufunc.reduceat(values[self.order], self.starts)


def layer_columns(grouping: _Grouping, table: Array, fresh: Array) -> dict[str, Array]:
    """The LayerTable columns from a [parameters, NCOLS + 1] table. Parameters without a
    fresh gradient do not combine into their layer's gradient statistics (their rows
    are zeros); a layer none of whose parameters got one is `received` 0."""
    cols: dict[str, Array] = {}
    for name, col in zip(_ADDITIVE_NAMES, _ADDITIVE, strict=True):
        cols[name] = grouping.add(table[:, col])
    # Extremes of rows with no gradient must not count: neutral values in their place.
    cols["abs_max"] = grouping.reduce(np.maximum, np.where(fresh, table[:, Col.ABS_MAX], 0.0))
    cols["min"] = grouping.reduce(np.minimum, np.where(fresh, table[:, Col.MIN], np.inf))
    cols["max"] = grouping.reduce(np.maximum, np.where(fresh, table[:, Col.MAX], -np.inf))
    cols["param_sum_squares"] = grouping.add(table[:, NCOLS])
    got = grouping.add(fresh.astype(np.float64))
    numel_fresh = grouping.add(grouping.numels * fresh)
    cols["received"] = (got > 0).astype(np.float64)
    cols["numel"] = np.where(got > 0, numel_fresh, grouping.add(grouping.numels))
    cols["update_ratio"] = np.full(len(got), np.nan)
    assert set(cols) == set(TABLE_COLUMNS)
    return cols


class Publisher:
    """Builds each collection's Snapshot. `skipped_positions` (shared with the gatherer)
    are parameters left out at collection: a layer of only those is not judged."""

    def __init__(
        self,
        index: LayerIndex,
        health: HealthRules,
        skipped_positions: set[int],
        on_error: Callable[[BaseException], None],
        owned: Sequence[bool] | None = None,
    ) -> None:
        self._index = index
        # placement.py: where a layer mixes parameters this rank exports with replicas
        # another rank exports, the exported ones' sum of squares goes in a column of its own.
        self._owned = np.asarray(owned, dtype=bool) if owned is not None else None
        self._health = health
        self._left_out = skipped_positions
        self._on_error = on_error
        self._grouping = _Grouping(index)

    def build(self, ready: Ready, skipped: bool) -> Snapshot:
        table = ready.table.numpy()
        fresh = np.asarray(ready.fresh, dtype=bool)
        cols = layer_columns(self._grouping, table, fresh)
        if self._owned is not None:
            mine = np.where(self._owned, table[:, Col.SUM_SQ], 0.0)
            cols[OWNED_SUM_SQUARES] = self._grouping.add(mine)
        names = self._index.layer_names
        keep = self._present(ready.failed)
        if keep is not None:  # a group failed (counted): its layers are left out
            names = [n for n, k in zip(names, keep, strict=True) if k]
            cols = {k: v[keep] for k, v in cols.items()}
        layers = LayerTable(names, cols)
        norm = math.sqrt(float(cols["sum_squares"].sum()))
        bad = cols["nan_count"] + cols["inf_count"] > 0
        origin = self._first_nonfinite(ready.arrival, keep, bad) if bad.any() else None
        try:
            anomalies = self._health.evaluate(ready.step, self._judged(layers, keep), norm)
        except Exception as exc:  # a failing rule leaves the statistics published
            self._on_error(exc)
            anomalies = []
        return Snapshot(
            step=ready.step,
            global_norm=norm,
            nonfinite=bool(bad.any()),
            layers=layers,
            anomalies=anomalies,
            timestamp=time.time(),
            skipped=skipped,
            nonfinite_origin=origin,
        )

    def _present(self, failed: frozenset[int]) -> Array | None:
        if not failed:
            return None
        return np.array([not any(i in failed for i in m) for m in self._index.members])

    def _judged(self, layers: LayerTable, keep: Array | None) -> LayerTable:
        """The layers health rules look at. An empty shard (FSDP: a rank may hold no
        element of a small parameter) is neither vanishing nor dead: left to the ranks
        that hold the elements; a layer whose every parameter is skipped is not judged."""
        judged = layers.column("numel") > 0
        if self._left_out:
            members = self._index.members
            if keep is not None:
                members = [m for m, k in zip(members, keep, strict=True) if k]
            left = self._left_out
            judged &= np.array([not all(i in left for i in m) for m in members])
        if judged.all():
            return layers
        names = [n for n, j in zip(layers.names, judged, strict=True) if j]
        return LayerTable(names, {k: layers.column(k)[judged] for k in TABLE_COLUMNS})

    def _first_nonfinite(self, arrival: Array, keep: Array | None, bad: Array) -> str | None:
        """The first layer in backward order (the order its grads arrive, learned by
        hooks.GradArrivals) whose gradient held NaN/Inf. Grads the hooks never saw
        arrive (set by hand) come after, in model order."""
        ranks = np.asarray(arrival, dtype=np.float64)
        seen = np.where(ranks > 0, ranks, np.inf)  # a new array: `arrival` is shared
        first = self._grouping.reduce(np.minimum, seen)
        names = self._index.layer_names
        if keep is not None:
            first, names = first[keep], [n for n, k in zip(names, keep, strict=True) if k]
        candidates = np.flatnonzero(bad)
        # lexsort: the last key is the primary one; ties (and no arrivals) by model order.
        pick = candidates[np.lexsort((candidates, first[candidates]))[0]]
        return names[int(pick)]
