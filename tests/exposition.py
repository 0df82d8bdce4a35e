"""/metrics of a real agent with every family present: shared by the tests that hold the
schema, the rules and the dashboards to what the agent really serves."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, generate_latest

import gradmon

from .conftest import SmallNet, train_step


def full_exposition() -> str:
    """The text exposition of a fresh registry after a few steps: a GradScaler, a logged
    scalar, anomalies, a step with NaN gradients, a structurally zero layer (fc1.bias, its
    gradient zeroed at every step), and the opt-in update ratio and activation statistics."""
    torch.manual_seed(0)
    net = SmallNet()
    net.fc1.bias.register_hook(torch.zeros_like)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    registry = CollectorRegistry()
    config = {
        "exporter": {"enabled": False},
        "health": {"exploding_norm": 1e-9},
        "collect": {"update_ratio_every": 1, "activations": True},
    }
    with gradmon.attach(net, opt, scaler=scaler, config=config, registry=registry) as mon:
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = net(torch.randn(4, 8)).pow(2).mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            mon.log(loss=loss.detach())
        train_step(net, opt)
        # Last, a step where one layer's gradient holds a NaN: where it started is counted.
        opt.zero_grad(set_to_none=True)
        net(torch.randn(4, 8)).pow(2).mean().backward()
        net.out.bias.grad[0] = float("nan")  # type: ignore[index]
        opt.step()
        mon.snapshot(wait=True)
        return generate_latest(registry).decode()
