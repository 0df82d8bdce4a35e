"""gradmon_update_ratio (collect.update_ratio_every): ‖Δw‖/‖w‖ of real training steps
against a float64 reference the test takes itself, from copies of the weights made
before and after optimizer.step()."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

import gradmon

from . import readings
from .conftest import SmallNet
from .export.test_collector import samples, scrape

NO_SERVER = {"exporter": {"enabled": False}}
Weights = dict[str, torch.Tensor]


def config(every: int = 1, **collect: object) -> dict[str, object]:
    return {**NO_SERVER, "collect": {"update_ratio_every": every, **collect}}


def weights(model: nn.Module) -> Weights:
    return {n: p.detach().to(torch.float64).clone() for n, p in model.named_parameters()}


def reference(before: Weights, after: Weights, layers: dict[str, list[str]]) -> dict[str, float]:
    """‖w_after - w_before‖ / ‖w_after‖ per layer, in float64."""
    out = {}
    for layer, names in layers.items():
        dsq = sum(float((after[n] - before[n]).pow(2).sum()) for n in names)
        wsq = sum(float(after[n].pow(2).sum()) for n in names)
        out[layer] = math.sqrt(dsq) / math.sqrt(wsq)
    return out


def step(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[Weights, Weights]:
    """One training step; the weights before and after optimizer.step()."""
    opt.zero_grad(set_to_none=True)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    before = weights(model)
    opt.step()
    return before, weights(model)


def ratios(mon: gradmon.Monitor) -> dict[str, float | None]:
    snap = mon.snapshot()
    assert snap is not None
    return {n: s.update_ratio for n, s in snap.layers.items()}


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("granularity", ["parameter", "module"])
def test_ratio_equals_float64_reference(net: SmallNet, optimizer: str, granularity: str) -> None:
    opt = OPTIMIZERS[optimizer](net)
    with gradmon.attach(net, opt, config=config(granularity=granularity)) as mon:
        members = {
            layer: [n for n, _ in net.named_parameters() if n.rpartition(".")[0] == layer]
            if granularity == "module"
            else [layer]
            for layer in mon.layer_names
        }
        for _ in range(3):
            before, after = step(net, opt)
            want = reference(before, after, members)
            got = ratios(mon)
            for layer, value in want.items():
                # fp32 accumulation on the device, float64 per layer: ~1e-7 relative
                assert got[layer] == pytest.approx(value, rel=1e-5), layer
            assert all(v > 0 for v in want.values())
        assert not any(readings.errors(mon).values())


def test_sampled_on_every_kth_collection_only(net: SmallNet) -> None:
    opt = OPTIMIZERS["adam"](net)
    every_n = {"every_n_steps": 2}
    with gradmon.attach(net, opt, config=config(3, **every_n)) as mon:
        layers = {n: [n] for n in mon.layer_names}
        last: dict[str, float | None] = {}
        measured = []
        for i in range(12):  # collections at steps 0, 2, 4 ...; sampled: 0, 6, 12 ...
            before, after = step(net, opt)
            got = ratios(mon)
            if i % 6 == 0:
                measured.append(i)
                assert got == pytest.approx(reference(before, after, layers), rel=1e-5)
            else:
                assert got == last  # the last measured value, unchanged
            last = got
        assert measured == [0, 6]


def test_budget_measures_round_robin_until_every_layer_is_seen(net: SmallNet) -> None:
    # fp32 SmallNet: fc1.weight 512 B, fc2.weight 1024 B, biases and out.weight <= 64 B.
    opt = OPTIMIZERS["sgd"](net)
    with gradmon.attach(net, opt, config=config(update_ratio_max_bytes=1024)) as mon:
        layers = {n: [n] for n in mon.layer_names}
        chunks = []
        previous: dict[str, float | None] = dict.fromkeys(layers)
        for _ in range(4):
            before, after = step(net, opt)
            want = reference(before, after, layers)
            got = ratios(mon)
            changed = [n for n in layers if got[n] != previous[n]]
            for n in changed:
                assert got[n] == pytest.approx(want[n], rel=1e-5), n
            chunks.append(changed)
            previous = got
    assert chunks == [
        ["fc1.weight", "fc1.bias"],
        ["fc2.weight"],
        ["fc2.bias", "out.weight", "out.bias"],
        ["fc1.weight", "fc1.bias"],  # round-robin: from the start again
    ]


def test_layer_larger_than_budget_is_skipped_and_named_once(
    net: SmallNet, caplog: pytest.LogCaptureFixture
) -> None:
    opt = OPTIMIZERS["sgd"](net)
    cfg = config(update_ratio_max_bytes=600)
    with (
        caplog.at_level(logging.WARNING, logger="gradmon"),
        gradmon.attach(net, opt, config=cfg) as mon,
    ):
        for _ in range(6):
            step(net, opt)
        got = ratios(mon)
        assert "fc2.weight: 1024 bytes" in caplog.text  # told once, with its size
    assert got["fc2.weight"] is None
    assert all(v is not None for n, v in got.items() if n != "fc2.weight")
    warned = [r.getMessage() for r in caplog.records if "update_ratio_max_bytes" in r.getMessage()]
    assert len(warned) == 1 and "fc2.weight: 1024 bytes" in warned[0]


def scaled_step(
    model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, poison: bool
) -> tuple[Weights, Weights]:
    opt.zero_grad(set_to_none=True)
    scaler.scale(model(torch.randn(4, 8)).pow(2).mean()).backward()
    if poison:
        dict(model.named_parameters())["out.bias"].grad.view(-1)[0] = float("inf")  # type: ignore[union-attr]
    before = weights(model)
    scaler.step(opt)
    scaler.update()
    return before, weights(model)


def test_step_skipped_by_grad_scaler_keeps_the_last_value(net: SmallNet) -> None:
    # A plain optimizer: GradScaler skips optimizer.step(), so neither step hook runs.
    opt = OPTIMIZERS["sgd"](net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with gradmon.attach(net, opt, scaler=scaler, config=config()) as mon:
        layers = {n: [n] for n in mon.layer_names}
        before, after = scaled_step(net, opt, scaler, poison=False)
        first = ratios(mon)
        assert first == pytest.approx(reference(before, after, layers), rel=1e-5)
        before, after = scaled_step(net, opt, scaler, poison=True)
        snap = mon.snapshot()
        assert snap is not None and snap.skipped
        assert all(torch.equal(before[n], after[n]) for n in layers)
        assert ratios(mon) == first  # not measured: the last value stays
        before, after = scaled_step(net, opt, scaler, poison=False)
        assert ratios(mon) == pytest.approx(reference(before, after, layers), rel=1e-5)
        snap = mon.snapshot()  # published without waiting: nothing held back
        assert snap is not None and snap.step == 2 and not snap.skipped
        assert not any(readings.errors(mon).values())


def test_step_skipped_inside_a_fused_optimizer_measures_zero(net: SmallNet) -> None:
    # A fused optimizer runs both hooks and skips the update itself (found_inf): w is
    # unchanged, so the ratio of that step is 0.
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with gradmon.attach(net, opt, scaler=scaler, config=config()) as mon:
        layers = {n: [n] for n in mon.layer_names}
        before, after = scaled_step(net, opt, scaler, poison=False)
        assert ratios(mon) == pytest.approx(reference(before, after, layers), rel=1e-5)
        before, after = scaled_step(net, opt, scaler, poison=True)
        snap = mon.snapshot()
        assert snap is not None and snap.skipped
        assert all(torch.equal(before[n], after[n]) for n in layers)
        assert ratios(mon) == dict.fromkeys(layers, 0.0)


def test_off_by_default_no_post_hook_no_buffer(net: SmallNet) -> None:
    opt = OPTIMIZERS["sgd"](net)
    registry = CollectorRegistry()
    with gradmon.attach(net, opt, config=NO_SERVER, registry=registry) as mon:
        assert mon.config.collect.update_ratio_every == 0
        assert not opt._optimizer_step_post_hooks  # type: ignore[attr-defined]
        step(net, opt)
        assert all(v is None for v in ratios(mon).values())
        assert "gradmon_update_ratio" not in {f.name for f in registry.collect()}


def test_close_removes_the_post_hook(net: SmallNet) -> None:
    opt = OPTIMIZERS["sgd"](net)
    mon = gradmon.attach(net, opt, config=config())
    assert len(opt._optimizer_step_post_hooks) == 1  # type: ignore[attr-defined]
    step(net, opt)
    mon.close()
    assert not opt._optimizer_step_post_hooks  # type: ignore[attr-defined]
    assert not opt._optimizer_step_pre_hooks  # type: ignore[attr-defined]
    step(net, opt)  # training goes on without the agent


def test_step_that_raises_before_the_post_hook_does_not_stall_publishing(net: SmallNet) -> None:
    opt = OPTIMIZERS["sgd"](net)
    with gradmon.attach(net, opt, config=config()) as mon:
        fail = [True]

        def flaky(*_: object) -> None:  # a user's pre-hook after ours, failing once
            if fail.pop() if fail else False:
                raise RuntimeError("user hook")

        handle = opt.register_step_pre_hook(flaky)
        with pytest.raises(RuntimeError, match="user hook"):
            step(net, opt)
        snap = mon.snapshot()
        assert snap is None  # held for a post-hook that never came
        before, after = step(net, opt)  # the next step releases it and measures anew
        handle.remove()
        snap = mon.snapshot()
        assert snap is not None and snap.step == 1 and readings.collections(mon) == 2
        layers = {n: [n] for n in mon.layer_names}
        assert ratios(mon) == pytest.approx(reference(before, after, layers), rel=1e-5)


def test_without_optimizer_it_is_off_with_a_warning(
    net: SmallNet, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="gradmon"),
        gradmon.attach(net, config=config()) as mon,
    ):
        net(torch.randn(4, 8)).sum().backward()
        mon.collect()
        snap = mon.snapshot()
        assert snap is not None and all(s.update_ratio is None for s in snap.layers.values())
    assert any("update_ratio_every" in r.getMessage() for r in caplog.records)


def test_scraped_over_http_and_bounded_like_other_layer_families(net: SmallNet) -> None:
    opt = OPTIMIZERS["adam"](net)
    cfg = {"exporter": {"port": 0, "max_layers": 4}, "collect": {"update_ratio_every": 1}}
    with gradmon.attach(net, opt, config=cfg) as mon:
        assert mon.port
        step(net, opt)
        got = ratios(mon)
        fams = scrape(mon.port)
    family = fams["gradmon_update_ratio"]
    assert family.type == "gauge" and family.documentation  # type: ignore[attr-defined]
    assert samples(family) == {(("layer", n),): got[n] for n in mon.layer_names[:4]}
    registry = CollectorRegistry()
    cfg2 = {**config(), "exporter": {"enabled": False, "per_layer": False}}
    with gradmon.attach(net, opt, config=cfg2, registry=registry):
        step(net, opt)
        assert "gradmon_update_ratio" not in {f.name for f in registry.collect()}


def test_record_file_holds_the_ratio_when_measured(net: SmallNet, tmp_path: Path) -> None:
    opt = OPTIMIZERS["sgd"](net)
    path = tmp_path / "r.jsonl"
    cfg = {**config(2), "record": {"path": str(path)}}
    with gradmon.attach(net, opt, config=cfg) as mon:
        seen = []
        for _ in range(2):
            step(net, opt)
            seen.append(ratios(mon))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [ln["layers"]["fc1.weight"]["update_ratio"] for ln in lines] == [
        s["fc1.weight"] for s in seen
    ]
    assert seen[0] == seen[1]  # step 1 is not sampled: the step-0 value is carried


def test_tensorboard_scalars_hold_the_ratio(net: SmallNet, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opt = OPTIMIZERS["sgd"](net)
    cfg = {**config(), "tensorboard": {"logdir": str(tmp_path), "histogram_every": 0}}
    with gradmon.attach(net, opt, config=cfg) as mon:
        step(net, opt)
        got = ratios(mon)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    for name in mon.layer_names:
        [event] = acc.Scalars(f"update_ratio/{name}")
        assert event.value == pytest.approx(got[name], rel=1e-6)  # stored as float32


def test_compiled_optimizer_step_measures_without_graph_break() -> None:
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters

    def run(attach: bool) -> dict[str, int]:
        """Three compiled Adam steps, each checked against the reference; the graph breaks."""
        dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = SmallNet()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        mon = gradmon.attach(model, opt, config=config()) if attach else None
        compiled = torch.compile(opt.step, backend="aot_eager")
        try:
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(4, 8)).pow(2).mean().backward()
                before = weights(model)
                compiled()
                if mon is not None:
                    layers = {n: [n] for n in mon.layer_names}
                    want = reference(before, weights(model), layers)
                    got = ratios(mon)
                    for n, value in want.items():
                        assert got[n] == pytest.approx(value, rel=1e-5), n
        finally:
            if mon is not None:
                mon.close()
        return dict(counters["graph_break"])

    breaks = run(attach=True)
    assert breaks == run(attach=False)  # the agent's two hooks add no graph break
    assert not any("gradmon" in reason for reason in breaks)


def test_complex_weights_count_real_and_imaginary_parts() -> None:
    from .test_unusual_grads import ComplexNet

    model = ComplexNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmon.attach(model, opt, config=config()) as mon:
        opt.zero_grad()
        model(torch.randn(4, 2)).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        got = ratios(mon)
    for n, p in model.named_parameters():
        # the complex L2 norm: |z|^2 = re^2 + im^2
        want = (p.detach() - before[n]).to(torch.complex128).abs().norm() / p.detach().to(
            torch.complex128
        ).abs().norm()
        assert got[n] == pytest.approx(float(want), rel=1e-5), n
        assert got[n] > 0
