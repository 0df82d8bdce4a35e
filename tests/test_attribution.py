"""Where NaN/Inf started (Snapshot.nonfinite_origin, gradmon_nonfinite_origin_total) and
anomaly callbacks (Monitor.on_anomaly), through a real training loop."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

import gradmon
from gradmon.agent.hooks import merge_order
from gradmon.snapshot import Anomaly

from . import readings

NO_SERVER: dict[str, Any] = {"exporter": {"enabled": False}}


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def poison_forward(module: nn.Module) -> Any:
    def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        return out * float("nan")

    return module.register_forward_hook(hook)


def poison_backward(module: nn.Module) -> Any:
    """Inf only in the gradient flowing back out of `module` into what precedes it."""

    def hook(_m: nn.Module, grad_in: tuple[Any, ...], _grad_out: Any) -> Any:
        return tuple(None if g is None else g * float("inf") for g in grad_in)

    return module.register_full_backward_hook(hook)


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()


def test_origin_of_inf_in_the_backward_is_the_first_layer_it_reached() -> None:
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        step(model, opt)
        snap = mon.snapshot()
        assert snap is not None and snap.nonfinite_origin is None  # all finite
        handle = poison_backward(model.layers[3])  # layers 0..2 get Inf; 3 and 4 do not
        step(model, opt)
        handle.remove()
        snap = mon.snapshot()
        assert snap is not None and snap.nonfinite
        bad = sorted(n for n, s in snap.layers.items() if s.inf_count or s.nan_count)
        assert all(n.startswith(("layers.0.", "layers.1.", "layers.2.")) for n in bad)
        # Backward order: layers.2 receives its gradient before layers.1 and layers.0.
        assert snap.nonfinite_origin is not None
        assert snap.nonfinite_origin.startswith("layers.2.")
        counted = readings.value(mon, "gradmon_nonfinite_origin_total", layer=snap.nonfinite_origin)
        assert counted == 1


def test_origin_with_activations_is_the_first_module_in_forward_order() -> None:
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    config = {**NO_SERVER, "collect": {"activations": True}}
    # Registered before attach(), so the agent's hook sees the poisoned output (forward
    # hooks run in registration order, each on what the one before returned).
    handle = poison_forward(model.layers[2])  # its output and everything after: NaN
    with gradmon.attach(model, opt, config=config) as mon:
        step(model, opt)
        handle.remove()
        snap = mon.snapshot()
        assert snap is not None and snap.nonfinite
        assert {n for n, a in snap.activations.items() if a.nan_count} == {
            "layers.2",
            "layers.3",
            "layers.4",
        }
        assert snap.nonfinite_origin == "layers.2"
        assert readings.value(mon, "gradmon_nonfinite_origin_total", layer="layers.2") == 1


def test_anomaly_callbacks_get_each_collections_anomalies_and_a_failing_one_is_counted() -> None:
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen: list[list[Anomaly]] = []

    def broken(_anomalies: list[Anomaly]) -> None:
        raise RuntimeError("a user callback fails")

    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        mon.on_anomaly(seen.append)
        mon.on_anomaly(broken)
        step(model, opt)
        assert seen == []  # a healthy step: not called
        handle = poison_backward(model.layers[3])
        step(model, opt)  # (SGD makes the weights NaN: Inf times a zero learning rate)
        handle.remove()
        step(model, opt)
        assert len(seen) == 2  # the Inf step, and the NaN step after it
        assert {a.kind for a in seen[0]} == {"nonfinite"}
        assert all(a.step == 1 for a in seen[0]) and all(a.step == 2 for a in seen[1])
        assert not any(math.isinf(a.value) for a in seen[0])
        assert readings.errors(mon)["callback"] == 2  # each failure counted
        assert readings.steps(mon) == 3  # training went on


def test_backward_order_learned_from_a_partial_backward_keeps_the_others_in_place() -> None:
    """Conditional computation: a backward that reached only some parameters (MoE experts
    without tokens) reorders those; the others keep their place after the last parameter
    before them, in the order learned before, that this backward reached."""
    learned = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 0.0])  # the last one never seen
    noted = np.array([2.0, 0.0, 1.0, 0.0, 3.0, 0.0])  # 1 and 3 got no gradient this time
    merged = merge_order(learned, noted)
    assert list(np.argsort(merged, kind="stable")) == [5, 2, 0, 1, 3, 4]
    assert merged[5] == 0 and merged[2] == 1 and merged[0] == 2 and merged[4] == 3
    assert 2 < merged[1] < merged[3] < 3  # after parameter 0 (rank 2), before 4 (rank 3)
    assert merge_order(np.zeros(3), np.array([3.0, 0.0, 1.0])).tolist() == [3.0, 0.0, 1.0]
