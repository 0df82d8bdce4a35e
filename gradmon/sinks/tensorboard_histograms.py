"""The gradient histograms of the TensorBoard sink (`grad_hist/<layer>`), one job in two
halves: computed on the grads' device at collection time, read on the storage thread.

On the training thread (`device_histograms`, from the sink's on_collect) a layer's
histogram is a few sync-free tensor ops on the grads' device (finite min/max, torch.histc
over the values rescaled to [0, 1]; a strided sample past `histogram_max_elements`); on
CUDA the table of a collection is copied without blocking into pinned memory behind an
event, and nothing waits for it there. On the storage thread (`histogram_args`) the event
is waited for and the rows become add_histogram_raw arguments, so reading device values
only ever blocks that thread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "HIST_HEAD",
    "HistogramMethod",
    "Histograms",
    "device_histograms",
    "histogram_args",
    "histogram_row",
]

# A histogram row: [lo, hi, num, sum, sum_squares, counts[bins]...] in float64.
HIST_HEAD = 5

HistogramMethod = Literal["auto", "histc", "sort"]


def histogram_row(
    tensors: list[torch.Tensor], bins: int, max_elements: int, method: HistogramMethod = "auto"
) -> torch.Tensor:
    """One layer's histogram as a float64 row on the grads' device, without a device sync.

    Bins split [finite min, finite max] of the layer into `bins` equal parts; NaN/Inf
    entries are left out (the layer's nan/inf counts are in the scalars). A grad of more
    than `max_elements` entries is sampled with an odd stride (so a power-of-two row
    length never aliases onto a single column).

    method: "histc" masks non-finite entries and rescales to [0, 1] for torch.histc,
    all on the device; "sort" counts with a sort and searchsorted instead (torch.histc
    on CUDA refuses torch.use_deterministic_algorithms); "auto" is "histc", except for
    CPU tensors with no NaN/Inf, where reading min/max costs nothing and two passes do.
    """
    flat = []
    for t in tensors:
        v = t.detach().reshape(-1)
        if v.numel() > max_elements:
            stride = -(-v.numel() // max_elements) | 1
            v = v[::stride]
        flat.append(v)
    x = flat[0] if len(flat) == 1 else torch.cat(flat)
    if x.dtype != torch.float64:
        x = x.float()
    device = x.device
    if x.numel() == 0:
        return torch.zeros(HIST_HEAD + bins, dtype=torch.float64, device=device)
    if method == "auto" and device.type == "cpu":
        # Host memory: reading a value costs no device sync. min/max propagate NaN and
        # Inf, so finite ones mean every entry is finite: two passes instead of eight.
        lo, hi = torch.aminmax(x)
        lo_f, hi_f = float(lo), float(hi)
        if math.isfinite(lo_f) and math.isfinite(hi_f):
            x64 = x.to(torch.float64)
            head = torch.tensor([lo_f, hi_f, float(x.numel())], dtype=torch.float64)
            if hi_f > lo_f:  # bincount: ~3x faster than torch.histc on the CPU
                index = ((x - lo_f) * (bins / (hi_f - lo_f))).long().clamp_(0, bins - 1)
                counts = torch.bincount(index, minlength=bins).to(torch.float64)
            else:
                counts = torch.zeros(bins, dtype=torch.float64)
                counts[0] = x.numel()
            return torch.cat([head, x64.sum().reshape(1), torch.dot(x64, x64).reshape(1), counts])
    # Device path: no Python branch on a value, no host->device copy (torch.tensor(...,
    # device=cuda) would be one, and a blocking copy syncs); scalars go in as Python numbers.
    finite = torch.isfinite(x)
    lo = x.masked_fill(~finite, math.inf).amin()
    hi = x.masked_fill(~finite, -math.inf).amax()
    any_finite = hi >= lo  # False when no entry is finite (lo=+inf, hi=-inf)
    lo = torch.where(any_finite, lo, 0.0)
    hi = torch.where(any_finite, hi, 0.0)
    span = torch.where(hi > lo, hi - lo, 1.0)
    # Finite entries land in [0, 1]; the others at -1, outside the histogram's range.
    unit = torch.where(finite, (x - lo) / span, -1.0)
    if method == "sort":
        ordered = unit.sort().values
        edges = torch.linspace(0.0, 1.0, bins + 1, dtype=x.dtype, device=device)
        starts = torch.searchsorted(ordered, edges[:-1])
        end = torch.searchsorted(ordered, edges[-1:], right=True)
        counts = torch.diff(torch.cat([starts, end])).to(torch.float64)
    else:
        counts = torch.histc(unit, bins=bins, min=0.0, max=1.0).to(torch.float64)
    kept = x.masked_fill(~finite, 0.0).to(torch.float64)
    head = torch.stack(
        [
            lo.to(torch.float64),
            hi.to(torch.float64),
            finite.sum().to(torch.float64),
            kept.sum(),
            torch.dot(kept, kept),
        ]
    )
    return torch.cat([head, counts])


@dataclass
class Histograms:
    """One collection's histograms, per device, on their way to the storage thread."""

    step: int
    parts: list[tuple[list[str], torch.Tensor, Any]]  # (layers, [L, 5+bins] rows, event)


def device_histograms(
    step: int, grads: Mapping[str, list[torch.Tensor]], bins: int, max_elements: int
) -> Histograms:
    """Every layer's histogram row, launched on the grads' devices; never syncs."""
    # torch.histc on CUDA raises under torch.use_deterministic_algorithms(True).
    deterministic = torch.are_deterministic_algorithms_enabled()
    by_device: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    for name, tensors in grads.items():
        if not tensors:
            continue
        device = tensors[0].device
        row = histogram_row(
            tensors,
            bins,
            max_elements,
            "sort" if deterministic and device.type == "cuda" else "auto",
        )
        names, rows = by_device.setdefault(device, ([], []))
        names.append(name)
        rows.append(row)
    hist = Histograms(step, [])
    for device, (names, rows) in by_device.items():
        table = torch.stack(rows)
        event = None
        if device.type == "cuda":
            # As the monitor does with its partials: a non-blocking copy into pinned
            # memory behind an event; only the writer thread waits for it.
            staging = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
            staging.copy_(table, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(device))
            table = staging
        hist.parts.append((names, table, event))
    return hist


def histogram_args(hist: Histograms, bins: int) -> list[dict[str, Any]]:
    """add_histogram_raw's keyword arguments for each layer with a finite entry.
    Waits for the device copy: call it on the storage thread only."""
    out: list[dict[str, Any]] = []
    for names, table, event in hist.parts:
        if event is not None:
            event.synchronize()  # sync-ok: the storage thread, not the training thread
        rows = table.cpu().tolist()
        for name, row in zip(names, rows, strict=True):
            lo, hi, num, total, sum_sq = row[:HIST_HEAD]
            counts = row[HIST_HEAD:]
            if num <= 0:
                continue  # no finite entry: nothing to draw
            if hi > lo:
                limits = [lo + (hi - lo) * (k + 1) / bins for k in range(bins)]
            else:  # every finite entry has the same value
                limits, counts = [hi], [num]
            out.append(
                {
                    "tag": f"grad_hist/{name}",
                    "min": lo,
                    "max": hi,
                    "num": num,
                    "sum": total,
                    "sum_squares": sum_sq,
                    "bucket_limits": limits,
                    "bucket_counts": counts,
                    "global_step": hist.step,
                }
            )
    return out
