"""What one collection found: per-layer statistics finalized from the partials."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from gradmon.stats.layout import Col

AnomalyKind = Literal["vanishing", "exploding", "nonfinite", "dead", "spike"]
ANOMALY_KINDS: tuple[AnomalyKind, ...] = ("vanishing", "exploding", "nonfinite", "dead", "spike")
GLOBAL_LAYER = "global"  # the `layer` of anomalies about the whole model (spike)


@dataclass(frozen=True, slots=True)
class LayerStats:
    """One layer's gradient at one collection. Magnitudes are over finite entries only;
    NaN/Inf entries are counted in nan_count/inf_count, never dropped silently."""

    numel: int
    norm: float
    rms: float  # norm / sqrt(finite numel)
    abs_max: float
    mean: float
    min: float  # NaN when the layer has no finite entry
    max: float
    zero_ratio: float
    nan_count: int
    inf_count: int
    param_norm: float
    sum_squares: float = 0.0  # additive partial, exported for cross-rank sums
    received: bool = True  # False: no gradient reached this layer since the last collection


@dataclass(frozen=True, slots=True)
class Anomaly:
    layer: str
    kind: AnomalyKind
    value: float  # the value that broke the rule (norm, rms, count, ratio...)
    step: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The latest published state of one collection."""

    step: int
    global_norm: float  # L2 over the finite entries of every monitored grad
    nonfinite: bool  # any NaN/Inf in any monitored grad
    layers: dict[str, LayerStats]
    anomalies: list[Anomaly] = field(default_factory=list)
    timestamp: float = 0.0  # wall time of the collection
    skipped: bool = False  # the optimizer step was skipped (GradScaler found inf/NaN)


def finalize_layer(
    rows: Sequence[Sequence[float]], numel: int, param_sum_sq: float, received: bool
) -> LayerStats:
    """Combine the partial rows of the tensors that make up one layer into LayerStats."""
    sum_sq = sum(r[Col.SUM_SQ] for r in rows)
    total = sum(r[Col.SUM] for r in rows)
    nan = int(sum(r[Col.NAN_COUNT] for r in rows))
    inf = int(sum(r[Col.INF_COUNT] for r in rows))
    zeros = sum(r[Col.ZERO_COUNT] for r in rows)
    lo = min((r[Col.MIN] for r in rows), default=math.inf)
    hi = max((r[Col.MAX] for r in rows), default=-math.inf)
    finite = numel - nan - inf
    norm = math.sqrt(sum_sq)
    return LayerStats(
        numel=numel,
        norm=norm,
        rms=norm / math.sqrt(finite) if finite > 0 else 0.0,
        abs_max=max((r[Col.ABS_MAX] for r in rows), default=0.0),
        mean=total / finite if finite > 0 else 0.0,
        min=lo if finite > 0 else math.nan,
        max=hi if finite > 0 else math.nan,
        zero_ratio=zeros / numel if numel else 0.0,
        nan_count=nan,
        inf_count=inf,
        param_norm=math.sqrt(param_sum_sq),
        sum_squares=sum_sq,
        received=received,
    )


def no_grad_layer(numel: int, param_sum_sq: float) -> LayerStats:
    """A layer that received no gradient since the last collection."""
    return LayerStats(
        numel=numel,
        norm=0.0,
        rms=0.0,
        abs_max=0.0,
        mean=0.0,
        min=math.nan,
        max=math.nan,
        zero_ratio=1.0,  # torch treats a missing grad as zeros
        nan_count=0,
        inf_count=0,
        param_norm=math.sqrt(param_sum_sq),
        received=False,
    )


def global_norm(layers: dict[str, LayerStats]) -> float:
    return math.sqrt(sum(s.sum_squares for s in layers.values()))
