"""The per-layer health rules (a Python loop over layers) that gradmon/health.py replaced
with arrays over the layer axis: kept as the reference the vectorised rules are held to."""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from gradmon.config import HealthConfig
from gradmon.snapshot import GLOBAL_LAYER, Anomaly, AnomalyKind, LayerStats

log = logging.getLogger("gradmon")

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass
class _Track:
    """One layer's history."""

    norms: deque[float]
    over: int = 0  # consecutive collections over the jump threshold
    vanishing: int = 0  # consecutive vanishing collections
    idle: int = 0  # consecutive collections without a (non-zero) gradient
    longest_idle: int = 0  # the longest idle run it came back from
    seen: int = 0  # collections that judged this layer
    negligible: bool = True  # negligible at every collection so far (structural candidate)
    structural: bool = False
    param_norm: float = math.nan  # at the last collection


@dataclass(frozen=True)
class _Jump:
    layer: str
    kind: AnomalyKind
    ratio: float
    weights_jumped: bool
    value: float


class ReferenceHealthRules:
    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self._tracks: dict[str, _Track] = {}
        self._norms: deque[float] = deque(maxlen=config.spike_window)

    def structurally_zero(self) -> tuple[str, ...]:
        """Layers whose gradient has been negligible since their first collection (see the
        module docstring); each was warned about once. A gauge per name, set to 1."""
        return tuple(n for n, t in self._tracks.items() if t.structural)

    def evaluate(
        self, step: int, layers: Mapping[str, LayerStats], global_norm: float
    ) -> list[Anomaly]:
        cfg = self.config
        nonfinite: list[Anomaly] = []
        jumps: list[_Jump] = []
        vanishing: list[Anomaly] = []
        dead: list[Anomaly] = []
        finite_rms = [s.rms for s in layers.values() if s.received and s.numel > 0]
        median_rms = _median(finite_rms) if finite_rms else 0.0
        for name, s in layers.items():
            track = self._tracks.get(name)
            if track is None:
                track = self._tracks[name] = _Track(deque(maxlen=cfg.spike_window))
            track.seen += 1
            bad = s.nan_count + s.inf_count
            if bad:
                nonfinite.append(Anomaly(name, "nonfinite", float(bad), step))
            zero = not s.received or (s.numel > 0 and s.zero_ratio == 1.0)
            self._structural(name, track, s, zero, bad > 0, median_rms)
            if not bad:
                jump = self._jump(name, track, s)
                if jump is not None:
                    jumps.append(jump)
            track.param_norm = s.param_norm

            # A zero gradient from the first collection on is structural, never dead.
            idle = zero and not track.structural and not (s.received and track.negligible)
            if not idle and track.idle:
                track.longest_idle = max(track.longest_idle, track.idle)
            track.idle = track.idle + 1 if idle else 0
            # A layer that came back after n idle collections is dead only after 2n.
            if track.idle >= max(cfg.dead_window, 2 * track.longest_idle):
                dead.append(Anomaly(name, "dead", s.zero_ratio if s.received else 1.0, step))

            small = s.rms < cfg.vanishing_rms or s.rms < cfg.vanishing_ratio * median_rms
            is_vanishing = s.received and not zero and not bad and not track.structural and small
            track.vanishing = track.vanishing + 1 if is_vanishing else 0
            if track.vanishing >= cfg.patience:
                vanishing.append(Anomaly(name, "vanishing", s.rms, step))

        jumps.sort(key=lambda j: (not j.weights_jumped, -j.ratio))
        found = nonfinite + [Anomaly(j.layer, j.kind, j.value, step) for j in jumps]
        if not nonfinite:
            found += self._global_spike(step, global_norm)
        return found + vanishing + dead

    def _jump(self, name: str, track: _Track, s: LayerStats) -> _Jump | None:
        """The layer's norm against its own baseline; records the norm in the baseline
        unless it is over the threshold (the baseline stays what it was before)."""
        cfg = self.config
        absolute = s.norm > cfg.exploding_norm
        ratio, threshold = 0.0, math.inf
        if s.received and s.norm > 0 and len(track.norms) >= cfg.spike_warmup:
            ratio, threshold = self._judge(s.norm, track.norms)
        over = ratio >= threshold
        track.over = track.over + 1 if over else 0
        if not over and s.received and s.norm > 0:
            track.norms.append(s.norm)
        if not (over or absolute):
            return None
        weights_jumped = track.param_norm > 0 and (
            s.param_norm >= cfg.spike_factor * track.param_norm
        )
        if absolute:
            return _Jump(name, "exploding", max(ratio, 1.0), weights_jumped, s.norm)
        kind: AnomalyKind = "exploding" if track.over >= cfg.patience else "spike"
        return _Jump(name, kind, ratio, weights_jumped, ratio)

    def _structural(
        self, name: str, track: _Track, s: LayerStats, zero: bool, bad: bool, median_rms: float
    ) -> None:
        if not s.received:
            return  # no gradient says nothing about its size
        negligible = not bad and (zero or s.rms <= self.config.structural_ratio * median_rms)
        if not negligible:
            if track.structural:
                log.info("gradmon: %s carries a gradient now; judged as any layer", name)
            track.negligible = track.structural = False
            return
        if track.negligible and not track.structural and track.seen >= self.config.patience:
            track.structural = True
            log.warning(
                "gradmon: %s has had a negligible gradient (rms %.3g, the median layer's "
                "%.3g) since its first collection: structurally zero, e.g. a bias in front "
                "of BatchNorm. Reported once, not as vanishing or dead; consider "
                "bias=False or excluding it (collect.exclude)",
                name,
                s.rms,
                median_rms,
            )

    def _judge(self, norm: float, norms: deque[float]) -> tuple[float, float]:
        """(norm / the median of `norms`, the threshold that ratio is held to)."""
        ratio = norm / _median(norms)
        threshold = self.config.spike_factor
        if ratio < threshold:  # the spread only raises it: the common case stops here
            return ratio, threshold
        logs = [math.log(x) for x in norms]
        center = _median(logs)
        spread = _MAD_TO_SIGMA * _median([abs(x - center) for x in logs])
        return ratio, threshold * math.exp(self.config.spike_mad * spread)

    def _global_spike(self, step: int, global_norm: float) -> list[Anomaly]:
        """The global norm, judged like a layer (a spike is reported at every collection
        over the threshold; the baseline keeps the spike out)."""
        found: list[Anomaly] = []
        norms = self._norms
        if global_norm <= 0 or not math.isfinite(global_norm):
            return found
        over = False
        if len(norms) >= self.config.spike_warmup:
            ratio, threshold = self._judge(global_norm, norms)
            over = ratio >= threshold
            if over:
                found.append(Anomaly(GLOBAL_LAYER, "spike", ratio, step))
        if not over:
            norms.append(global_norm)
        return found


def _median(values: Collection[float]) -> float:
    """statistics.median without its overhead (this runs per layer per collection)."""
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
