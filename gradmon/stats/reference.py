"""The float64 reference: slow, obviously right, the oracle every backend is tested against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradmon.stats.layout import NCOLS, Col


def tensor_partials(grad: torch.Tensor) -> list[float]:
    """Partials of one tensor, computed in float64 on the host."""
    x = grad.detach().reshape(-1)
    if x.is_complex():
        raise TypeError("complex gradients are not supported")
    x = x.to(device="cpu", dtype=torch.float64)
    nan = torch.isnan(x)
    inf = torch.isinf(x)
    finite = x[~(nan | inf)]
    out = [0.0] * NCOLS
    out[Col.SUM_SQ] = float((finite * finite).sum())
    out[Col.SUM] = float(finite.sum())
    out[Col.ABS_MAX] = float(finite.abs().max()) if finite.numel() else 0.0
    out[Col.MIN] = float(finite.min()) if finite.numel() else float("inf")
    out[Col.MAX] = float(finite.max()) if finite.numel() else float("-inf")
    out[Col.ZERO_COUNT] = float((x == 0).sum())
    out[Col.NAN_COUNT] = float(nan.sum())
    out[Col.INF_COUNT] = float(inf.sum())
    return out


def compute_partials(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """[T, 8] float64 partials on the CPU, one row per tensor (see `layout.Col`)."""
    rows = [tensor_partials(g) for g in grads]
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), NCOLS)
