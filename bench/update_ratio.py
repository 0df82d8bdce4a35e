"""Step-time cost of collect.update_ratio_every on the reference model of `gradmon bench`.

`python bench/update_ratio.py [--steps N] [--json]`. Four identical copies of the
reference model (gradmon/tools/bench.py) train side by side: no agent, the agent with the update
ratio off, every 10th collection, every collection. Their steps are interleaved so machine
noise hits all alike; each arm's median over 10-step cycles of the cycle's mean step is
reported (so the one sampled step in ten counts), as ratios against the plain step and
against the agent with the update ratio off. On a shared machine the step medians are noisy at
the percent level, so the update ratio's own work (copy of the old weights before the
step, w_old - w_new and the two norms after it, the float64 combine) is also timed
alone, interleaved with a bare AdamW `optimizer.step()` of the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import weakref
from collections.abc import Callable

import torch
from _readings import agent_errors
from torch import nn

import gradmon
from gradmon.agent.features.update_ratio import UpdateRatio
from gradmon.tools.bench import ReferenceModel, _interleaved

VARIANTS: dict[str, int | None] = {"no agent": None, "off": 0, "every 10": 10, "every 1": 1}


def run(steps: int = 30, warmup: int = 3) -> dict[str, float]:
    torch.manual_seed(0)
    base = ReferenceModel()
    tokens = torch.randint(0, 1000, (16, 128))
    loss_fn = nn.CrossEntropyLoss()
    fns: list[Callable[[], None]] = []
    monitors = []
    for every in VARIANTS.values():
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if every is not None:
            cfg = {"exporter": {"port": 0}, "collect": {"update_ratio_every": every}}
            monitors.append(gradmon.attach(model, opt, config=cfg))

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(tokens).flatten(0, 1), tokens.flatten()).backward()
            opt.step()

        fns.append(step)
    try:
        _interleaved(fns, warmup)
        times = _interleaved(fns, -(-steps // CYCLE) * CYCLE)  # whole cycles
        for mon in monitors:
            assert mon.snapshot() is not None and not agent_errors(mon)
    finally:
        for mon in monitors:
            mon.close()
    return {name: cycle_median(t) * 1e3 for name, t in zip(VARIANTS, times, strict=True)}


CYCLE = 10  # the "every 10" arm samples one step in ten


def cycle_median(times: list[float]) -> float:
    """The median over whole 10-step cycles of each cycle's mean step: a plain median of
    steps would mostly leave out the one step in ten the "every 10" arm samples."""
    cycles = [times[k : k + CYCLE] for k in range(0, len(times) - CYCLE + 1, CYCLE)]
    return statistics.median(statistics.fmean(c) for c in cycles)


def run_parts(reps: int = 50) -> dict[str, float]:
    """Medians (ms) of the update ratio's work per sample and of a bare optimizer step."""
    torch.manual_seed(0)
    model = ReferenceModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # optimizer state exists
    named = list(model.named_parameters())
    ratio = UpdateRatio(
        1,
        256 << 20,
        [n for n, _ in named],
        [[i] for i in range(len(named))],
        [weakref.ref(p) for _, p in named],
    )

    def measure() -> None:
        ratio.before_step()
        ratio.finish(ratio.after_step())

    fns = [opt.step, measure]
    _interleaved(fns, 3)
    step_t, ratio_t = _interleaved(fns, reps)
    return {
        "optimizer.step() alone": statistics.median(step_t) * 1e3,
        "update ratio work": statistics.median(ratio_t) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    parts = run_parts()
    ms = run(args.steps)
    if args.json:
        print(json.dumps({k: round(v, 3) for k, v in {**ms, **parts}.items()}, indent=2))
        return
    print(
        f"{args.steps} interleaved steps, {torch.get_num_threads()} torch threads, "
        "medians of 10-step cycle means"
    )
    for name, value in ms.items():
        print(
            f"  {name:9s} {value:8.2f} ms   / no agent {value / ms['no agent']:.4f}"
            f"   / off {value / ms['off']:.4f}"
        )
    work = parts["update ratio work"]
    print(
        f"  update ratio work per sample {work:.3f} ms"
        f" (optimizer.step() alone {parts['optimizer.step() alone']:.3f} ms):"
        f" {work / ms['off']:.2%} of an agent step at every 1, {work / ms['off'] / 10:.2%} at 10"
    )


if __name__ == "__main__":
    main()
