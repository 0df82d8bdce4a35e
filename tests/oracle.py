"""The float64 oracle check shared by the backend tests (C kernel, Triton)."""

from __future__ import annotations

import math

import pytest
import torch

from gradmon.stats import reference
from gradmon.stats.layout import NCOLS, Col

EXACT_COLS = [Col.ABS_MAX, Col.MIN, Col.MAX, Col.ZERO_COUNT, Col.NAN_COUNT, Col.INF_COUNT]


def assert_matches_reference(
    grads: list[torch.Tensor], got: torch.Tensor, *, cancellation: float, floor: float = 0.0
) -> torch.Tensor:
    """Backend vs oracle: sums to 1e-6 relative (plus `cancellation` x sum|x| + `floor`
    absolute, the bound for a sum whose terms cancel), every other column exactly."""
    want = reference.compute_partials(grads)
    assert got.shape == (len(grads), NCOLS)
    assert got.dtype == torch.float64
    for i, g in enumerate(grads):
        x = g.detach().double().reshape(-1)
        scale = float(x[torch.isfinite(x)].abs().sum())
        for col in (Col.SUM_SQ, Col.SUM):
            a, b = float(got[i, col]), float(want[i, col])
            if math.isinf(b):
                assert a == b, (i, col.name, a, b)
            else:
                tol = cancellation * scale + floor
                assert a == pytest.approx(b, rel=1e-6, abs=tol), (i, col.name, a, b)
        for col in EXACT_COLS:
            assert float(got[i, col]) == float(want[i, col]), (i, col.name, got[i], want[i])
    return got
