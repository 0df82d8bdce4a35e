"""gradmon.viz.plot_record: a record file's steps as one report."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradmon.snapshot import ANOMALY_KINDS
from gradmon.viz._common import log10_or_nan, new_figure, save_png

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ANOMALY_COLORS = {
    "nonfinite": "#d62728",
    "exploding": "#ff7f0e",
    "spike": "#e377c2",
    "vanishing": "#1f77b4",
    "dead": "#000000",
}
_MAX_HEATMAP_COLUMNS = 1500  # longer records are averaged (in log space) into this many
_MAX_MARKERS = 4000  # anomaly markers drawn on the heatmap, evenly thinned past this
_LABELLED_LINES = 8  # zero-ratio lines with a legend entry


@dataclass(frozen=True)
class _Record:
    """A record file as arrays, one column per collected step (numpy arrays typed Any)."""

    name: str  # the file's name, for the title
    steps: list[int]
    rows: list[dict[str, Any]]  # one record line per step
    names: list[str]  # the layers, in order of first appearance
    x: Any  # the steps as floats
    global_norm: Any
    log_norm: Any  # layers × steps, log10 of each layer's grad norm
    zero_ratio: Any  # layers × steps
    marks: dict[str, list[tuple[float, float]]]  # kind: (step, layer index) on the heatmap
    step_marks: dict[str, set[int]]  # kind: columns with such an anomaly, any layer
    losses: list[str]  # the logged scalars named like a loss


def plot_record(record_path: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path:
    """A report of a record file (see gradmon.sinks.record) as one PNG; returns its path.

    Panels: the global gradient norm (and logged losses) over steps, log y; a layers ×
    steps heatmap of log10 gradient norm; each layer's zero ratio over steps. Anomalies
    are marked where they happened, coloured by kind: on the heatmap at their layer, and
    on the global norm curve. A step recorded twice (a resumed run) shows its last line.
    """
    rec = _load_record(record_path)
    n_layers = len(rec.names)
    fig = new_figure(13, 8.5 + min(n_layers, 60) * 0.08)
    top, heat, zeros = fig.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [1.2, 2.2, 1.0]}
    )
    n_anomalies = sum(len(r.get("anomalies") or []) for r in rec.rows)
    fig.suptitle(
        f"gradmon record {rec.name}: {len(rec.steps)} collections, steps "
        f"{rec.steps[0]}..{rec.steps[-1]}, {n_layers} layers, {n_anomalies} anomalies"
    )
    _draw_global_norm(top, rec)
    _draw_heatmap(fig, heat, rec)
    _draw_zero_ratios(zeros, rec)
    return save_png(fig, out_png)


def _load_record(record_path: str | os.PathLike[str]) -> _Record:
    import numpy as np

    from gradmon.sinks.record import read_record

    by_step = {int(r["step"]): r for r in read_record(record_path)}  # last line of a step wins
    steps = sorted(by_step)
    rows = [by_step[s] for s in steps]
    layers: dict[str, None] = {}
    for r in rows:
        layers.update(dict.fromkeys(r["layers"]))
    names = list(layers)
    index = {n: i for i, n in enumerate(names)}
    x = np.asarray(steps, dtype=float)
    log_norm = np.full((len(names), len(steps)), np.nan)
    zero_ratio = np.full((len(names), len(steps)), np.nan)
    for j, r in enumerate(rows):
        for name, s in r["layers"].items():
            log_norm[index[name], j] = log10_or_nan(_num(s.get("norm")))
            zero_ratio[index[name], j] = _num(s.get("zero_ratio"))
    marks, step_marks = _anomaly_marks(rows, x, index)
    return _Record(
        name=Path(record_path).name,
        steps=steps,
        rows=rows,
        names=names,
        x=x,
        global_norm=np.array([_num(r.get("global_norm")) for r in rows]),
        log_norm=log_norm,
        zero_ratio=zero_ratio,
        marks=marks,
        step_marks=step_marks,
        losses=sorted({k for r in rows for k in (r.get("scalars") or {}) if "loss" in k.lower()}),
    )


def _anomaly_marks(
    rows: list[dict[str, Any]], x: Any, index: dict[str, int]
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, set[int]]]:
    """Where each kind of anomaly happened: (step, layer index) points for the anomalies
    of a layer, and the columns of all of them (global ones too). Known kinds first."""
    marks: dict[str, list[tuple[float, float]]] = {k: [] for k in ANOMALY_KINDS}
    step_marks: dict[str, set[int]] = {k: set() for k in ANOMALY_KINDS}
    for j, r in enumerate(rows):
        for a in r.get("anomalies") or []:
            kind = str(a.get("kind"))
            marks.setdefault(kind, [])
            step_marks.setdefault(kind, set()).add(j)
            if a.get("layer") in index:
                marks[kind].append((x[j], float(index[a["layer"]])))
    return marks, step_marks


def _draw_global_norm(top: Axes, rec: _Record) -> None:
    """The global norm over steps (log y), logged losses, anomalies as dots on the curve."""
    import numpy as np

    positive = np.where(rec.global_norm > 0, rec.global_norm, np.nan)
    top.plot(rec.x, positive, color="#333333", lw=1.2, label="global grad norm")
    top.set_yscale("log")
    top.set_ylabel("global grad norm")
    handles, labels = top.get_legend_handles_labels()
    if rec.losses:
        h2, l2 = _draw_losses(top, rec)
        handles, labels = handles + h2, labels + l2
    for kind, js in rec.step_marks.items():
        if not js:
            continue
        where = sorted(js)
        y = positive[where]
        y = np.where(np.isfinite(y), y, np.nanmax(positive) if np.isfinite(positive).any() else 1)
        handles.append(
            top.scatter(
                rec.x[where],
                y,
                s=22,
                color=ANOMALY_COLORS.get(kind, "#7f7f7f"),
                zorder=3,
                label=kind,
            )
        )
        labels.append(kind)
    top.legend(handles, labels, loc="upper left", fontsize=8, ncols=min(len(labels), 6))
    top.grid(True, which="major", alpha=0.3)


def _draw_losses(top: Axes, rec: _Record) -> tuple[list[Artist], list[Any]]:
    """The first three losses on a right axis (log y if all positive); its legend entries."""
    import numpy as np

    right = top.twinx()
    curves = [
        np.array([_num((r.get("scalars") or {}).get(name)) for r in rec.rows])
        for name in rec.losses[:3]
    ]
    for k, (name, values) in enumerate(zip(rec.losses, curves, strict=False)):
        right.plot(rec.x, values, lw=1.0, color=f"C{k + 2}", alpha=0.9, label=name)
    finite = np.concatenate([c[np.isfinite(c)] for c in curves])
    if finite.size and finite.min() > 0:
        right.set_yscale("log")
    right.set_ylabel(", ".join(rec.losses[:3]))
    return right.get_legend_handles_labels()


def _draw_heatmap(fig: Figure, heat: Axes, rec: _Record) -> None:
    """Layers × steps of log10 norm, anomalies of a layer as crosses at their cell."""
    import numpy as np
    from matplotlib import colormaps

    n_layers = len(rec.names)
    image, edges = _heatmap_columns(rec.log_norm, _edges(rec.x))
    masked = np.ma.masked_invalid(image)
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    mesh = heat.pcolormesh(edges, np.arange(n_layers + 1) - 0.5, masked, cmap=cmap, shading="flat")
    cax = heat.inset_axes((1.005, 0.0, 0.012, 1.0))
    fig.colorbar(mesh, cax=cax, label="log10 grad norm (grey: zero or no data)")
    heat.set_ylim(n_layers - 0.5, -0.5)
    tick_every = max(1, math.ceil(n_layers / 40))
    heat.set_yticks(range(0, n_layers, tick_every))
    heat.set_yticklabels(
        [rec.names[i] for i in range(0, n_layers, tick_every)], fontsize=7 if n_layers > 15 else 8
    )
    heat.set_ylabel("layer")
    for kind, points in rec.marks.items():
        if not points:
            continue
        if len(points) > _MAX_MARKERS:
            points = points[:: math.ceil(len(points) / _MAX_MARKERS)]
        px, py = zip(*points, strict=True)
        heat.scatter(
            px, py, s=14, marker="x", color=ANOMALY_COLORS.get(kind, "#7f7f7f"), linewidths=1.2
        )


def _heatmap_columns(log_norm: Any, edges: Any) -> tuple[Any, Any]:
    """The heatmap's image and column edges: columns averaged in log space past
    _MAX_HEATMAP_COLUMNS steps."""
    import numpy as np

    n_steps = log_norm.shape[1]
    if n_steps <= _MAX_HEATMAP_COLUMNS:
        return log_norm, edges
    groups = np.array_split(np.arange(n_steps), _MAX_HEATMAP_COLUMNS)
    with warnings.catch_warnings():  # all-NaN groups: "Mean of empty slice"
        warnings.simplefilter("ignore", RuntimeWarning)
        image = np.stack([np.nanmean(log_norm[:, g], axis=1) for g in groups], axis=1)
    return image, np.array([edges[g[0]] for g in groups] + [edges[-1]])


def _draw_zero_ratios(zeros: Axes, rec: _Record) -> None:
    """Each layer's zero ratio over steps; the layers that reached the highest ratios get a
    legend entry."""
    import numpy as np

    peak = np.where(np.isfinite(rec.zero_ratio), rec.zero_ratio, -1).max(axis=1)
    labelled = set(np.argsort(-peak, kind="stable")[:_LABELLED_LINES].tolist())
    for i, name in enumerate(rec.names):
        if i in labelled:
            zeros.plot(rec.x, rec.zero_ratio[i], lw=1.1, label=name)
        else:
            zeros.plot(rec.x, rec.zero_ratio[i], lw=0.6, color="#bbbbbb")
    zeros.set_ylim(-0.03, 1.03)
    zeros.set_ylabel("zero ratio")
    zeros.set_xlabel("step")
    zeros.grid(True, alpha=0.3)
    zeros.legend(loc="upper left", fontsize=7, ncols=2)


def _edges(x: Any) -> Any:
    """Cell edges around step positions (midpoints; the ends mirror their neighbour)."""
    import numpy as np

    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def _num(value: Any) -> float:
    """A record value (None = NaN/Inf in the file) as a float."""
    return math.nan if value is None else float(value)
