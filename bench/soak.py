"""A long run with the agent attached: resident memory and live objects stay flat.

`python bench/soak.py [--steps 20000] [--sample-every 1000] [--scrape-every 50]
[--record] [--all-features] [--json]`

A small model trains with the agent collecting every step and its server scraped over
HTTP every `--scrape-every` steps (optionally the JSONL record sink too; `--all-features` adds the
TensorBoard sink with histograms, activation statistics and the update ratio). Every
`--sample-every` steps the resident set (/proc/self/statm) and len(gc.get_objects()) are
sampled; after the first quarter (warm-up) a least-squares slope is fitted, and the run
fails (exit 1) when the growth it projects over the measured span exceeds the bounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import torch
from _readings import agent_errors
from torch import nn

import gradmon

RSS_BOUND_MIB = 8.0  # projected growth over the measured span
OBJECTS_BOUND = 2000


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def run_soak(
    steps: int = 20_000,
    sample_every: int = 1000,
    scrape_every: int = 50,
    record: bool = False,
    all_features: bool = False,
) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model: more threads only spin on a shared machine
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        config: dict[str, Any] = {"exporter": {"port": 0}, "collect": {"every_n_steps": 1}}
        if record or all_features:
            config["record"] = {"path": str(Path(tmp) / "record.jsonl")}
        if all_features:
            config["tensorboard"] = {"logdir": str(Path(tmp) / "tb"), "histogram_every": 10}
            config["collect"].update(activations=True, update_ratio_every=5)
        samples: list[tuple[int, float, int]] = []
        scrapes = failed = 0
        with gradmon.attach(model, opt, config=config) as mon:
            url = f"http://127.0.0.1:{mon.port}/metrics"
            for step in range(1, steps + 1):
                opt.zero_grad(set_to_none=True)
                loss = model(torch.randn(16, 8)).pow(2).mean()
                loss.backward()
                opt.step()
                mon.log(loss=loss.detach())
                if step % scrape_every == 0:
                    scrapes += 1
                    try:
                        with urllib.request.urlopen(url, timeout=30) as resp:
                            failed += resp.status != 200 or not resp.read()
                    except OSError:
                        failed += 1
                if step % sample_every == 0:
                    gc.collect()
                    samples.append((step, rss_mib(), len(gc.get_objects())))
            errors = sum(agent_errors(mon).values())
    measured = samples[len(samples) // 4 :] if len(samples) >= 4 else samples
    xs = [float(s[0]) for s in measured]
    span = xs[-1] - xs[0] if len(xs) > 1 else 0.0
    rss_growth = slope(xs, [s[1] for s in measured]) * span
    obj_growth = slope(xs, [float(s[2]) for s in measured]) * span
    ok = rss_growth <= RSS_BOUND_MIB and obj_growth <= OBJECTS_BOUND and not failed and not errors
    return {
        "steps": steps,
        "scrapes": scrapes,
        "failed_scrapes": failed,
        "agent_errors": errors,
        "samples": [{"step": s, "rss_mib": round(r, 2), "objects": o} for s, r, o in samples],
        "warmup_steps": int(xs[0]) if xs else 0,
        "rss_growth_mib": rss_growth,
        "objects_growth": obj_growth,
        "bounds": {"rss_mib": RSS_BOUND_MIB, "objects": OBJECTS_BOUND},
        "ok": ok,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--sample-every", type=int, default=1000)
    parser.add_argument("--scrape-every", type=int, default=50)
    parser.add_argument("--record", action="store_true", help="the JSONL record sink too")
    parser.add_argument(
        "--all-features",
        action="store_true",
        help="record, TensorBoard (histograms every 10th), activations, update ratio (every 5th)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = run_soak(args.steps, args.sample_every, args.scrape_every, args.record, args.all_features)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        for s in r["samples"]:
            print(f"step {s['step']:>6}  rss {s['rss_mib']:8.2f} MiB  objects {s['objects']}")
        print(
            f"after warm-up (step {r['warmup_steps']}): rss {r['rss_growth_mib']:+.2f} MiB "
            f"(bound {RSS_BOUND_MIB}), objects {r['objects_growth']:+.0f} (bound "
            f"{OBJECTS_BOUND}) projected over the span; {r['scrapes']} scrapes, "
            f"{r['failed_scrapes']} failed; agent errors {r['agent_errors']}: "
            + ("OK" if r["ok"] else "FAIL")
        )
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
