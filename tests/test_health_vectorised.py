"""The vectorised health rules give exactly the anomalies of the per-layer rules they
replaced (tests/health_reference.py), on random streams of layers: noise, spikes, blow-ups,
NaN/Inf, all-zero and missing gradients, structurally zero and intermittent layers."""

from __future__ import annotations

import math
import random

import pytest

from gradmon.config import HealthConfig
from gradmon.health import HealthRules
from gradmon.snapshot import LayerStats, finalize_layer, no_grad_layer

from .health_reference import ReferenceHealthRules


def layer(rng: random.Random, kind: str, scale: float, step: int) -> LayerStats:
    numel = 64
    param_sq = (scale * 100.0) ** 2 * (1000.0 if kind == "blowup" and step > 30 else 1.0)
    if kind == "absent" or (kind == "expert" and rng.random() < 0.4):
        return no_grad_layer(numel, param_sq)
    if kind == "zero" or (kind == "dying" and step > 25):
        return finalize_layer([0.0, 0.0, 0.0, 0.0, 0.0, numel, 0, 0], numel, param_sq)
    norm = scale * math.exp(rng.gauss(0.0, 0.2))
    if kind == "structural":
        norm = scale * 1e-9
    if kind == "spiky" and step in (22, 23, 24, 40):
        norm *= 50.0
    if kind == "blowup" and step > 30:
        norm *= 1e6
    nan = 1 if kind == "nan" and step % 7 == 3 else 0
    if kind == "vanish" and step > 15:
        norm = 1e-12
    row = [norm**2, norm, norm / 4, -norm / 4, norm / 4, 1.0, nan, 0]
    return finalize_layer(row, numel, param_sq)


KINDS = ("plain", "expert", "zero", "dying", "structural", "spiky", "blowup", "nan", "vanish")


@pytest.mark.parametrize("seed", range(8))
def test_same_anomalies_as_the_per_layer_rules(seed: int) -> None:
    rng = random.Random(seed)
    config = HealthConfig(patience=3, spike_window=12, spike_warmup=4, dead_window=6)
    names = [f"l{i}.{rng.choice(KINDS)}" for i in range(24)]
    scales = {n: 10.0 ** rng.uniform(-4, 2) for n in names}
    vectorised, reference = HealthRules(config), ReferenceHealthRules(config)
    for step in range(60):
        # Some collections leave some layers out (a failed group, an empty shard).
        shown = [n for n in names if rng.random() > 0.05]
        layers = {n: layer(rng, n.split(".")[1], scales[n], step) for n in shown}
        norm = math.sqrt(sum(s.sum_squares for s in layers.values()))
        want = reference.evaluate(step, layers, norm)
        got = vectorised.evaluate(step, layers, norm)
        assert [(a.layer, a.kind) for a in got] == [(a.layer, a.kind) for a in want], step
        for a, b in zip(got, want, strict=True):
            assert a.value == pytest.approx(b.value, rel=1e-9), (step, a)
    assert vectorised.structurally_zero() == reference.structurally_zero()
