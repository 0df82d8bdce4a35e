"""Scrapers hammering /metrics of a 1000-layer model while it trains.

`python bench/load.py [--layers 1000] [--scrapers 6] [--rounds 6] [--steps 20]
[--max-scrapes-per-second 10] [--json]`

Four arms, `--steps` steps of each per round, the order forward on even rounds and
reversed on odd ones so machine noise and position hit all alike (medians):
- baseline: an identical model without the agent;
- agent: the model with the agent (every step, every layer exported), not scraped;
- control: the agent's model while the same scraper processes GET a static copy of the
  exposition from another process that answers like the agent's server (one at a time,
  at most `--max-scrapes-per-second`): the same scrapes at the same pace, so what the
  scraper processes take from the machine, without the serving;
- scraped: the agent's model while `--scrapers` processes GET its /metrics over HTTP as
  fast as they are answered (separate processes: their own work does not take this
  process's GIL).
scraped/control is then the cost of serving the scrapes inside the training process, and
control/agent that of the scraper processes on this machine. Reports the training step
time of each arm and the ratios, the scrapes answered per second in both scraped arms (to
show the pace was alike), the scrape latencies (p50/p99/max), failed scrapes, the
exposition's size and the time to render it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _readings import agent_errors
from prometheus_client import generate_latest
from torch import nn

import gradmon
from gradmon.tools.bench import arm_order

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


# The control's server: the exposition's bytes, answered like gradmon's exporter answers
# (gradmon/export/server.py `throttled`: one at a time, at most `rate` a second, the
# surplus waiting in sleep()), but in another process, so that serving costs training
# nothing there.
STATIC_SERVER = r"""
import sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
body = open(sys.argv[1], "rb").read()
rate = float(sys.argv[2])
lock, next_at = threading.Lock(), [0.0]
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if rate > 0:
            with lock:
                wait = next_at[0] - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                next_at[0] = time.monotonic() + 1.0 / rate
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class StaticServer:
    """The same bytes served by a separate process, paced like the agent's exporter."""

    def __init__(self, body: bytes, max_per_second: float) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="gradmon-load-")
        path = Path(self._dir.name, "metrics")
        path.write_bytes(body)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", STATIC_SERVER, str(path), str(max_per_second)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self._proc.stdout.readline())}/metrics"

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=30)
        self._dir.cleanup()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_load(
    layers: int = 1000,
    scrapers: int = 6,
    rounds: int = 6,
    steps: int = 20,
    max_scrapes_per_second: float = 10.0,
    seed: int = 0,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    base = Wide(layers)
    model = copy.deepcopy(base)
    base_opt = torch.optim.SGD(base.parameters(), lr=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    config = {
        "exporter": {
            "port": 0,
            "max_layers": layers,
            "max_scrapes_per_second": max_scrapes_per_second,
        },
        "collect": {"granularity": "module", "every_n_steps": 1},
    }
    x = torch.randn(8, 16)
    arms = ["baseline", "agent", "control", "scraped"]
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    seconds: dict[str, float] = {"control": 0.0, "scraped": 0.0}  # scraped, go to stop
    results: dict[str, list[dict[str, Any]]] = {"control": [], "scraped": []}
    order: list[str] = []
    with gradmon.attach(model, opt, config=config) as mon:
        for _ in range(3):  # warm-up: first collection, backend selection
            _step(base, base_opt, x)
            _step(model, opt, x)
        render: list[float] = []
        for _ in range(5):
            t = time.perf_counter()
            body = generate_latest(mon.registry)
            render.append(time.perf_counter() - t)
        static = StaticServer(body, max_scrapes_per_second)
        pools = {
            "control": Scrapers(scrapers, static.url),
            "scraped": Scrapers(scrapers, f"http://127.0.0.1:{mon.port}/metrics"),
        }
        fns: dict[str, Callable[[], None]] = {
            "baseline": lambda: _step(base, base_opt, x),
            "agent": lambda: _step(model, opt, x),
            "control": lambda: _step(model, opt, x),
            "scraped": lambda: _step(model, opt, x),
        }

        try:
            for rnd in range(rounds):
                for i in arm_order(len(arms), rnd):
                    arm = arms[i]
                    order.append(arm)
                    pool = pools.get(arm)
                    if pool is not None:
                        pool.go()
                    t0 = time.perf_counter()  # scraping from here until stop() returns
                    for _ in range(steps):
                        t = time.perf_counter()
                        fns[arm]()
                        times[arm].append(time.perf_counter() - t)
                    if pool is not None:
                        results[arm] += pool.stop()
                        seconds[arm] += time.perf_counter() - t0
        finally:
            static.close()
        errors = int(sum(agent_errors(mon).values()))
    latencies = [v for r in results["scraped"] for v in r["lat"]]
    answered = {arm: sum(len(r["lat"]) for r in results[arm]) for arm in results}
    med = {arm: statistics.median(v) for arm, v in times.items()}
    return {
        "layers": layers,
        "scrapers": scrapers,
        "rounds": rounds,
        "steps_per_round": steps,
        "max_scrapes_per_second": max_scrapes_per_second,
        "torch_threads": torch.get_num_threads(),
        "arm_order": order,
        "step_ms": {arm: 1e3 * v for arm, v in med.items()},
        "agent_over_baseline": med["agent"] / med["baseline"],
        "control_over_agent": med["control"] / med["agent"],
        "scraped_over_agent": med["scraped"] / med["agent"],
        "scraped_over_control": med["scraped"] / med["control"],
        "scraped_over_baseline": med["scraped"] / med["baseline"],
        "scrapes": answered["scraped"],
        "control_scrapes": answered["control"],
        "scrapes_per_second": {arm: answered[arm] / seconds[arm] for arm in answered},
        "failed_scrapes": sum(r["fail"] for r in results["scraped"]),
        "control_failed_scrapes": sum(r["fail"] for r in results["control"]),
        "scrape_ms": {
            "p50": 1e3 * _pct(latencies, 0.50),
            "p99": 1e3 * _pct(latencies, 0.99),
            "max": 1e3 * max(latencies, default=float("nan")),
        },
        "exposition_bytes": len(body),
        "render_ms_median": 1e3 * statistics.median(render),
        "agent_errors": errors,
        "load_average": list(os.getloadavg()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1000)
    parser.add_argument("--scrapers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="training steps per arm per round")
    parser.add_argument(
        "--max-scrapes-per-second",
        type=float,
        default=10.0,
        help="the agent's exporter.max_scrapes_per_second, and the control server's pace",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = run_load(args.layers, args.scrapers, args.rounds, args.steps, args.max_scrapes_per_second)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        s, ms, rate = r["step_ms"], r["scrape_ms"], r["scrapes_per_second"]
        print(
            f"{r['layers']} layers, {r['scrapers']} scrapers, {r['rounds']} rounds x "
            f"{r['steps_per_round']} steps per arm (arm order alternating), "
            f"{r['torch_threads']} torch threads, max_scrapes_per_second "
            f"{r['max_scrapes_per_second']:g}, load average {r['load_average'][0]:.2f}\n"
            f"step ms (median): baseline {s['baseline']:.2f}  agent {s['agent']:.2f}  "
            f"control {s['control']:.2f}  scraped {s['scraped']:.2f}\n"
            f"ratios: agent/baseline {r['agent_over_baseline']:.3f}  control/agent "
            f"{r['control_over_agent']:.3f}  scraped/agent {r['scraped_over_agent']:.3f}  "
            f"scraped/control {r['scraped_over_control']:.3f} (serving in process)\n"
            f"scrapes answered: agent {r['scrapes']} ({rate['scraped']:.1f}/s), control "
            f"{r['control_scrapes']} ({rate['control']:.1f}/s); failed {r['failed_scrapes']}"
            f" (control {r['control_failed_scrapes']}); agent latency ms p50 {ms['p50']:.1f} "
            f"p99 {ms['p99']:.1f} max {ms['max']:.1f}\n"
            f"exposition {r['exposition_bytes']} bytes, rendered in "
            f"{r['render_ms_median']:.1f} ms (median); agent errors {r['agent_errors']}"
        )
    failed = r["failed_scrapes"] or r["control_failed_scrapes"]
    return 1 if failed or r["agent_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
