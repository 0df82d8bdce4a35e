"""CPU fast path: the 8-column partials of many tensors in one pass of a C kernel.

The kernel (`gradmon.stats._cpu_kernel`, plain C, no torch headers) reads raw pointers.
Contract of `_cpu_kernel.compute(ptrs, numels, dtypes, out_ptr, nthreads)`:

* ``ptrs``, ``numels`` and ``dtypes`` are sequences of ints of equal length T (checked
  in C, as are negative numels, unknown codes and NULL pointers); ``ptrs[i]`` addresses
  ``numels[i]`` contiguous elements of dtype code ``dtypes[i]`` (0 float32, 1 float16,
  2 bfloat16, 3 float64), plus ``NORM_ONLY`` (16) where only the sum of squares is wanted
  (the row's other columns are then NaN: a weight, read for its norm, costs less).
* ``out_ptr`` addresses T*8 writable, contiguous float64 values (row-major ``[T, 8]``)
  that overlap no input.
* Every buffer stays valid and unchanged for the whole call. The kernel releases the GIL,
  works on the calling thread plus up to ``nthreads - 1`` pooled helper threads, and
  returns when all of them are done with the buffers.

`_cpu_kernel.compute_group(table_ptr, capacity, n, code, out_ptr, nthreads)` is the agent's
call (group_partials): the same work for n grads of dtype ``code`` and their weights,
whose pointers, sizes and weight codes are the first n columns of an int64 ``[5,
capacity]`` table (agent/gather.py Reads); it writes ``[n, 9]``: each grad's 8 partials,
then its weight's sum of squares.

The C side cannot see devices, strides, buffer sizes or lifetimes: checking those is this
module's job. Results are bit-identical from run to run and for every thread count on a
given machine (across CPUs the sum of squares may differ in the last bits, FMA or not).
Like torch's own CPU ops, the kernel honours the calling thread's floating-point mode:
under ``torch.set_flush_denormal(True)`` subnormal float32, bfloat16 and float64 values
count as zeros.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import torch

from gradmon.stats.layout import NCOLS, Col

_kernel: ModuleType | None
try:
    # By module name, not `from gradmon.stats import _cpu_kernel`: the package namespace
    # may hold another object under that name.
    _kernel = importlib.import_module("gradmon.stats._cpu_kernel")
except ImportError:  # not built (no compiler at install time): callers use another backend
    _kernel = None

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
)
_CODES: dict[torch.dtype, int] = {dt: code for code, dt in enumerate(SUPPORTED_DTYPES)}
NORM_ONLY = 16  # added to a dtype code: the sum of squares only (see the contract above)


def _flatten(g: torch.Tensor) -> torch.Tensor:
    """A contiguous, sign-resolved copy (a negative view's data_ptr holds -x)."""
    if not g.is_cpu or g.layout != torch.strided:
        raise ValueError(f"expected a strided CPU tensor, got {g.device} {g.layout}")
    return g.resolve_neg().contiguous()


def _codes(tensors: Sequence[torch.Tensor]) -> list[int]:
    """The kernel's dtype code of each tensor; TypeError naming an unsupported dtype."""
    try:
        return [_CODES[t.dtype] for t in tensors]
    except KeyError:
        bad = next(t.dtype for t in tensors if t.dtype not in _CODES)
        raise TypeError(f"gradmon CPU kernel does not support dtype {bad}") from None


def _readable(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor as the kernel reads it: itself if it is a contiguous, strided CPU tensor
    without the negative bit, else a contiguous copy (ValueError for other devices)."""
    strided = torch.strided
    return [
        t
        if t.is_cpu and t.layout is strided and t.is_contiguous() and not t.is_neg()
        else _flatten(t)
        for t in tensors
    ]


def weaken(objects: list[Any]) -> None:
    """Replaces, in place, each item that is neither None nor a weak reference by a weak
    reference to it, untracked by the cyclic GC where the kernel is built (see its
    `weaken`: weak references the agent holds for the whole run, or from one collection to
    the next, add N objects to every collection of the oldest generation); plain
    `weakref.ref` otherwise."""
    if _kernel is not None:
        _kernel.weaken(objects)
        return
    for i, item in enumerate(objects):
        if item is not None and not isinstance(item, weakref.ref):
            objects[i] = weakref.ref(item)


def available() -> bool:
    """True when the compiled kernel could be imported."""
    return _kernel is not None


def kernel_takes(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the compiled kernel can read tensors of this device and dtype."""
    return _kernel is not None and device.type == "cpu" and dtype in _CODES


def compute_partials(
    grads: Sequence[torch.Tensor],
    out: torch.Tensor | None = None,
    nthreads: int | None = None,
) -> torch.Tensor:
    """[T, 8] float64 partials of CPU tensors, one row per tensor in input order.

    ``out``, if given, must be a contiguous float64 CPU tensor of shape ``[T, 8]``; it is
    filled and returned. ``nthreads`` defaults to ``torch.get_num_threads()``.
    Raises TypeError for unsupported dtypes and ValueError for non-CPU/non-strided tensors.
    """
    if _kernel is None:
        raise RuntimeError(
            "gradmon CPU kernel is not available (gradmon.stats._cpu_kernel failed to import; "
            "rebuild with `python setup.py build_ext --inplace`)"
        )
    n = len(grads)
    if out is None:
        out = torch.empty((n, NCOLS), dtype=torch.float64)
    elif (
        out.dtype != torch.float64
        or out.device.type != "cpu"
        or tuple(out.shape) != (n, NCOLS)
        or not out.is_contiguous()
    ):
        raise ValueError(f"out must be a contiguous float64 CPU tensor of shape [{n}, {NCOLS}]")
    # Comprehensions, not one loop with appends: this per-tensor overhead (~0.4 us each)
    # is a visible share of the call next to a ~0.5 ms kernel.
    codes = _codes(grads)
    flat = _readable(grads)  # also keeps any contiguous copy alive until the kernel returns
    ptrs = [g.data_ptr() for g in flat]
    numels = [g.numel() for g in flat]
    threads = torch.get_num_threads() if nthreads is None else nthreads
    _kernel.compute(ptrs, numels, codes, out.data_ptr(), threads)
    return out


class KnownWeights:
    """What one group's weights looked like at the last `group_partials` call that checked
    them in full: `table`, the bytes of int64 rows of their data pointers, sizes and dtype
    codes (see Pointers). A parameter's data moves, or changes dtype or size,
    only when its `.data` is replaced (`model.to()`, `.half()`,
    `load_state_dict(assign=True)`); then, or when the group's members change, they are
    checked in full again."""

    def __init__(self) -> None:
        self.table: bytes | None = None  # None: not read in place (copies), check again
        self._out: torch.Tensor | None = None

    def output(self, rows: int) -> torch.Tensor:
        """A [rows, 9] float64 buffer for the kernel, the same from call to call (a fresh
        one of 1000 rows was an mmap and its page faults: ~30 us). The caller copies it
        before the group's next call (collect.py)."""
        if self._out is None or self._out.shape[0] != rows:
            self._out = torch.empty((rows, NCOLS + 1), dtype=torch.float64)
        return self._out


class Pointers(Protocol):
    """What the caller already read of a group's tensors (agent/gather.py's Reads): an
    int64 [5, >= T] table whose column k holds grad k's data pointer and element count,
    then its weight's data pointer, element count and dtype code (-1: unsupported); and
    the positions of grads whose pointer is 0 because the kernel cannot read them in
    place."""

    table: np.ndarray[Any, np.dtype[np.int64]]
    unreadable: list[int]


def group_partials(
    grads: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    known: KnownWeights,
    nthreads: int | None = None,
    reads: Pointers | None = None,
) -> torch.Tensor:
    """[T, 9] float64: each grad's 8 partials, then its weight's sum of squares (a weight
    is read for its norm only): `compute_partials(grads)` and the weights' squared norms
    in one kernel call, for the agent's groups, with fewer checks per tensor (the host
    cost of a collection is mostly these attribute reads).

    The caller guarantees that `grads` are strided CPU tensors of one supported dtype (it
    grouped them by device, dtype and layout); the weights are checked in full only when
    what `known` remembers of them no longer holds (a pointer, dtype or size changed).
    `reads`, if given, holds the pointers, sizes and weight dtypes of these very tensors,
    read while the caller had them at hand: then nothing is read again here, unless a grad
    is not readable in place or the weights changed, and the result is a buffer of `known`
    that the group's next call overwrites (KnownWeights.output).
    """
    if _kernel is None:
        return side_by_side(compute_partials([*grads, *weights], nthreads=nthreads), len(grads))
    n = len(grads)
    if n == 0:
        return torch.empty((0, NCOLS + 1), dtype=torch.float64)
    code = _codes(grads[:1])[0]
    threads = torch.get_num_threads() if nthreads is None else nthreads
    if reads is not None and not reads.unreadable and known.table is not None:
        table = reads.table
        if table[2:, :n].tobytes() == known.table:  # one memcmp (np.array_equal: ~4x longer)
            out = known.output(n)
            _kernel.compute_group(
                table.ctypes.data, table.shape[1], n, code, out.data_ptr(), threads
            )
            return out
    # `flat`, `wflat` also keep any contiguous copy alive until the kernel returns.
    flat = [g if g.is_contiguous() and not g.is_neg() else _flatten(g) for g in grads]
    ptrs = [g.data_ptr() for g in flat]
    numels = [g.numel() for g in flat]
    wptrs = [w.data_ptr() for w in weights]
    wnumels = [w.numel() for w in weights]
    wcodes = [_CODES.get(w.dtype, -1) for w in weights]
    now = np.array([wptrs, wnumels, wcodes], dtype=np.int64).tobytes()
    if now != known.table:
        known.table = None
        wflat = _readable(weights)
        _codes(wflat)  # TypeError naming an unsupported dtype (else they are `wcodes`)
        if all(a is b for a, b in zip(wflat, weights, strict=True)):
            known.table = now  # read in place: next time the pointers are enough
        else:  # a copy's pointer means nothing next time
            wptrs = [w.data_ptr() for w in wflat]
    both = torch.empty((2 * n, NCOLS), dtype=torch.float64)
    codes = [code] * n + [c + NORM_ONLY for c in wcodes]
    _kernel.compute(ptrs + wptrs, numels + wnumels, codes, both.data_ptr(), threads)
    return side_by_side(both, n)


def side_by_side(both: torch.Tensor, n: int) -> torch.Tensor:
    """[2n, 8] rows (grads, then weights) as [n, 9]: the weights' sums of squares last."""
    block = torch.empty((n, NCOLS + 1), dtype=torch.float64)
    block[:, :NCOLS] = both[:n]
    block[:, NCOLS] = both[n:, Col.SUM_SQ]
    return block
