"""Statistics backends and the choice between them.

Like `clip_grad_norm_`'s foreach switch: `auto` takes the fast path where it exists
(the C kernel for CPU tensors, Triton for CUDA tensors) and falls back to the plain
torch backend silently; naming a backend that cannot run is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from gradmon.errors import GradmonError
from gradmon.stats import generic
from gradmon.stats.layout import NCOLS, Col

__all__ = ["NCOLS", "Backend", "Col", "PartialsFn", "param_sum_squares", "select_backend"]

Backend = Literal["auto", "torch", "cpu", "triton"]
PartialsFn = Callable[[Sequence[torch.Tensor]], torch.Tensor]

_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _load_cpu_backend() -> PartialsFn | None:
    try:
        from gradmon.stats import cpu
    except ImportError:
        return None
    return cpu.compute_partials if cpu.available() else None


def _load_triton_backend() -> tuple[PartialsFn | None, str]:
    try:
        from gradmon.stats import triton as triton_backend  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"cannot import the Triton backend ({exc}); install gradmon[cuda]"
    fn: PartialsFn = triton_backend.compute_partials
    return fn, ""


def select_backend(name: Backend, device: torch.device, dtype: torch.dtype) -> PartialsFn:
    """The partials function for one (device, dtype) group of gradients."""
    if name == "torch" or dtype.is_complex:
        return generic.compute_partials
    if name in ("auto", "cpu") and device.type == "cpu" and dtype in _CPU_DTYPES:
        fn = _load_cpu_backend()
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
        triton_fn, why = _load_triton_backend()
        if triton_fn is not None:
            return triton_fn
        if name == "triton":
            raise GradmonError(f"collect.backend 'triton' cannot run: {why}")
    return generic.compute_partials


def param_sum_squares(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """[T] float64 squared L2 norms of parameters, on their device, without a sync.

    One `_foreach_norm` in the parameters' dtype: a parameter norm is a slowly moving
    gauge, and float64 accumulation (`dtype=torch.float64`) costs ~30x more on the CPU.
    """
    tensors = [p.detach() for p in params]
    # fp16/bf16 norms come back in fp16/bf16 unless asked: 65504 would overflow fp16.
    wide = torch.float32 if tensors and tensors[0].element_size() < 4 else None
    norms = torch._foreach_norm(tensors, 2, dtype=wide)
    return torch.stack(norms).double().square()
