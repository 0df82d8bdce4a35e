"""What one collection found: per-layer statistics finalized from the partials."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

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
    # ‖Δw‖/‖w‖ of the last sampled step that measured this layer (collect.update_ratio_every);
    # None when off or not measured yet.
    update_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class ActivationStats:
    """One module's forward output over the forwards before one collected step (opt-in:
    `collect.activations`; see gradmon/agent/features/activations.py). Several forwards
    (micro-batches of gradient accumulation, a module called twice) add up. Magnitudes
    are over finite entries only; NaN/Inf entries are counted, never dropped silently."""

    numel: int  # entries seen, over every forward of the window
    rms: float  # sqrt(sum of squares / finite entries)
    mean: float  # over finite entries
    zero_ratio: float  # exact zeros / numel (dead ReLUs show up here)
    nan_count: int
    inf_count: int
    sum_squares: float = 0.0  # additive partial

    @property
    def nonfinite(self) -> bool:
        return bool(self.nan_count or self.inf_count)


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One health event: a layer (or "global") broke the rule `kind` at `step`."""

    layer: str
    kind: AnomalyKind
    value: float  # the value that broke the rule (norm, rms, count, ratio...)
    step: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The latest published state of one collection, as this process (rank) saw it.

    - One process, DDP, DataParallel: the statistics are of the gradients the optimizer
      steps with, i.e. after DDP's all-reduce (the average over ranks), so every DDP rank
      holds the same Snapshot.
    - FSDP2 (`fully_shard`): each rank sees its local shard of every parameter (the
      DTensor's `to_local()`, possibly empty). `LayerStats.numel` and every magnitude are
      the shard's; `sum_squares`, the counts and `numel` add up over ranks (sqrt of the
      summed `sum_squares` is the layer norm, the max of `abs_max` the layer's abs-max),
      while `norm`, `rms`, `mean` and `global_norm` are this rank's shard only.
    - HSDP, tensor parallel, pipeline stages: likewise this rank's shards, replicas and
      stage. The combined view of the whole model is Prometheus': each distinct shard is
      exported by one rank (agent/placement.py), so sums over ranks of
      gradmon_grad_sum_squares and gradmon_grad_global_sum_squares are exact (README,
      "Parallel layouts").
    """

    step: int
    global_norm: float  # L2 over the finite entries of every monitored grad
    nonfinite: bool  # any NaN/Inf in any monitored grad
    # Layer name -> LayerStats. The agent hands a LayerTable (columns, LayerStats built
    # when read); any Mapping does.
    layers: Mapping[str, LayerStats]
    anomalies: list[Anomaly] = field(default_factory=list)
    timestamp: float = 0.0  # wall time of the collection
    skipped: bool = False  # the optimizer step was skipped (GradScaler found inf/NaN)
    # Module name -> its forward output statistics (collect.activations); empty when off.
    activations: dict[str, ActivationStats] = field(default_factory=dict)
    # Where NaN/Inf first appeared in this step: with collect.activations, the first module
    # in forward order whose output held it; otherwise the first layer in backward order
    # (the order the grads became ready) whose gradient held it. None when all finite.
    nonfinite_origin: str | None = None


def combine_rows(rows: Sequence[Sequence[float]]) -> list[float]:
    """Combine partial rows (tensors of one module, shards, ranks): sums, mins and maxes."""
    out = list(rows[0])
    for r in rows[1:]:
        for col in (Col.SUM_SQ, Col.SUM, Col.ZERO_COUNT, Col.NAN_COUNT, Col.INF_COUNT):
            out[col] += r[col]
        out[Col.ABS_MAX] = max(out[Col.ABS_MAX], r[Col.ABS_MAX])
        out[Col.MIN] = min(out[Col.MIN], r[Col.MIN])
        out[Col.MAX] = max(out[Col.MAX], r[Col.MAX])
    return out


def finalize_layer(
    row: Sequence[float], numel: int, param_sum_sq: float, received: bool = True
) -> LayerStats:
    """Final values of one layer from its (combined) partial row."""
    sum_sq, total, abs_max, lo, hi, zeros, nan, inf = row[:8]
    finite = numel - nan - inf
    norm = math.sqrt(sum_sq)
    return LayerStats(
        numel=numel,
        norm=norm,
        rms=norm / math.sqrt(finite) if finite > 0 else 0.0,
        abs_max=abs_max,
        mean=total / finite if finite > 0 else 0.0,
        min=lo if finite > 0 else math.nan,
        max=hi if finite > 0 else math.nan,
        zero_ratio=zeros / numel if numel else 0.0,
        nan_count=int(nan),
        inf_count=int(inf),
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


def global_norm(layers: Mapping[str, LayerStats]) -> float:
    if isinstance(layers, LayerTable):
        return math.sqrt(float(layers.column("sum_squares").sum()))
    return math.sqrt(sum(s.sum_squares for s in layers.values()))


# The columns of a LayerTable: float64 arrays over its layers, in its order.
TABLE_COLUMNS = (
    "numel",
    "sum_squares",
    "sum",
    "abs_max",
    "min",
    "max",
    "zero_count",
    "nan_count",
    "inf_count",
    "param_sum_squares",
    "received",  # 1.0 / 0.0
    "update_ratio",  # NaN: not measured (yet)
)


class LayerTable(Mapping[str, LayerStats]):
    """Per-layer statistics held as columns (one float64 array per TABLE_COLUMNS entry,
    indexed like `names`). Whole-model work (health, counters, exposition) reads the
    columns; a LayerStats is built only when someone reads that layer, then kept."""

    __slots__ = ("_built", "_cols", "_position", "names")

    def __init__(self, names: Sequence[str], cols: Mapping[str, np.ndarray[Any, Any]]) -> None:
        # Kept, not copied (never mutated): the agent hands the same list every collection,
        # which lets the health rules reuse their lookup of it.
        self.names = names if isinstance(names, list) else list(names)
        self._cols = dict(cols)
        self._position: dict[str, int] | None = None  # built when a layer is looked up
        self._built: dict[str, LayerStats] = {}

    def _positions(self) -> dict[str, int]:
        if self._position is None:
            self._position = {n: i for i, n in enumerate(self.names)}
        return self._position

    def column(self, name: str) -> np.ndarray[Any, Any]:
        return self._cols[name]

    def with_column(self, name: str, values: np.ndarray[Any, Any]) -> LayerTable:
        return LayerTable(self.names, {**self._cols, name: values})

    def __getitem__(self, name: str) -> LayerStats:
        built = self._built.get(name)
        if built is None:
            built = self._built[name] = self._build(self._positions()[name])
        return built

    def _build(self, i: int) -> LayerStats:
        c = self._cols
        ratio = float(c["update_ratio"][i])
        numel, param_sq = int(c["numel"][i]), float(c["param_sum_squares"][i])
        if not c["received"][i]:
            stats = no_grad_layer(numel, param_sq)
        else:
            row = [float(c[k][i]) for k in TABLE_COLUMNS[1:9]]
            stats = finalize_layer(row, numel, param_sq)
        return stats if math.isnan(ratio) else dataclasses.replace(stats, update_ratio=ratio)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._positions()
