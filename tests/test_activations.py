"""Activation statistics (collect.activations): real training of small models, every value
checked against a float64 reference of the module outputs captured at hook time."""

from __future__ import annotations

import copy
import json
import math
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn
from torch.overrides import TorchFunctionMode

import gradmon
from gradmon.agent.features import activations
from gradmon.sinks.record import read_record

from . import readings

NO_SERVER = {"exporter": {"enabled": False}}


class Probe(nn.Module):
    """An identity first (so the input's NaN/Inf/zeros are measured as they are), then
    Linear -> in-place ReLU -> Linear, whose output is changed in place by the parent."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Identity()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(self.inp(x))))
        return y.add_(1.0)  # in place, after fc2's hook has measured y


MODULES = ["inp", "fc1", "act", "fc2"]


@contextmanager
def captured(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Every module output as a float64 copy taken at hook time (the reference)."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if name:

            def keep(_m: nn.Module, _a: Any, out: torch.Tensor, name: str = name) -> None:
                if torch.is_grad_enabled():
                    seen.setdefault(name, []).append(out.detach().to(torch.float64).clone())

            handles.append(module.register_forward_hook(keep))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def assert_matches(got: gradmon.snapshot.ActivationStats, outputs: list[torch.Tensor]) -> None:
    x = torch.cat([o.reshape(-1) for o in outputs])
    nan, inf = torch.isnan(x), torch.isinf(x)
    finite = x[~(nan | inf)]
    assert got.numel == x.numel()
    assert got.nan_count == int(nan.sum()) and got.inf_count == int(inf.sum())
    assert got.zero_ratio == float((x == 0).sum()) / x.numel()
    n = max(finite.numel(), 1)  # no finite entry: rms and mean are 0
    assert got.sum_squares == pytest.approx(float((finite * finite).sum()), rel=1e-9, abs=1e-12)
    assert got.rms == pytest.approx(math.sqrt(float((finite * finite).sum()) / n), rel=1e-9)
    assert got.mean == pytest.approx(float(finite.sum()) / n, rel=1e-9, abs=1e-12)


def run(
    model: nn.Module,
    batches: list[list[torch.Tensor]],
    config: dict[str, Any],
    check: Callable[[gradmon.Snapshot, dict[str, list[torch.Tensor]]], None] | None = None,
) -> list[gradmon.Snapshot]:
    """One optimizer step per entry of `batches` (each a list of micro-batches)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    snaps = []
    with gradmon.attach(model, opt, config=config) as mon:
        for micro in batches:
            opt.zero_grad()
            with captured(model) as seen:
                for x in micro:
                    model(x).float().pow(2).mean().backward()
            opt.step()
            with torch.no_grad():  # a NaN batch must not poison the next one
                for p in model.parameters():
                    p.nan_to_num_(0.0, 0.0, 0.0)
            snap = mon.snapshot()
            assert snap is not None
            if check is not None:
                check(snap, seen)
            snaps.append(snap)
        assert not any(readings.errors(mon).values())
    return snaps


def cfg(**collect: Any) -> dict[str, Any]:
    return {**NO_SERVER, "collect": {"activations": True, **collect}}


def special_input(dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(6, 8)
    x[0, 0], x[1, 1], x[2, 2] = math.nan, math.inf, -math.inf
    x[3] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("backend", ["auto", "torch"])  # C kernel / plain torch ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_statistics_equal_float64_reference(dtype: torch.dtype, backend: str) -> None:
    model = Probe().to(dtype)

    def check(snap: gradmon.Snapshot, seen: dict[str, list[torch.Tensor]]) -> None:
        assert list(snap.activations) == MODULES
        for name in MODULES:
            assert_matches(snap.activations[name], seen[name])

    clean = torch.randn(6, 8, dtype=dtype)
    snaps = run(model, [[special_input(dtype)], [clean]], cfg(backend=backend), check)
    bad = snaps[0].activations
    assert (bad["inp"].nan_count, bad["inp"].inf_count) == (1, 2)
    assert bad["inp"].zero_ratio == pytest.approx(8 / 48)
    assert bad["fc1"].nan_count > 0  # NaN/Inf rows spread through the layer
    assert snaps[1].activations["fc1"].nan_count == 0


class Transposed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)  # not contiguous: measured through a permuted view


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_non_contiguous_outputs(backend: str) -> None:
    model = nn.Sequential(nn.Linear(8, 6), Transposed(), nn.Linear(5, 3))

    def check(snap: gradmon.Snapshot, seen: dict[str, list[torch.Tensor]]) -> None:
        for name in ("0", "1", "2"):
            assert_matches(snap.activations[name], seen[name])

    run(model, [[torch.randn(5, 8)]], cfg(backend=backend), check)


def test_dead_relu_has_zero_ratio_one() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # every pre-activation negative
    (snap,) = run(model, [[torch.randn(4, 8)]], cfg())
    dead = snap.activations["1"]
    assert (dead.zero_ratio, dead.rms, dead.mean, dead.numel) == (1.0, 0.0, 0.0, 32)
    assert snap.activations["0"].mean == -1.0 and snap.activations["0"].zero_ratio == 0.0


def test_gradient_accumulation_adds_micro_batches() -> None:
    model = Probe()
    micro = [torch.randn(5, 8) for _ in range(3)]

    def check(snap: gradmon.Snapshot, seen: dict[str, list[torch.Tensor]]) -> None:
        for name in MODULES:
            assert len(seen[name]) == 3
            assert_matches(snap.activations[name], seen[name])  # all three, combined

    (snap,) = run(model, [micro], cfg(), check)
    assert snap.activations["fc1"].numel == 3 * 5 * 16


def test_only_forwards_before_a_collected_step_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    # Count the statistics the hooks compute, through the function they call (the C
    # kernel is turned off so that every output goes through it).
    calls: list[int] = []
    row_fn = activations.activation_row
    monkeypatch.setattr(activations, "cpu_kernel", lambda: None)
    monkeypatch.setattr(activations, "activation_row", lambda x: calls.append(1) or row_fn(x))
    model = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradmon.attach(model, opt, config=cfg(every_n_steps=3)) as mon:
        for step in range(7):
            opt.zero_grad()
            calls.clear()
            with captured(model) as seen:
                model(torch.randn(4, 8)).pow(2).mean().backward()
            # Forwards before an uncollected step compute nothing.
            assert len(calls) == (len(MODULES) if step % 3 == 0 else 0), step
            opt.step()
            snap = mon.snapshot()
            assert snap is not None
            if step % 3 == 0:
                assert snap.step == step
                for name in MODULES:  # this step's forward only
                    assert_matches(snap.activations[name], seen[name])
        assert readings.collections(mon) == 3


def test_inplace_ops_train_identically_and_are_measured_before() -> None:
    base = Probe()
    data = [torch.randn(4, 8) for _ in range(4)]

    def train(model: nn.Module, attach: bool) -> tuple[list[float], list[torch.Tensor]]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = gradmon.attach(model, opt, config=cfg()) if attach else None
        losses = []
        try:
            for x in data:
                opt.zero_grad()
                with captured(model) as seen:
                    loss = model(x).pow(2).mean()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if mon is not None:
                    snap = mon.snapshot()
                    assert snap is not None
                    # fc1 before the in-place ReLU, fc2 before the parent's add_
                    assert snap.activations["fc1"].zero_ratio == 0.0
                    assert_matches(snap.activations["fc1"], seen["fc1"])
                    assert_matches(snap.activations["fc2"], seen["fc2"])
        finally:
            if mon is not None:
                mon.close()
        return losses, [p.detach().clone() for p in model.parameters()]

    want_losses, want_params = train(copy.deepcopy(base), attach=False)
    got_losses, got_params = train(copy.deepcopy(base), attach=True)
    assert got_losses == want_losses
    assert all(torch.equal(a, b) for a, b in zip(got_params, want_params, strict=True))


def test_tuple_outputs_eval_forwards_and_memory() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.ones(2, dtype=torch.long), self.fc(x)  # first float: fc's output

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair()
            self.none = nn.Identity()  # fed an int tensor: nothing to record

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.none(torch.arange(3))
            return self.pair(x)[1]

    model = Model()
    include = {"activations_include": r"^(pair|pair\.fc|none)$"}
    outputs: list[weakref.ref[torch.Tensor]] = []
    model.pair.fc.register_forward_hook(lambda _m, _a, out: outputs.append(weakref.ref(out)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmon.attach(model, opt, config=cfg(**include)) as mon:
        x = torch.randn(3, 4)
        with torch.no_grad():
            model(x * 100)  # evaluation: not counted
        model(x).sum().backward()
        opt.step()
        snap = mon.snapshot()
    assert snap is not None
    assert list(snap.activations) == ["pair", "pair.fc"]  # `none` never had a float output
    assert snap.activations["pair"] == snap.activations["pair.fc"]
    assert snap.activations["pair.fc"].numel == 12  # the no_grad forward left out
    assert all(ref() is None for ref in outputs)  # no output kept alive by the agent


def test_hooks_only_when_on_and_removed_on_close() -> None:
    def forward_hooks(model: nn.Module) -> int:
        return sum(len(m._forward_hooks) for m in model.modules())

    model = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmon.attach(model, opt, config=NO_SERVER):
        assert forward_hooks(model) == 0  # activations off by default
    mon = gradmon.attach(model, opt, config=cfg(activations_exclude="^inp$"))
    assert forward_hooks(model) == 3
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    snap = mon.snapshot()
    assert snap is not None and list(snap.activations) == MODULES[1:]
    mon.close()
    assert forward_hooks(model) == 0


def test_bad_filters_are_clear_errors() -> None:
    model = Probe()
    with pytest.raises(gradmon.GradmonError, match=r"activations_include.*leave none.*fc2"):
        gradmon.attach(model, config=cfg(activations_include="^nothing$"))
    with pytest.raises(gradmon.GradmonError, match=r"collect\.activations_exclude.*regular"):
        gradmon.attach(model, config=cfg(activations_exclude="("))
    assert not any(m._forward_hooks for m in model.modules())


class SyncCalls(TorchFunctionMode):
    """Records tensor calls that read a value back to the host (a sync on a GPU)."""

    READS = frozenset(
        {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_hook_reads_nothing_back_to_the_host() -> None:
    """The torch path (the one CUDA outputs take): no value read in the hooks."""
    model = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmon.attach(model, opt, config=cfg(backend="torch")) as mon:
        x = special_input(torch.float32)
        with SyncCalls() as mode:
            out = model(x)
        assert mode.calls == []
        out.pow(2).mean().backward()
        opt.step()
        snap = mon.snapshot()
    assert snap is not None and list(snap.activations) == MODULES


def test_exporter_families_over_a_socket() -> None:
    model = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    config = {"exporter": {"port": 0}, "collect": {"activations": True}}
    with gradmon.attach(model, opt, config=config) as mon:
        for x in (special_input(torch.float32), torch.randn(4, 8)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            with torch.no_grad():
                for p in model.parameters():
                    p.nan_to_num_(0.0, 0.0, 0.0)
        snap = mon.snapshot()
        assert snap is not None and mon.port
        with urllib.request.urlopen(f"http://127.0.0.1:{mon.port}/metrics", timeout=10) as r:
            fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    for name, kind, attr in (
        ("gradmon_activation_rms", "gauge", "rms"),
        ("gradmon_activation_mean", "gauge", "mean"),
        ("gradmon_activation_zero_ratio", "gauge", "zero_ratio"),
    ):
        assert fams[name].type == kind and fams[name].documentation
        got = {s.labels["layer"]: s.value for s in fams[name].samples}
        assert got == pytest.approx({m: getattr(snap.activations[m], attr) for m in MODULES})
    nonfinite = fams["gradmon_activation_nonfinite"]
    assert nonfinite.type == "counter"
    counts = {s.labels["layer"]: s.value for s in nonfinite.samples if s.name.endswith("_total")}
    assert counts == {"inp": 1, "fc1": 1, "act": 1, "fc2": 1}  # the first step only


def test_per_layer_off_and_max_layers_bound_the_families() -> None:
    from prometheus_client import CollectorRegistry

    def families(exporter: dict[str, Any]) -> dict[str, int]:
        registry = CollectorRegistry()
        model = Probe()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        config = {"exporter": {"enabled": False, **exporter}, "collect": {"activations": True}}
        with gradmon.attach(model, opt, config=config, registry=registry):
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
            return {f.name: len(f.samples) for f in registry.collect()}

    assert families({"max_layers": 2})["gradmon_activation_rms"] == 2
    assert "gradmon_activation_rms" not in families({"per_layer": False})


def test_tensorboard_and_record_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = tmp_path / "run.jsonl"
    config = {
        **cfg(),
        "tensorboard": {"logdir": str(tmp_path / "tb")},
        "record": {"path": str(record)},
    }
    snaps = run(Probe(), [[torch.randn(4, 8)], [special_input(torch.float32)]], config)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    for name in MODULES:
        for tag, attr in (("rms", "rms"), ("mean", "mean"), ("zero_ratio", "zero_ratio")):
            events = acc.Scalars(f"activation_{tag}/{name}")
            assert [e.step for e in events] == [0, 1]
            want = [getattr(s.activations[name], attr) for s in snaps]
            assert [e.value for e in events] == pytest.approx(want, rel=1e-6)
    assert [e.value for e in acc.Scalars("activation_nonfinite/inp")] == [0.0, 3.0]
    lines = read_record(record)
    assert [sorted(line["activations"]) for line in lines] == [sorted(MODULES)] * 2
    assert lines[1]["activations"]["inp"]["nan_count"] == 1
    assert lines[0]["activations"]["fc1"]["rms"] == pytest.approx(snaps[0].activations["fc1"].rms)
    json.dumps(lines)  # plain JSON (non-finite numbers written as null)


# ------------------------------------------------------------------ torch.compile
def compiled_run(backend: str, every: int) -> tuple[list[gradmon.Snapshot], list, dict, dict]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    base = Probe()
    data = torch.Generator().manual_seed(1)
    batches = [[torch.randn(4, 8, generator=data)] for _ in range(4)]
    eager = run(copy.deepcopy(base), batches, cfg(every_n_steps=every))
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    compiled = torch.compile(model, backend=backend)
    snaps = []
    with gradmon.attach(compiled, opt, config=cfg(every_n_steps=every)) as mon:
        for (x,) in batches:
            opt.zero_grad()
            compiled(x).pow(2).mean().backward()
            opt.step()
            snaps.append(mon.snapshot())
    return snaps, eager, dict(counters["graph_break"]), dict(counters["stats"])


def assert_same_activations(got: list[Any], want: list[gradmon.Snapshot]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.step == w.step and list(g.activations) == MODULES
        for name in MODULES:
            a, b = g.activations[name], w.activations[name]
            assert (a.numel, a.nan_count, a.inf_count) == (b.numel, b.nan_count, b.inf_count)
            assert a.zero_ratio == b.zero_ratio
            assert a.rms == pytest.approx(b.rms, rel=1e-5)
            assert a.mean == pytest.approx(b.mean, rel=1e-5, abs=1e-7)


def test_compiled_model_gives_eager_activations_without_graph_breaks() -> None:
    snaps, eager, breaks, stats = compiled_run("aot_eager", every=2)
    assert_same_activations(snaps, eager)
    assert breaks == {}
    # every_n_steps=2: one graph with the statistics, one without; reused afterwards.
    assert stats["unique_graphs"] == 2


@pytest.mark.slow
def test_inductor_compiled_model_gives_eager_activations() -> None:
    snaps, eager, breaks, _ = compiled_run("inductor", every=1)
    assert_same_activations(snaps, eager)
    assert breaks == {}


def test_compiled_output_on_another_device_than_the_table_runs_eagerly() -> None:
    """A module moved after attach: its output is not on the table's device. Stood in for
    by a table on the meta device; the compiled hook falls back to an eager call."""
    from gradmon.agent.features.activations import ActivationTracker
    from gradmon.agent.staging import Staged
    from gradmon.config import CollectConfig

    def cpu_stats(tracker: ActivationTracker) -> dict[str, Any]:
        tables = [c.host for c, _ in tracker.take(Staged) if c.host.device.type == "cpu"]
        return tracker.finalize(tables)

    torch._dynamo.reset()
    model = Probe()
    x = torch.randn(4, 8)
    eager = ActivationTracker(model, CollectConfig(activations=True), "(root)")
    model(x)
    model(x)
    want = cpu_stats(eager)
    eager.remove()
    meta = torch.device("meta")
    tracker = ActivationTracker(model, CollectConfig(activations=True), "(root)", home=meta)
    compiled = torch.compile(model, backend="aot_eager")
    compiled(x)
    compiled(x)
    got = cpu_stats(tracker)
    assert got.keys() == want.keys()
    for name, stats in want.items():
        assert got[name].numel == stats.numel
        assert math.isclose(got[name].rms, stats.rms, rel_tol=1e-6)
    tracker.remove()
