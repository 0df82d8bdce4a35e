"""Health rules: classify each layer at each collection, each against its own history.

The rules, with the thresholds of `HealthConfig` (README "Health rules and their defaults"
gives the measurements behind each default):

- nonfinite: the layer's grad holds NaN/Inf (every collection where it does). Such a
  collection is not judged for jumps and does not enter any baseline.
- spike / exploding (relative): the layer's norm against its own baseline, the median of
  its last `spike_window` norms (collections where it received a finite, non-zero
  gradient; after `spike_warmup` of them). The threshold is `spike_factor` times
  exp(`spike_mad` * the robust spread of the layer's log-norm), so a layer whose norm is
  noisy by nature (an MoE expert fed 1 token one step and 9 the next) needs a larger jump.
  The first `patience - 1` collections over the threshold are a `spike`; from the
  `patience`-th in a row on it is `exploding`. While over, the baseline is frozen: the
  report lasts as long as the layer stays up.
- exploding (absolute): the layer's norm is above `exploding_norm`, a ceiling far above
  healthy gradients of any reduction or batch size.
- spike (global): the global norm, judged the same way against its own last
  `spike_window` collections (reported at every collection it stays over; the
  GradmonGradNormSpike alert holds the plain ratio to `spike_factor`).
- vanishing: rms below `vanishing_rms`, or below `vanishing_ratio` times the median layer
  rms, for `patience` consecutive collections.
- structurally zero: a gradient that has been negligible (all zero, or rms below
  `structural_ratio` times the median layer rms: rounding noise) at every collection since
  the layer's first, for `patience` collections: a conv bias in front of BatchNorm, a
  branch multiplied by a constant zero. Said once (a warning; `structurally_zero()` for a
  gauge) and then neither vanishing nor dead; it leaves the set if it ever carries a
  gradient.
- dead: no gradient, or an all-zero one, in each of the last `dead_window` collections
  (long enough for conditional computation: an MoE expert that gets no token for a while),
  or twice the longest idle run the layer has come back from, if that is longer.

Persistent conditions are reported at every collection they hold, so counters keep rising
and alerts keep firing while the problem lasts.

Vectorised over the layer axis: each layer's state (its last `spike_window` norms, run
lengths, flags) lives in numpy arrays, so a collection costs a few array operations, not
a Python loop over layers; Anomaly objects are made for flagged layers only.

Order of the returned anomalies, so that the first one names the origin: nonfinite (in
the order of `layers`), then the per-layer spike/exploding ones, first those whose
parameter norm itself jumped by `spike_factor` since the last collection (a bad write into
the weights), then by how far the gradient jumped against its own baseline, largest
first; then the global spike, vanishing, dead.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradmon.config import HealthConfig
from gradmon.snapshot import GLOBAL_LAYER, Anomaly, AnomalyKind, LayerStats, LayerTable

log = logging.getLogger("gradmon")

Array = np.ndarray[Any, Any]

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


class Judged:
    """What the rules read of one collection, as arrays over its layers (in order)."""

    def __init__(self, names: Sequence[str], cols: Mapping[str, Array]) -> None:
        self.names = names
        self.received = cols["received"] > 0
        self.numel = cols["numel"]
        self.bad = cols["nan_count"] + cols["inf_count"]
        self.norm = np.sqrt(cols["sum_squares"])
        finite = self.numel - self.bad
        with np.errstate(divide="ignore", invalid="ignore"):
            rms = np.where(finite > 0, self.norm / np.sqrt(np.maximum(finite, 1.0)), 0.0)
        self.rms = np.where(self.received, rms, 0.0)
        self.norm = np.where(self.received, self.norm, 0.0)
        self.all_zero = self.received & (self.numel > 0) & (cols["zero_count"] == self.numel)
        self.param_norm = np.sqrt(cols["param_sum_squares"])

    @classmethod
    def of(cls, layers: Mapping[str, LayerStats]) -> Judged:
        if isinstance(layers, LayerTable):
            return cls(layers.names, {k: layers.column(k) for k in _READ})
        names = list(layers)
        stats = [layers[n] for n in names]
        cols = {
            "received": np.array([s.received for s in stats], dtype=np.float64),
            "numel": np.array([s.numel for s in stats], dtype=np.float64),
            "nan_count": np.array([s.nan_count for s in stats], dtype=np.float64),
            "inf_count": np.array([s.inf_count for s in stats], dtype=np.float64),
            "sum_squares": np.array([s.norm**2 for s in stats], dtype=np.float64),
            "zero_count": np.array([s.zero_ratio * s.numel for s in stats], dtype=np.float64),
            "param_sum_squares": np.array([s.param_norm**2 for s in stats], dtype=np.float64),
        }
        return cls(names, cols)


_READ = (
    "received",
    "numel",
    "nan_count",
    "inf_count",
    "sum_squares",
    "zero_count",
    "param_sum_squares",
)


class _History:
    """Each layer's last `window` norms (NaN: not yet filled), one column per layer (so
    that a reduction over the window runs across layers, vectorised: over rows of 20 it
    ran one short row at a time, ~8x slower), with a write position and a count per
    layer. Medians sort the layers' rows (NaN sorts last), which numpy does several times
    faster than its median over short rows."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.values = np.full((window, 0), np.nan)
        self.pos = np.zeros(0, dtype=np.int64)
        self.count = np.zeros(0, dtype=np.int64)

    def grow(self, size: int) -> None:
        extra = size - self.values.shape[1]
        if extra > 0:
            fill = np.full((self.window, extra), np.nan)
            self.values = np.concatenate([self.values, fill], axis=1)
            self.pos = np.concatenate([self.pos, np.zeros(extra, dtype=np.int64)])
            self.count = np.concatenate([self.count, np.zeros(extra, dtype=np.int64)])

    def append(self, slots: Array, values: Array) -> None:
        self.values[self.pos[slots], slots] = values
        self.pos[slots] = (self.pos[slots] + 1) % self.window
        self.count[slots] = np.minimum(self.count[slots] + 1, self.window)

    def smallest(self, slots: Slots) -> Array:
        """The smallest norm in each layer's window (NaN: none yet)."""
        smallest: Array = np.fmin.reduce(self.values[:, slots], axis=0)
        return smallest

    def median(self, slots: Array) -> Array:
        return _row_medians(self.values[:, slots].T, self.count[slots])

    def spread(self, slots: Array) -> Array:
        """The robust spread (1.4826 MAD) of each layer's log-norm."""
        logs = np.log(self.values[:, slots].T)
        count = self.count[slots]
        center = _row_medians(logs, count)
        spread: Array = _MAD_TO_SIGMA * _row_medians(np.abs(logs - center[:, None]), count)
        return spread


Slots = Array | slice  # this collection's layers' rows in the state arrays (HealthRules)


def _pick(slots: Slots, which: Any) -> Any:
    """The state rows of `which` (a mask, indices or one index over this collection's
    layers)."""
    return which if isinstance(slots, slice) else slots[which]


def _where(values: Array) -> Array:
    """np.flatnonzero of a 1-D array, without its ravel and wrappers (~3 us a call, a
    dozen calls a collection)."""
    where: Array = values.nonzero()[0]
    return where


def _median(values: Array) -> float:
    """np.median of a 1-D array (0.0 when empty) through one partition: np.median's own
    checks and copies cost more than the partition over a thousand layers."""
    n = len(values)
    if n == 0:
        return 0.0
    low, high = (n - 1) // 2, n // 2
    part = np.partition(values, (low, high))
    return float((part[low] + part[high]) / 2)


def _sorted_median(values: Sequence[float]) -> float:
    """The median of a few floats (a window of global norms), without numpy."""
    ordered = sorted(values)
    n = len(ordered)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def _row_medians(rows: Array, count: Array) -> Array:
    """The median of the first `count[i]` finite values of each row (the rest are NaN)."""
    ordered = np.sort(rows, axis=1)
    at = np.arange(len(rows))
    median: Array = (ordered[at, (count - 1) // 2] + ordered[at, count // 2]) / 2
    return median


class HealthRules:
    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self._slot: dict[str, int] = {}
        self._names: list[str] = []
        self._cached: tuple[Sequence[str], Slots] | None = None  # names -> their slots
        self._hist = _History(config.spike_window)
        self._state = {k: np.zeros(0, dtype=np.int64) for k in _COUNTS}
        self._flags = {k: np.zeros(0, dtype=bool) for k in _FLAGS}
        self._param_norm = np.zeros(0)  # at each layer's last collection (NaN: none yet)
        self._norms: deque[float] = deque(maxlen=config.spike_window)
        # The names of the layers flagged structural, rebuilt whenever a flag changes: one
        # attribute, swapped whole, that a scrape thread can read while a collection runs.
        self._structural_names: tuple[str, ...] = ()

    def structurally_zero(self) -> tuple[str, ...]:
        """Layers whose gradient has been negligible since their first collection (see the
        module docstring); each was warned about once. Exported as
        gradmon_grad_structurally_zero{layer} 1. Safe to call from another thread."""
        return self._structural_names

    def _slots(self, names: Sequence[str]) -> Slots:
        """Each layer's position in the state arrays (new layers get new state)."""
        if self._cached is not None and self._cached[0] is names:
            return self._cached[1]
        slots = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            slot = self._slot.get(name)
            if slot is None:
                slot = self._slot[name] = len(self._names)
                self._names.append(name)
            slots[i] = slot
        size = len(self._names)
        self._hist.grow(size)
        for k, v in self._state.items():
            self._state[k] = np.concatenate([v, np.zeros(size - len(v), dtype=np.int64)])
        for k, f in self._flags.items():
            fill = k == "negligible"  # negligible at every collection so far: yes, at first
            self._flags[k] = np.concatenate([f, np.full(size - len(f), fill)])
        more = size - len(self._param_norm)
        self._param_norm = np.concatenate([self._param_norm, np.full(more, np.nan)])
        # Every layer, in slot order (the usual case): a slice, whose selections are views
        # where an index array's are copies (a few dozen per collection).
        every = size == len(names) and bool((slots == np.arange(size)).all())
        self._cached = (names, slice(None) if every else slots)
        return self._cached[1]

    def evaluate(
        self, step: int, layers: Mapping[str, LayerStats], global_norm: float
    ) -> list[Anomaly]:
        j = Judged.of(layers)
        slots = self._slots(j.names)
        self._state["seen"][slots] += 1
        median_rms = _median(j.rms[j.received & (j.numel > 0)])
        zero = ~j.received | j.all_zero
        self._structural(j, slots, zero, median_rms)
        jumps = self._jumps(step, j, slots)
        self._param_norm[slots] = j.param_norm
        dead = self._dead(step, j, slots, zero)
        vanishing = self._vanishing(step, j, slots, zero, median_rms)
        nonfinite = [
            Anomaly(j.names[i], "nonfinite", float(j.bad[i]), step) for i in _where(j.bad).tolist()
        ]
        found = nonfinite + jumps
        if not nonfinite:
            found += self._global_spike(step, global_norm)
        return found + vanishing + dead

    def _structural(self, j: Judged, slots: Slots, zero: Array, median_rms: float) -> None:
        """Negligible since the first collection, for `patience` of them: said once."""
        cfg, flags = self.config, self._flags
        negligible = (j.bad == 0) & (zero | (j.rms <= cfg.structural_ratio * median_rms))
        considered = j.received  # no gradient says nothing about its size
        back = considered & ~negligible
        returned = _where(back & flags["structural"][slots]).tolist()
        for i in returned:
            log.info("gradmon: %s carries a gradient now; judged as any layer", j.names[i])
        flags["negligible"][_pick(slots, back)] = False
        flags["structural"][_pick(slots, back)] = False
        if returned:
            self._flagged_changed()
        new = (
            considered
            & negligible
            & flags["negligible"][slots]
            & ~flags["structural"][slots]
            & (self._state["seen"][slots] >= cfg.patience)
        )
        found = _where(new).tolist()
        if not found:
            return
        flags["structural"][_pick(slots, found)] = True
        self._flagged_changed()
        # One warning per collection, however many layers it finds (a deep model can hold
        # thousands): the count, the first names, and their rms against the median.
        shown = ", ".join(f"{j.names[i]} (rms {j.rms[i]:.3g})" for i in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        log.warning(
            "gradmon: %d layer(s) have had a negligible gradient since their first "
            "collection (the median layer's rms is %.3g): %s%s. Structurally zero, e.g. a "
            "bias in front of BatchNorm: reported once, not as vanishing or dead; consider "
            "bias=False or excluding them (collect.exclude)",
            len(found),
            median_rms,
            shown,
            more,
        )

    def _flagged_changed(self) -> None:
        structural = _where(self._flags["structural"]).tolist()
        self._structural_names = tuple(self._names[i] for i in structural)

    def _jumps(self, step: int, j: Judged, slots: Slots) -> list[Anomaly]:
        """Each finite layer's norm against its own baseline; a norm over the threshold
        stays out of the baseline (it stays what it was before)."""
        cfg, hist, over_run = self.config, self._hist, self._state["over"]
        finite = j.bad == 0
        absolute = finite & (j.norm > cfg.exploding_norm)
        judged = finite & j.received & (j.norm > 0) & (hist.count[slots] >= cfg.spike_warmup)
        ratio = np.zeros(len(j.names))
        idx = _where(judged)
        if len(idx):
            # A norm under spike_factor x the smallest of its window is under spike_factor x
            # its median: only the rest need the median (a sort of the row: most of this
            # rule's cost over thousands of layers). Absolute ones need it for the order.
            # Over this collection's rows, then picked: with a slice, no copy of the window.
            smallest = hist.smallest(slots)[idx]
            maybe = ~(j.norm[idx] < cfg.spike_factor * smallest) | absolute[idx]
            idx = idx[maybe]
        if len(idx):
            ratio[idx] = j.norm[idx] / hist.median(_pick(slots, idx))
        over = ratio >= cfg.spike_factor  # the spread only raises the threshold
        wide = _where(over)
        if len(wide):
            spread = hist.spread(_pick(slots, wide))
            over[wide] = ratio[wide] >= cfg.spike_factor * np.exp(cfg.spike_mad * spread)
        run = np.where(over, over_run[slots] + 1, 0)
        over_run[slots] = np.where(finite, run, over_run[slots])  # NaN steps are not judged
        grow = finite & ~over & j.received & (j.norm > 0)
        hist.append(_pick(slots, grow), j.norm[grow])
        flagged = _where(over | absolute)
        if not len(flagged):
            return []
        before = self._param_norm[_pick(slots, flagged)]
        weights_jumped = (before > 0) & (j.param_norm[flagged] >= cfg.spike_factor * before)
        key = np.where(absolute[flagged], np.maximum(ratio[flagged], 1.0), ratio[flagged])
        order = np.lexsort((flagged, -key, ~weights_jumped))
        found = []
        for k in order.tolist():
            i = int(flagged[k])
            if absolute[i]:
                found.append(Anomaly(j.names[i], "exploding", float(j.norm[i]), step))
                continue
            run_i = over_run[_pick(slots, i)]
            kind: AnomalyKind = "exploding" if run_i >= cfg.patience else "spike"
            found.append(Anomaly(j.names[i], kind, float(ratio[i]), step))
        return found

    def _dead(self, step: int, j: Judged, slots: Slots, zero: Array) -> list[Anomaly]:
        """No (or an all-zero) gradient for `dead_window` collections, or twice the longest
        idle run the layer came back from. A zero gradient from the first collection on
        is structural, never dead."""
        flags, idle_run, longest = self._flags, self._state["idle"], self._state["longest_idle"]
        idle = zero & ~flags["structural"][slots] & ~(j.received & flags["negligible"][slots])
        back = ~idle & (idle_run[slots] > 0)
        came_back = _pick(slots, back)
        longest[came_back] = np.maximum(longest[came_back], idle_run[came_back])
        idle_run[slots] = np.where(idle, idle_run[slots] + 1, 0)
        limit = np.maximum(self.config.dead_window, 2 * longest[slots])
        # The value is the zero ratio: a dead layer's gradient is all zeros (or absent).
        dead = _where(idle_run[slots] >= limit).tolist()
        return [Anomaly(j.names[i], "dead", 1.0, step) for i in dead]

    def _vanishing(
        self, step: int, j: Judged, slots: Slots, zero: Array, median_rms: float
    ) -> list[Anomaly]:
        cfg, run = self.config, self._state["vanishing"]
        small = (j.rms < cfg.vanishing_rms) | (j.rms < cfg.vanishing_ratio * median_rms)
        now = j.received & ~zero & (j.bad == 0) & ~self._flags["structural"][slots] & small
        run[slots] = np.where(now, run[slots] + 1, 0)
        return [
            Anomaly(j.names[i], "vanishing", float(j.rms[i]), step)
            for i in _where(run[slots] >= cfg.patience).tolist()
        ]

    def _global_spike(self, step: int, global_norm: float) -> list[Anomaly]:
        """The global norm, judged like a layer (a spike is reported at every collection
        over the threshold; the baseline keeps the spike out)."""
        norms = self._norms
        if global_norm <= 0 or not math.isfinite(global_norm):
            return []
        over = False
        found: list[Anomaly] = []
        if len(norms) >= self.config.spike_warmup:
            ratio = global_norm / _sorted_median(norms)
            threshold = self.config.spike_factor
            if ratio >= threshold:
                logs = [math.log(v) for v in norms]
                center = _sorted_median(logs)
                spread = _MAD_TO_SIGMA * _sorted_median([abs(v - center) for v in logs])
                threshold *= math.exp(self.config.spike_mad * spread)
            over = ratio >= threshold
            if over:
                found.append(Anomaly(GLOBAL_LAYER, "spike", ratio, step))
        if not over:
            norms.append(global_norm)
        return found


_COUNTS = ("seen", "over", "vanishing", "idle", "longest_idle")
_FLAGS = ("negligible", "structural")
