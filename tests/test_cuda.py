"""On a CUDA device: the Triton kernel against the float64 oracle, and a training step with
the agent attached that never makes the host wait for the GPU.

`pytest -m gpu tests/test_cuda.py`; skipped without CUDA (or without triton).
`bench/gpu_check.sh` runs these on a lent GPU machine.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import pytest
import torch
from torch import nn

from gradmon.stats import NCOLS, Col, reference, select_backend

from . import readings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
EXACT_COLS = [Col.ABS_MAX, Col.MIN, Col.MAX, Col.ZERO_COUNT, Col.NAN_COUNT, Col.INF_COUNT]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tb() -> ModuleType:
    pytest.importorskip("triton")
    from gradmon.stats import triton as backend

    assert not backend.interpreting(), "unset TRITON_INTERPRET for the GPU tests"
    return backend


def assert_matches(grads: list[torch.Tensor], got: torch.Tensor, rel: float = 1e-6) -> None:
    assert got.device.type == "cuda" and got.dtype == torch.float64
    assert got.shape == (len(grads), NCOLS)
    got = got.cpu()
    want = reference.compute_partials(grads)
    for i, g in enumerate(grads):
        x = g.detach().double().reshape(-1)
        scale = float(x[torch.isfinite(x)].abs().sum())
        for col in (Col.SUM_SQ, Col.SUM):
            a, b = float(got[i, col]), float(want[i, col])
            if math.isinf(b):
                assert a == b, (i, col.name, a, b)
            else:
                assert a == pytest.approx(b, rel=rel, abs=rel * scale + 1e-30), (i, col.name)
        for col in EXACT_COLS:
            assert float(got[i, col]) == float(want[i, col]), (i, col.name, got[i], want[i])


def _cases(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    big = 300.0 if dtype == torch.float16 else 1e20 if dtype != torch.bfloat16 else 1e30
    dirty = torch.randn(70_000, generator=g)
    dirty[[0, 65_535, 65_536, 69_999]] = torch.tensor([NAN, INF, -INF, NAN])
    tiny = torch.finfo(dtype).smallest_normal
    cases = [
        torch.randn(1000, generator=g),
        torch.randn(33, 17, generator=g),
        torch.tensor([1.0, NAN, INF, -INF, 0.0, -2.5]),
        torch.zeros(64),
        torch.empty(0),
        torch.tensor([3.0]),
        torch.full((500,), big),
        torch.tensor([NAN, NAN]),
        dirty,
        torch.tensor([tiny / 2, -tiny / 4, tiny, 0.0] * 40),  # subnormals are not zeros
        -torch.rand(3000, generator=g) - 1.0,
    ]
    cases += [torch.randn(n, generator=g) for n in (1, 65_535, 65_536, 65_537, 300_001)]
    return [c.to(dtype) for c in cases]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_reference(tb: ModuleType, dtype: torch.dtype) -> None:
    grads = [c.to(CUDA) for c in _cases(dtype)]
    assert_matches(grads, tb.compute_partials(grads))
    assert_matches(grads, tb.compute_partials(grads, chunk=1024, block=64))
    assert torch.equal(tb.compute_partials(grads), tb.compute_partials(grads))  # no atomics


def test_selected_for_cuda(tb: ModuleType) -> None:
    assert select_backend("triton", CUDA, torch.bfloat16) is tb.compute_partials
    grads = [torch.randn(1000, device=CUDA)]
    assert_matches(grads, select_backend("auto", CUDA, torch.float32)(grads))


def test_unaligned_views(tb: ModuleType) -> None:
    # DDP's gradient_as_bucket_view and FSDP shards: grads at odd element offsets of a
    # flat buffer, so the kernel takes its unaligned (scalar-load) variant.
    flat = torch.randn(100_003, device=CUDA, dtype=torch.bfloat16)
    grads = [flat[1:40_001], flat[40_001:40_002], flat[40_003:100_003].view(300, 200)]
    assert grads[0].data_ptr() % 16 != 0
    assert_matches(grads, tb.compute_partials(grads))


def test_grads_replaced_between_calls(tb: ModuleType) -> None:
    shapes = [(768, 2304), (2304,), (0,), (50_257, 64)]
    for step in range(4):
        grads = [torch.randn(s, device=CUDA) * (step + 1) for s in shapes]
        if step == 2:
            grads[1][5] = NAN
        assert_matches(grads, tb.compute_partials(grads))


def test_fp32_accuracy_at_1e8(tb: ModuleType) -> None:
    x = torch.randn(100_000_000, device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    x += 0.25
    got = tb.compute_partials([x]).cpu()
    xd = x.double()
    assert float(got[0, Col.SUM_SQ]) == pytest.approx(float(xd.square().sum()), rel=1e-6)
    assert float(got[0, Col.SUM]) == pytest.approx(float(xd.sum()), rel=1e-6)
    assert float(got[0, Col.ABS_MAX]) == float(x.abs().max())


def test_tensor_over_2_31_elements(tb: ModuleType) -> None:
    n = 2**31 + 4099
    if torch.cuda.get_device_properties(CUDA).total_memory < 16 * 2**30:
        pytest.skip("needs 16 GiB of GPU memory")
    x = torch.ones(n, device=CUDA, dtype=torch.bfloat16)
    x[-3:] = torch.tensor([NAN, -INF, 0.0], dtype=torch.bfloat16)
    x[2**31 + 7] = -2.0
    row = tb.compute_partials([x])[0].tolist()
    ones = n - 4  # all but NaN, -Inf, 0 and -2
    assert row[Col.SUM_SQ] == pytest.approx(ones + 4.0, rel=1e-6)
    assert row[Col.SUM] == pytest.approx(ones - 2.0, rel=1e-6)
    assert row[Col.MIN] == -2.0 and row[Col.MAX] == 1.0 and row[Col.ABS_MAX] == 2.0
    assert row[Col.ZERO_COUNT :] == [1.0, 1.0, 1.0]


# --------------------------------------------------------------- no host syncs
class GPT(nn.Module):
    """A small GPT-shaped model: embeddings, pre-norm causal blocks, tied head."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 2, ctx: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        block = nn.TransformerEncoderLayer(
            d, 4, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.h = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device)
        x = self.h(self.wte(tokens) + self.wpe(pos), mask=self.mask[:t, :t], is_causal=True)
        out: torch.Tensor = self.ln_f(x) @ self.wte.weight.t()
        return out


@contextmanager
def sync_debug(mode: str) -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _train(model: nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)  # new grad tensors every step
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        loss.backward()
        opt.step()


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_training_step_makes_no_sync(tb: ModuleType, param_dtype: torch.dtype) -> None:
    import gradmon

    torch.manual_seed(0)
    base = GPT().to(CUDA, param_dtype)
    model = copy.deepcopy(base)
    tokens = torch.randint(0, 512, (4, 64), device=CUDA)
    opt_base = torch.optim.AdamW(base.parameters(), lr=1e-4)
    _train(base, opt_base, tokens, 1)
    try:  # the training step alone must be sync-free, or nothing can be said about ours
        with sync_debug("error"):
            _train(base, opt_base, tokens, 2)
    except RuntimeError as exc:
        pytest.skip(f"this torch's training step syncs by itself: {exc}")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tb._plans.clear()
    mon = gradmon.attach(model, opt, config={"exporter": {"enabled": False}})
    try:
        _train(model, opt, tokens, 1)  # compiles the kernels, builds the tables
        with sync_debug("error"):
            _train(model, opt, tokens, 3)
        # the agent catches its own errors (training goes on): a sync shows up as a count
        assert not any(readings.errors(mon).values()), readings.errors(mon)
        with warnings.catch_warnings(record=True) as caught, sync_debug("warn"):
            warnings.simplefilter("always")
            _train(model, opt, tokens, 2)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert not syncs, [str(w.message) for w in syncs]
        assert tb._plans, "the Triton backend did not run"
        snap = mon.snapshot(wait=True)  # outside the debug mode: this one may wait
    finally:
        mon.close()
    assert snap is not None and snap.step == 5
    named = dict(model.named_parameters())
    grads = [named[name].grad for name in snap.layers]
    want = reference.compute_partials(grads)  # the grads the last collection saw
    for i, (name, s) in enumerate(snap.layers.items()):
        row = want[i].tolist()
        assert s.norm == pytest.approx(math.sqrt(row[Col.SUM_SQ]), rel=1e-5), name
        assert s.abs_max == row[Col.ABS_MAX] and s.min == row[Col.MIN], name
        assert s.max == row[Col.MAX] and s.nan_count == 0 and s.inf_count == 0, name
        assert s.zero_ratio == row[Col.ZERO_COUNT] / s.numel, name
    assert snap.global_norm == pytest.approx(math.sqrt(float(want[:, Col.SUM_SQ].sum())), rel=1e-5)


def test_update_ratio_makes_no_sync_and_staging_buffers_are_reused(
    tb: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """collect.update_ratio_every: 1 with a budget of half the weights (two round-robin
    chunks): no host sync in the step, pinned buffers reused across steps, and the ratio
    of the last sample against a float64 reference."""
    import gradmon

    torch.manual_seed(0)
    model = GPT().to(CUDA)
    tokens = torch.randint(0, 512, (4, 64), device=CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    half = sum(p.numel() * p.element_size() for p in model.parameters()) // 2
    cfg = {
        "exporter": {"enabled": False},
        "collect": {"update_ratio_every": 1, "update_ratio_max_bytes": half},
    }
    from gradmon.agent import inflight
    from gradmon.agent.staging import StagingPool

    pools: list[StagingPool] = []  # the pool the agent stages through, seen at its seam
    monkeypatch.setattr(inflight, "StagingPool", lambda: pools.append(StagingPool()) or pools[-1])
    mon = gradmon.attach(model, opt, config=cfg)
    (pool,) = pools
    try:
        _train(model, opt, tokens, 4)  # kernels compiled, chunks planned, buffers made
        mon.snapshot(wait=True)
        allocated = pool.allocations
        with sync_debug("error"):
            _train(model, opt, tokens, 10)  # 20 copies staged: partials + ratio rows
        assert not any(readings.errors(mon).values()), readings.errors(mon)
        # Reused, not one pinned allocation per copy (a spare only when the GPU lagged).
        assert pool.allocations - allocated <= 4, pool.allocations
        earlier = {n: s.update_ratio for n, s in mon.snapshot(wait=True).layers.items()}  # type: ignore[union-attr]
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        _train(model, opt, tokens, 1)
        after = {n: p.detach().double() for n, p in model.named_parameters()}
        snap = mon.snapshot(wait=True)
    finally:
        mon.close()
    assert snap is not None  # two chunks: every layer measured, some in the last sample
    assert all(s.update_ratio is not None for s in snap.layers.values())
    measured = [n for n, s in snap.layers.items() if s.update_ratio != earlier[n]]
    assert measured
    for n in measured:
        want = float((after[n] - before[n]).norm() / after[n].norm())
        assert snap.layers[n].update_ratio == pytest.approx(want, rel=1e-4), n


def test_activation_statistics_make_no_sync() -> None:
    """collect.activations: the forward hooks (plain torch ops into a device table) and the
    collection add no host sync to a training step."""
    import gradmon

    torch.manual_seed(0)
    model = GPT().to(CUDA)
    tokens = torch.randint(0, 512, (4, 64), device=CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    config = {"exporter": {"enabled": False}, "collect": {"activations": True}}
    mon = gradmon.attach(model, opt, config=config)
    try:
        _train(model, opt, tokens, 1)
        try:
            with sync_debug("error"):
                _train(model, opt, tokens, 3)
        except RuntimeError as exc:
            pytest.skip(f"this torch's training step syncs by itself: {exc}")
        errors = readings.errors(mon)
        assert not any(errors.values()), errors
        snap = mon.snapshot(wait=True)
    finally:
        mon.close()
    assert snap is not None and snap.step == 3
    assert snap.activations and all(a.numel > 0 for a in snap.activations.values())
    assert all(a.nan_count == 0 and a.rms > 0 for a in snap.activations.values())
