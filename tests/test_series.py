"""Bounded series: grouping by module-path depth, and the series count README documents."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

import gradmon
from gradmon.stats import Col, reference

NO_SERVER = {"exporter": {"enabled": False}}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(4, 6)
        self.linear2 = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear2(torch.tanh(self.linear1(x)))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(4, 1)
        self.scale = nn.Parameter(torch.ones(()))  # owned by the root module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)) * self.scale


def one_step(model: nn.Module, cfg: dict[str, object]) -> tuple[gradmon.Snapshot, dict]:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmon.attach(model, opt, config={**NO_SERVER, **cfg}) as mon:
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        rows = {n: reference.tensor_partials(p.grad) for n, p in model.named_parameters()}
        opt.step()
        snap = mon.snapshot()
    assert snap is not None
    return snap, rows


@pytest.mark.parametrize(
    ("depth", "layers"),
    [
        # model order: the root's own parameter comes first in named_parameters()
        (1, ["(root)", "encoder", "head"]),
        (2, ["(root)", "encoder.layers", "head"]),
        (3, ["(root)", "encoder.layers.0", "encoder.layers.1", "encoder.layers.2", "head"]),
        # deeper than the module tree: the module itself, as with granularity module
        (
            9,
            [
                "(root)",
                *(f"encoder.layers.{i}.linear{j}" for i in range(3) for j in (1, 2)),
                "head",
            ],
        ),
    ],
)
def test_granularity_depth_groups_by_module_path_prefix(depth: int, layers: list[str]) -> None:
    model = Model()
    snap, rows = one_step(model, {"collect": {"granularity": "depth", "depth": depth}})
    assert list(snap.layers) == layers
    for layer in layers:
        members = [
            n
            for n in rows
            if n.rpartition(".")[0].split(".")[:depth] == layer.split(".")
            or (layer == "(root)" and "." not in n)
        ]
        assert members, layer
        sum_sq = sum(rows[n][Col.SUM_SQ] for n in members)
        numel = sum(dict(model.named_parameters())[n].numel() for n in members)
        s = snap.layers[layer]
        assert s.numel == numel
        assert s.norm == pytest.approx(math.sqrt(sum_sq), rel=1e-6)
        assert s.abs_max == max(rows[n][Col.ABS_MAX] for n in members)


def test_include_exclude_apply_to_depth_groups() -> None:
    cfg = {"collect": {"granularity": "depth", "depth": 3, "include": r"layers\.[01]$"}}
    snap, _ = one_step(Model(), cfg)
    assert list(snap.layers) == ["encoder.layers.0", "encoder.layers.1"]


def test_depth_is_validated() -> None:
    with pytest.raises(gradmon.GradmonError, match=r"collect\.depth"):
        gradmon.attach(Model(), config={**NO_SERVER, "collect": {"depth": 0}})


def series(registry: CollectorRegistry) -> dict[str, int]:
    out: dict[str, int] = {}
    for family in registry.collect():
        out[family.name] = out.get(family.name, 0) + len(family.samples)
    return out


PER_LAYER = (
    "gradmon_grad_norm",
    "gradmon_grad_rms",
    "gradmon_grad_abs_max",
    "gradmon_grad_zero_ratio",
    "gradmon_grad_sum_squares",
    "gradmon_param_norm",
    "gradmon_layer_nonfinite_steps",
)


@pytest.mark.parametrize(
    ("collect", "max_layers", "exported"),
    [
        ({}, 512, 15),  # every parameter
        ({"granularity": "module"}, 512, 8),
        ({"granularity": "depth", "depth": 3}, 512, 5),
        ({}, 4, 4),  # capped
    ],
)
def test_series_count_is_as_documented(
    collect: dict[str, object],
    max_layers: int,
    exported: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """README "Series count": 7 per exported layer, ~80 global, + anomaly pairs seen."""
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    registry = CollectorRegistry()
    cfg = {"collect": collect, "exporter": {"enabled": False, "max_layers": max_layers}}
    with (
        caplog.at_level(logging.WARNING, logger="gradmon"),
        gradmon.attach(model, opt, config=cfg, registry=registry) as mon,
    ):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        counts = series(registry)
        layers = len(mon.layer_names)
    assert exported == min(layers, max_layers)
    for name in PER_LAYER:
        assert counts[name] == exported, name
    assert counts["gradmon_anomalies"] == 0  # a healthy step
    global_series = sum(n for name, n in counts.items() if name not in PER_LAYER)
    assert 70 <= global_series <= 90
    capped = [r.getMessage() for r in caplog.records if "max_layers" in r.getMessage()]
    if layers > max_layers:
        assert len(capped) == 1 and "exporter.max_layers is 4" in capped[0]
    else:
        assert not capped


@pytest.mark.parametrize(("max_layers", "exported"), [(512, 15), (4, 4)])
def test_update_ratio_series_are_per_exported_layer(max_layers: int, exported: int) -> None:
    """Opt-in gradmon_update_ratio: one series per exported layer once measured, capped by
    exporter.max_layers like the other per-layer families; absent when off."""
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    registry = CollectorRegistry()
    cfg = {
        "collect": {"update_ratio_every": 1},
        "exporter": {"enabled": False, "max_layers": max_layers},
    }
    with gradmon.attach(model, opt, config=cfg, registry=registry):
        assert "gradmon_update_ratio" not in series(registry)  # nothing measured yet
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        counts = series(registry)
    assert counts["gradmon_update_ratio"] == exported
    assert all(counts[name] == exported for name in PER_LAYER)


ACTIVATION_FAMILIES = (
    "gradmon_activation_rms",
    "gradmon_activation_mean",
    "gradmon_activation_zero_ratio",
    "gradmon_activation_nonfinite",
)


@pytest.mark.parametrize(("max_layers", "exported"), [(512, 7), (4, 4)])
def test_activation_series_count_is_as_documented(max_layers: int, exported: int) -> None:
    """README "Series count": collect.activations adds 4 per exported module (the 7 leaf
    modules: six Linear layers and the head), bounded by exporter.max_layers."""
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    registry = CollectorRegistry()
    cfg = {"collect": {"activations": True}, "exporter": {"enabled": False, "max_layers": 512}}
    cfg["exporter"]["max_layers"] = max_layers  # type: ignore[index]
    with gradmon.attach(model, opt, config=cfg, registry=registry):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        counts = series(registry)
    for name in ACTIVATION_FAMILIES:
        assert counts[name] == exported, name
    for name in PER_LAYER:  # the gradient families are unchanged
        assert counts[name] == min(15, max_layers), name
    others = sum(n for k, n in counts.items() if k not in PER_LAYER + ACTIVATION_FAMILIES)
    assert 70 <= others <= 90
