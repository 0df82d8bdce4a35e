"""The plain torch backend and the backend switch, against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from gradmon import GradmonError
from gradmon.stats import Col, reference, select_backend
from gradmon.stats import torch as torch_stats

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _cases(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    big = 300.0 if dtype == torch.float16 else 1e20 if dtype != torch.bfloat16 else 1e30
    return [
        torch.randn(1000, generator=g).to(dtype),
        torch.randn(33, 17, generator=g).to(dtype),  # odd-sized 2D
        torch.tensor([1.0, NAN, INF, -INF, 0.0, -2.5]).to(dtype),
        torch.zeros(64, dtype=dtype),
        torch.empty(0, dtype=dtype),
        torch.tensor([3.0]).to(dtype),
        torch.full((500,), big).to(dtype),  # squares overflow the input dtype
        torch.tensor([NAN, NAN]).to(dtype),
        torch.randn(65537, generator=g).to(dtype),
        torch.randn(40, 30, generator=g).to(dtype).t(),  # non-contiguous
    ]


def assert_partials_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-6) -> None:
    assert got.shape == want.shape
    got = got.cpu().double()
    for col in Col:
        a, b = got[:, col], want[:, col]
        if col in (Col.ZERO_COUNT, Col.NAN_COUNT, Col.INF_COUNT, Col.MIN, Col.MAX, Col.ABS_MAX):
            assert torch.equal(a, b), f"{col.name}: {a} != {b}"
        else:
            assert torch.allclose(a, b, rtol=rtol, atol=1e-12), f"{col.name}: {a} != {b}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_matches_reference(dtype: torch.dtype) -> None:
    grads = _cases(dtype)
    assert_partials_close(torch_stats.compute_partials(grads), reference.compute_partials(grads))


def test_reference_semantics() -> None:
    row = reference.tensor_partials(torch.tensor([1.0, NAN, INF, -INF, 0.0, -2.0]))
    assert row[Col.SUM_SQ] == 5.0 and row[Col.SUM] == -1.0
    assert row[Col.MIN] == -2.0 and row[Col.MAX] == 1.0 and row[Col.ABS_MAX] == 2.0
    assert (row[Col.ZERO_COUNT], row[Col.NAN_COUNT], row[Col.INF_COUNT]) == (1, 1, 2)
    empty = reference.tensor_partials(torch.empty(0))
    assert empty[Col.MIN] == math.inf and empty[Col.MAX] == -math.inf and empty[Col.SUM_SQ] == 0


def test_fp16_300_does_not_overflow() -> None:
    grads = [torch.full((1000,), 300.0, dtype=torch.float16)]
    out = torch_stats.compute_partials(grads)
    assert out[0, Col.SUM_SQ].item() == pytest.approx(1000 * 300.0**2)


def test_empty_list() -> None:
    assert torch_stats.compute_partials([]).shape == (0, 8)


def test_backend_switch() -> None:
    cpu = torch.device("cpu")
    assert select_backend("torch", cpu, torch.float32) is torch_stats.compute_partials
    assert select_backend("auto", cpu, torch.complex64) is torch_stats.compute_partials
    with pytest.raises(GradmonError, match="collect.backend 'cpu'"):
        select_backend("cpu", cpu, torch.int32)
    try:
        import triton  # noqa: F401
    except ImportError:
        with pytest.raises(GradmonError, match="collect.backend 'triton' cannot run"):
            select_backend("triton", cpu, torch.float32)
