"""AMP: GradScaler with plain and fused optimizers, skipped steps, bf16 autocast.

Every statistic is checked against the float64 reference of the *unscaled* gradients.
`torch.amp.GradScaler("cpu")` and `AdamW(fused=True)` both run on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

import gradmon
from gradmon.agent.collect import unscale_partials as _unscale_partials
from gradmon.stats import Col, reference

from . import readings
from .conftest import SmallNet

NO_SERVER = {"exporter": {"enabled": False}}
SCALE = 2.0**10


def reference_rows(model: nn.Module, divide_by: float = 1.0) -> dict[str, list[float]]:
    """float64 partials of each grad / divide_by, as the grads are now."""
    return {
        n: reference.tensor_partials(p.grad.double() / divide_by)
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def assert_matches(snap: gradmon.Snapshot, rows: dict[str, list[float]], rel: float) -> None:
    for name, row in rows.items():
        s = snap.layers[name]
        assert s.sum_squares == pytest.approx(row[Col.SUM_SQ], rel=rel), name
        assert s.norm == pytest.approx(math.sqrt(row[Col.SUM_SQ]), rel=rel), name
        assert s.mean * s.numel == pytest.approx(row[Col.SUM], rel=rel, abs=1e-9), name
        assert s.abs_max == pytest.approx(row[Col.ABS_MAX], rel=rel), name
        assert s.min == pytest.approx(row[Col.MIN], rel=rel), name
        assert s.max == pytest.approx(row[Col.MAX], rel=rel), name
        assert s.zero_ratio == row[Col.ZERO_COUNT] / s.numel, name
        assert (s.nan_count, s.inf_count) == (row[Col.NAN_COUNT], row[Col.INF_COUNT]), name


def scaled_backward(model: nn.Module, scaler: torch.amp.GradScaler, poison: str = "") -> None:
    """Forward/backward of a scaled loss; `poison` names a parameter whose grad gets an Inf."""
    loss = model(torch.randn(8, 8)).pow(2).mean()
    scaler.scale(loss).backward()
    if poison:
        dict(model.named_parameters())[poison].grad.view(-1)[0] = float("inf")


def test_plain_optimizer_sees_unscaled_grads(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the grads stay as the hook saw them
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    with gradmon.attach(net, opt, scaler=scaler, config=NO_SERVER) as mon:
        opt.zero_grad()
        scaled_backward(net, scaler)
        scaled = reference_rows(net)
        scaler.step(opt)  # unscale_ in place, then opt.step() -> the hook
        scaler.update()
        snap = mon.snapshot()
    assert snap is not None and not snap.skipped
    assert_matches(snap, reference_rows(net), rel=1e-6)
    # ... and those are the scaled ones divided by the scale, not the scaled ones.
    assert_matches(snap, {n: _divided(r, SCALE) for n, r in scaled.items()}, rel=1e-6)


def _divided(row: list[float], s: float) -> list[float]:
    out = list(row)
    out[Col.SUM_SQ] /= s * s
    for col in (Col.SUM, Col.ABS_MAX, Col.MIN, Col.MAX):
        out[col] /= s
    return out


def test_skipped_steps_counted_with_their_nonfinite_layers(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=2)
    registry = CollectorRegistry()
    with gradmon.attach(net, opt, scaler=scaler, config=NO_SERVER, registry=registry) as mon:

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        scales = []
        for i in range(5):
            opt.zero_grad()
            scaled_backward(net, scaler, poison="fc2.bias" if i == 1 else "")
            before = net.fc2.bias.detach().clone()
            scaler.step(opt)
            scaler.update()
            scales.append(value("gradmon_loss_scale"))
            snap = mon.snapshot()
            assert snap is not None and snap.step == i
            assert snap.skipped == (i == 1)
            if i == 1:
                assert torch.equal(before, net.fc2.bias)  # the scaler did skip it
                assert snap.nonfinite and snap.layers["fc2.bias"].inf_count == 1
                assert snap.layers["fc1.weight"].inf_count == 0
                # magnitudes of the skipped step are of unscaled grads too
                assert snap.layers["fc1.weight"].norm < 100
        assert value("gradmon_steps_total") == 5
        assert value("gradmon_collections_total") == 5
        assert value("gradmon_skipped_steps_total") == 1
        assert value("gradmon_nonfinite_steps_total") == 1
        assert value("gradmon_layer_nonfinite_steps_total", layer="fc2.bias") == 1
        assert value("gradmon_layer_nonfinite_steps_total", layer="fc2.weight") == 0
        assert value("gradmon_anomalies_total", layer="fc2.bias", kind="nonfinite") == 1
        # gradmon_loss_scale follows the scaler: halved by the skip, doubled every 2 good steps
        assert scales == [SCALE, SCALE / 2, SCALE / 2, SCALE, SCALE]
        assert scales[-1] == scaler.get_scale()


def test_several_optimizers_share_one_scaler() -> None:
    net = SmallNet()
    body = torch.optim.SGD([*net.fc1.parameters(), *net.fc2.parameters()], lr=0.01)
    head = torch.optim.Adam(net.out.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    mon_body = gradmon.attach(net, body, scaler=scaler, config=NO_SERVER)
    mon_head = gradmon.attach(net, head, scaler=scaler, config=NO_SERVER)
    assert mon_head.layer_names == ["out.weight", "out.bias"]
    # iteration 0: both step; 1: head's grads hold an Inf, only head skips;
    # 2: only body is stepped this iteration (head's step is not due): nothing skipped
    for i, stepped in enumerate([(body, head), (body, head), (body,)]):
        for opt in (body, head):
            opt.zero_grad()
        scaled_backward(net, scaler, poison="out.weight" if i == 1 else "")
        for opt in stepped:
            scaler.step(opt)
        scaler.update()
    assert (
        readings.steps(mon_body),
        readings.skipped_steps(mon_body),
        readings.nonfinite_steps(mon_body),
    ) == (3, 0, 0)
    assert (
        readings.steps(mon_head),
        readings.skipped_steps(mon_head),
        readings.nonfinite_steps(mon_head),
    ) == (2, 1, 1)
    snap = mon_head.snapshot()
    assert snap is not None and snap.skipped and snap.layers["out.weight"].inf_count == 1
    mon_body.close()
    assert "update" in scaler.__dict__  # still watched for mon_head
    mon_head.close()
    assert "update" not in scaler.__dict__  # the last one out restored it


def test_scaler_without_optimizer_counts_no_skips(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    with gradmon.attach(net, scaler=scaler, config=NO_SERVER) as mon:
        for _ in range(2):
            opt.zero_grad()
            scaled_backward(net, scaler)
            scaler.step(opt)
            scaler.update()
        assert readings.skipped_steps(mon) == 0  # it cannot tell without the optimizer
        assert readings.loss_scale(mon) == SCALE


def test_fused_optimizer_statistics_are_unscaled_on_the_device(net: SmallNet) -> None:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    assert opt._step_supports_amp_scaling  # the scaler hands it grad_scale/found_inf
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    with gradmon.attach(net, opt, scaler=scaler, config=NO_SERVER) as mon:
        for _ in range(2):
            opt.zero_grad()
            scaled_backward(net, scaler)
            want = reference_rows(net, divide_by=scaler.get_scale())  # grads are scaled
            scaler.step(opt)
            # (the fused kernel unscales the grads in place, after our pre-hook saw them)
            scaler.update()
            snap = mon.snapshot()
            assert snap is not None and not snap.skipped
            assert_matches(snap, want, rel=1e-6)
        assert readings.skipped_steps(mon) == 0


def test_fused_optimizer_skipped_steps_counted_from_found_inf(net: SmallNet) -> None:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    registry = CollectorRegistry()
    cfg = {**NO_SERVER, "collect": {"every_n_steps": 2}}
    with gradmon.attach(net, opt, scaler=scaler, config=cfg, registry=registry) as mon:
        skipped = []
        for i in range(5):  # collected: 0, 2, 4; poisoned: 1 (not collected) and 2
            opt.zero_grad()
            scaled_backward(net, scaler, poison="out.bias" if i in (1, 2) else "")
            before = net.out.bias.detach().clone()
            scaler.step(opt)  # the fused kernel skips the update itself
            scaler.update()
            if i in (1, 2):
                assert torch.equal(before, net.out.bias)
            snap = mon.snapshot()
            assert snap is not None
            skipped.append((snap.step, snap.skipped))
            # counted on the device, read back with each collection's partials
            want = {0: 0, 1: 0, 2: 2, 3: 2, 4: 2}[i]
            assert registry.get_sample_value("gradmon_skipped_steps_total") == want
        assert skipped == [(0, False), (0, False), (2, True), (2, True), (4, False)]
        assert registry.get_sample_value("gradmon_steps_total") == 5
        assert registry.get_sample_value("gradmon_nonfinite_steps_total") == 1
        assert (
            registry.get_sample_value("gradmon_layer_nonfinite_steps_total", {"layer": "out.bias"})
            == 1
        )
        assert registry.get_sample_value("gradmon_loss_scale") == SCALE / 4


def test_unscale_partials_matches_reference() -> None:
    g = torch.randn(1000, dtype=torch.float64) * 300
    g[:7] = 0.0
    g[7] = float("nan")
    g[8] = float("-inf")
    s = 2.0**13 * 3  # not a power of two: rounding is checked too
    parts = reference.compute_partials([g])
    want = torch.tensor([reference.tensor_partials(g / s)], dtype=torch.float64)
    for scale in (s, torch.tensor(s, dtype=torch.float32), torch.tensor([s])):
        got = _unscale_partials(parts, scale)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


def test_bf16_autocast_without_scaler(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with gradmon.attach(net, opt, config=NO_SERVER) as mon:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(torch.randn(8, 8))
        assert out.dtype == torch.bfloat16
        out.float().pow(2).mean().backward()
        want = reference_rows(net)
        opt.step()
        snap = mon.snapshot()
    assert snap is not None and readings.collections(mon) == 1
    assert_matches(snap, want, rel=1e-6)


def test_bf16_parameters(net: SmallNet) -> None:
    net = net.to(torch.bfloat16)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with gradmon.attach(net, opt, config=NO_SERVER) as mon:
        opt.zero_grad()
        net(torch.randn(8, 8, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        assert net.fc1.weight.grad.dtype == torch.bfloat16
        want = reference_rows(net)
        opt.step()
        snap = mon.snapshot()
    assert snap is not None
    assert_matches(snap, want, rel=1e-6)  # float64 accumulation of bf16 values


def test_fused_optimizer_after_explicit_unscale_for_clipping(net: SmallNet) -> None:
    # scaler.unscale_() first (to clip), then scaler.step(): the scaler hands the fused
    # optimizer grad_scale=None, and the grads are already unscaled: no second division.
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    with gradmon.attach(net, opt, scaler=scaler, config=NO_SERVER) as mon:
        opt.zero_grad()
        scaled_backward(net, scaler)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=0.05)
        want = reference_rows(net)
        scaler.step(opt)
        scaler.update()
        snap = mon.snapshot()
    assert snap is not None and not snap.skipped
    assert_matches(snap, want, rel=1e-6)
    assert snap.global_norm == pytest.approx(0.05, rel=1e-5)
