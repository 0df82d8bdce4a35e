"""Triton backend: the 8 partials of every tensor of a (device, dtype) group, one read.

Two launches per group, whatever the number of tensors (the apex ``multi_tensor_l2norm``
pattern):

* stage 1 (``_chunk_partials``): one program per chunk of ``chunk`` elements (65536). A
  device table maps program -> (tensor, chunk) and tensor -> (data pointer, numel), so a
  single launch reads every grad once. Loads are upcast at once and accumulated per lane
  in fp32 (fp64 for fp64 grads), four unmasked 128-bit loads in flight per thread; each
  chunk's row of 8 partials goes to a float64 workspace ``[n_chunks, 8]``. The fp32 part
  of every sum is short (32 terms per lane plus an 11-level tree); everything after it is
  float64, so sums over 1e8+ elements keep fp32 accuracy.
* stage 2 (``_tensor_partials``): one program per tensor folds its chunk rows in a fixed
  order into the ``[T, 8]`` float64 output. No atomics: the result is bit-identical from
  run to run. Tensors with no chunks (empty) get the identity row here.

NaN and Inf: the hot loop does no per-element test. Any NaN or Inf entry makes the chunk's
sum non-finite (no IEEE operation on a NaN or Inf gives a finite result), and so does an
fp32 overflow of finite values (squares above ~3.4e38). Such a chunk is read again by
``_careful_chunk``, which masks every non-finite entry explicitly (``|x| < inf`` is false
for both) before any sum, min or max, counts NaN and Inf, and sums in float64. So min/max
only ever see finite values: results never depend on how a backend's ``tl.minimum`` /
``tl.maximum`` treat NaN, nor on the fp32 range. Clean chunks, the usual case, cost one
read and ~9 instructions per element.

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
import triton
import triton.language as tl

from gradmon.stats.layout import NCOLS

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


# ----------------------------------------------------------------------------- kernels
@triton.jit  # type: ignore[untyped-decorator]
def _accumulate(x, valid, sq, sm, lo, hi, zeros, MASKED: tl.constexpr):  # type: ignore[no-untyped-def]
    # The fast path: no per-element NaN/Inf test. Any NaN or Inf makes the chunk's sum
    # non-finite (IEEE: no finite result from a NaN or Inf operand), which sends the whole
    # chunk to _careful_chunk; so min/max here only ever see finite values, whatever a
    # backend's NaN rules for min/max are.
    sq += x * x
    sm += x
    if MASKED:  # masked lanes hold 0.0
        lo = tl.minimum(lo, tl.where(valid, x, float("inf")))
        hi = tl.maximum(hi, tl.where(valid, x, float("-inf")))
        zeros += ((x == 0.0) & valid).to(tl.int32)
    else:
        lo = tl.minimum(lo, x)
        hi = tl.maximum(hi, x)
        zeros += (x == 0.0).to(tl.int32)
    return sq, sm, lo, hi, zeros


@triton.jit  # type: ignore[untyped-decorator]
def _careful_chunk(base, length, ACC: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    # The rare path, for a chunk with NaN/Inf or whose fp32 sums overflowed (finite values
    # above ~1.8e19): every entry tested explicitly, sums in float64.
    lanes = tl.arange(0, BLOCK)
    sq = tl.zeros([BLOCK], tl.float64)
    sm = tl.zeros([BLOCK], tl.float64)
    lo = tl.full([BLOCK], float("inf"), ACC)
    hi = tl.full([BLOCK], float("-inf"), ACC)
    nans = tl.zeros([BLOCK], tl.int32)
    bad = tl.zeros([BLOCK], tl.int32)
    for off in range(0, length, BLOCK):
        idx = off + lanes
        valid = idx < length
        x = tl.load(base + idx, mask=valid, other=0.0).to(ACC)
        finite = (tl.abs(x) < float("inf")) & valid  # NaN compares false
        xw = tl.where(finite, x, 0.0).to(tl.float64)
        sq += xw * xw
        sm += xw
        lo = tl.minimum(lo, tl.where(finite, x, float("inf")))
        hi = tl.maximum(hi, tl.where(finite, x, float("-inf")))
        nans += (x != x).to(tl.int32)
        bad += ((~finite) & valid).to(tl.int32)
    n_nan = tl.sum(nans, axis=0)
    return (
        tl.sum(sq, axis=0),
        tl.sum(sm, axis=0),
        tl.min(lo, axis=0).to(tl.float64),
        tl.max(hi, axis=0).to(tl.float64),
        n_nan,
        tl.sum(bad, axis=0) - n_nan,
    )


@triton.jit  # type: ignore[untyped-decorator]
def _chunk_partials(  # type: ignore[no-untyped-def]
    ptrs,  # [T] int64 data pointers
    numels,  # [T] int64
    block_tensor,  # [n_chunks] int64: the tensor of each program
    block_chunk,  # [n_chunks] int64: the chunk index within that tensor
    ws,  # [n_chunks, 8] float64 workspace
    ELEM: tl.constexpr,  # element type of the grads
    ACC: tl.constexpr,  # accumulator type: fp32, or fp64 for fp64 grads
    ELEM_BYTES: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_chunk + pid) * CHUNK  # int64: tensors may exceed 2**31 elements
    length = tl.minimum(tl.load(numels + t) - start, CHUNK).to(tl.int32)
    addr = tl.load(ptrs + t) + start * ELEM_BYTES  # the chunk's first byte
    base = addr.to(tl.pointer_type(ELEM))
    # The elements before the chunk's first 16-byte boundary (none for tensors from the
    # caching allocator; DDP bucket views and FSDP shards start anywhere) are read with a
    # mask, the rest from a pointer the compiler knows is aligned: 128-bit loads.
    head = tl.minimum((((16 - addr % 16) % 16) // ELEM_BYTES).to(tl.int32), length)
    body = tl.multiple_of((addr + head * ELEM_BYTES).to(tl.pointer_type(ELEM)), 16)
    body_len = length - head

    lanes = tl.arange(0, BLOCK)
    sq = tl.zeros([BLOCK], ACC)
    sm = tl.zeros([BLOCK], ACC)
    lo = tl.full([BLOCK], float("inf"), ACC)
    hi = tl.full([BLOCK], float("-inf"), ACC)
    zeros = tl.zeros([BLOCK], tl.int32)
    valid = lanes < head
    x = tl.load(base + lanes, mask=valid, other=0.0).to(ACC)
    sq, sm, lo, hi, zeros = _accumulate(x, valid, sq, sm, lo, hi, zeros, MASKED=True)
    # Four full tiles per iteration, without a mask (a mask with an unknown bound defeats
    # vector loads).
    n_fast = (body_len // (4 * BLOCK)) * (4 * BLOCK)
    for off in range(0, n_fast, 4 * BLOCK):
        p = body + off + lanes
        x0 = tl.load(p).to(ACC)
        x1 = tl.load(p + BLOCK).to(ACC)
        x2 = tl.load(p + 2 * BLOCK).to(ACC)
        x3 = tl.load(p + 3 * BLOCK).to(ACC)
        sq, sm, lo, hi, zeros = _accumulate(x0, lanes, sq, sm, lo, hi, zeros, MASKED=False)
        sq, sm, lo, hi, zeros = _accumulate(x1, lanes, sq, sm, lo, hi, zeros, MASKED=False)
        sq, sm, lo, hi, zeros = _accumulate(x2, lanes, sq, sm, lo, hi, zeros, MASKED=False)
        sq, sm, lo, hi, zeros = _accumulate(x3, lanes, sq, sm, lo, hi, zeros, MASKED=False)
    for off in range(n_fast, body_len, BLOCK):  # the last chunk of a tensor: <4 tiles left
        idx = off + lanes
        valid = idx < body_len
        x = tl.load(body + idx, mask=valid, other=0.0).to(ACC)
        sq, sm, lo, hi, zeros = _accumulate(x, valid, sq, sm, lo, hi, zeros, MASKED=True)

    s_sq = tl.sum(sq, axis=0)
    s_sum = tl.sum(sm, axis=0)
    sum_sq = s_sq.to(tl.float64)
    total = s_sum.to(tl.float64)
    v_min = tl.min(lo, axis=0).to(tl.float64)
    v_max = tl.max(hi, axis=0).to(tl.float64)
    n_zero = tl.sum(zeros, axis=0)  # exact either way: NaN is not == 0
    n_nan = n_zero * 0
    n_inf = n_zero * 0
    # A finite fp32 sum and sum of squares prove every entry finite and nothing overflowed.
    if ~((s_sq < float("inf")) & (tl.abs(s_sum) < float("inf"))):
        sum_sq, total, v_min, v_max, n_nan, n_inf = _careful_chunk(base, length, ACC, BLOCK)
    abs_max = tl.maximum(tl.maximum(v_max, -v_min), 0.0)

    cols = tl.arange(0, 8)
    row = tl.where(
        cols == 0,
        sum_sq,
        tl.where(
            cols == 1,
            total,
            tl.where(
                cols == 2,
                abs_max,
                tl.where(
                    cols == 3,
                    v_min,
                    tl.where(
                        cols == 4,
                        v_max,
                        tl.where(
                            cols == 5,
                            n_zero.to(tl.float64),
                            tl.where(cols == 6, n_nan.to(tl.float64), n_inf.to(tl.float64)),
                        ),
                    ),
                ),
            ),
        ),
    )
    tl.store(ws + pid.to(tl.int64) * 8 + cols, row)


@triton.jit  # type: ignore[untyped-decorator]
def _tensor_partials(  # type: ignore[no-untyped-def]
    ws,  # [n_chunks, 8] float64 from stage 1
    first_chunk,  # [T] int64: the tensor's first row in ws
    n_chunks,  # [T] int64
    out,  # [T, 8] float64
    ROWS: tl.constexpr,
):
    t = tl.program_id(0)
    first = tl.load(first_chunk + t)
    count = tl.load(n_chunks + t)
    rows = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, 8)[None, :]
    is_max = (cols == 2) | (cols == 4)  # ABS_MAX, MAX
    is_min = cols == 3  # MIN
    # Neutral elements of each column's combine; the output starts from the identity row.
    fill = tl.where(is_max, float("-inf"), tl.where(is_min, float("inf"), 0.0)).to(tl.float64)
    acc = tl.where(cols == 3, float("inf"), tl.where(cols == 4, float("-inf"), 0.0)).to(tl.float64)
    for r0 in range(0, count, ROWS):
        r = r0 + rows
        inside = r < count
        tile = tl.load(ws + (first + r) * 8 + cols, mask=inside, other=0.0)
        tile = tl.where(inside, tile, fill)
        # A fixed tree per tile, tiles in order: deterministic, no atomics.
        t_sum = tl.sum(tile, axis=0)[None, :]
        t_max = tl.max(tile, axis=0)[None, :]
        t_min = tl.min(tile, axis=0)[None, :]
        acc = tl.where(
            is_max, tl.maximum(acc, t_max), tl.where(is_min, tl.minimum(acc, t_min), acc + t_sum)
        )
    tl.store(out + t.to(tl.int64) * 8 + cols, acc)


# ------------------------------------------------------------------------------- host
def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1
    was set when triton was imported)."""
    return type(_chunk_partials).__name__ == "InterpretedFunction"


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
            _chunk_partials[(plan.n_blocks,)](
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
        _tensor_partials[(n,)](
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
