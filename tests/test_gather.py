"""The per-parameter pass of a collection (agent/gather.py): the C++ pass (`_scan`) and the
same pass in Python give the same snapshots, both match the float64 reference, and the
pointers the C++ pass reads for the CPU kernel are used only while they still hold."""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import gradmon
from gradmon.agent import gather
from gradmon.snapshot import LayerStats, Snapshot
from gradmon.stats import Col, reference

NO_SERVER = {"exporter": {"enabled": False}}
SIZES = {"empty": (0,), "one": (1,), "odd": (7, 3), "block": (4097,), "wide": (33, 65)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

needs_scan = pytest.mark.skipif(
    gather._scan_module is None, reason="the C++ pass gradmon.agent._scan is not built"
)


@pytest.fixture(params=["c++", "python"])
def scan_pass(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test below runs once with each pass."""
    if request.param == "c++":
        if gather._scan_module is None:
            pytest.skip("the C++ pass gradmon.agent._scan is not built")
    else:
        monkeypatch.setattr(gather, "_scan_module", None)
    yield request.param


class Params(nn.Module):
    """One parameter per entry of SIZES, in one dtype: every layer is a parameter."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.p = nn.ParameterDict(
            {k: nn.Parameter(torch.randn(shape).to(dtype)) for k, shape in SIZES.items()}
        )


def _grads(model: Params, step: int) -> None:
    """Grads with zeros, NaN and Inf in some steps, as a backward could leave them."""
    for p in model.p.values():
        g = torch.randn(p.shape).to(p.dtype)
        if p.numel() > 2:
            g.view(-1)[0] = 0.0
            if step == 1:
                g.view(-1)[1] = math.nan
            if step == 2:
                g.view(-1)[-1] = -math.inf
        p.grad = g


def _expected(model: Params) -> dict[str, tuple[list[float], list[float]]]:
    """Per layer with a grad: the float64 reference partials of the grad and of the
    weight, taken before the step (an SGD step with lr=0 still writes NaN where a grad is NaN)."""
    out = {}
    for k, p in model.p.items():
        if p.grad is not None:
            out[f"p.{k}"] = (
                reference.tensor_partials(p.grad),
                reference.tensor_partials(p.detach()),
            )
    return out


def _check(snap: Snapshot, expected: dict[str, tuple[list[float], list[float]]]) -> None:
    for name, (want, w) in expected.items():
        s: LayerStats = snap.layers[name]
        numel = s.numel
        assert s.received
        assert s.norm == pytest.approx(math.sqrt(want[Col.SUM_SQ]), rel=1e-6)
        assert s.param_norm == pytest.approx(math.sqrt(w[Col.SUM_SQ]), rel=1e-6)
        assert s.nan_count == want[Col.NAN_COUNT] and s.inf_count == want[Col.INF_COUNT]
        if numel:
            assert s.abs_max == want[Col.ABS_MAX]
            assert s.zero_ratio == want[Col.ZERO_COUNT] / numel


def _train(
    model: nn.Module, steps: int, set_grads: Callable[[int], None]
) -> list[tuple[Snapshot, dict[str, tuple[list[float], list[float]]]]]:
    """Each step's snapshot, with the reference of what it measured (for Params)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = []
    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        for step in range(steps):
            set_grads(step)
            want = _expected(model) if isinstance(model, Params) else {}
            opt.step()
            snap = mon.snapshot()
            assert snap is not None and snap.step == step
            out.append((snap, want))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_both_passes_match_the_float64_reference(scan_pass: str, dtype: torch.dtype) -> None:
    model = Params(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        for step in range(4):
            _grads(model, step)
            want = _expected(model)
            opt.step()
            snap = mon.snapshot()
            assert snap is not None and snap.step == step
            _check(snap, want)
            assert [snap.layers[f"p.{k}"].numel for k in SIZES] == [
                math.prod(shape) for shape in SIZES.values()
            ]
            assert snap.nonfinite == (step in (1, 2))


@needs_scan
def test_the_two_passes_give_the_same_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same grads, same layer tables: the C++ pass against the Python one it replaces."""

    def run() -> list[tuple[Snapshot, dict[str, tuple[list[float], list[float]]]]]:
        torch.manual_seed(3)
        model = Params(torch.float32)
        return _train(model, 4, lambda step: _grads(model, step))

    fast = run()
    monkeypatch.setattr(gather, "_scan_module", None)
    slow = run()
    for (a, _), (b, _) in zip(fast, slow, strict=True):
        assert a.layers.keys() == b.layers.keys()
        for name in a.layers:
            assert a.layers[name] == b.layers[name], name


def test_only_fresh_grads_are_collected(scan_pass: str) -> None:
    """Fresh: a new grad tensor, or the same one changed in place (its version counter).
    An untouched grad, or none, is not received."""
    model = Params(torch.float32)
    p = model.p
    first: dict[str, torch.Tensor] = {}

    def set_grads(step: int) -> None:
        if step == 0:
            _grads(model, 0)
            first.update({k: v.grad for k, v in p.items()})  # type: ignore[misc]
        elif step == 1:  # nothing changes
            pass
        elif step == 2:  # one grad in place, one replaced, one removed
            first["odd"].mul_(2.0)
            p["wide"].grad = torch.ones_like(p["wide"])
            p["one"].grad = None
        # step 3: nothing changes again

    snaps = [snap for snap, _ in _train(model, 4, set_grads)]
    assert all(s.received for s in snaps[0].layers.values())
    assert not any(s.received for s in snaps[1].layers.values())
    received = {n for n, s in snaps[2].layers.items() if s.received}
    assert received == {"p.odd", "p.wide"}
    assert snaps[2].layers["p.wide"].norm == pytest.approx(math.sqrt(33 * 65))
    assert not any(s.received for s in snaps[3].layers.values())


def test_grads_the_kernel_cannot_read_in_place(scan_pass: str) -> None:
    """A transposed (non-contiguous) grad and a lazily negated one: copied before the
    kernel reads them, so their sign and values are right."""
    model = Params(torch.float32)

    def set_grads(step: int) -> None:
        _grads(model, step)
        wide = model.p["wide"]
        base = torch.arange(float(wide.numel())).reshape(65, 33) - 100.0
        wide.grad = base.t()  # [33, 65], not contiguous
        odd = model.p["odd"]
        odd.grad = torch._neg_view(torch.arange(1.0, 22.0).reshape(7, 3))

    snap, _ = _train(model, 3, set_grads)[-1]
    wide, odd = snap.layers["p.wide"], snap.layers["p.odd"]
    assert (wide.min, wide.max) == (-100.0, 33 * 65 - 101.0)
    assert (odd.min, odd.max, odd.mean) == (-21.0, -1.0, -11.0)


def test_weights_changed_under_the_monitor_are_read_again(scan_pass: str) -> None:
    """A parameter's data replaced between collections (`model.double()`, a `.data`
    swap of another size): the parameter norms follow, from the new data."""
    model = Params(torch.float32)

    def set_grads(step: int) -> None:
        if step == 2:
            model.double()
        if step == 3:
            model.p["block"].data = torch.full((4097,), 2.0, dtype=torch.float64)
        _grads(model, step)

    runs = _train(model, 5, set_grads)
    for snap, want in runs:
        _check(snap, want)
    assert runs[-1][0].layers["p.block"].param_norm == pytest.approx(2.0 * math.sqrt(4097))


def test_kept_references_are_weak_and_untracked(scan_pass: str) -> None:
    """From one collection to the next the pass keeps a reference per grad: weak (a grad
    set to None is freed) and untracked by the cyclic GC (N tracked ones set off full
    collections of the heap): by the C++ pass, or by the C kernel's `weaken` for the
    Python one (a plain `pip install` builds the kernel but not the C++ pass)."""
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        # Those to the parameters, held for the run: weak and untracked as well.
        held = [r for p in model.parameters() for r in weakref.getweakrefs(p)]
        assert len(held) == 2 and not any(gc.is_tracked(r) for r in held)
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        assert mon.snapshot() is not None
        # What the pass keeps of each grad: the weak references to it (Python's own view,
        # not the monitor's attributes), taken before this test makes its own.
        tensors = [p.grad for p in model.parameters() if p.grad is not None]
        kept = [r for g in tensors for r in weakref.getweakrefs(g)]
        grads = [weakref.ref(g) for g in tensors]
        del tensors
        assert len(grads) == 2 and len(kept) == 2
        assert all(isinstance(r, weakref.ref) for r in kept)
        assert not any(gc.is_tracked(r) for r in kept)
        opt.zero_grad(set_to_none=True)
        assert all(g() is None for g in grads)


@needs_scan
def test_the_pass_is_built_for_this_torch() -> None:
    assert gather._scan_module is not None
    assert gather._scan_module.torch_version == torch.__version__


@needs_scan
def test_the_kernel_reads_the_pointers_of_the_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first collection has checked the weights in full, the kernel is called
    with the table the C++ pass wrote (no attribute is read again), until a weight moves."""
    from gradmon.stats import cpu

    kernel = cpu._kernel
    assert kernel is not None
    calls: list[str] = []

    class Spy:
        def __getattr__(self, name: str) -> object:  # the rest as it is (weaken)
            return getattr(kernel, name)

        def compute(self, *args: object) -> None:
            calls.append("compute")
            kernel.compute(*args)

        def compute_group(self, *args: object) -> None:
            calls.append("table")
            kernel.compute_group(*args)

    monkeypatch.setattr(cpu, "_kernel", Spy())
    model = Params(torch.float32)

    def set_grads(step: int) -> None:
        if step == 3:
            model.p["odd"].data = torch.zeros(7, 3)  # moved: checked in full once more
        _grads(model, step)

    for snap, want in _train(model, 5, set_grads):
        _check(snap, want)
    assert calls == ["compute", "table", "table", "compute", "table"]
