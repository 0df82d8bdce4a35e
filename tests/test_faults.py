"""Fault injection: a real internal function made to raise at each agent stage.

Every test trains a monitored model beside an unmonitored twin (same weights, same
batches) and checks that training is untouched (identical losses), that the stage's
`gradmon_agent_errors_total{stage}` rises in a real scrape of /metrics, that the failure
is logged once, and that the statistics that did not fail keep flowing (float64 oracle).
"""

from __future__ import annotations

import copy
import math
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradmon
from gradmon.agent import exposure, gather, publish, steps
from gradmon.export import collector as exporter
from gradmon.export.schema import AGENT_STAGES
from gradmon.health import HealthRules
from gradmon.sinks.record import RecordSink
from gradmon.stats import Col, cpu, reference
from gradmon.stats import torch as torch_stats

from . import readings

STEPS = 4
MODULES = {"granularity": "module"}  # layers fc1, mid, out
SERVED = {"exporter": {"port": 0}, "collect": MODULES}


class MixedNet(nn.Module):
    """Two (device, dtype) groups: float32 layers around a float64 one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.mid = nn.Linear(16, 16).double()
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x)).double()
        return self.out(torch.relu(self.mid(h)).float())


def batches(n: int = STEPS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 8, generator=gen) for _ in range(n)]


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def scrape(port: int | None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


def sample(text: str, metric: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def errors(port: int | None) -> dict[str, float]:
    status, text = scrape(port)
    assert status == 200
    return {st: sample(text, "gradmon_agent_errors_total", stage=st) or 0.0 for st in AGENT_STAGES}


def logged(caplog: pytest.LogCaptureFixture, stage: str) -> int:
    return sum(f"error in stage {stage!r}" in r.getMessage() for r in caplog.records)


def layer_norms(model: nn.Module) -> dict[str, float]:
    """float64 reference norm of each module's gradient as it is now."""
    sums: dict[str, float] = {}
    for name, p in model.named_parameters():
        assert p.grad is not None
        layer = name.rpartition(".")[0]
        sums[layer] = sums.get(layer, 0.0) + reference.tensor_partials(p.grad)[Col.SUM_SQ]
    return {n: math.sqrt(v) for n, v in sums.items()}


@pytest.fixture
def twins() -> Iterator[tuple[nn.Module, nn.Module, list[float]]]:
    """A MixedNet to monitor, and the losses of its unmonitored twin on batches()."""
    model = MixedNet()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    yield model, twin, [step(twin, opt, x) for x in batches()]


def train_monitored(
    model: nn.Module, config: dict[str, Any], **attach: Any
) -> tuple[gradmon.Monitor, list[float]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradmon.attach(model, opt, config=config, **attach)
    return mon, [step(model, opt, x) for x in batches()]


def test_hook_fault(
    twins: tuple[nn.Module, nn.Module, list[float]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, _, want = twins

    def broken(self: gather.Gatherer) -> gather.Gathered:
        raise RuntimeError("injected hook fault")

    monkeypatch.setattr(gather.Gatherer, "gather", broken)
    mon, got = train_monitored(model, SERVED)
    with mon:
        assert got == want
        assert errors(mon.port)["hook"] == STEPS
        assert mon.snapshot() is None  # nothing to publish; the steps are still counted
        assert readings.steps(mon) == STEPS
    assert logged(caplog, "hook") == 1


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_stats_backend_fault_leaves_other_groups(
    backend: str,
    twins: tuple[nn.Module, nn.Module, list[float]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A backend failing on the float64 group: the float32 layers keep flowing."""
    model, _, want = twins

    def failing_on_float64(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def partials(grads: Sequence[torch.Tensor]) -> torch.Tensor:
            if grads[0].dtype == torch.float64:
                raise RuntimeError("injected kernel fault")
            return original(grads)

        return partials

    monkeypatch.setattr(cpu, "compute_partials", failing_on_float64(cpu.compute_partials))
    group_partials = cpu.group_partials  # the agent's call of the C kernel

    def group_failing_on_float64(
        grads: Sequence[torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if grads[0].dtype == torch.float64:
            raise RuntimeError("injected kernel fault")
        return group_partials(grads, *args, **kwargs)

    monkeypatch.setattr(cpu, "group_partials", group_failing_on_float64)
    monkeypatch.setattr(
        torch_stats, "compute_partials", failing_on_float64(torch_stats.compute_partials)
    )
    mon, got = train_monitored(model, {**SERVED, "collect": {**MODULES, "backend": backend}})
    with mon:
        assert got == want
        snap = mon.snapshot()
        assert snap is not None and set(snap.layers) == {"fc1", "out"}  # "mid" left out
        oracle = layer_norms(model)
        for name in ("fc1", "out"):
            assert snap.layers[name].norm == pytest.approx(oracle[name], rel=1e-6)
        assert errors(mon.port)["collect"] == STEPS
        _, text = scrape(mon.port)
        assert sample(text, "gradmon_grad_norm", layer="fc1") is not None
        assert sample(text, "gradmon_grad_norm", layer="mid") is None  # absent, not zero
        # The missing layer is neither dead nor vanishing: it was not judged.
        assert not any(a.layer == "mid" for a in snap.anomalies)
    assert logged(caplog, "collect") == 1


def test_publish_fault_in_the_health_rules_leaves_the_statistics(
    twins: tuple[nn.Module, nn.Module, list[float]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, _, want = twins

    def broken(self: HealthRules, *_: Any) -> Any:
        raise ValueError("injected publish fault")

    monkeypatch.setattr(HealthRules, "evaluate", broken)
    mon, got = train_monitored(model, SERVED)
    with mon:
        assert got == want
        snap = mon.snapshot()
        assert snap is not None and set(snap.layers) == {"fc1", "mid", "out"}
        assert snap.anomalies == []  # not judged this time; counted
        oracle = layer_norms(model)
        assert snap.layers["out"].norm == pytest.approx(oracle["out"], rel=1e-6)
        assert errors(mon.port)["publish"] == STEPS
        assert readings.collections(mon) == STEPS
    assert logged(caplog, "publish") == 1


def test_publish_fault_loses_that_collection_only(
    twins: tuple[nn.Module, nn.Module, list[float]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _, want = twins
    original = publish.Publisher.build
    calls = []

    def build(self: publish.Publisher, ready: Any, skipped: bool) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("injected publish fault")
        return original(self, ready, skipped)

    monkeypatch.setattr(publish.Publisher, "build", build)
    mon, got = train_monitored(model, SERVED)
    with mon:
        assert got == want
        assert errors(mon.port)["publish"] == 1
        assert readings.collections(mon) == STEPS - 1
        snap = mon.snapshot()
        assert snap is not None and snap.step == STEPS - 1


def test_scaler_fault(
    net: nn.Module, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    twin = copy.deepcopy(net)

    def train(model: nn.Module, **attach: Any) -> tuple[list[float], gradmon.Monitor | None]:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        mon = gradmon.attach(model, opt, scaler=scaler, config=SERVED) if attach else None
        losses = []
        for i, x in enumerate(batches()):
            if i == 2:
                x = x.clone()
                x[0, 0] = float("nan")  # the scaler skips this step
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
        return losses, mon

    want, _ = train(twin)

    def broken(scaler: Any, optimizer: Any) -> bool:
        raise RuntimeError("injected scaler fault")

    monkeypatch.setattr(steps, "scaler_stepped", broken)
    got, mon = train(net, monitor=True)
    assert mon is not None
    with mon:
        assert got[:2] == want[:2] and math.isnan(got[2]) and got[3:] == want[3:]
        assert errors(mon.port)["scaler"] == 1
        assert readings.collections(mon) == STEPS - 1  # the stepped ones; the skipped one was lost
    assert logged(caplog, "scaler") == 1


def test_sink_fault(
    twins: tuple[nn.Module, nn.Module, list[float]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, _, want = twins

    def broken(self: RecordSink, snapshot: Any, scalars: Any) -> None:
        raise OSError("injected sink fault")

    monkeypatch.setattr(RecordSink, "on_publish", broken)
    config = {**SERVED, "record": {"path": str(tmp_path / "record.jsonl")}}
    mon, got = train_monitored(model, config)
    with mon:
        assert got == want
        assert errors(mon.port)["sink"] == STEPS
        snap = mon.snapshot()
        assert snap is not None and set(snap.layers) == {"fc1", "mid", "out"}
    assert logged(caplog, "sink") == 1


def test_export_fault_in_a_value_serves_the_rest(
    twins: tuple[nn.Module, nn.Module, list[float]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, _, want = twins

    def broken(value: object) -> float:
        raise RuntimeError("injected scalar read fault")

    monkeypatch.setattr(exposure, "to_float", broken)
    mon, got = train_monitored(model, SERVED)
    with mon:
        mon.log(loss=torch.tensor(got[-1]))
        status, text = scrape(mon.port)
        assert status == 200
        assert sample(text, "gradmon_scalar", name="loss") is None
        assert sample(text, "gradmon_steps_total") == STEPS
        assert sample(text, "gradmon_grad_norm", layer="mid") is not None
        assert errors(mon.port)["export"] == 1  # the first scrape's; each shows in the next
        assert got == want
    assert logged(caplog, "export") == 1


def test_export_fault_in_the_collector_serves_the_rest(
    twins: tuple[nn.Module, nn.Module, list[float]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, _, want = twins

    def broken(*args: object) -> Iterator[Any]:
        raise RuntimeError("injected exposition fault")
        yield

    monkeypatch.setattr(exporter, "_layer_families", broken)
    mon, got = train_monitored(model, SERVED)
    with mon:
        status, text = scrape(mon.port)
        assert status == 200  # the failing part left out, counted; the rest served
        assert sample(text, "gradmon_grad_norm", layer="fc1") is None
        assert sample(text, "gradmon_steps_total") == STEPS
        assert sample(text, "process_cpu_seconds_total") is not None
        assert sample(text, "gradmon_agent_errors_total", stage="export") == 0  # not yet
        assert errors(mon.port)["export"] == 1  # the first scrape's
        assert got == want
    assert logged(caplog, "export") == 1


def test_request_handling_fault_answers_500_and_recovers(
    twins: tuple[nn.Module, nn.Module, list[float]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A collector beside gradmon's in the same registry fails while rendering: the
    scrape is answered (500, not a dropped connection), counted, and the server goes on."""
    model, _, want = twins
    registry = CollectorRegistry()
    Counter("app_events", "the user's own metric", registry=registry).inc()

    class Broken:
        def collect(self) -> Iterator[Any]:
            raise RuntimeError("injected request fault")

    broken = Broken()
    registry.register(broken)  # type: ignore[arg-type]
    mon, got = train_monitored(model, SERVED, registry=registry)
    with mon:
        assert [scrape(mon.port)[0] for _ in range(3)] == [500] * 3
        registry.unregister(broken)  # type: ignore[arg-type]
        status, text = scrape(mon.port)
        assert status == 200 and sample(text, "app_events_total") == 1
        assert sample(text, "gradmon_agent_errors_total", stage="export") == 3
        assert got == want
    assert logged(caplog, "export") == 1
