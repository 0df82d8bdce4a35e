"""Host tables -> Snapshot: per-layer statistics, the global norm, health, NaN origin."""

from __future__ import annotations

import time
from collections.abc import Callable

from gradmon.agent.inflight import Ready
from gradmon.agent.layers import LayerIndex
from gradmon.health import HealthRules
from gradmon.snapshot import (
    LayerStats,
    Snapshot,
    combine_rows,
    finalize_layer,
    global_norm,
    no_grad_layer,
)
from gradmon.stats import NCOLS

__all__ = ["Publisher", "layer_stats"]


def layer_stats(
    members: list[int], rows: list[list[float]], fresh: list[bool], numels: list[int]
) -> LayerStats:
    """One layer from its parameters' rows (partials + squared parameter norm)."""
    if len(members) == 1:  # parameter granularity: no combining needed
        i = members[0]
        row = rows[i]
        if fresh[i]:
            return finalize_layer(row, numels[i], row[NCOLS])
        return no_grad_layer(numels[i], row[NCOLS])
    got = [i for i in members if fresh[i]]
    param_sq = sum(rows[i][NCOLS] for i in members)
    numel = sum(numels[i] for i in (got or members))
    if got:
        return finalize_layer(combine_rows([rows[i] for i in got]), numel, param_sq)
    return no_grad_layer(numel, param_sq)


class Publisher:
    """Builds each collection's Snapshot. `skipped_positions` (shared with the gatherer)
    are parameters left out at collection: a layer of only those is not judged."""

    def __init__(
        self,
        index: LayerIndex,
        health: HealthRules,
        skipped_positions: set[int],
        on_layer_error: Callable[[BaseException], None],
    ) -> None:
        self._index = index
        self._health = health
        self._left_out = skipped_positions
        self._on_layer_error = on_layer_error

    def build(self, ready: Ready, skipped: bool) -> Snapshot:
        index = self._index
        rows = ready.table.tolist()  # sync-ok: a host tensor by now
        layers: dict[str, LayerStats] = {}
        for name, members in zip(index.layer_names, index.members, strict=True):
            if ready.failed and any(i in ready.failed for i in members):
                continue  # its group failed (counted): left out, not shown as zeros
            try:
                layers[name] = layer_stats(members, rows, ready.fresh, index.numels)
            except Exception as exc:  # one bad layer leaves the others published
                self._on_layer_error(exc)
        norm = global_norm(layers)
        anomalies = self._health.evaluate(ready.step, self._judged(layers), norm)
        return Snapshot(
            step=ready.step,
            global_norm=norm,
            nonfinite=any(s.nan_count or s.inf_count for s in layers.values()),
            layers=layers,
            anomalies=anomalies,
            timestamp=time.time(),
            skipped=skipped,
            nonfinite_origin=self._first_nonfinite(layers, ready.arrival),
        )

    def _judged(self, layers: dict[str, LayerStats]) -> dict[str, LayerStats]:
        """The layers health rules look at. An empty shard (FSDP: a rank may hold no
        element of a small parameter) is neither vanishing nor dead: left to the ranks
        that hold the elements; a layer whose every parameter is skipped is not judged."""
        left_out = self._left_out
        return {
            n: layers[n]
            for n, members in zip(self._index.layer_names, self._index.members, strict=True)
            if n in layers
            and layers[n].numel > 0
            and not (left_out and all(i in left_out for i in members))
        }

    def _first_nonfinite(self, layers: dict[str, LayerStats], arrival: list[int]) -> str | None:
        """The first layer in backward order (the order its grads arrived) whose gradient
        held NaN/Inf. Grads the hooks did not see arrive (set by hand) come after, in
        model order."""
        index = self._index
        best: tuple[bool, int, int] | None = None
        origin = None
        for position, (name, members) in enumerate(
            zip(index.layer_names, index.members, strict=True)
        ):
            s = layers.get(name)
            if s is None or not (s.nan_count or s.inf_count):
                continue
            seen = [arrival[i] for i in members if arrival[i]]
            key = (not seen, min(seen) if seen else 0, position)
            if best is None or key < best:
                best, origin = key, name
        return origin
