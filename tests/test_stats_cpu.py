"""The C kernel (`gradmon.stats.cpu`) against the float64 oracle `gradmon.stats.reference`."""

from __future__ import annotations

import math
import multiprocessing
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gradmon.stats import cpu
from gradmon.stats.layout import NCOLS, Col

from .oracle import EXACT_COLS, assert_matches_reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="C kernel not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NAN, INF = float("nan"), float("inf")
# Sizes around the kernel's lane (16 double / 32 float), block (4096) and work-item (65536)
# boundaries.
BOUNDARY_SIZES = [1, 15, 16, 17, 31, 32, 33, 4095, 4096, 4097, 8193, 65535, 65536, 65537, 131073]


def assert_matches(grads: list[torch.Tensor], got: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel vs oracle: sums to 1e-6 relative, every other column exactly."""
    if got is None:
        got = cpu.compute_partials(grads)
    return assert_matches_reference(grads, got, cancellation=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_values(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    assert_matches([torch.randn(10007).to(dtype), (torch.rand(333) * 100).to(dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    x = torch.randn(5000)
    x[[3, 100, 2047, 2048, 4999]] = NAN
    y = torch.randn(5000)
    y[[0, 17, 4096]] = INF
    y[[5, 2049]] = -INF
    z = torch.randn(100)
    z[[1, 2]] = torch.tensor([INF, -INF])
    z[50] = NAN
    grads = [
        x,
        y,
        z,
        torch.full((40,), NAN),
        torch.full((40,), INF),
        torch.full((40,), -INF),
        torch.tensor([NAN, INF, -INF, 0.0, -2.5, 7.0]),
        torch.tensor([INF, -INF]),
    ]
    got = assert_matches([g.to(dtype) for g in grads])
    assert got[0, Col.NAN_COUNT] == 5 and got[1, Col.INF_COUNT] == 5
    assert got[3].tolist() == [0.0, 0.0, 0.0, INF, -INF, 0.0, 40.0, 0.0]
    assert got[4].tolist() == [0.0, 0.0, 0.0, INF, -INF, 0.0, 0.0, 40.0]
    assert got[6].tolist() == [6.25 + 49.0, 4.5, 7.0, -2.5, 7.0, 1.0, 1.0, 2.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_zeros_empty_and_single(dtype: torch.dtype) -> None:
    grads = [
        torch.zeros(3000, dtype=dtype),
        torch.tensor([0.0, -0.0, 0.0], dtype=dtype),
        torch.zeros(0, dtype=dtype),
        torch.zeros(0, 5, dtype=dtype),
        torch.tensor([-3.0], dtype=dtype),
        torch.tensor([NAN], dtype=dtype),
        torch.tensor(2.0, dtype=dtype),  # 0-d
    ]
    got = assert_matches(grads)
    assert got[0].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 3000.0, 0.0, 0.0]
    identity = [0.0, 0.0, 0.0, INF, -INF, 0.0, 0.0, 0.0]
    assert got[2].tolist() == identity and got[3].tolist() == identity
    assert got[4].tolist() == [9.0, -3.0, 3.0, -3.0, -3.0, 0.0, 0.0, 0.0]
    assert got[5].tolist() == [0.0, 0.0, 0.0, INF, -INF, 0.0, 1.0, 0.0]


def test_empty_list() -> None:
    out = cpu.compute_partials([])
    assert out.shape == (0, NCOLS)


@pytest.mark.parametrize("n", BOUNDARY_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_boundary_sizes(n: int, dtype: torch.dtype) -> None:
    torch.manual_seed(n)
    clean = torch.randn(n).to(dtype)
    dirty = clean.clone()
    dirty[-1] = NAN  # lands in the last (often partial) block: the careful path's tail
    if n > 2:
        dirty[n // 2] = -INF
        dirty[0] = 0.0
    assert_matches([clean, dirty])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_dirty_blocks_between_clean_ones(dtype: torch.dtype) -> None:
    # After a block with NaN/Inf the kernel stays on its careful path until a clean block.
    torch.manual_seed(6)
    x = torch.randn(6 * 4096 + 5)
    x[[0, 4096 + 7, 3 * 4096 + 100, 6 * 4096 + 4]] = torch.tensor([NAN, INF, -INF, NAN])
    got = assert_matches([x.to(dtype)])
    assert got[0, Col.NAN_COUNT] == 2 and got[0, Col.INF_COUNT] == 2


def test_many_small_tensors_mixed_dtypes() -> None:
    gen = torch.Generator().manual_seed(2)
    grads = []
    for i in range(300):
        n = int(torch.randint(0, 50, (1,), generator=gen))
        x = torch.randn(n, generator=gen)
        if n and i % 7 == 0:
            x[int(torch.randint(0, n, (1,), generator=gen))] = NAN
        if n and i % 11 == 0:
            x[int(torch.randint(0, n, (1,), generator=gen))] = -INF
        grads.append(x.to(DTYPES[i % len(DTYPES)]))
    assert_matches(grads)


def test_random_mixtures() -> None:
    # Random sizes, dtypes and densities of NaN/+Inf/-Inf/zero, one call for all of them.
    gen = torch.Generator().manual_seed(8)
    grads = []
    for i in range(60):
        n = int(torch.randint(0, 20_000, (1,), generator=gen))
        x = torch.randn(n, generator=gen) * 10.0 ** int(torch.randint(-3, 4, (1,), generator=gen))
        for value in (NAN, INF, -INF, 0.0):
            density = float(torch.rand(1, generator=gen)) ** 4  # mostly sparse, some dense
            x[torch.rand(n, generator=gen) < density] = value
        grads.append(x.to(DTYPES[i % len(DTYPES)]))
    assert_matches(grads)


def test_large_finite_values_do_not_overflow() -> None:
    half = torch.tensor([300.0, 60000.0, -60000.0, 65504.0, -300.0] * 100, dtype=torch.float16)
    bf = torch.tensor([3e38, -3e38, 1e30] * 100, dtype=torch.bfloat16)
    big32 = torch.full((5000,), 1e20, dtype=torch.float32)  # x*x overflows fp32
    huge32 = torch.tensor([3e38, 3e38, -1e38] * 1000, dtype=torch.float32)  # x overflows a sum
    got = assert_matches([half, bf, big32, huge32])
    assert got[0, Col.SUM_SQ] == 100 * (2 * 300.0**2 + 2 * 60000.0**2 + 65504.0**2)
    assert math.isfinite(float(got[1, Col.SUM_SQ]))
    assert float(got[2, Col.SUM_SQ]) == pytest.approx(5000 * float(big32[0]) ** 2, rel=1e-12)
    assert float(got[3, Col.SUM]) == pytest.approx(1000 * (6e38 - 1e38), rel=1e-6)


def test_float64_overflow_matches_reference() -> None:
    # Squares of 1e200 overflow float64 itself; the oracle reports inf and so do we.
    assert_matches([torch.tensor([1e200, 2.0, -1e200], dtype=torch.float64)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_subnormals(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    tiny = info.smallest_normal
    # Every fp16 bit pattern with a zero exponent field (the subnormals), plus a few normals.
    vals = [tiny / 2, -tiny / 4, tiny * 0.75, tiny, -tiny, 0.0]
    x = torch.tensor(vals * 50, dtype=dtype)
    if dtype == torch.float16:
        sub = torch.arange(1, 1024, dtype=torch.int16).view(torch.float16)
        x = torch.cat([x, sub, -sub])
    got = assert_matches([x])
    assert got[0, Col.ZERO_COUNT] == 50  # a subnormal is not zero


def test_float16_every_bit_pattern() -> None:
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    got = assert_matches([x])
    assert got[0, Col.NAN_COUNT] == 2 * 1023 and got[0, Col.INF_COUNT] == 2
    assert got[0, Col.ZERO_COUNT] == 2  # +0 and -0


def test_non_contiguous_2d_and_neg_view() -> None:
    torch.manual_seed(3)
    base = torch.randn(300, 70)
    t = base.t()
    assert not t.is_contiguous()
    sliced = base[::3, 5:9]
    neg = torch._neg_view(base[:10])
    assert neg.is_neg()
    got = assert_matches([base, t, sliced, neg])
    assert torch.equal(got[0, EXACT_COLS], got[1, EXACT_COLS])  # sums differ in order only
    assert float(got[3, Col.SUM]) == pytest.approx(-float(base[:10].double().sum()), rel=1e-12)


def test_requires_grad_parameter() -> None:
    p = torch.nn.Parameter(torch.randn(64, 8))
    assert_matches([p])


def test_out_argument() -> None:
    grads = [torch.randn(100), torch.randn(7, dtype=torch.float64)]
    out = torch.full((2, NCOLS), -1.0, dtype=torch.float64)
    assert cpu.compute_partials(grads, out=out) is out
    assert_matches(grads, got=out)
    for bad in (
        torch.empty(3, NCOLS, dtype=torch.float64),
        torch.empty(2, NCOLS, dtype=torch.float32),
        torch.empty(NCOLS, 2, dtype=torch.float64).t(),
    ):
        with pytest.raises(ValueError, match="out must be"):
            cpu.compute_partials(grads, out=bad)


def test_deterministic_and_thread_count_independent() -> None:
    torch.manual_seed(4)
    grads = [
        torch.randn(1_000_003),
        torch.randn(300_000).half(),
        torch.randn(5),
        torch.randn(70_001),
    ]
    grads[0][123_456] = NAN
    first = cpu.compute_partials(grads)
    assert torch.equal(first, cpu.compute_partials(grads))
    for nthreads in (1, 2, 3, 8):
        assert torch.equal(first, cpu.compute_partials(grads, nthreads=nthreads))
    assert_matches(grads, got=first)


def test_many_small_tensors_thread_count_independent() -> None:
    """Items of small tensors are claimed many at a time (see job_t in the kernel): the
    result is the same for every thread count, empty tensors and NaN included."""
    torch.manual_seed(5)
    grads = [torch.randn(n) for n in ([256] * 3000 + [0, 1, 70_001] + [17] * 500)]
    grads[1500][7] = NAN
    grads[-1][3] = INF
    first = cpu.compute_partials(grads, nthreads=1)
    for nthreads in (2, 3, 8):
        assert torch.equal(first, cpu.compute_partials(grads, nthreads=nthreads))
    assert_matches(grads, got=first)


def test_concurrent_calls_agree() -> None:
    # Python threads calling at once (the GIL is released): one uses the helper pool,
    # the others run on their own thread; every result must be the same.
    torch.manual_seed(7)
    grads = [torch.randn(700_001), torch.randn(300_000)]
    want = cpu.compute_partials(grads)
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: cpu.compute_partials(grads, nthreads=2), range(16)))
    for got in results:
        assert torch.equal(got, want)


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_works_in_forked_child() -> None:
    grads = [torch.randn(1_000_000)]
    want = cpu.compute_partials(grads, nthreads=2)  # starts the helper pool in the parent
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply(_partials_in_child, (grads,))
    assert torch.equal(got, want)


def _partials_in_child(grads: list[torch.Tensor]) -> torch.Tensor:
    return cpu.compute_partials(grads, nthreads=2)


def test_helpers_follow_the_callers_fp_environment() -> None:
    # Under torch.set_flush_denormal(True) (DAZ), subnormals read as zero. Helper threads
    # must use the caller's FP environment, or the answer would depend on which thread
    # took which chunk.
    x = torch.full((4_000_000,), 1e-40)  # fp32 subnormal; big, so that the helper joins
    x[::3] = 1.0
    cpu.compute_partials([x], nthreads=2)  # make sure the helper pool exists
    if not torch.set_flush_denormal(True):
        pytest.skip("no flush-denormal support on this CPU")
    try:
        one = cpu.compute_partials([x], nthreads=1)
        for _ in range(10):
            assert torch.equal(cpu.compute_partials([x], nthreads=2), one)
    finally:
        torch.set_flush_denormal(False)


def test_fp32_sum_sq_is_accurate_at_20m() -> None:
    torch.manual_seed(5)
    x = torch.randn(20_000_000)
    got = cpu.compute_partials([x])
    xd = x.double()
    want_sq = float(xd.square().sum())
    assert float(got[0, Col.SUM_SQ]) == pytest.approx(want_sq, rel=1e-6)
    assert float(got[0, Col.SUM]) == pytest.approx(float(xd.sum()), abs=1e-9 * want_sq)
    assert float(got[0, Col.ABS_MAX]) == float(x.abs().max())


@pytest.mark.parametrize(
    "dtype", [torch.complex64, torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool]
)
def test_unsupported_dtype_raises(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=str(dtype)):
        cpu.compute_partials([torch.randn(4), torch.zeros(3, dtype=dtype)])


def test_non_cpu_tensor_raises() -> None:
    with pytest.raises(ValueError, match="CPU"):
        cpu.compute_partials([torch.empty(3, device="meta")])


def test_compute_group_reads_the_pass_table() -> None:
    """The agent's call: a [5, capacity] table of grads and weights (pointers, sizes,
    weight codes; only the first n columns read) gives each grad's partials and its
    weight's sum of squares side by side, the bits of compute()'s."""
    import numpy as np

    kernel = cpu._kernel
    assert kernel is not None
    grads = [torch.randn(5), torch.randn(300), torch.zeros(0), torch.randn(70_001)]
    grads[1][3] = NAN
    weights = [torch.randn(5), torch.randn(300).half(), torch.zeros(0), torch.randn(70_001)]
    weights[3][9] = INF
    n, capacity = len(grads), len(grads) + 3
    table = np.full((5, capacity), -7, dtype=np.int64)  # junk past n: never read
    table[:, :n] = [
        [g.data_ptr() for g in grads],
        [g.numel() for g in grads],
        [w.data_ptr() for w in weights],
        [w.numel() for w in weights],
        [cpu._CODES[w.dtype] for w in weights],
    ]
    out = torch.empty(n, NCOLS + 1, dtype=torch.float64)
    for threads in (1, 2):
        kernel.compute_group(table.ctypes.data, capacity, n, 0, out.data_ptr(), threads)
        assert torch.equal(out[:, :NCOLS], cpu.compute_partials(grads))
        assert torch.equal(out[:, NCOLS], cpu.compute_partials(weights)[:, Col.SUM_SQ])
    bad = table.copy()
    bad[4, 1] = -1  # an unsupported weight dtype (what the C++ pass writes for one)
    with pytest.raises(ValueError, match="bad entry 5"):
        kernel.compute_group(bad.ctypes.data, capacity, n, 0, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="bad group"):
        kernel.compute_group(table.ctypes.data, n - 1, n, 0, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="bad group"):
        kernel.compute_group(table.ctypes.data, capacity, n, 4, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="table_ptr is NULL"):
        kernel.compute_group(0, 1, 1, 0, out.data_ptr(), 1)
    kernel.compute_group(0, 0, 0, 0, 0, 1)  # nothing to do


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_only_entries_give_the_full_sum_of_squares_bits(dtype: torch.dtype) -> None:
    """A code plus NORM_ONLY: the same sum of squares as the full partials (NaN/Inf left
    out through the careful redo, a float64 overflow to inf), NaN in the other columns."""
    torch.manual_seed(5)
    tensors = [torch.randn(n).to(dtype) for n in (0, 1, 31, 4097, 70_001)]
    tensors[2][[0, 30]] = torch.tensor([NAN, INF], dtype=dtype)
    tensors[4][[5, 65_536, 70_000]] = torch.tensor([-INF, NAN, NAN], dtype=dtype)
    if dtype == torch.float64:
        tensors.append(torch.full((64,), 1e300, dtype=dtype))  # x*x overflows: inf
    full = assert_matches(tensors)
    code = cpu._CODES[dtype] + cpu.NORM_ONLY
    for threads in (1, 2):
        got = torch.empty(len(tensors), NCOLS, dtype=torch.float64)
        kernel = cpu._kernel
        assert kernel is not None
        ptrs = [t.data_ptr() for t in tensors]
        kernel.compute(
            ptrs, [t.numel() for t in tensors], [code] * len(tensors), got.data_ptr(), threads
        )
        assert torch.equal(got[:, Col.SUM_SQ], full[:, Col.SUM_SQ])
        assert bool(got[:, Col.SUM_SQ + 1 :].isnan().all())
    if dtype == torch.float64:
        assert got[-1, Col.SUM_SQ] == INF


def test_kernel_validates_its_arguments() -> None:
    kernel = cpu._kernel
    assert kernel is not None
    x = torch.randn(4)
    out = torch.empty(1, NCOLS, dtype=torch.float64)
    with pytest.raises(ValueError, match="equal lengths"):
        kernel.compute([x.data_ptr()], [4, 4], [0], out.data_ptr(), 1)
    with pytest.raises(ValueError, match="bad entry"):
        kernel.compute([x.data_ptr()], [4], [9], out.data_ptr(), 1)
    with pytest.raises(ValueError, match="bad entry"):
        kernel.compute([x.data_ptr()], [-1], [0], out.data_ptr(), 1)
    with pytest.raises(ValueError, match="bad entry"):
        kernel.compute([0], [4], [0], out.data_ptr(), 1)
    with pytest.raises(ValueError, match="out_ptr"):
        kernel.compute([x.data_ptr()], [4], [0], 0, 1)
    with pytest.raises(TypeError):
        kernel.compute(None, [4], [0], out.data_ptr(), 1)


def test_unavailable_kernel_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_kernel", None)
    assert not cpu.available()
    with pytest.raises(RuntimeError, match="not available"):
        cpu.compute_partials([torch.randn(3)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_partials_and_param_norms_in_one_call_match_float64(dtype: torch.dtype) -> None:
    """The C kernel reads the weights with the gradients (one call): the weights' squared
    norms (the block's last column) equal a float64 reference, the gradient partials are
    those of the gradients alone, and a non-CPU-kernel backend takes the two separate
    paths into the same block."""
    from gradmon.stats import param_sum_squares as foreach_path
    from gradmon.stats import partials_block
    from gradmon.stats import torch as torch_stats

    gen = torch.Generator().manual_seed(3)
    shapes = [(1,), (65537,), (7, 13), (0,), (300, 257)]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    weights = [torch.randn(s, generator=gen).mul(50).to(dtype) for s in shapes]
    want = [float(w.double().square().sum()) for w in weights]
    for known in (None, cpu.KnownWeights()):
        block = partials_block(cpu.compute_partials, grads, weights, known)
        assert block.dtype == torch.float64 and block.shape == (len(shapes), NCOLS + 1)
        assert block[:, NCOLS].tolist() == pytest.approx(want, rel=1e-12, abs=0)
        assert torch.equal(block[:, :NCOLS], cpu.compute_partials(grads))
    generic = partials_block(torch_stats.compute_partials, grads, weights)
    assert torch.equal(generic[:, NCOLS], foreach_path(weights))
    assert generic.shape == block.shape


def grads_and_weights(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Odd sizes, an empty one, NaN/Inf and zeros; one non-contiguous grad and weight."""
    torch.manual_seed(3)
    grads = [torch.randn(n).to(dtype) for n in (1, 17, 4097, 0, 65537)]
    grads[1][[2, 5]] = torch.tensor([NAN, INF], dtype=dtype)
    grads[2][:100] = 0
    grads.append(torch.randn(6, 7).to(dtype).t())  # non-contiguous
    weights = [torch.randn(g.shape).to(dtype) for g in grads]
    weights[2][[7, 4096]] = torch.tensor([NAN, -INF], dtype=dtype)  # the norm's redo
    weights[-1] = torch.randn(7, 6).to(dtype).t()  # non-contiguous: read through a copy
    return grads, weights


def assert_group_matches(
    grads: list[torch.Tensor], weights: list[torch.Tensor], got: torch.Tensor
) -> None:
    """group_partials' [T, 9] block: the grads' partials against the oracle; in the last
    column the weights' sums of squares, the bits of their full partials' (the same lanes
    in the same order)."""
    n = len(grads)
    assert got.shape == (n, NCOLS + 1)
    assert_matches(grads, got[:, :NCOLS])
    full = assert_matches(weights)  # the kernel's full partials of the weights, checked
    assert torch.equal(got[:, NCOLS], full[:, Col.SUM_SQ])


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_partials_match_float64_across_calls(dtype: torch.dtype) -> None:
    """The agent's per-group call (fewer checks, weights re-checked only when changed)
    against the oracle: again with the same weights, after one was changed in place, and
    after one's data was replaced by a tensor of another dtype and size."""
    grads, weights = grads_and_weights(dtype)
    known = cpu.KnownWeights()
    for _ in range(2):
        assert_group_matches(grads, weights, cpu.group_partials(grads, weights, known))
    plain = weights[:-1]  # all read in place: the next call trusts the pointers
    cpu.group_partials(grads[:-1], plain, known)
    assert known.table is not None
    plain[2].mul_(-3.0)  # in place: same pointer, new values
    assert_group_matches(grads[:-1], plain, cpu.group_partials(grads[:-1], plain, known))
    param = torch.nn.Parameter(plain[1].clone())
    swapped = [*plain[:1], param, *plain[2:]]
    cpu.group_partials(grads[:-1], swapped, known)
    param.data = torch.randn(3, dtype=torch.float64)  # another dtype and size
    got = cpu.group_partials(grads[:-1], swapped, known)
    assert_group_matches(grads[:-1], swapped, got)


def test_group_partials_of_nothing_and_of_an_unsupported_weight() -> None:
    assert cpu.group_partials([], [], cpu.KnownWeights()).shape == (0, NCOLS + 1)
    with pytest.raises(TypeError, match="does not support dtype"):
        cpu.group_partials([torch.ones(2)], [torch.ones(2, dtype=torch.int32)], cpu.KnownWeights())


def test_weaken_turns_held_objects_into_untracked_weak_references() -> None:
    """The agent's freshness check keeps a weak reference per grad from one collection to
    the next; weaken() makes them in place, untracked by the cyclic GC."""
    import gc
    import importlib
    import weakref

    weaken = importlib.import_module("gradmon.stats._cpu_kernel").weaken
    a, b = torch.ones(2), torch.zeros(3)
    existing = weakref.ref(b)
    held: list[object] = [a, None, existing]
    weaken(held)
    assert held[1] is None and held[2] is existing
    ref = held[0]
    assert isinstance(ref, weakref.ref) and ref() is a and not gc.is_tracked(ref)
    del a
    assert ref() is None  # weak: the tensor is gone
    with pytest.raises(TypeError, match="list"):
        weaken((b,))
