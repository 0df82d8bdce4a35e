from __future__ import annotations

import dataclasses
import math

import pytest

from gradmon.config import HealthConfig, load_config
from gradmon.errors import GradmonError
from gradmon.health import HealthRules
from gradmon.snapshot import Anomaly, LayerStats, no_grad_layer


def layer(
    rms: float = 1e-2,
    numel: int = 100,
    zero_ratio: float = 0.0,
    nan: int = 0,
    param_norm: float = 1.0,
) -> LayerStats:
    norm = rms * math.sqrt(numel - nan)
    return LayerStats(
        numel=numel,
        norm=norm,
        rms=rms,
        abs_max=rms * 3,
        mean=0.0,
        min=-rms,
        max=rms,
        zero_ratio=zero_ratio,
        nan_count=nan,
        inf_count=0,
        param_norm=param_norm,
        sum_squares=norm**2,
    )


def kinds(found: list[Anomaly]) -> set[tuple[str, str]]:
    return {(a.layer, a.kind) for a in found}


def warm(rules: HealthRules, layers: dict[str, LayerStats], n: int = 10, g: float = 1.0) -> None:
    """n healthy collections with a little noise, so every baseline is set."""
    for step in range(n):
        wobble = 1 + 0.05 * math.sin(step)
        noisy = {k: dataclasses.replace(s, norm=s.norm * wobble) for k, s in layers.items()}
        assert rules.evaluate(step, noisy, g * wobble) == []


def test_healthy_is_silent() -> None:
    rules = HealthRules(HealthConfig())
    for step in range(50):
        scale = 1 + 0.3 * math.sin(step)
        layers = {"a": layer(1e-2 * scale), "b": layer(3e-3 * scale), "c": layer(2e-2)}
        assert rules.evaluate(step, layers, 1.0 * scale) == []


def test_nonfinite_every_collection() -> None:
    rules = HealthRules(HealthConfig())
    for step in range(3):
        found = rules.evaluate(step, {"a": layer(nan=2), "b": layer()}, 1.0)
        assert kinds(found) == {("a", "nonfinite")}
        assert found[0].value == 2


def test_exploding_absolute_ceiling() -> None:
    rules = HealthRules(HealthConfig(exploding_norm=10))
    found = rules.evaluate(0, {"a": layer(rms=2.0)}, 20.0)
    assert kinds(found) == {("a", "exploding")}
    assert found[0].value == pytest.approx(20.0)  # the norm that broke the ceiling


def test_default_ceiling_leaves_sum_reduced_norms_alone() -> None:
    # reduction="sum" over a batch of 512: healthy layer norms of 1e3..7e3 (issue 14)
    rules = HealthRules(HealthConfig())
    for step in range(30):
        assert rules.evaluate(step, {"a": layer(rms=700.0 * (1 + step % 3))}, 7e3) == []


def test_vanishing_needs_patience() -> None:
    rules = HealthRules(HealthConfig(patience=3))
    assert rules.evaluate(0, {"a": layer(1e-2), "b": layer(1e-2)}, 1.0) == []
    found = [rules.evaluate(s, {"a": layer(1e-9), "b": layer(1e-2)}, 1.0) for s in range(1, 5)]
    assert [kinds(f) for f in found] == [set(), set(), {("a", "vanishing")}, {("a", "vanishing")}]
    # recovering resets the run
    assert rules.evaluate(5, {"a": layer(1e-2), "b": layer(1e-2)}, 1.0) == []
    assert rules.evaluate(6, {"a": layer(1e-9), "b": layer(1e-2)}, 1.0) == []
    assert rules.structurally_zero() == ()


def test_vanishing_relative_to_median_layer() -> None:
    rules = HealthRules(HealthConfig(patience=1, vanishing_rms=0, vanishing_ratio=1e-3))
    layers = {"a": layer(1.0), "b": layer(1.0), "c": layer(1e-4)}
    assert kinds(rules.evaluate(0, layers, 1.0)) == {("c", "vanishing")}


def test_structurally_zero_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """A conv bias in front of BatchNorm: rounding noise from the first step on."""
    rules = HealthRules(HealthConfig(patience=3, dead_window=2))
    layers = {"conv.bias": layer(1e-9), "zeros": layer(0.0, zero_ratio=1.0)}
    layers |= {f"w{i}": layer(1e-2) for i in range(3)}
    for step in range(20):
        assert rules.evaluate(step, layers, 1.0) == []
    assert rules.structurally_zero() == ("conv.bias", "zeros")
    warned = [r.getMessage() for r in caplog.records if "Structurally zero" in r.getMessage()]
    # One warning for the collection that found both, naming them.
    assert len(warned) == 1 and "2 layer(s)" in warned[0]
    assert "conv.bias" in warned[0] and "zeros" in warned[0]


def test_many_structurally_zero_layers_are_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    rules = HealthRules(HealthConfig(patience=2))
    layers = {f"bias{i}": layer(0.0, zero_ratio=1.0) for i in range(1000)}
    layers |= {"w": layer(1e-2)}
    for step in range(5):
        rules.evaluate(step, layers, 1.0)
    assert len(rules.structurally_zero()) == 1000
    warned = [r.getMessage() for r in caplog.records if "Structurally zero" in r.getMessage()]
    assert len(warned) == 1 and "and 995 more" in warned[0]


def test_structurally_zero_leaves_the_set_when_a_gradient_arrives() -> None:
    rules = HealthRules(HealthConfig(patience=2))
    for step in range(3):
        rules.evaluate(step, {"b": layer(1e-9), "w": layer(1e-2)}, 1.0)
    assert rules.structurally_zero() == ("b",)
    assert rules.evaluate(3, {"b": layer(1e-2), "w": layer(1e-2)}, 1.0) == []
    assert rules.structurally_zero() == ()
    # from now on it is an ordinary layer: vanishing again is vanishing
    found = [rules.evaluate(s, {"b": layer(1e-9), "w": layer(1e-2)}, 1.0) for s in range(4, 6)]
    assert kinds(found[-1]) == {("b", "vanishing")}


def test_zero_at_the_first_step_only_is_not_structural() -> None:
    """LoRA: B starts at zero, so A's gradient is exactly zero at the first step only."""
    rules = HealthRules(HealthConfig())
    assert rules.evaluate(0, {"A": layer(0.0, zero_ratio=1.0), "B": layer()}, 1.0) == []
    for step in range(1, 10):
        assert rules.evaluate(step, {"A": layer(), "B": layer()}, 1.0) == []
    assert rules.structurally_zero() == ()


def test_dead_is_judged_over_a_window() -> None:
    rules = HealthRules(HealthConfig(dead_window=5))
    alive = {"went": layer(), "none": no_grad_layer(10, 1.0), "ok": layer()}
    gone = {"went": layer(0.0, zero_ratio=1.0), "none": no_grad_layer(10, 1.0), "ok": layer()}
    assert rules.evaluate(0, alive, 1.0) == []
    for step in range(1, 4):
        assert rules.evaluate(step, gone, 1.0) == []
    assert kinds(rules.evaluate(4, gone, 1.0)) == {("none", "dead")}  # 5 without a gradient
    assert kinds(rules.evaluate(5, gone, 1.0)) == {("none", "dead"), ("went", "dead")}


def test_intermittent_layer_is_not_dead() -> None:
    """An MoE expert that gets no token for a few steps at a time."""
    rules = HealthRules(HealthConfig(dead_window=10))
    for step in range(100):
        idle = step % 9 != 0  # 8 idle collections in every 9
        expert = no_grad_layer(10, 1.0) if idle else layer()
        assert rules.evaluate(step, {"expert": expert, "ok": layer()}, 1.0) == []


def test_layer_spike_against_its_own_history_while_global_is_flat() -> None:
    rules = HealthRules(HealthConfig(spike_factor=10, spike_warmup=5))
    layers = {"big": layer(1.0), "branch": layer(1e-4)}
    warm(rules, layers)
    found = rules.evaluate(10, {"big": layer(1.0), "branch": layer(1e-1)}, 1.0)
    assert kinds(found) == {("branch", "spike")}
    assert found[0].value == pytest.approx(1000, rel=0.1)  # its norm over its own baseline


def test_a_noisy_layer_needs_a_larger_jump() -> None:
    rules = HealthRules(HealthConfig(spike_factor=10, spike_mad=3))
    # an expert fed 1..8 tokens: its norm swings 8x from one collection to the next
    for step in range(40):
        n = 1 + (step * 5) % 8
        assert rules.evaluate(step, {"expert": layer(1e-2 * n)}, 1.0) == []
    assert rules.evaluate(40, {"expert": layer(1e-2 * 30)}, 1.0) == []  # 30x its low end
    assert kinds(rules.evaluate(41, {"expert": layer(10.0)}, 1.0)) == {("expert", "spike")}


def test_a_steady_ramp_is_no_spike() -> None:
    """Escaping a plateau: the norm grows 15% a collection, 1000x over 50 collections."""
    rules = HealthRules(HealthConfig())
    for step in range(50):
        norm = 1e-3 * 1.15**step
        assert rules.evaluate(step, {"a": layer(norm)}, norm) == []


def test_a_spike_that_lasts_is_exploding_until_it_ends() -> None:
    rules = HealthRules(HealthConfig(patience=3))
    warm(rules, {"a": layer(1e-2)})
    got = [kinds(rules.evaluate(s, {"a": layer(1.0)}, 1.0)) for s in range(10, 40)]
    assert got[:2] == [{("a", "spike")}] * 2
    # the baseline stays what it was before: reported for as long as it lasts
    assert got[2:] == [{("a", "exploding")}] * 28
    assert rules.evaluate(40, {"a": layer(1e-2)}, 1.0) == []


def test_origin_first_weights_that_jumped_then_largest_jump() -> None:
    """One layer's weights blown up: the layers around it have larger gradient jumps, but
    its own parameter norm jumped, so it comes first."""
    rules = HealthRules(HealthConfig())
    before = {"l0": layer(), "l1": layer(), "l2": layer()}
    warm(rules, before)
    after = {
        "l0": layer(1e2),
        "l1": layer(1e1, param_norm=1000.0),  # the culprit: x1000 weights
        "l2": layer(1e3),
    }
    found = rules.evaluate(10, after, 1e3)
    assert [a.layer for a in found if a.kind == "spike"] == ["l1", "l2", "l0", "global"]


def test_global_spike_against_running_median() -> None:
    rules = HealthRules(HealthConfig(spike_factor=10, spike_warmup=5))
    layers = {"a": layer()}
    for step in range(5):
        assert rules.evaluate(step, layers, 1.0 + 0.1 * step) == []
    found = rules.evaluate(5, layers, 50.0)
    assert kinds(found) == {("global", "spike")}
    assert found[0].value > 10
    # the spike stays out of the baseline it is judged against
    assert kinds(rules.evaluate(6, layers, 50.0)) == {("global", "spike")}


def test_no_spike_before_warmup() -> None:
    rules = HealthRules(HealthConfig(spike_warmup=10))
    assert rules.evaluate(0, {"a": layer()}, 1.0) == []
    assert rules.evaluate(1, {"a": layer(1e3)}, 1e6) == []


def test_nonfinite_collection_stays_out_of_baselines() -> None:
    rules = HealthRules(HealthConfig())
    warm(rules, {"a": layer()})
    # NaN in 'a': magnitudes of the finite rest are not judged, nor the global norm
    assert kinds(rules.evaluate(10, {"a": layer(1e3, nan=5)}, 1e4)) == {("a", "nonfinite")}
    assert rules.evaluate(11, {"a": layer()}, 1.0) == []


def test_new_keys_are_validated() -> None:
    with pytest.raises(GradmonError, match=r"health\.spike_warmup .*spike_window"):
        load_config({"health": {"spike_warmup": 30, "spike_window": 20}})
    with pytest.raises(GradmonError, match=r"health\.dead_window"):
        load_config({"health": {"dead_window": 0}})
    with pytest.raises(GradmonError, match=r"health\.structural_ratio"):
        load_config({"health": {"structural_ratio": 1.5}})


def test_dead_waits_twice_the_longest_idle_run_it_came_back_from() -> None:
    rules = HealthRules(HealthConfig(dead_window=10))
    idle, busy = {"e": no_grad_layer(10, 1.0), "ok": layer()}, {"e": layer(), "ok": layer()}
    step = 0
    for layers in [busy] + [idle] * 9 + [busy]:  # back after 9 idle collections
        assert rules.evaluate(step, layers, 1.0) == []
        step += 1
    for _ in range(17):  # 18 needed now
        assert rules.evaluate(step, idle, 1.0) == []
        step += 1
    assert kinds(rules.evaluate(step, idle, 1.0)) == {("e", "dead")}


def test_structurally_zero_layers_are_a_gauge_on_the_registry() -> None:
    """A Conv2d bias in front of BatchNorm, trained for real: its gauge reads 1 from the
    collection that finds it, no other layer has a series, and it is never vanishing. Its
    gradient made real again (no BatchNorm after it), it leaves the gauge."""
    import torch
    from torch import nn

    import gradmon

    from . import readings

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    norm = nn.BatchNorm2d(4)
    head = nn.Linear(4 * 6 * 6, 1)
    bypass = {"on": False}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm, self.head = conv, norm, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            y = y if bypass["on"] else self.norm(y)
            return self.head(torch.relu(y).flatten(1))

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    names = [n for n, _ in model.named_parameters()]
    gauge = "gradmon_grad_structurally_zero"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(torch.randn(8, 3, 8, 8)).pow(2).mean().backward()
        opt.step()

    with gradmon.attach(model, opt, config={"exporter": {"enabled": False}}) as mon:
        step()
        assert all(readings.value(mon, gauge, layer=n) == 0.0 for n in names)  # no series yet
        for _ in range(9):
            step()
        assert mon.registry.get_sample_value(gauge, {"layer": "conv.bias"}) == 1.0
        assert [n for n in names if mon.registry.get_sample_value(gauge, {"layer": n})] == [
            "conv.bias"
        ]
        vanishing = {"layer": "conv.bias", "kind": "vanishing"}
        assert readings.value(mon, "gradmon_anomalies_total", **vanishing) == 0
        bypass["on"] = True  # the bias now carries a real gradient
        step()
        assert mon.registry.get_sample_value(gauge, {"layer": "conv.bias"}) is None
