"""gradmon.viz.plot_gradients: one step's gradients, layer by layer."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradmon.errors import GradmonError
from gradmon.snapshot import LayerStats, Snapshot, finalize_layer
from gradmon.stats import reference
from gradmon.stats.torch import real_view
from gradmon.viz._common import log10_or_nan, new_figure, save_png

if TYPE_CHECKING:
    from matplotlib.axes import Axes


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
    fig = new_figure(13, 2.2 + min(n, 120) * 0.22)
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
    return save_png(fig, out_png)


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
    logs = [
        log10_or_nan(v) for s in stats.values() if s is not None for v in (s.norm, s.rms, s.abs_max)
    ]
    finite = [v for v in logs if not math.isnan(v)]
    return math.floor(min(finite)) - 1 if finite else -12.0


def _draw_layer_bars(bars: Axes, zeros: Axes, i: int, s: LayerStats, floor: float) -> None:
    """Row i: log10 norm and rms bars (red with NaN/Inf), abs max marker, zero ratio."""
    bad = bool(s.nan_count or s.inf_count)
    norm, rms, amax = (log10_or_nan(v) for v in (s.norm, s.rms, s.abs_max))
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
