"""Visual tools: a record file over time, one step's gradients, activation maximization.

    gradmon.viz.plot_record("run.jsonl", "report.png")    # `gradmon plot run.jsonl -o report.png`
    gradmon.viz.plot_gradients(model, "grads.png")         # after backward(), or a Snapshot
    x = gradmon.viz.maximize_activation(model, "features.3", unit=5, input_shape=(1, 3, 32, 32))

matplotlib is an extra (`pip install gradmon[viz]`), imported when a plot is drawn. The
figures are drawn with matplotlib's object API on its Agg canvas (no pyplot), so they
need no display and leave the backend of an interactive session alone.
"""

from __future__ import annotations

import difflib
import math
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradmon.errors import GradmonError
from gradmon.snapshot import ANOMALY_KINDS, LayerStats, Snapshot, finalize_layer
from gradmon.stats import reference
from gradmon.stats.torch import first_float_tensor, real_view

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from torch.utils.hooks import RemovableHandle

__all__ = ["maximize_activation", "plot_gradients", "plot_inputs", "plot_record"]

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
_START_SCALES = (0.1, 1.0, 4.0)  # noise levels maximize_activation starts from, in turn


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "gradmon.viz needs matplotlib, which is not installed: pip install 'gradmon[viz]'"
        ) from exc
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Figure, out_png: str | os.PathLike[str]) -> Path:
    out = Path(out_png)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    except OSError as exc:
        raise GradmonError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def _num(value: Any) -> float:
    """A record value (None = NaN/Inf in the file) as a float."""
    return math.nan if value is None else float(value)


def _log10(value: float) -> float:
    return math.log10(value) if value > 0 and math.isfinite(value) else math.nan


# --------------------------------------------------------------------- record file
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
    fig = _figure(13, 8.5 + min(n_layers, 60) * 0.08)
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
    return _save(fig, out_png)


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
            log_norm[index[name], j] = _log10(_num(s.get("norm")))
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


# ------------------------------------------------------------------- one step
def _stats_from_model(model: nn.Module) -> dict[str, LayerStats | None]:
    """Per-parameter statistics of the current `.grad`s (None: no grad), from the float64
    reference partials (gradmon.stats.reference). Host-side: this syncs, which is fine
    for a picture."""
    out: dict[str, LayerStats | None] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is None:
                out[name] = None
                continue
            g = real_view(p.grad.detach())
            g = g.to_dense() if g.is_sparse else g
            w = real_view(p.detach()).to(torch.float64)
            row = reference.tensor_partials(g)
            out[name] = finalize_layer(row, g.numel(), float(w.square().sum()))
    return out


def plot_gradients(model_or_snapshot: Any, out_png: str | os.PathLike[str]) -> Path:
    """A per-layer picture of one step's gradients as a PNG; returns its path.

    `model_or_snapshot`: an nn.Module (reads each parameter's `.grad`, so call it after
    backward()), a gradmon.Snapshot (its layers), or a Monitor (its latest snapshot).
    Left: log10 of each layer's grad norm and rms as bars, abs-max as a marker; right:
    the zero ratio. Layers with NaN/Inf entries are drawn red and annotated with their
    counts in their label; layers that received no gradient are greyed and labelled, and
    all-zero gradients are labelled too.
    """
    stats, title = _gradient_stats(model_or_snapshot)
    n = len(stats)
    floor = _log_floor(stats)
    fig = _figure(13, 2.2 + min(n, 120) * 0.22)
    bars, zeros = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    fig.suptitle(title)
    for i, s in enumerate(stats.values()):
        if s is not None:
            _draw_layer_bars(bars, zeros, i, s, floor)
    handles, labels = bars.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one entry per kind of bar
    if unique:
        bars.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8)
    _label_layers(bars, stats)
    bars.set_ylim(n - 0.5, -0.5)
    bars.set_xlim(left=floor)
    bars.set_xlabel("log10 (grad norm, rms; ◆ abs max)")
    bars.grid(True, axis="x", alpha=0.3)
    zeros.set_xlim(0, 1)
    zeros.set_xlabel("zero ratio")
    zeros.grid(True, axis="x", alpha=0.3)
    return _save(fig, out_png)


def _gradient_stats(model_or_snapshot: Any) -> tuple[dict[str, LayerStats | None], str]:
    """Each layer's statistics (None: it received no gradient) and the figure's title."""
    if isinstance(model_or_snapshot, nn.Module):
        stats = _stats_from_model(model_or_snapshot)
        if not any(s is not None for s in stats.values()):
            what = "parameters" if stats else "no parameters at all"
            raise GradmonError(
                f"plot_gradients(): {type(model_or_snapshot).__name__} has {what} but no "
                "gradients (every .grad is None); call it after loss.backward()"
            )
        return stats, f"{type(model_or_snapshot).__name__}: gradients"
    snap = _snapshot_of(model_or_snapshot)
    title = f"step {snap.step}: global grad norm {snap.global_norm:.4g}"
    if snap.nonfinite:
        title += " (NaN/Inf present)"
    return {k: (v if v.received else None) for k, v in snap.layers.items()}, title


def _snapshot_of(snapshot_or_monitor: Any) -> Snapshot:
    """A Snapshot as it is, or a Monitor's latest; one with layers."""
    snap = snapshot_or_monitor
    if not isinstance(snap, Snapshot) and callable(getattr(snap, "snapshot", None)):
        snap = snap.snapshot(wait=True)  # a Monitor
        if snap is None:
            raise GradmonError("plot_gradients(): the Monitor has not collected yet")
    if not isinstance(snap, Snapshot):
        raise GradmonError(
            "plot_gradients() needs an nn.Module, a gradmon.Snapshot or a Monitor, "
            f"not {type(snapshot_or_monitor).__name__}"
        )
    if not snap.layers:
        raise GradmonError(f"plot_gradients(): the snapshot of step {snap.step} has no layers")
    return snap


def _log_floor(stats: dict[str, LayerStats | None]) -> float:
    """Where the log10 bars start: a decade below the smallest finite value drawn."""
    values = [s for s in stats.values() if s is not None]
    floor_candidates = [
        _log10(v) for s in values for v in (s.norm, s.rms, s.abs_max) if _log10(v) == _log10(v)
    ]
    return math.floor(min(floor_candidates)) - 1 if floor_candidates else -12.0


def _draw_layer_bars(bars: Axes, zeros: Axes, i: int, s: LayerStats, floor: float) -> None:
    """Row i: log10 norm and rms bars (red with NaN/Inf), abs max marker, zero ratio."""
    bad = bool(s.nan_count or s.inf_count)
    norm, rms, amax = (_log10(v) for v in (s.norm, s.rms, s.abs_max))
    for offset, value, color, label in (
        (-0.2, norm, "#d62728" if bad else "#1f77b4", "norm"),
        (0.2, rms, "#ff9896" if bad else "#aec7e8", "rms"),
    ):
        if value == value:
            bars.barh(i + offset, value - floor, left=floor, height=0.38, color=color, label=label)
    if amax == amax:
        bars.plot([amax], [i], marker="D", ms=4, color="#2ca02c", ls="", label="abs max")
    zeros.barh(i, s.zero_ratio, height=0.6, color="#7f7f7f" if s.zero_ratio < 1 else "k")


def _label_layers(bars: Axes, stats: dict[str, LayerStats | None]) -> None:
    """The layer names as y tick labels, annotated; no grad in grey, NaN/Inf in red."""
    bars.set_yticks(list(range(len(stats))))
    bars.set_yticklabels(
        [_layer_label(name, s) for name, s in stats.items()], fontsize=7 if len(stats) > 30 else 8
    )
    for label, s in zip(bars.get_yticklabels(), stats.values(), strict=True):
        if s is None:
            label.set_color("#7f7f7f")
        elif s.nan_count or s.inf_count:
            label.set_color("#d62728")


def _layer_label(name: str, s: LayerStats | None) -> str:
    if s is None:
        return f"{name}  (no grad)"
    if s.nan_count or s.inf_count:
        return f"{name}  [NaN {s.nan_count}, Inf {s.inf_count}]"
    if s.norm == 0:
        return f"{name}  (all zero)"
    return name


# ------------------------------------------------------- activation maximization
def _resolve_module(model: nn.Module, module_name: str) -> nn.Module:
    modules: dict[str, nn.Module] = dict(model.named_modules())
    if module_name in modules:
        return modules[module_name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(module_name, names, n=3, cutoff=0.5)
    shown = close + [n for n in names if n not in close][: max(0, 6 - len(close))]
    raise GradmonError(
        f"maximize_activation(module_name={module_name!r}): {type(model).__name__} has no "
        f"such module; valid names include {', '.join(repr(n) for n in shown) or '(none)'}"
        + (f" ({len(names)} in all)" if len(names) > len(shown) else "")
    )


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbours along the last two (spatial) dims."""
    tv = (x[..., 1:] - x[..., :-1]).abs().mean()
    if x.dim() >= 4:
        tv = tv + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return tv


def maximize_activation(
    model: nn.Module,
    module_name: str,
    unit: int,
    input_shape: Sequence[int],
    steps: int = 200,
    lr: float = 0.05,
    l2: float = 1e-3,
    tv: float = 1e-2,
    jitter: int = 2,
    seed: int = 0,
) -> torch.Tensor:
    """The input that maximizes the mean activation of channel `unit` of a module.

    Gradient ascent (Adam) on the input, starting from faint Gaussian noise (stronger
    noise when the unit gives no gradient there, e.g. a silent ReLU): the objective is the
    mean over batch and spatial positions of output channel `unit` (dim 1) of
    `module_name`, read with a forward hook, minus `l2` × mean(x²) and `tv` × total
    variation (for inputs with spatial dims). `jitter` > 0 shifts the input by up to that
    many pixels each step (robustness to translation, fewer high-frequency artefacts).
    The model runs in eval mode with its parameters frozen; its mode, `requires_grad`
    flags and `.grad`s are as before afterwards. Returns the optimized input, detached,
    on the model's device.
    """
    shape = _check_arguments(model, input_shape, steps, lr, l2, tv, jitter)
    activation = _UnitActivation(model, module_name, unit)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    with activation, _frozen_eval(model), torch.enable_grad():
        x = _starting_point(activation, noise)
        optimizer = torch.optim.Adam([x], lr=lr)
        shifts = random.Random(seed)
        for _ in range(steps):
            inp = _shifted(x, shifts, jitter) if jitter and len(shape) >= 3 else x
            loss = _loss(activation, inp, x, l2, tv)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return x.detach()


def _check_arguments(
    model: nn.Module,
    input_shape: Sequence[int],
    steps: int,
    lr: float,
    l2: float,
    tv: float,
    jitter: int,
) -> tuple[int, ...]:
    """maximize_activation's arguments checked; the input shape as a tuple of ints."""
    if not isinstance(model, nn.Module):
        raise GradmonError(f"maximize_activation() needs an nn.Module, not {type(model).__name__}")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise GradmonError(
            f"maximize_activation(input_shape={tuple(input_shape)!r}): needs (batch, channels, "
            "...) with every size >= 1, e.g. (1, 3, 32, 32)"
        )
    if steps < 1 or lr <= 0 or l2 < 0 or tv < 0 or jitter < 0:
        raise GradmonError(
            "maximize_activation(): needs steps >= 1, lr > 0, l2 >= 0, tv >= 0, jitter >= 0 "
            f"(got steps={steps}, lr={lr}, l2={l2}, tv={tv}, jitter={jitter})"
        )
    return shape


class _UnitActivation:
    """Calling it runs the model and returns the mean of output channel `unit` of the
    module, read with a forward hook; the hook is in place inside `with`."""

    def __init__(self, model: nn.Module, module_name: str, unit: int) -> None:
        self.model, self.module_name, self.unit = model, module_name, unit
        self.module = _resolve_module(model, module_name)
        self._captured: list[torch.Tensor] = []
        self._handle: RemovableHandle | None = None

    def __enter__(self) -> _UnitActivation:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self._captured.append(first_float_tensor(output))  # type: ignore[arg-type]

    def __call__(self, inp: torch.Tensor) -> torch.Tensor:
        self._captured.clear()
        self.model(inp)
        out = self._captured[0] if self._captured else None
        if out is None:
            raise GradmonError(
                f"maximize_activation(): module {self.module_name!r} did not run in the forward "
                "pass, or its output is not a tensor"
            )
        if out.dim() < 2 or not 0 <= self.unit < out.shape[1]:
            size = out.shape[1] if out.dim() >= 2 else 0
            raise GradmonError(
                f"maximize_activation(unit={self.unit}): module {self.module_name!r} outputs "
                f"shape {tuple(out.shape)}; unit must be in 0..{size - 1} (a channel of dim 1)"
            )
        return out[:, self.unit].float().mean()


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """The model in eval mode with its parameters frozen; its mode and `requires_grad`
    flags restored afterwards."""
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)


def _starting_point(activation: _UnitActivation, noise: torch.Tensor) -> torch.Tensor:
    """The input the ascent starts from, requiring grad."""
    # Start from faint noise (the picture is then what the ascent drew). A unit behind a
    # ReLU may be silent there, with no gradient to climb: then start from stronger noise.
    for scale in _START_SCALES:
        x = (noise * scale).requires_grad_(True)
        act = activation(x)
        if not act.requires_grad:
            raise GradmonError(
                f"maximize_activation(): the output of module {activation.module_name!r} does "
                "not depend on the input (no gradient reaches it)"
            )
        (grad,) = torch.autograd.grad(act, x, allow_unused=True)
        if grad is not None and bool(grad.abs().sum() > 0):  # one sync, before the loop
            break
    return x


def _shifted(x: torch.Tensor, shifts: random.Random, jitter: int) -> torch.Tensor:
    """x rolled by up to `jitter` positions along its spatial dims (the last one or two)."""
    dy, dx = shifts.randint(-jitter, jitter), shifts.randint(-jitter, jitter)
    if x.dim() >= 4:
        return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return torch.roll(x, shifts=dx, dims=-1)


def _loss(
    activation: _UnitActivation, inp: torch.Tensor, x: torch.Tensor, l2: float, tv: float
) -> torch.Tensor:
    """What the ascent minimizes: minus the activation on `inp` (x, maybe shifted), plus
    `l2` × mean(x²) and, for inputs with spatial dims, `tv` × total variation of x."""
    loss = -activation(inp) + l2 * x.float().pow(2).mean()
    if tv and x.dim() >= 3:
        loss = loss + tv * _total_variation(x.float())
    return loss


def plot_inputs(
    inputs: Sequence[torch.Tensor],
    out_png: str | os.PathLike[str],
    titles: Sequence[str] | None = None,
) -> Path:
    """A grid of inputs (e.g. from maximize_activation) as a PNG; returns its path.

    Each input's first batch item is shown: 3 channels as RGB, others as the channel
    mean in grey, each scaled to its own min..max; inputs without spatial dims as bars.
    """
    if not inputs:
        raise GradmonError("plot_inputs(): no inputs to draw")
    count = len(inputs)
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    fig = _figure(2.6 * cols, 2.6 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= count:
            ax.set_axis_off()
            continue
        item = inputs[k].detach().float().cpu()[0]
        if titles is not None and k < len(titles):
            ax.set_title(titles[k], fontsize=9)
        if item.dim() >= 3 or (item.dim() == 2 and item.shape[0] > 1):
            image = item if item.dim() >= 3 else item.unsqueeze(0)
            image = image.reshape(image.shape[0], image.shape[-2], image.shape[-1])
            lo, hi = image.min(), image.max()
            image = (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)
            if image.shape[0] == 3:
                ax.imshow(image.permute(1, 2, 0).numpy())
            else:
                ax.imshow(image.mean(0).numpy(), cmap="gray")
            ax.set_axis_off()
        else:
            values = item.reshape(-1).numpy()
            ax.bar(range(len(values)), values, color="#1f77b4")
            ax.tick_params(labelsize=7)
    return _save(fig, out_png)
