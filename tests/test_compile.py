"""torch.compile: a compiled model and a compiled optimizer step give the eager statistics
(and those of the float64 reference), and attaching the agent adds no graph break.

Both `aot_eager` (dynamo + AOTAutograd, eager kernels: everything that decides graph breaks
and hook placement) and `inductor`, the default backend, which generates code around the
agent's step hook (an opaque custom op, see gradmon/agent/hooks.py) and once crashed on it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradmon
from gradmon.stats import Col, reference

from . import readings
from .conftest import SmallNet

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

NO_SERVER = {"exporter": {"enabled": False}}
BACKEND = "aot_eager"
BACKENDS = ("aot_eager", "inductor")
STEPS = 3


def train(
    model: nn.Module,
    *,
    compile_model: bool,
    compile_step: bool,
    attach: bool,
    backend: str = BACKEND,
) -> tuple[list[gradmon.Snapshot], dict[str, int]]:
    """STEPS training steps on fixed data; the snapshots and the graph breaks seen. Each
    snapshot is also checked against the float64 reference of the grads it was taken of."""
    dynamo.reset()
    counters.clear()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = gradmon.attach(model, opt, config=NO_SERVER) if attach else None
    forward: Callable[[torch.Tensor], torch.Tensor] = (
        torch.compile(model, backend=backend) if compile_model else model
    )

    def step() -> None:
        opt.step()

    do_step = torch.compile(step, backend=backend) if compile_step else step
    data = torch.Generator().manual_seed(1)
    snaps = []
    try:
        for _ in range(STEPS):
            opt.zero_grad()
            forward(torch.randn(8, 8, generator=data)).pow(2).mean().backward()
            want = {n: reference.tensor_partials(p.grad) for n, p in model.named_parameters()}
            # The weights the step starts from: the hook runs before the step's updates.
            weights = {n: p.detach().double().norm().item() for n, p in model.named_parameters()}
            do_step()
            if mon is not None:
                snap = mon.snapshot()
                assert snap is not None
                for name, row in want.items():
                    assert snap.layers[name].sum_squares == pytest.approx(row[Col.SUM_SQ])
                    assert snap.layers[name].abs_max == row[Col.ABS_MAX]
                    assert snap.layers[name].param_norm == pytest.approx(weights[name])
                snaps.append(snap)
        if mon is not None:
            assert readings.collections(mon) == STEPS  # one collection per (compiled) step
    finally:
        if mon is not None:
            mon.close()
    return snaps, dict(counters["graph_break"])


def assert_same(got: list[gradmon.Snapshot], want: list[gradmon.Snapshot]) -> None:
    assert [s.step for s in got] == [s.step for s in want] == list(range(STEPS))
    for g, w in zip(got, want, strict=True):
        assert list(g.layers) == list(w.layers)  # no `_orig_mod.` prefix
        # Compiled and eager Adam round differently in the last bits, and the parameters
        # (hence the next grads) drift apart by ~1e-6 relative over the steps.
        for name, ws in w.layers.items():
            gs = g.layers[name]
            assert gs.norm == pytest.approx(ws.norm, rel=1e-4), name
            assert gs.abs_max == pytest.approx(ws.abs_max, rel=1e-4), name
            assert gs.param_norm == pytest.approx(ws.param_norm, rel=1e-4), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("compile_model", "compile_step"), [(True, False), (False, True), (True, True)]
)
def test_compiled_statistics_equal_eager_and_no_graph_break_added(
    compile_model: bool, compile_step: bool, backend: str
) -> None:
    base = SmallNet()
    eager, _ = train(copy.deepcopy(base), compile_model=False, compile_step=False, attach=True)
    kw = {"compile_model": compile_model, "compile_step": compile_step, "backend": backend}
    got, breaks = train(copy.deepcopy(base), attach=True, **kw)
    assert_same(got, eager)
    _, breaks_without = train(copy.deepcopy(base), attach=False, **kw)
    # The optimizer's own graph breaks (torch.optim breaks around its no_grad region)
    # stay; the agent adds none, of any kind.
    assert breaks == breaks_without
    assert not any("gradmon" in reason for reason in breaks)


def test_compiled_model_layer_names_are_the_models() -> None:
    model = SmallNet()
    compiled = torch.compile(model, backend=BACKEND)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmon.attach(compiled, opt, config=NO_SERVER) as mon:
        assert mon.layer_names == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_with_dtensor_parameters(backend: str) -> None:
    """FSDP2 parameters are DTensors: the step hook's custom op takes their local shards
    (DTensor has no sharding rule for an op of gradmon's own)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        dynamo.reset()
        model = SmallNet()
        fully_shard(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        step = torch.compile(opt.step, backend=backend)
        with gradmon.attach(model, opt, config=NO_SERVER) as mon:
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(8, 8)).pow(2).mean().backward()
                want = {
                    n: reference.tensor_partials(p.grad.to_local())  # type: ignore[union-attr]
                    for n, p in model.named_parameters()
                }
                step()
                snap = mon.snapshot()
                assert snap is not None
                for name, row in want.items():
                    assert snap.layers[name].sum_squares == pytest.approx(row[Col.SUM_SQ])
            assert readings.collections(mon) == 2
            assert readings.errors(mon) == dict.fromkeys(readings.STAGES, 0)
    finally:
        dist.destroy_process_group()
