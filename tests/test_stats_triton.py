"""The Triton kernel (`gradmon.stats.triton`) against the float64 oracle, on the CPU.

The kernels run in Triton's interpreter, which is chosen when triton is imported
(TRITON_INTERPRET=1 must be set before that), and pytest imports every test module at
collection. So `test_interpreter_cases` runs the `TestInterpreter` cases below in a child
pytest process on this file (`-k TestInterpreter`), with the variable set; in this process
they are not collected. To run them directly:
    TRITON_INTERPRET=1 GRADMON_TRITON_INTERPRET_CHILD=1 \\
        pytest tests/test_stats_triton.py -k TestInterpreter
Without triton installed the cases skip, and fail where the CI variable is set (CI installs
`gradmon[dev]`, which brings triton on Linux x86-64).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from gradmon import GradmonError
from gradmon.stats import select_backend
from gradmon.stats import torch as torch_stats
from gradmon.stats.layout import NCOLS, Col

from .oracle import EXACT_COLS, assert_matches_reference

_CHILD_ENV = "GRADMON_TRITON_INTERPRET_CHILD"
IN_CHILD = os.environ.get(_CHILD_ENV) == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parents[1]

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SMALL = {"chunk": 1024, "block": 64}  # cheap chunk and unroll (4 * 64) boundaries


def _require_triton() -> None:
    if not HAVE_TRITON:
        if os.environ.get("CI"):
            pytest.fail("triton is not installed but CI is set: install gradmon[dev]")
        pytest.skip("triton is not installed (pip install gradmon[cuda])")


# ------------------------------------------------------------------ this process
def test_interpreter_cases() -> None:
    _require_triton()
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_ENV: "1"})
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider"]
    cmd += ["-k", "TestInterpreter"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout[-12000:] + proc.stderr[-4000:]
    if "only 0-dimensional arrays can be converted" in report:
        pytest.fail(
            "this triton's interpreter does not work with numpy >= 2.4 (triton-lang/triton "
            "issue 9171): upgrade triton (3.9 works) or use numpy < 2.4\n" + report
        )
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 30 and " skipped" not in proc.stdout, report


def test_import_gradmon_does_not_import_triton() -> None:
    # (torch.optim itself may import triton when it is installed; gradmon's backend module
    # must still stay unimported on CPU.)
    code = (
        "import sys, torch, gradmon\n"
        "assert 'triton' not in sys.modules, 'import gradmon imported triton'\n"
        "m = torch.nn.Linear(3, 2)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "mon = gradmon.attach(m, opt, config={'exporter': {'enabled': False}})\n"
        "m(torch.randn(4, 3)).sum().backward(); opt.step()\n"
        "assert mon.snapshot() is not None\n"
        "assert 'gradmon.stats.triton' not in sys.modules, 'CPU training loaded it'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradmon.stats

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "gradmon.stats.triton", raising=False)
    monkeypatch.delattr(gradmon.stats, "triton", raising=False)


def test_triton_not_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_triton(monkeypatch)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    with pytest.raises(GradmonError, match=r"cannot run.*pip install gradmon\[cuda\]"):
        select_backend("triton", cuda, torch.bfloat16)
    with pytest.raises(GradmonError, match=r"collect.backend 'triton' cannot run"):
        select_backend("triton", cpu, torch.float32)
    # auto falls back silently (selection only looks at the device type: no GPU needed)
    assert select_backend("auto", cuda, torch.bfloat16) is torch_stats.compute_partials


def test_triton_on_cpu_needs_the_interpreter() -> None:
    _require_triton()
    with pytest.raises(GradmonError, match="TRITON_INTERPRET=1"):
        select_backend("triton", torch.device("cpu"), torch.float32)
    with pytest.raises(GradmonError, match="handles"):
        select_backend("triton", torch.device("cuda", 0), torch.int32)
    # auto never sends CPU tensors to Triton, and unsupported CUDA dtypes go to torch
    assert select_backend("auto", torch.device("cuda", 0), torch.int32) is (
        torch_stats.compute_partials
    )


def test_auto_falls_back_when_the_kernel_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import gradmon.stats as stats

    calls = []

    def broken(grads: object) -> torch.Tensor:
        calls.append(grads)
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(stats, "_load_triton_backend", lambda device, dtype: (broken, ""))
    fn = select_backend("auto", torch.device("cuda", 0), torch.float32)
    grads = [torch.randn(100), torch.tensor([NAN, 1.0])]
    with caplog.at_level(logging.WARNING, logger="gradmon"):
        first = fn(grads)
        second = fn(grads)
    assert len(calls) == 1  # not retried on every step
    assert "Triton statistics kernel failed" in caplog.text
    assert_matches(grads, first)
    assert torch.equal(first, second)
    # named explicitly, the failure is the user's to see
    assert select_backend("triton", torch.device("cuda", 0), torch.float32) is broken


# -------------------------------------------------------------------- the oracle
def assert_matches(grads: list[torch.Tensor], got: torch.Tensor) -> torch.Tensor:
    """Kernel vs oracle: sums to fp32 accuracy, every other column exactly."""
    return assert_matches_reference(grads, got, cancellation=1e-6, floor=1e-30)


# --------------------------------------------------- the cases, in the interpreter
@pytest.fixture
def tb() -> ModuleType:
    from gradmon.stats import triton as backend

    assert backend.interpreting()
    return backend


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf*inf in the interpreter
class TestInterpreter:
    __test__ = IN_CHILD  # collected only in the child process (see the module docstring)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_random_values(self, tb: ModuleType, dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(0)
        grads = [
            torch.randn(10007, generator=gen).to(dtype),
            (torch.rand(333, generator=gen) * 100).to(dtype),
            torch.randn(33, 17, generator=gen).to(dtype),
        ]
        assert_matches(grads, tb.compute_partials(grads))
        assert_matches(grads, tb.compute_partials(grads, **SMALL))

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_nan_and_inf(self, tb: ModuleType, dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(5000, generator=gen)
        x[[3, 100, 2047, 2048, 4999]] = NAN
        y = torch.randn(5000, generator=gen)
        y[[0, 17, 4096]] = INF
        y[[5, 2049]] = -INF
        grads = [
            t.to(dtype)
            for t in (
                x,
                y,
                torch.full((40,), NAN),
                torch.full((40,), INF),
                torch.full((40,), -INF),
                torch.tensor([NAN, INF, -INF, 0.0, -2.5, 7.0]),
                torch.tensor([INF, -INF]),
                -torch.rand(300, generator=gen) - 1.0,  # all negative: max must not be 0
            )
        ]
        grads[-1][7] = NAN
        got = assert_matches(grads, tb.compute_partials(grads, **SMALL))
        assert got[0, Col.NAN_COUNT] == 5 and got[1, Col.INF_COUNT] == 5
        assert got[2].tolist() == [0.0, 0.0, 0.0, INF, -INF, 0.0, 40.0, 0.0]
        assert got[3].tolist() == [0.0, 0.0, 0.0, INF, -INF, 0.0, 0.0, 40.0]
        assert got[5].tolist() == [6.25 + 49.0, 4.5, 7.0, -2.5, 7.0, 1.0, 1.0, 2.0]
        assert got[7, Col.MAX] <= -1.0
        other = tb.compute_partials(grads)  # another chunking: sums differ in order only
        assert torch.equal(got[:, EXACT_COLS], other[:, EXACT_COLS])

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_zeros_empty_and_single(self, tb: ModuleType, dtype: torch.dtype) -> None:
        grads = [
            torch.zeros(3000, dtype=dtype),
            torch.tensor([0.0, -0.0, 0.0], dtype=dtype),
            torch.zeros(0, dtype=dtype),
            torch.zeros(0, 5, dtype=dtype),
            torch.tensor([-3.0], dtype=dtype),
            torch.tensor([NAN], dtype=dtype),
            torch.tensor(2.0, dtype=dtype),  # 0-d
        ]
        got = assert_matches(grads, tb.compute_partials(grads))
        assert got[0].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 3000.0, 0.0, 0.0]
        identity = [0.0, 0.0, 0.0, INF, -INF, 0.0, 0.0, 0.0]
        assert got[2].tolist() == identity and got[3].tolist() == identity
        assert got[4].tolist() == [9.0, -3.0, 3.0, -3.0, -3.0, 0.0, 0.0, 0.0]
        assert got[5].tolist() == [0.0, 0.0, 0.0, INF, -INF, 0.0, 1.0, 0.0]
        only_empty = [torch.zeros(0, dtype=dtype)] * 3  # no stage-1 program at all
        assert tb.compute_partials(only_empty).tolist() == [identity] * 3

    def test_empty_list(self, tb: ModuleType) -> None:
        assert tb.compute_partials([]).shape == (0, NCOLS)

    @pytest.mark.parametrize(
        ("sizes", "config"),
        [
            ([1, 65535, 65536, 65537, 4 * 65536 + 3], {}),
            ([63, 64, 65, 255, 256, 257, 1023, 1024, 1025, 3 * 1024 + 511], SMALL),
        ],
        ids=["default", "small"],
    )
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_boundary_sizes(
        self, tb: ModuleType, sizes: list[int], config: dict[str, int], dtype: torch.dtype
    ) -> None:
        gen = torch.Generator().manual_seed(len(sizes))
        grads = []
        for n in sizes:
            clean = torch.randn(n, generator=gen).to(dtype)
            dirty = clean.clone()
            dirty[-1] = NAN  # the last, often partial, chunk and tile
            if n > 2:
                dirty[n // 2] = -INF
                dirty[0] = 0.0
            grads += [clean, dirty]
        assert_matches(grads, tb.compute_partials(grads, **config))

    def test_many_small_tensors(self, tb: ModuleType) -> None:
        gen = torch.Generator().manual_seed(2)
        grads = []
        for i in range(50):
            n = int(torch.randint(0, 300, (1,), generator=gen))
            scale = 10.0 ** int(torch.randint(-3, 4, (1,), generator=gen))
            x = torch.randn(n, generator=gen) * scale
            if n and i % 7 == 0:
                x[int(torch.randint(0, n, (1,), generator=gen))] = NAN
            if n and i % 11 == 0:
                x[int(torch.randint(0, n, (1,), generator=gen))] = -INF
            if n and i % 5 == 0:
                x[torch.rand(n, generator=gen) < 0.3] = 0.0
            grads.append(x)
        assert_matches(grads, tb.compute_partials(grads, chunk=128, block=16))
        assert_matches(grads, tb.compute_partials(grads))

    def test_grads_replaced_between_calls(self, tb: ModuleType) -> None:
        # zero_grad(set_to_none=True) makes new grads of the same shapes every step: the
        # table is keyed by shape, and the pointers must follow the new storage.
        gen = torch.Generator().manual_seed(3)
        shapes = [(300,), (17, 5), (0,), (2000,)]
        old = [torch.randn(s, generator=gen) for s in shapes]
        first = assert_matches(old, tb.compute_partials(old, **SMALL))
        plans = len(tb._plans)
        new = [torch.randn(s, generator=gen) * 3 for s in shapes]  # `old` stays alive
        second = assert_matches(new, tb.compute_partials(new, **SMALL))
        assert len(tb._plans) == plans  # the same plan, with new pointers
        assert not torch.equal(first[0], second[0])
        for g in new:  # same storage, new values (grad accumulation): read again
            g.mul_(-2.0)
        assert_matches(new, tb.compute_partials(new, **SMALL))
        del old
        again = [torch.randn(s, generator=gen) for s in shapes]
        assert_matches(again, tb.compute_partials(again, **SMALL))
        swapped = [new[0], again[1], new[2], again[3]]
        assert_matches(swapped, tb.compute_partials(swapped, **SMALL))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
    def test_unaligned_views(self, tb: ModuleType, dtype: torch.dtype) -> None:
        # Grads as views into one flat buffer (DDP's gradient_as_bucket_view, FSDP shards)
        # start at any element: each chunk reads up to 15 bytes with a mask, then 16-byte
        # aligned tiles.
        flat = torch.randn(9000, generator=torch.Generator().manual_seed(7)).to(dtype)
        flat[[5, 2000, 8999]] = torch.tensor([NAN, INF, 0.0], dtype=dtype)
        grads = [flat[1:3], flat[3:4], flat[5:2600], flat[2601:8999].view(2, 3199), flat[8999:]]
        assert grads[2].data_ptr() % 16 != 0
        assert_matches(grads, tb.compute_partials(grads, **SMALL))
        assert_matches(grads, tb.compute_partials(grads))

    def test_mixed_list(self, tb: ModuleType) -> None:
        gen = torch.Generator().manual_seed(4)
        big = torch.randn(70_001, generator=gen)
        big[[10, 65_600]] = torch.tensor([NAN, INF])
        grads = [
            torch.randn(768, generator=gen),
            torch.zeros(0),
            big,
            torch.randn(64, 48, generator=gen).t(),  # non-contiguous
            torch.full((9,), -INF),
            torch.zeros(100),
            torch.tensor(5.0),
        ]
        got = assert_matches(grads, tb.compute_partials(grads))
        assert (got[2, Col.NAN_COUNT], got[2, Col.INF_COUNT]) == (1.0, 1.0)
        with pytest.raises(ValueError, match="one device and dtype"):
            tb.compute_partials([torch.randn(3), torch.randn(3, dtype=torch.float64)])

    def test_large_finite_values_do_not_overflow(self, tb: ModuleType) -> None:
        half = torch.tensor([300.0, 60000.0, -60000.0, 65504.0, -300.0] * 100).half()
        bf = torch.tensor([3e38, -3e38, 1e30] * 100, dtype=torch.bfloat16)
        big32 = torch.full((5000,), 1e20)  # x*x overflows fp32
        huge32 = torch.tensor([3e38, 3e38, -1e38] * 1000)  # the sum overflows fp32
        mixed = torch.cat([big32[:100], torch.tensor([NAN, -INF])])
        for grads in ([half], [bf], [big32, huge32, mixed]):
            got = assert_matches(grads, tb.compute_partials(grads, **SMALL))
            assert torch.isfinite(got[0, :3]).all()
        f64 = [torch.tensor([1e200, 2.0, -1e200], dtype=torch.float64)]  # the oracle: inf
        assert_matches(f64, tb.compute_partials(f64))

    @pytest.mark.parametrize(
        "dtype",
        [
            torch.float32,
            torch.float16,
            pytest.param(
                torch.bfloat16,
                marks=pytest.mark.xfail(
                    reason="Triton's interpreter converts bf16 subnormals to fp32 wrongly "
                    "(triton/runtime/interpreter.py _convert_float); tests/test_cuda.py "
                    "checks them on a GPU",
                    strict=False,
                ),
            ),
        ],
        ids=str,
    )
    def test_subnormals(self, tb: ModuleType, dtype: torch.dtype) -> None:
        tiny = torch.finfo(dtype).smallest_normal
        x = torch.tensor([tiny / 2, -tiny / 4, tiny * 0.75, tiny, -tiny, 0.0] * 50, dtype=dtype)
        got = assert_matches([x], tb.compute_partials([x]))
        assert got[0, Col.ZERO_COUNT] == 50  # a subnormal is not zero

    def test_float16_every_bit_pattern(self, tb: ModuleType) -> None:
        x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
        got = assert_matches([x], tb.compute_partials([x]))
        assert got[0, Col.NAN_COUNT] == 2 * 1023 and got[0, Col.INF_COUNT] == 2
        assert got[0, Col.ZERO_COUNT] == 2  # +0 and -0

    def test_neg_view_and_parameter(self, tb: ModuleType) -> None:
        base = torch.randn(300, 70)
        neg = torch._neg_view(base[:10])
        p = torch.nn.Parameter(torch.randn(64, 8))
        got = assert_matches([neg, p], tb.compute_partials([neg, p]))
        assert float(got[0, Col.SUM]) == pytest.approx(-float(base[:10].double().sum()))

    def test_fp32_sums_are_accurate_over_many_chunks(self, tb: ModuleType) -> None:
        # fp32 only within a chunk, float64 after: ~1e-7 relative however many chunks.
        x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(5)) + 0.5
        got = tb.compute_partials([x])
        xd = x.double()
        assert float(got[0, Col.SUM_SQ]) == pytest.approx(float(xd.square().sum()), rel=1e-6)
        assert float(got[0, Col.SUM]) == pytest.approx(float(xd.sum()), rel=1e-6)

    def test_deterministic(self, tb: ModuleType) -> None:
        gen = torch.Generator().manual_seed(6)
        grads = [torch.randn(150_001, generator=gen), torch.randn(3, generator=gen)]
        assert torch.equal(tb.compute_partials(grads), tb.compute_partials(grads))

    def test_out_argument(self, tb: ModuleType) -> None:
        grads = [torch.randn(100), torch.randn(7)]
        out = torch.full((2, NCOLS), -1.0, dtype=torch.float64)
        assert tb.compute_partials(grads, out) is out
        assert_matches(grads, out)
        for bad in (torch.empty(3, NCOLS, dtype=torch.float64), torch.empty(2, NCOLS)):
            with pytest.raises(ValueError, match="out must be"):
                tb.compute_partials(grads, bad)

    def test_arguments_are_checked(self, tb: ModuleType) -> None:
        with pytest.raises(ValueError, match="handles"):
            tb.compute_partials([torch.zeros(3, dtype=torch.int32)])
        with pytest.raises(ValueError, match="powers of two"):
            tb.compute_partials([torch.zeros(3)], chunk=1000, block=8)
        with pytest.raises(ValueError, match="powers of two"):
            tb.compute_partials([torch.zeros(3)], chunk=64, block=128)
        with pytest.raises(ValueError, match="interpreter"):
            tb.compute_partials([torch.zeros(3, device="meta")])

    def test_plan_cache_is_bounded(self, tb: ModuleType) -> None:
        for n in range(1, tb._MAX_PLANS + 10):
            tb.compute_partials([torch.ones(n)])
        assert len(tb._plans) <= tb._MAX_PLANS

    def test_selected_under_the_interpreter(self, tb: ModuleType) -> None:
        fn = select_backend("triton", torch.device("cpu"), torch.bfloat16)
        assert fn is tb.compute_partials
        grads = [torch.randn(1000).bfloat16()]
        assert_matches(grads, fn(grads))
