"""The vectorised publish step against the per-layer computation it replaced, and against
the float64 reference on real gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradmon.agent.inflight import Ready
from gradmon.agent.layers import LayerIndex
from gradmon.agent.publish import Publisher
from gradmon.config import Config
from gradmon.health import HealthRules
from gradmon.snapshot import LayerStats, combine_rows, finalize_layer, no_grad_layer
from gradmon.stats import NCOLS, Col, reference


def per_layer(
    index: LayerIndex, rows: list[list[float]], fresh: list[bool]
) -> dict[str, LayerStats]:
    """The pre-vectorisation publish: one layer at a time, in Python."""
    out = {}
    for name, members in zip(index.layer_names, index.members, strict=True):
        got = [i for i in members if fresh[i]]
        param_sq = sum(rows[i][NCOLS] for i in members)
        numel = sum(index.numels[i] for i in (got or members))
        if got:
            out[name] = finalize_layer(combine_rows([rows[i] for i in got]), numel, param_sq)
        else:
            out[name] = no_grad_layer(numel, param_sq)
    return out


def same(a: LayerStats, b: LayerStats) -> None:
    for field in LayerStats.__slots__:
        x, y = getattr(a, field), getattr(b, field)
        if isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), field
        else:
            assert x == pytest.approx(y, rel=1e-12, abs=0.0), field


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(3, 3, bias=False)
        self.c = nn.Linear(3, 0)  # an empty weight and bias: numel 0
        self.d = nn.Linear(3, 7)


def index_of(model: nn.Module, granularity: str) -> LayerIndex:
    cfg = Config.model_validate({"collect": {"granularity": granularity}})
    return LayerIndex.build(list(model.named_parameters()), cfg)


def partial_rows(grads: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    rows = reference.compute_partials([g.detach() for g in grads])
    sq = torch.tensor([float(w.detach().double().square().sum()) for w in weights])
    return torch.cat([rows, sq.unsqueeze(1)], dim=1)


@pytest.mark.parametrize("granularity", ["parameter", "module"])
@pytest.mark.parametrize("seed", range(6))
def test_columns_match_the_per_layer_computation(granularity: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = Blocks()
    index = index_of(model, granularity)
    params = [p for _, p in model.named_parameters()]
    grads = []
    for p in params:
        g = torch.randn(p.shape, generator=gen) * 10.0 ** float(
            torch.randint(-6, 6, (), generator=gen)
        )
        if g.numel():
            g.view(-1)[torch.randint(0, g.numel(), (2,), generator=gen)] = 0.0
            if seed % 3 == 0:  # NaN and Inf in some layers
                g.view(-1)[0] = float("nan")
                g.view(-1)[-1] = float("inf")
        grads.append(g)
    fresh = [bool(torch.rand((), generator=gen) < 0.7) for _ in params]
    table = partial_rows(grads, params)
    table[[i for i, f in enumerate(fresh) if not f]] = 0.0  # as the inflight table holds them
    ready = Ready(1, False, 0.0, fresh, [0] * len(params), table, None, frozenset(), {})
    cfg = Config()
    snap = Publisher(index, HealthRules(cfg.health), set(), print).build(ready, False)
    want = per_layer(index, table.tolist(), fresh)
    assert list(snap.layers) == list(want)
    for name, stats in want.items():
        same(snap.layers[name], stats)
    assert snap.global_norm == pytest.approx(math.sqrt(sum(s.sum_squares for s in want.values())))
    assert snap.nonfinite == any(s.nan_count or s.inf_count for s in want.values())


def test_real_gradients_against_the_float64_reference() -> None:
    model = Blocks()
    model.d(model.b(model.a(torch.randn(4, 5)))).pow(2).sum().backward()
    index = index_of(model, "module")
    params = [p for _, p in model.named_parameters()]
    fresh = [p.grad is not None for p in params]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    table = partial_rows(grads, params)
    ready = Ready(0, False, 0.0, fresh, [0] * len(params), table, None, frozenset(), {})
    snap = Publisher(index, HealthRules(Config().health), set(), print).build(ready, False)
    for name in ("a", "b", "d"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name + ".")]
        flat = torch.cat([g.reshape(-1) for g in grads]).double()  # type: ignore[union-attr]
        s = snap.layers[name]
        assert s.norm == pytest.approx(float(flat.norm()), rel=1e-12)
        assert s.abs_max == pytest.approx(float(flat.abs().max()))
        assert s.mean == pytest.approx(float(flat.mean()), rel=1e-12)
        assert s.numel == flat.numel()
    assert not snap.layers["c"].received  # empty: no gradient element
    assert table[:, Col.NAN_COUNT].sum() == 0


def test_a_failed_group_leaves_its_layers_out() -> None:
    model = Blocks()
    index = index_of(model, "parameter")
    n = len(index.param_names)
    table = torch.zeros((n, NCOLS + 1), dtype=torch.float64)
    ready = Ready(0, False, 0.0, [True] * n, [0] * n, table, None, frozenset({0, 1}), {})
    snap = Publisher(index, HealthRules(Config().health), set(), print).build(ready, False)
    assert "a.weight" not in snap.layers and "a.bias" not in snap.layers
    assert next(iter(snap.layers)) == "b.weight"


def test_nonfinite_origin_is_the_first_to_arrive() -> None:
    model = Blocks()
    index = index_of(model, "parameter")
    n = len(index.param_names)
    table = torch.zeros((n, NCOLS + 1), dtype=torch.float64)
    table[[0, 5], Col.NAN_COUNT] = 1.0  # a.weight and d.weight
    arrival = [n - i for i in range(n)]  # backward order: the last parameter first
    ready = Ready(0, False, 0.0, [True] * n, arrival, table, None, frozenset(), {})
    snap = Publisher(index, HealthRules(Config().health), set(), print).build(ready, False)
    assert snap.nonfinite_origin == index.param_names[5]
