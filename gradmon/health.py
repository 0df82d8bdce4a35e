"""Health rules: classify each layer at each collection.

The rules, with the thresholds of `HealthConfig` (the same values render the alert rules):
- nonfinite: the layer's grad holds NaN/Inf (every collection where it does);
- exploding: the layer's grad norm is above `exploding_norm`;
- spike: the global norm is above `spike_factor` times the median of the last
  `spike_window` collections (after `spike_warmup` of them). A median, so one spike
  barely moves the baseline it is judged against;
- vanishing: rms below `vanishing_rms`, or below `vanishing_ratio` times the median
  layer rms, for `patience` consecutive collections;
- dead: an all-zero gradient, or no gradient at all, for `patience` consecutive collections.
Persistent conditions are reported at every collection they hold, so counters keep rising
and alerts keep firing while the problem lasts.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping

from gradmon.config import HealthConfig
from gradmon.snapshot import GLOBAL_LAYER, Anomaly, LayerStats


class HealthRules:
    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self._vanishing_run: dict[str, int] = {}
        self._dead_run: dict[str, int] = {}
        self._norms: deque[float] = deque(maxlen=config.spike_window)

    def evaluate(
        self, step: int, layers: Mapping[str, LayerStats], global_norm: float
    ) -> list[Anomaly]:
        cfg = self.config
        found: list[Anomaly] = []
        finite_rms = [s.rms for s in layers.values() if s.received and s.numel > 0]
        median_rms = statistics.median(finite_rms) if finite_rms else 0.0
        for name, s in layers.items():
            nonfinite = s.nan_count + s.inf_count
            if nonfinite:
                found.append(Anomaly(name, "nonfinite", float(nonfinite), step))
            if s.norm > cfg.exploding_norm:
                found.append(Anomaly(name, "exploding", s.norm, step))

            dead = not s.received or (s.numel > 0 and s.zero_ratio == 1.0)
            if self._persisted(self._dead_run, name, dead):
                found.append(Anomaly(name, "dead", s.zero_ratio if s.received else 1.0, step))

            vanishing = (
                s.received
                and not dead
                and not nonfinite
                and (s.rms < cfg.vanishing_rms or s.rms < cfg.vanishing_ratio * median_rms)
            )
            if self._persisted(self._vanishing_run, name, vanishing):
                found.append(Anomaly(name, "vanishing", s.rms, step))

        norms = self._norms
        if len(norms) >= cfg.spike_warmup:
            baseline = statistics.median(norms)
            if baseline > 0 and global_norm > cfg.spike_factor * baseline:
                found.append(Anomaly(GLOBAL_LAYER, "spike", global_norm / baseline, step))
        if global_norm > 0:
            norms.append(global_norm)
        return found

    def _persisted(self, runs: dict[str, int], name: str, condition: bool) -> bool:
        run = runs.get(name, 0) + 1 if condition else 0
        runs[name] = run
        return run >= self.config.patience
