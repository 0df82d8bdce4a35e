"""Triton backend: the 8 partials of every tensor of a (device, dtype) group, one read.

Two launches per group, whatever the number of tensors: per chunk of every grad, then per
tensor (the kernels, and how they treat NaN/Inf, are in gradmon/stats/triton_kernels.py).
This module plans and launches them.

Tables are cached per (device, dtype, stream, chunk, numels): the layout part is built once
per group shape; the pointer part is re-uploaded only when a grad's storage moved (after
``zero_grad(set_to_none=True)`` the caching allocator usually hands back the same
addresses). Uploads go through pinned memory with ``non_blocking=True``: nothing here
waits for the device.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run in Triton's
interpreter on CPU tensors, where data pointers are host pointers: that is how the tests
check this code without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton.language as tl

from gradmon.stats.layout import NCOLS
from gradmon.stats.triton_kernels import chunk_partials, tensor_partials

__all__ = [
    "CHUNK",
    "SUPPORTED_DTYPES",
    "compute_partials",
    "interpreting",
    "unsupported_reason",
]

CHUNK = 65536
"""Elements per stage-1 program (a power of two, at most 2**30)."""
BLOCK = 2048
"""Elements per loop iteration of a stage-1 program (a power of two dividing CHUNK)."""
NUM_WARPS = 8
REDUCE_ROWS = 64  # chunk rows per loop iteration of stage 2
_MAX_PLANS = 32

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
)
_ELEM: dict[torch.dtype, Any] = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1
    was set when triton was imported)."""
    return type(chunk_partials).__name__ == "InterpretedFunction"


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why this backend cannot take a (device, dtype) group, or None when it can."""
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        return f"the Triton kernel handles {names}, not {dtype}"
    if interpreting():
        if device.type != "cpu":
            return (
                f"TRITON_INTERPRET=1 is set, so Triton runs its CPU interpreter, which cannot "
                f"read {device} tensors; unset TRITON_INTERPRET"
            )
        return None
    if device.type == "cpu":
        return (
            "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before Python starts, "
            "for tests and debugging); use collect.backend 'auto', 'cpu' or 'torch' for CPU "
            "training"
        )
    if device.type != "cuda":
        return f"the Triton backend runs on CUDA devices, not {device.type}"
    return None


@dataclass(eq=False)
class _Plan:
    """Device tables of one group shape; the pointer part follows the grads' storage."""

    table: torch.Tensor  # int64 on the device: [ptrs | numels | first | counts | b_t | b_c]
    ptrs: torch.Tensor  # views into `table`, each 16-byte aligned
    numels: torch.Tensor
    first_chunk: torch.Tensor
    n_chunks: torch.Tensor
    block_tensor: torch.Tensor
    block_chunk: torch.Tensor
    workspace: torch.Tensor  # [max(n_blocks, 1), 8] float64
    n_blocks: int
    ptr_key: tuple[int, ...] = ()


_plans: OrderedDict[tuple[Any, ...], _Plan] = OrderedDict()
_plans_lock = threading.Lock()


def _upload(host: torch.Tensor, dst: torch.Tensor) -> None:
    """Host -> device without a sync: a fresh pinned buffer per upload, so a copy still
    queued from an earlier call never sees it change (torch's host allocator holds it
    until the copy has run)."""
    if dst.device.type == "cpu":
        dst.copy_(host)
        return
    dst.copy_(host.pin_memory(), non_blocking=True)


def _padded(n: int) -> int:
    return n + (n & 1)  # int64 segments of even length start 16-byte aligned


def _new_plan(numels: Sequence[int], chunk: int, device: torch.device) -> _Plan:
    t = len(numels)
    sizes = torch.tensor(numels, dtype=torch.int64)
    counts = torch.div(sizes + (chunk - 1), chunk, rounding_mode="floor")
    first = torch.cumsum(counts, 0) - counts
    n_blocks = int(counts.sum())
    block_tensor = torch.repeat_interleave(torch.arange(t, dtype=torch.int64), counts)
    block_chunk = torch.arange(n_blocks, dtype=torch.int64) - first[block_tensor]
    lengths = [t, t, t, t, n_blocks, n_blocks]
    host = torch.zeros(sum(_padded(n) for n in lengths), dtype=torch.int64)
    views: list[torch.Tensor] = []
    offset = 0
    for n in lengths:
        views.append(host[offset : offset + n])
        offset += _padded(n)
    for view, src in zip(views[1:], (sizes, first, counts, block_tensor, block_chunk), strict=True):
        view.copy_(src)
    table = torch.empty_like(host, device=device)
    _upload(host, table)
    dev: list[torch.Tensor] = []
    offset = 0
    for n in lengths:
        dev.append(table[offset : offset + n])
        offset += _padded(n)
    workspace = torch.empty((max(n_blocks, 1), NCOLS), dtype=torch.float64, device=device)
    ptrs, sizes_d, first_d, counts_d, block_tensor_d, block_chunk_d = dev
    return _Plan(
        table=table,
        ptrs=ptrs,
        numels=sizes_d,
        first_chunk=first_d,
        n_chunks=counts_d,
        block_tensor=block_tensor_d,
        block_chunk=block_chunk_d,
        workspace=workspace,
        n_blocks=n_blocks,
    )


def _plan_for(
    flat: Sequence[torch.Tensor], chunk: int, device: torch.device, dtype: torch.dtype
) -> _Plan:
    """The tables for these grads; the caller holds _plans_lock until it has launched."""
    numels = tuple([g.numel() for g in flat])
    ptr_key = tuple([g.data_ptr() for g in flat])
    # Buffers are reused in stream order, so each stream gets plans of its own.
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, dtype, stream, chunk, numels)
    plan = _plans.get(key)
    if plan is None:
        plan = _new_plan(numels, chunk, device)
        _plans[key] = plan
        while len(_plans) > _MAX_PLANS:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    if plan.ptr_key != ptr_key:
        # New storage (e.g. after zero_grad(set_to_none=True)): T int64s, no sync. The
        # stage-1 kernel queued earlier on this stream read the old pointers already.
        _upload(torch.tensor(ptr_key, dtype=torch.int64), plan.ptrs)
        plan.ptr_key = ptr_key
    return plan


def _flat(g: torch.Tensor) -> torch.Tensor:
    # Contiguous, sign-resolved storage; the kernel reads raw pointers. A copy, if one is
    # made, lives in `flat` until after the launch; later reuse of its memory is ordered
    # after the kernel on the same stream.
    if g.is_contiguous() and not g.is_neg():  # the usual case: no copy
        return g
    return g.resolve_neg().contiguous()


def compute_partials(
    grads: Sequence[torch.Tensor],
    out: torch.Tensor | None = None,
    *,
    chunk: int = CHUNK,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """[T, 8] float64 partials on the grads' device, one row per tensor in input order.

    The grads share one device and dtype (float32, float16, bfloat16 or float64). CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1. Nothing here waits for the device.
    ``out``, if given, must be a contiguous float64 ``[T, 8]`` tensor on that device.
    ``chunk`` and ``block`` (powers of two, block <= chunk) trade parallelism for per-chunk
    work; the defaults suit large grads.
    """
    n = len(grads)
    if n == 0:
        return out if out is not None else torch.empty((0, NCOLS), dtype=torch.float64)
    device, dtype = grads[0].device, grads[0].dtype
    why = unsupported_reason(device, dtype)
    if why is not None:
        raise ValueError(f"gradmon Triton backend: {why}")
    for g in grads:
        if g.dtype is not dtype or g.device != device or g.layout is not torch.strided:
            raise ValueError(
                "gradmon Triton backend: one call takes strided tensors of one device and "
                f"dtype; got {g.device} {g.dtype} {g.layout} next to {device} {dtype}"
            )
    if not 0 < block <= chunk <= 2**30 or chunk & (chunk - 1) or block & (block - 1):
        raise ValueError(
            f"chunk ({chunk}) and block ({block}) must be powers of two, block <= chunk <= 2**30"
        )
    if out is None:
        out = torch.empty((n, NCOLS), dtype=torch.float64, device=device)
    elif (
        out.dtype != torch.float64
        or out.device != device
        or tuple(out.shape) != (n, NCOLS)
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous float64 {device} tensor of shape [{n}, {NCOLS}]"
        )

    flat = [_flat(g) for g in grads]
    # Triton launches on the current device. The lock spans table update and launches: a
    # concurrent call on the same plan must not swap the pointers in between.
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard, _plans_lock:
        plan = _plan_for(flat, chunk, device, dtype)
        if plan.n_blocks:
            chunk_partials[(plan.n_blocks,)](
                plan.ptrs,
                plan.numels,
                plan.block_tensor,
                plan.block_chunk,
                plan.workspace,
                ELEM=_ELEM[dtype],
                ACC=tl.float64 if dtype == torch.float64 else tl.float32,
                ELEM_BYTES=grads[0].element_size(),
                CHUNK=chunk,
                BLOCK=block,
                num_warps=num_warps,
                enable_fp_fusion=True,  # FMA: x*x + acc rounded once (and no warning in 3.9)
            )
        tensor_partials[(n,)](
            plan.workspace,
            plan.first_chunk,
            plan.n_chunks,
            out,
            ROWS=REDUCE_ROWS,
            num_warps=2,
            enable_fp_fusion=True,
        )
    del flat  # the kernels are queued; contiguous copies may go back to the allocator
    return out
