"""What `collect.activations` costs on the reference model of `gradmon bench`.

`python bench/activations.py [--steps N] [--json]`

Four identical copies of gradmon.tools.bench.ReferenceModel train side by side, their steps
interleaved so machine noise hits all alike: no agent; the agent with activations off;
on, collecting every step; on, with every_n_steps=10 (9 of 10 forwards unarmed). Medians
of the step times are reported, and the ratios of activations on to off.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import gradmon
from gradmon.tools.bench import ReferenceModel, _interleaved, _median_ms


def run(steps: int, warmup: int = 3, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    base = ReferenceModel()
    tokens = torch.randint(0, 1000, (16, 128))
    loss_fn = nn.CrossEntropyLoss()
    configs: dict[str, dict[str, Any] | None] = {
        "no_agent": None,
        "activations_off": {},
        "activations_on": {"activations": True},
        "activations_on_every_10": {"activations": True, "every_n_steps": 10},
    }
    monitors = []
    fns: list[Callable[[], None]] = []
    modules = 0
    for collect in configs.values():
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if collect is not None:
            config = {"exporter": {"enabled": False}, "collect": collect}
            mon = gradmon.attach(model, opt, config=config)
            monitors.append(mon)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            logits = model(tokens)
            loss_fn(logits.flatten(0, 1), tokens.flatten()).backward()
            opt.step()

        fns.append(step)
    try:
        _interleaved(fns, warmup)
        times = _interleaved(fns, steps)
        snap = monitors[1].snapshot()
        assert snap is not None and snap.activations, "no activation statistics collected"
        modules = len(snap.activations)  # every hooked module runs in this model's forward
    finally:
        for mon in monitors:
            mon.close()
    ms = {name: round(_median_ms(t), 2) for name, t in zip(configs, times, strict=True)}
    return {
        "steps": steps,
        "threads": torch.get_num_threads(),
        "hooked_modules": modules,
        "step_ms": ms,
        "on_over_off": round(ms["activations_on"] / ms["activations_off"], 4),
        "on_every_10_over_off": round(ms["activations_on_every_10"] / ms["activations_off"], 4),
        "off_over_no_agent": round(ms["activations_off"] / ms["no_agent"], 4),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.steps)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"reference model, {result['hooked_modules']} hooked modules, "
            f"{result['threads']} torch threads, {result['steps']} interleaved steps (medians)"
        )
        for name, value in result["step_ms"].items():
            print(f"  {name:24s} {value:9.2f} ms")
        print(f"  activations on / off             {result['on_over_off']:.4f}")
        print(f"  on, every_n_steps=10 / off       {result['on_every_10_over_off']:.4f}")
        print(f"  agent (activations off) / none   {result['off_over_no_agent']:.4f}")
