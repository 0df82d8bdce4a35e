"""Scrapers hammering /metrics of a 1000-layer model while it trains.

`python bench/load.py [--layers 1000] [--scrapers 6] [--rounds 5] [--steps 20] [--json]`

Four arms, interleaved round by round so machine noise hits all alike (medians):
- baseline: an identical model without the agent;
- agent: the model with the agent (every step, every layer exported), not scraped;
- contended: the baseline model while the same scrapers hammer a static copy of the
  exposition served by another process: what the scraper processes alone cost the
  training on this machine (on 2 cores, 6 busy scrapers take most of the CPU);
- scraped: the agent's model while `--scrapers` processes GET its /metrics over HTTP as
  fast as they can (separate processes: their own work does not take this process's GIL).
scraped/contended is then the cost of serving the scrapes inside the training process.
Reports the training step time of each arm and the ratios, the scrape latencies
(p50/p99/max), failed scrapes, the exposition's size and the time to render it.
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _readings import agent_errors
from prometheus_client import generate_latest
from torch import nn

import gradmon

SCRAPER = r"""
import json, sys, time, urllib.request
url = sys.argv[1]
lat, fail, size = [], 0, 0
print("ready", flush=True)
sys.stdin.readline()  # go
import select
while not select.select([sys.stdin], [], [], 0)[0]:  # until told to stop
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = resp.read()
            ok = resp.status == 200 and body.endswith(b"\n")
    except Exception:
        ok = False
    if ok:
        lat.append(time.perf_counter() - t)
        size = len(body)
    else:
        fail += 1
print(json.dumps({"lat": lat, "fail": fail, "size": size}), flush=True)
"""


class Wide(nn.Module):
    """`layers` small Linear layers side by side (weight and bias: one layer each)."""

    def __init__(self, layers: int, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([b(x) for b in self.blocks]).sum(0)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()
    opt.step()


class Scrapers:
    """`n` scraper processes, started once; each phase is go ... stop."""

    def __init__(self, n: int, url: str) -> None:
        self.n, self.url = n, url
        self.procs: list[subprocess.Popen[str]] = []

    def go(self) -> None:
        cmd = [sys.executable, "-c", SCRAPER, self.url]
        pipe = subprocess.PIPE
        self.procs = [
            subprocess.Popen(cmd, stdin=pipe, stdout=pipe, text=True) for _ in range(self.n)
        ]
        for p in self.procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()

    def stop(self) -> list[dict[str, Any]]:
        out = []
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("stop\n")
            p.stdin.flush()
        for p in self.procs:
            stdout, _ = p.communicate(timeout=120)
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out


class StaticServer:
    """The same bytes served by a separate process (python -m http.server)."""

    def __init__(self, body: bytes) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="gradmon-load-")
        Path(self._dir.name, "metrics").write_bytes(body)
        with socket.socket() as s:  # a free port (the server binds it right after)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/metrics"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            cwd=self._dir.name,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    resp.read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=30)
        self._dir.cleanup()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_load(
    layers: int = 1000, scrapers: int = 6, rounds: int = 5, steps: int = 20, seed: int = 0
) -> dict[str, Any]:
    torch.manual_seed(seed)
    base = Wide(layers)
    model = copy.deepcopy(base)
    base_opt = torch.optim.SGD(base.parameters(), lr=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    config = {
        "exporter": {"port": 0, "max_layers": layers},
        "collect": {"granularity": "module", "every_n_steps": 1},
    }
    x = torch.randn(8, 16)
    times: dict[str, list[float]] = {"baseline": [], "agent": [], "contended": [], "scraped": []}
    results: list[dict[str, Any]] = []
    with gradmon.attach(model, opt, config=config) as mon:
        for _ in range(3):  # warm-up: first collection, backend selection
            _step(base, base_opt, x)
            _step(model, opt, x)
        render: list[float] = []
        for _ in range(5):
            t = time.perf_counter()
            body = generate_latest(mon.registry)
            render.append(time.perf_counter() - t)
        pool = Scrapers(scrapers, f"http://127.0.0.1:{mon.port}/metrics")
        static = StaticServer(body)
        control = Scrapers(scrapers, static.url)

        def timed(arm: str, fn: Callable[[], None]) -> None:
            for _ in range(steps):
                t = time.perf_counter()
                fn()
                times[arm].append(time.perf_counter() - t)

        try:
            for _ in range(rounds):
                timed("baseline", lambda: _step(base, base_opt, x))
                timed("agent", lambda: _step(model, opt, x))
                control.go()
                timed("contended", lambda: _step(base, base_opt, x))
                control.stop()
                pool.go()
                timed("scraped", lambda: _step(model, opt, x))
                results += pool.stop()
        finally:
            static.close()
        errors = int(sum(agent_errors(mon).values()))
    latencies = [v for r in results for v in r["lat"]]
    med = {arm: statistics.median(v) for arm, v in times.items()}
    return {
        "layers": layers,
        "scrapers": scrapers,
        "rounds": rounds,
        "steps_per_round": steps,
        "torch_threads": torch.get_num_threads(),
        "step_ms": {arm: 1e3 * v for arm, v in med.items()},
        "agent_over_baseline": med["agent"] / med["baseline"],
        "scraped_over_baseline": med["scraped"] / med["baseline"],
        "scraped_over_agent": med["scraped"] / med["agent"],
        "contended_over_baseline": med["contended"] / med["baseline"],
        "scraped_over_contended": med["scraped"] / med["contended"],
        "scrapes": len(latencies),
        "failed_scrapes": sum(r["fail"] for r in results),
        "scrape_ms": {
            "p50": 1e3 * _pct(latencies, 0.50),
            "p99": 1e3 * _pct(latencies, 0.99),
            "max": 1e3 * max(latencies, default=float("nan")),
        },
        "exposition_bytes": len(body),
        "render_ms_median": 1e3 * statistics.median(render),
        "agent_errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1000)
    parser.add_argument("--scrapers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="training steps per arm per round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = run_load(args.layers, args.scrapers, args.rounds, args.steps)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        s, ms = r["step_ms"], r["scrape_ms"]
        print(
            f"{r['layers']} layers, {r['scrapers']} scrapers, {r['rounds']} rounds x "
            f"{r['steps_per_round']} steps per arm, {r['torch_threads']} torch threads\n"
            f"step ms (median): baseline {s['baseline']:.2f}  agent {s['agent']:.2f}  "
            f"contended {s['contended']:.2f}  scraped {s['scraped']:.2f}\n"
            f"ratios: agent/baseline {r['agent_over_baseline']:.2f}  scraped/baseline "
            f"{r['scraped_over_baseline']:.2f}  contended/baseline "
            f"{r['contended_over_baseline']:.2f}  scraped/contended "
            f"{r['scraped_over_contended']:.2f}  scraped/agent {r['scraped_over_agent']:.2f}\n"
            f"scrapes {r['scrapes']}, failed {r['failed_scrapes']}; latency ms p50 "
            f"{ms['p50']:.1f} p99 {ms['p99']:.1f} max {ms['max']:.1f}\n"
            f"exposition {r['exposition_bytes']} bytes, rendered in "
            f"{r['render_ms_median']:.1f} ms (median); agent errors {r['agent_errors']}"
        )
    return 1 if r["failed_scrapes"] or r["agent_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
