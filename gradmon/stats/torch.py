"""The plain torch backend: works on any device and dtype, never syncs with the host.

Several kernels per tensor, so it is the slow path; the C kernel (CPU) and the Triton
kernel (CUDA) are the fast ones. Every value stays a device tensor: no read-back to the
host, no Python branch on a tensor value, so a CUDA stream is never stalled by this code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradmon.stats.layout import NCOLS, Col


def _tensor_row(grad: torch.Tensor) -> torch.Tensor:
    x = grad.detach().reshape(-1)
    if x.dtype != torch.float64:
        # fp32 accumulation at least: fp16 grads of 300 would overflow a fp16 sum of squares.
        x = x.float()
    if x.numel() == 0:
        # numel is metadata, so branching on it costs no sync. Fills, not torch.tensor(list):
        # a list would be copied from pageable host memory, which blocks on CUDA.
        row = torch.zeros(NCOLS, dtype=torch.float64, device=x.device)
        row[Col.MIN] = float("inf")
        row[Col.MAX] = float("-inf")
        return row
    finite = torch.isfinite(x)
    nan_count = torch.isnan(x).sum(dtype=torch.float64)
    finite_count = finite.sum(dtype=torch.float64)
    xf = torch.where(finite, x, 0.0)
    # float64 accumulation: a plain fp32 sum of squares is ~1% off at 1e8 elements, and
    # squares of finite fp32 values above ~1.8e19 overflow fp32.
    sum_sq = torch.linalg.vector_norm(xf, dtype=torch.float64).square()
    total = xf.sum(dtype=torch.float64)
    lo = torch.where(finite, x, float("inf")).min().double()
    hi = torch.where(finite, x, float("-inf")).max().double()
    abs_max = torch.clamp(torch.maximum(-lo, hi), min=0.0)
    zeros = (x == 0).sum(dtype=torch.float64)
    inf_count = x.numel() - finite_count - nan_count
    return torch.stack([sum_sq, total, abs_max, lo, hi, zeros, nan_count, inf_count])


def compute_partials(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """[T, 8] float64 partials on the grads' device (see `layout.Col`)."""
    if not grads:
        return torch.zeros((0, NCOLS), dtype=torch.float64)
    return torch.stack([_tensor_row(g) for g in grads])


# ---------------------------------------------------- per-tensor helpers shared by callers
def real_view(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors as their real and imaginary parts (two entries per element), so
    every statistic of a complex tensor is over both parts (its norm the complex L2 norm)."""
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def dense_view(x: torch.Tensor) -> torch.Tensor:
    """x with its dims permuted so that it is contiguous, where that is possible (a
    transposed attention output): the statistics do not depend on the order of the
    entries, and a flat view then costs no copy. Decided on strides (metadata) only."""
    if x.is_contiguous():
        return x
    strides, sizes = x.stride(), x.size()
    order = sorted(range(x.dim()), key=lambda d: (-strides[d], -sizes[d]))
    permuted = x.permute(order)
    return permuted if permuted.is_contiguous() else x


def activation_row(x: torch.Tensor) -> torch.Tensor:
    """[5] float64 on x's device: sum of squares and sum of the finite entries, zeros,
    NaNs, Infs. Pure torch, no host sync, no branch on a value: dynamo can trace it."""
    x = dense_view(x.detach()).reshape(-1)
    if x.dtype != torch.float64:
        x = x.float()  # fp16/bf16: no fp16 sum of squares (300**2 overflows it)
    finite = torch.isfinite(x)
    kept = torch.where(finite, x, 0.0)
    # float64 accumulation without a float64 copy of the activation.
    sum_sq = torch.linalg.vector_norm(kept, dtype=torch.float64).square()
    total = kept.sum(dtype=torch.float64)
    zeros = (x == 0).sum(dtype=torch.float64)
    nans = torch.isnan(x).sum(dtype=torch.float64)
    infs = torch.isinf(x).sum(dtype=torch.float64)
    return torch.stack([sum_sq, total, zeros, nans, infs])


def first_float_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a module's output is measured by: the output itself, or the first
    floating-point strided tensor of a tuple/list output; None when there is none."""
    items = (output,) if isinstance(output, torch.Tensor) else output
    if not isinstance(items, tuple | list):
        return None
    for t in items:
        if (
            isinstance(t, torch.Tensor)
            and t.is_floating_point()
            and t.layout == torch.strided
            and not t.is_nested
            and t.device.type != "meta"
        ):
            return t
    return None


def to_float(value: Any) -> float:
    """A float from a Python number or a one-element tensor. On a GPU tensor this syncs:
    call it on a writer or scrape thread, never on the training thread."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(()).item())  # sync-ok: writer thread only
    return float(value)
