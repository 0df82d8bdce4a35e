"""The Triton kernels of the statistics pass (host side: gradmon/stats/triton.py).

Two launches per group, whatever the number of tensors (the apex ``multi_tensor_l2norm``
pattern):

* stage 1 (``chunk_partials``): one program per chunk of ``CHUNK`` elements (65536). A
  device table maps program -> (tensor, chunk) and tensor -> (data pointer, numel), so a
  single launch reads every grad once. Loads are upcast at once and accumulated per lane
  in fp32 (fp64 for fp64 grads), four unmasked 128-bit loads in flight per thread; each
  chunk's row of 8 partials goes to a float64 workspace ``[n_chunks, 8]``. The fp32 part
  of every sum is short (32 terms per lane plus an 11-level tree); everything after it is
  float64, so sums over 1e8+ elements keep fp32 accuracy.
* stage 2 (``tensor_partials``): one program per tensor folds its chunk rows in a fixed
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

Importing this module imports triton: gradmon.stats loads it (through
gradmon/stats/triton.py) only when the Triton backend is asked for.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["chunk_partials", "tensor_partials"]


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
def chunk_partials(  # type: ignore[no-untyped-def]
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
def tensor_partials(  # type: ignore[no-untyped-def]
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
