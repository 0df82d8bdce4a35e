"""Host cost per gradient tensor: `python bench/host_cost.py [--sizes 250 1000 4000 20000]`.

A chain of N `Linear(16, 16, bias=False)` (N gradient tensors, next to no FLOPs), SGD,
batch 4, one process, CPU. Every arm trains its own copy of the same model; each round
runs one step of every arm, in an order that alternates between rounds (forward, then
reversed), and the medians over rounds are compared. Added host time per tensor per
step = (arm - none) / N. Arms:

- none: training only;
- none again: training only, on a second copy. The baseline is the mean of the two;
  half their gap is shown as the noise (±) of the measurement, the largest over the sets
  below (copies differ in where their tensors landed in memory, and the machine is
  shared);
- gradmon: `gradmon.attach(model, opt)`, every step collected, health on, exporter on
  (a real server on port 0, not scraped), `exporter.max_layers` N;
- gradmon own time: the gradmon arm's own time per collection as it reports it
  (`gradmon_collect_duration_seconds` sum / count over the timed rounds, read from
  `mon.registry`: from the step pre-hook's collection to the published snapshot), per
  tensor. Not a difference of two step times, so no copy's layout moves it; it leaves out
  what the agent saves the optimizer (each grad's Python object, made once) and what it
  costs around the hook (freeing its weak references at `zero_grad`);
- gradmon k=10: the same with `collect.every_n_steps: 10`, the mean step of a 10-step
  cycle as (median collected step + 9 x median step between) / 10 (which steps were
  collected is read off the agent's snapshots, outside the timing). The plain mean over
  all steps took in the garbage collector's full collections (~0.2 s each at 20,000
  tensors, one step in five) at random: one more or fewer moved it by ~0.5 µs a tensor;
- not collected: `collect.every_n_steps` 10**9, so no step after the first is collected:
  what a step that is not collected costs;
- foreach_norm: `torch._foreach_norm` of the grads, stacked, `.tolist()` (norms only);
- lightning: `lightning.pytorch.utilities.grad_norm(model, 2)` and a `.item()` of each
  value, as logging it does (norms only);
- item: `p.grad.norm().item()` per parameter (norms only).

Each arm is measured in a set of its own, against its own two untouched copies, one set
after another (their order reversed on every other repeat): every arm's step then runs
beside the same company, two untouched copies of the model. In one set of
all eight models (`--together`), the peers' allocations (20,000 `.item()` floats a step,
Lightning's dicts) move when the garbage collector runs and which arm's step pays for it,
and the eight copies compete for the caches: at 20,000 tensors an arm that does no work
("not collected") read -1.5 µs a tensor there. `--arms` keeps only the arms named.
`--repeats K` runs the whole measurement K times, each with fresh copies
(whose tensors land elsewhere in memory: a copy's layout alone moves its forward by a few
tenths of a µs a tensor), and reports the median over the repeats, each repeat's figure
listed under the table. It asserts nothing: it prints the table (and `--json`).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import gradmon


def chain(n: int) -> nn.Module:
    """Orthogonal weights, so activations and gradients keep their size down a deep chain:
    the statistics see finite, non-zero values, as they would in a trained model."""
    layers = [nn.Linear(16, 16, bias=False) for _ in range(n)]
    for layer in layers:
        nn.init.orthogonal_(layer.weight)
    return nn.Sequential(*layers)


def arms(
    n: int, only: list[str] | None = None
) -> dict[str, tuple[nn.Module, torch.optim.Optimizer, Callable[[nn.Module], object]]]:
    torch.manual_seed(0)
    base = chain(n)
    out = {}

    def nothing(_m: nn.Module) -> None:
        return None

    def foreach_norm(m: nn.Module) -> object:
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        return torch.stack(torch._foreach_norm(grads)).tolist()

    def per_item(m: nn.Module) -> object:
        return [p.grad.norm().item() for p in m.parameters() if p.grad is not None]

    extra: dict[str, Callable[[nn.Module], object]] = {
        "none": nothing,
        "none again": nothing,
        "gradmon": nothing,
        "gradmon k=10": nothing,
        "not collected": nothing,
        "foreach_norm": foreach_norm,
        "item": per_item,
    }
    try:
        from lightning.pytorch.utilities import grad_norm

        def lightning(m: nn.Module) -> object:
            return {k: float(v.item()) for k, v in grad_norm(m, norm_type=2).items()}

        extra["lightning"] = lightning
    except ImportError:
        print("lightning is not installed: its arm is left out", file=sys.stderr)
    for name, fn in extra.items():
        if only is not None and name not in ("none", "none again", *only):
            continue
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the same work; weights stay put
        out[name] = (model, opt, fn)
    return out


def measure(n: int, rounds: int, warmup: int, only: list[str] | None = None) -> dict[str, float]:
    x = torch.randn(4, 16)
    setup = arms(n, only)
    monitors = {}
    for name, every in (("gradmon", 1), ("gradmon k=10", 10), ("not collected", 10**9)):
        if name not in setup:
            continue
        model, opt, _ = setup[name]
        config = {
            "exporter": {"port": 0, "max_layers": n},
            "collect": {"every_n_steps": every},
        }
        monitors[name] = gradmon.attach(model, opt, config=config)

    def step(name: str) -> float:
        model, opt, fn = setup[name]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(x).sum().backward()
        fn(model)
        opt.step()
        return time.perf_counter() - t0

    def own_time() -> tuple[float, float]:  # the gradmon arm's reported collect time
        registry = monitors["gradmon"].registry
        total = registry.get_sample_value("gradmon_collect_duration_seconds_sum") or 0.0
        count = registry.get_sample_value("gradmon_collect_duration_seconds_count") or 0.0
        return total, count

    names = list(setup)
    times: dict[str, list[float]] = {name: [] for name in names}
    own = (0.0, 0.0)
    collected: list[bool] = []  # the k=10 arm's timed steps: collected or not
    last = -1
    try:
        for r in range(warmup + rounds):
            if r == warmup and "gradmon" in monitors:
                own = own_time()
            for name in names if r % 2 == 0 else reversed(names):
                t = step(name)
                if r >= warmup:
                    times[name].append(t)
                if name == "gradmon k=10":
                    snap = monitors[name].snapshot()
                    now = snap.step if snap is not None else -1
                    if r >= warmup:
                        collected.append(now != last)
                    last = now
        if "gradmon" in monitors:
            total, count = own_time()
            own = (total - own[0], count - own[1])
        for mon in monitors.values():
            snap = mon.snapshot()
            assert snap is not None, "the agent collected nothing"
            assert not snap.nonfinite and not snap.anomalies, snap.anomalies[:3]
    finally:
        for mon in monitors.values():
            mon.close()
    out = {name: statistics.median(ts) for name, ts in times.items()}
    if own[1]:
        out[OWN] = own[0] / own[1]  # seconds per collection, not a step time
    if "gradmon k=10" in times:
        out["gradmon k=10"] = _cycle_mean(times["gradmon k=10"], collected, 10)
    return out


def _cycle_mean(times: list[float], collected: list[bool], k: int) -> float:
    """The mean step of a k-step cycle of one collected step and k - 1 others, each from
    its median (the plain mean where the timed steps hold no collected one)."""
    on = [t for t, c in zip(times, collected, strict=True) if c]
    off = [t for t, c in zip(times, collected, strict=True) if not c]
    if not on or not off:
        return statistics.fmean(times)
    return (statistics.median(on) + (k - 1) * statistics.median(off)) / k


ARMS = ("gradmon", "gradmon k=10", "not collected", "foreach_norm", "item", "lightning")
OWN = "gradmon own time"  # shown after the gradmon arm (see the module docstring)
SHOWN = ("gradmon", OWN, *ARMS[1:])


def measure_sets(
    n: int, rounds: int, warmup: int, only: list[str] | None, together: bool, reverse: bool
) -> tuple[float, float, dict[str, float]]:
    """(baseline step, noise, added µs per tensor per arm) of one repeat: each arm against
    its own untouched copies (or every arm in one set: `together`)."""
    if together:
        sets: list[list[str] | None] = [only]
    else:
        sets = [[arm] for arm in ARMS if only is None or arm in only]
    if reverse:
        sets.reverse()
    bases, noises, added = [], [], {}
    for group in sets:
        med = measure(n, rounds, warmup, group)
        own = med.pop(OWN, None)
        if own is not None:
            added[OWN] = own / n * 1e6
        # The baseline is both untouched copies' mean; half their gap is the noise (±).
        none, again = med.pop("none"), med.pop("none again")
        base = (none + again) / 2
        bases.append(base)
        noises.append(abs(none - again) / 2 / n * 1e6)
        added.update({k: (v - base) / n * 1e6 for k, v in med.items()})
    return statistics.fmean(bases), max(noises), {a: added[a] for a in SHOWN if a in added}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000, 20000])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--arms",
        nargs="+",
        help="only these arms (and the two untouched copies): fewer models compete for the "
        "caches, as in a run that trains one model",
    )
    parser.add_argument("--repeats", type=int, default=1, help="fresh copies, K times")
    parser.add_argument(
        "--together", action="store_true", help="every arm in one set (eight models)"
    )
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        # At least 20 rounds: at 20,000 tensors one full collection of the heap (~0.2 s)
        # lands in about one step in five, which a median over 10 barely keeps out.
        rounds = max(20, args.rounds * 1000 // max(n, 1000))
        rounds = -(-rounds // 10) * 10  # a multiple of 10 (the k=10 arm)
        repeats = [
            measure_sets(n, rounds, args.warmup, args.arms, args.together, reverse=k % 2 == 1)
            for k in range(max(1, args.repeats))
        ]
        rows.append(
            {
                "tensors": n,
                "none_ms": statistics.median(r[0] for r in repeats) * 1e3,
                "noise_us": statistics.median(r[1] for r in repeats),
                "added_us_per_tensor": {
                    k: statistics.median(r[2][k] for r in repeats) for k in repeats[0][2]
                },
                "repeats": [r[2] for r in repeats],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    arms_shown = list(rows[0]["added_us_per_tensor"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; added host time per")
    print("tensor per step (us), medians over rounds with alternating arm order", end="")
    print(f", then over {args.repeats} repeats" if args.repeats > 1 else "")
    print("| N | step, none (ms) | noise (±) | " + " | ".join(arms_shown) + " |")
    print("|---|---|---|" + "---|" * len(arms_shown))
    for row in rows:
        added = row["added_us_per_tensor"]
        cells = " | ".join(f"{added[a]:.1f}" for a in arms_shown)  # type: ignore[index]
        print(f"| {row['tensors']} | {row['none_ms']:.1f} | {row['noise_us']:.1f} | {cells} |")
    if args.repeats > 1:
        for row in rows:
            each = row["repeats"]
            listed = "; ".join(
                f"{a} " + ", ".join(f"{r[a]:.1f}" for r in each)  # type: ignore[index]
                for a in arms_shown
            )
            print(f"N={row['tensors']} repeats: {listed}")


if __name__ == "__main__":
    main()
