"""What `collect.activations` costs on the reference model of `gradmon bench`.

`python bench/activations.py [--steps N] [--json]`

Five identical copies of gradmon.tools.bench.ReferenceModel train side by side, one step of
each per round, the order forward on even rounds and reversed on odd ones (machine noise
and position hit all alike): no agent; the agent collecting every step with activations
off and on; the agent with every_n_steps=10 with activations off and on (9 of 10 forwards
unarmed). Each "on" is compared with the "off" of the same collection cadence, so the
ratio is what activation statistics add, not what collecting less often saves.

Medians of the step times are reported, and the per-step time over a cycle of 10 steps
(`cycle_ms`: the median at each position in the cycle, averaged): the every_n_steps=10
arms collect at the same positions, once per cycle, so their ratio carries that step's
cost (a plain median would pick one of the 9 idle steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import gradmon
from gradmon.tools.bench import ReferenceModel, _interleaved, _median_ms

CYCLE = 10  # steps: every_n_steps=10 collects one of them


def cycle_ms(times: Sequence[float], period: int = CYCLE) -> float:
    """Per-step time over a cycle of `period` steps (ms): the mean over the positions in
    the cycle of the median step time at that position. It carries the one collected
    step of every_n_steps=10 at its weight (1 in 10), and a median per position keeps
    the outliers of a shared machine out."""
    positions = range(min(period, len(times)))
    return 1e3 * statistics.fmean(statistics.median(times[p::period]) for p in positions)


def run(steps: int, warmup: int = 3, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    base = ReferenceModel()
    tokens = torch.randint(0, 1000, (16, 128))
    loss_fn = nn.CrossEntropyLoss()
    configs: dict[str, dict[str, Any] | None] = {
        "no_agent": None,
        "activations_off": {},
        "activations_on": {"activations": True},
        "activations_off_every_10": {"every_n_steps": 10},
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
        snap = monitors[1].snapshot()  # activations on, every step
        assert snap is not None and snap.activations, "no activation statistics collected"
        modules = len(snap.activations)  # every hooked module runs in this model's forward
    finally:
        for mon in monitors:
            mon.close()
    ms = {name: round(_median_ms(t), 2) for name, t in zip(configs, times, strict=True)}
    cycle = {name: round(cycle_ms(t), 2) for name, t in zip(configs, times, strict=True)}
    return {
        "steps": steps,
        "threads": torch.get_num_threads(),
        "hooked_modules": modules,
        "step_ms": ms,
        "step_ms_cycle_of_10": cycle,
        "on_over_off": round(ms["activations_on"] / ms["activations_off"], 4),
        "on_every_10_over_off_every_10": round(
            cycle["activations_on_every_10"] / cycle["activations_off_every_10"], 4
        ),
        "off_over_no_agent": round(ms["activations_off"] / ms["no_agent"], 4),
        "off_every_10_over_no_agent": round(
            cycle["activations_off_every_10"] / cycle["no_agent"], 4
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--steps", type=int, default=50, help="rounds (>= 30: 3 per position in the cycle)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.steps)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"reference model, {result['hooked_modules']} hooked modules, "
            f"{result['threads']} torch threads, {result['steps']} rounds, arm order "
            "alternating (medians)"
        )
        print(f"  {'':24s} {'median':>9s}    {'cycle of 10':>12s}")
        for name, value in result["step_ms"].items():
            print(f"  {name:24s} {value:9.2f} ms {result['step_ms_cycle_of_10'][name]:9.2f} ms")
        print(f"  activations on / off, every step        {result['on_over_off']:.4f}")
        every_10 = result["on_every_10_over_off_every_10"]
        print(f"  activations on / off, every_n_steps=10  {every_10:.4f}  (cycle of 10)")
        print(f"  agent (activations off) / none          {result['off_over_no_agent']:.4f}")
        every_10 = result["off_every_10_over_no_agent"]
        print(f"  agent every_n_steps=10 (off) / none     {every_10:.4f}  (cycle of 10)")
