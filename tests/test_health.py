from __future__ import annotations

import math

from gradmon.config import HealthConfig
from gradmon.health import HealthRules
from gradmon.snapshot import LayerStats, no_grad_layer


def layer(rms: float = 1e-2, numel: int = 100, zero_ratio: float = 0.0, nan: int = 0) -> LayerStats:
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
        param_norm=1.0,
        sum_squares=norm**2,
    )


def kinds(found: list) -> set[tuple[str, str]]:
    return {(a.layer, a.kind) for a in found}


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


def test_exploding_absolute() -> None:
    rules = HealthRules(HealthConfig(exploding_norm=10))
    assert kinds(rules.evaluate(0, {"a": layer(rms=2.0)}, 20.0)) == {("a", "exploding")}


def test_vanishing_needs_patience() -> None:
    rules = HealthRules(HealthConfig(patience=3))
    found = [rules.evaluate(s, {"a": layer(1e-9), "b": layer(1e-2)}, 1.0) for s in range(4)]
    assert [kinds(f) for f in found] == [set(), set(), {("a", "vanishing")}, {("a", "vanishing")}]
    # recovering resets the run
    assert rules.evaluate(4, {"a": layer(1e-2), "b": layer(1e-2)}, 1.0) == []
    assert rules.evaluate(5, {"a": layer(1e-9), "b": layer(1e-2)}, 1.0) == []


def test_vanishing_relative_to_median_layer() -> None:
    rules = HealthRules(HealthConfig(patience=1, vanishing_rms=0, vanishing_ratio=1e-3))
    layers = {"a": layer(1.0), "b": layer(1.0), "c": layer(1e-4)}
    assert kinds(rules.evaluate(0, layers, 1.0)) == {("c", "vanishing")}


def test_dead_all_zero_or_missing() -> None:
    rules = HealthRules(HealthConfig(patience=2))
    layers = {"z": layer(0.0, zero_ratio=1.0), "none": no_grad_layer(10, 1.0), "ok": layer()}
    assert rules.evaluate(0, layers, 1.0) == []
    assert kinds(rules.evaluate(1, layers, 1.0)) == {("z", "dead"), ("none", "dead")}


def test_spike_against_running_median() -> None:
    rules = HealthRules(HealthConfig(spike_factor=10, spike_warmup=5))
    layers = {"a": layer()}
    for step in range(5):
        assert rules.evaluate(step, layers, 1.0 + 0.1 * step) == []
    found = rules.evaluate(5, layers, 50.0)
    assert kinds(found) == {("global", "spike")}
    assert found[0].value > 10
    # one spike does not move the median baseline
    assert kinds(rules.evaluate(6, layers, 50.0)) == {("global", "spike")}


def test_no_spike_before_warmup() -> None:
    rules = HealthRules(HealthConfig(spike_warmup=10))
    assert rules.evaluate(0, {"a": layer()}, 1.0) == []
    assert rules.evaluate(1, {"a": layer()}, 1e6) == []
