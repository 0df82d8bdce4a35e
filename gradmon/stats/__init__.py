"""Statistics backends and the choice between them.

Like `clip_grad_norm_`'s foreach switch: `auto` takes the fast path where it exists
(the C kernel for CPU tensors, Triton for CUDA tensors) and falls back to the plain
torch backend silently; naming a backend that cannot run is an error.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch as _torch  # aliased: the submodule gradmon.stats.torch takes the name

from gradmon.errors import GradmonError
from gradmon.stats import cpu
from gradmon.stats import torch as torch_backend
from gradmon.stats.layout import NCOLS, Col

__all__ = [
    "NCOLS",
    "Backend",
    "Col",
    "PartialsFn",
    "cpu_kernel",
    "cpu_kernel_takes",
    "param_sum_squares",
    "partials_block",
    "select_backend",
]

Backend = Literal["auto", "torch", "cpu", "triton"]
PartialsFn = Callable[[Sequence[_torch.Tensor]], _torch.Tensor]

log = logging.getLogger("gradmon")

_CPU_DTYPES = cpu.SUPPORTED_DTYPES  # the C kernel's dtypes, listed once, in cpu.py


@functools.cache  # asked on every collection (partials_block): probe once
def _cpu_kernel_built() -> bool:
    return cpu.available()


def cpu_kernel() -> PartialsFn | None:
    """The C kernel's partials function, or None where it is not built (probed once)."""
    return cpu.compute_partials if _cpu_kernel_built() else None


def cpu_kernel_takes(t: _torch.Tensor) -> bool:
    """Whether the C kernel can read `t` (a CPU tensor of one of its dtypes)."""
    return cpu.kernel_takes(t.device, t.dtype)


def _load_triton_backend(
    device: _torch.device, dtype: _torch.dtype
) -> tuple[PartialsFn | None, str]:
    """The Triton kernel for this group, or None and why not. Imports triton lazily."""
    try:
        from gradmon.stats import triton as triton_backend
    except Exception as exc:  # not installed, or an install that fails to import
        return None, (
            f"cannot import triton ({exc!r}); install it with `pip install gradmon[cuda]`"
        )
    why = triton_backend.unsupported_reason(device, dtype)
    if why is not None:
        return None, why
    fn: PartialsFn = triton_backend.compute_partials
    return fn, ""


def _first_call_fallback(fast: PartialsFn, device: _torch.device) -> PartialsFn:
    """backend 'auto': if the Triton kernel fails on its first call (it compiles then, e.g.
    for a GPU this Triton does not support), warn once and use the torch backend."""
    chosen: list[PartialsFn] = []

    def partials(grads: Sequence[_torch.Tensor]) -> _torch.Tensor:
        if chosen:
            return chosen[0](grads)
        try:
            out = fast(grads)
        except Exception as exc:
            log.warning(
                "gradmon: the Triton statistics kernel failed on %s (%r); using the torch "
                "backend instead (set collect.backend: triton to see the error)",
                device,
                exc,
            )
            chosen.append(torch_backend.compute_partials)
            return torch_backend.compute_partials(grads)
        chosen.append(fast)
        return out

    return partials


def select_backend(name: Backend, device: _torch.device, dtype: _torch.dtype) -> PartialsFn:
    """The partials function for one (device, dtype) group of gradients."""
    if name == "torch" or dtype.is_complex:
        return torch_backend.compute_partials
    if name in ("auto", "cpu") and device.type == "cpu" and dtype in _CPU_DTYPES:
        fn = cpu_kernel()
        if fn is not None:
            return fn
        if name == "cpu":
            raise GradmonError(
                "collect.backend 'cpu': the C extension gradmon.stats._cpu_kernel is not "
                "built (reinstall gradmon with a C compiler); use backend 'auto' or 'torch'"
            )
    if name == "cpu":
        raise GradmonError(
            f"collect.backend 'cpu' handles CPU tensors of {[str(d) for d in _CPU_DTYPES]}, "
            f"not {dtype} on {device}; use 'auto' or 'torch'"
        )
    if name in ("auto", "triton") and (device.type == "cuda" or name == "triton"):
        triton_fn, why = _load_triton_backend(device, dtype)
        if triton_fn is not None:
            return triton_fn if name == "triton" else _first_call_fallback(triton_fn, device)
        if name == "triton":
            raise GradmonError(
                f"collect.backend 'triton' cannot run on {dtype} gradients on {device}: {why}"
            )
    return torch_backend.compute_partials


def param_sum_squares(params: Sequence[_torch.Tensor]) -> _torch.Tensor:
    """[T] float64 squared L2 norms of parameters, on their device, without a sync.

    One `_foreach_norm` in the parameters' dtype: a parameter norm is a slowly moving
    gauge, and float64 accumulation (`dtype=torch.float64`) costs ~30x more on the CPU.
    """
    tensors = [p.detach() for p in params]
    # fp16/bf16 norms come back in fp16/bf16 unless asked: 65504 would overflow fp16.
    wide = _torch.float32 if tensors and tensors[0].element_size() < 4 else None
    norms = _torch._foreach_norm(tensors, 2, dtype=wide)
    return _torch.stack(norms).double().square()


def partials_block(
    backend: PartialsFn,
    grads: Sequence[_torch.Tensor],
    params: Sequence[_torch.Tensor],
    known: cpu.KnownWeights | None = None,
    reads: cpu.Pointers | None = None,
) -> _torch.Tensor:
    """[T, 9] float64 on the grads' device: the 8 partials of each grad, then the squared
    norm of its parameter (the agent's block, see agent/collect.py). `known`, `reads`: see
    cpu.group_partials (the caller vouches for the grads); with them the result is the
    kernel's reused buffer, to be copied before the group's next call.

    With the C kernel, one call reads both (the weights for their float64 sum of squares
    only): per tensor it costs ~0.7 us against ~2 us for `_foreach_norm` (a 2,000-tensor
    model spent 4 ms of every step in the latter), and per element it is no slower.
    """
    # The weights of one group share the grads' device and dtype (torch keeps a dense
    # grad like its parameter), so the first one tells for all.
    if backend is cpu_kernel() and (not params or cpu_kernel_takes(params[0])):
        # Read through data pointers: no detach needed. With `known` (the agent's groups:
        # strided grads of one dtype), the weights are checked in full only when changed.
        if known is not None:
            return cpu.group_partials(grads, params, known, reads=reads)
        return cpu.side_by_side(backend([*grads, *params]), len(grads))
    partials = backend(grads)
    param_sq = param_sum_squares(params).to(partials.device)
    return _torch.cat([partials, param_sq.unsqueeze(1)], dim=1)
