"""`gradmon bench`: what the agent costs, as ratios against a baseline in the same process.

The reference model is an nn.TransformerEncoder (6 layers, d_model 256, ff 1024, 4 heads)
with an embedding and head of 1000, batch 16x128, AdamW, on the CPU. Identical copies
train side by side: no agent (the baseline); the agent (every step, all statistics,
exporter on) not scraped; the agent with /metrics scraped over HTTP every 1 s and every
15 s of its training (a background thread, `IntervalScraper`). One step of each per round,
the order forward on even rounds and reversed on odd ones, so machine noise and
position in the round hit all alike; medians are reported (and means: a scrape every 15 s
lands in few steps, so only the mean carries its cost).

The statistics pass times the agent's real calls, the pass over the parameters and the
statistics call (agent/gather.py and agent/collect.py: the grads' partials and the
weights' norms), against reading the grads off the parameters and one
`torch._foreach_norm` of them (what `clip_grad_norm_` reads), and against that plus one
`_foreach_norm` of the weights (the same bytes read).
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import json
import os
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import gradmon
from gradmon.agent.collect import PartialsCollector
from gradmon.agent.gather import Gatherer
from gradmon.agent.layers import LayerIndex
from gradmon.config import Config
from gradmon.stats import partials_block, select_backend
from gradmon.stats import torch as torch_stats

SCRAPE_INTERVALS = (1.0, 15.0)  # seconds: a fast Prometheus job, and its default


class ReferenceModel(nn.Module):
    def __init__(self, vocab: int = 1000, d_model: int = 256, layers: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        block = nn.TransformerEncoderLayer(d_model, 4, 1024, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder(self.embed(tokens)))
        return out


def arm_order(arms: int, rnd: int) -> list[int]:
    """The order the arms run in round `rnd`: forward on even rounds, reversed on odd."""
    order = list(range(arms))
    return order if rnd % 2 == 0 else order[::-1]


def _interleaved(fns: Sequence[Callable[[], object]], reps: int) -> list[list[float]]:
    """Seconds of each call of each fn: `reps` rounds, one call of each per round, in
    `arm_order` (no arm always runs first, right after another's garbage or cache)."""
    times: list[list[float]] = [[] for _ in fns]
    for rnd in range(reps):
        for i in arm_order(len(fns), rnd):
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return times


def _median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1e3


class IntervalScraper:
    """GETs `url` over HTTP every `interval` seconds of the time it runs, on its own thread,
    as Prometheus does (`Accept-Encoding: gzip`; a body that ends in a newline counts).

    It runs only between resume() and pause() (the scraped arm's steps) and its clock
    counts only that time: an arm interleaved with others is scraped every `interval`
    seconds of its own training, as if it trained alone. The first scrape comes after
    `first_after` seconds (default interval / 2: Prometheus spreads its targets over the
    interval, half of it is the expected offset). pause() waits for a scrape in flight, so
    its whole cost lands in the scraped arm's step (at worst overstated, never lost).
    """

    def __init__(
        self,
        url: str,
        interval: float,
        first_after: float | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.url, self.interval, self.timeout = url, interval, timeout
        self.latencies: list[float] = []  # seconds, successful scrapes
        self.failures = 0
        self._left = interval / 2 if first_after is None else first_after  # running time
        self._since: float | None = None  # running since (monotonic), None: paused
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="bench-scraper", daemon=True)
        self._thread.start()

    @property
    def scrapes(self) -> int:
        return len(self.latencies)

    def reset(self) -> None:
        """Forget the scrapes so far (those of warm-up steps); call it paused."""
        with self._cond:
            self.latencies, self.failures = [], 0

    def resume(self) -> None:
        with self._cond:
            self._since = time.monotonic()
            self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            if self._since is not None:
                self._left -= time.monotonic() - self._since
                self._since = None  # first: no new scrape starts while this waits
            while self._busy:
                self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(self.timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if self._since is None:
                        self._cond.wait()
                        continue
                    left = self._left - (time.monotonic() - self._since)
                    if left <= 0:
                        break
                    self._cond.wait(left)
                # The next one is due `interval` of running time after this one starts.
                self._busy, self._since, self._left = True, time.monotonic(), self.interval
            ok, seconds = self._get()
            with self._cond:
                self._busy = False
                if ok:
                    self.latencies.append(seconds)
                else:
                    self.failures += 1
                self._cond.notify_all()

    def _get(self) -> tuple[bool, float]:
        request = urllib.request.Request(self.url, headers={"Accept-Encoding": "gzip"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                body = resp.read()
                if resp.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = resp.status == 200 and body.endswith(b"\n")
        except OSError:  # refused, reset, timed out, HTTP errors (URLError is an OSError)
            ok = False
        return ok, time.perf_counter() - t0


def scraped(step: Callable[[], None], scraper: IntervalScraper) -> Callable[[], None]:
    """`step`, with `scraper` running while it runs (and finishing its scrape in flight)."""

    def run() -> None:
        scraper.resume()
        try:
            step()
        finally:
            scraper.pause()

    return run


@dataclass
class Arm:
    name: str
    step_ms: float  # median
    mean_ms: float  # mean: carries the cost of rare events (a scrape every 15 s)
    ratio: float  # median / the baseline's median
    mean_ratio: float  # mean / the baseline's mean
    scrape_interval_s: float | None = None
    scrapes: int | None = None  # successful scrapes during this arm's timed steps
    failed_scrapes: int | None = None
    scrape_ms: float | None = None  # median latency of a scrape


def arms_from_times(
    names: Sequence[str],
    times: Sequence[Sequence[float]],
    scrapers: dict[str, IntervalScraper] | None = None,
) -> list[Arm]:
    """One Arm per name, ratios against the first (the baseline)."""
    base_med, base_mean = statistics.median(times[0]), statistics.fmean(times[0])
    arms = []
    for name, t in zip(names, times, strict=True):
        med, mean = statistics.median(t), statistics.fmean(t)
        arm = Arm(
            name,
            round(med * 1e3, 2),
            round(mean * 1e3, 2),
            round(med / base_med, 4),
            round(mean / base_mean, 4),
        )
        s = (scrapers or {}).get(name)
        if s is not None:
            arm.scrape_interval_s, arm.scrapes = s.interval, s.scrapes
            arm.failed_scrapes = s.failures
            arm.scrape_ms = round(_median_ms(s.latencies), 2) if s.latencies else None
        arms.append(arm)
    return arms


def format_arm(a: Arm, width: int = 44) -> str:
    line = (
        f"  {a.name:<{width}} {a.step_ms:8.1f} ms  {a.ratio:.3f}x   "
        f"mean {a.mean_ms:8.1f} ms  {a.mean_ratio:.3f}x"
    )
    if a.scrapes is not None:
        latency = f", {a.scrape_ms:.1f} ms each (median)" if a.scrape_ms is not None else ""
        line += f"   [{a.scrapes} scrapes{latency}, {a.failed_scrapes} failed]"
    return line


@dataclass
class BenchResult:
    steps: int
    step_ms_baseline: float
    step_ms_agent: float
    step_overhead: float  # agent (not scraped) / baseline, medians
    arms: list[Arm]
    stats_ms: float  # the agent's statistics call: grads' partials and weights' norms
    foreach_norm_ms: float  # _foreach_norm of the grads
    foreach_norm_both_ms: float  # _foreach_norm of the grads and of the weights
    stats_over_foreach_norm: float
    stats_over_foreach_norm_both: float
    torch_backend_ms: float  # the same call with the plain torch backend
    backend: str
    params: int
    tensors: int
    threads: int
    load_before: list[float] = field(default_factory=list)  # os.getloadavg(): 1, 5, 15 min
    load_after: list[float] = field(default_factory=list)


def run_bench(
    steps: int = 30,
    warmup: int = 3,
    stats_reps: int = 50,
    seed: int = 0,
    scrape_intervals: Sequence[float] = SCRAPE_INTERVALS,
) -> BenchResult:
    load_before = list(os.getloadavg())
    torch.manual_seed(seed)
    base = ReferenceModel()
    tokens = torch.randint(0, 1000, (16, 128))
    loss_fn = nn.CrossEntropyLoss()

    def make_step() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            logits = model(tokens)
            loss = loss_fn(logits.flatten(0, 1), tokens.flatten())
            loss.backward()
            opt.step()

        return model, opt, run

    config = {"exporter": {"port": 0}}
    names = ["no agent", "gradmon, not scraped"]
    fns = [make_step()[2]]
    watched, opt_watched, step = make_step()
    fns.append(step)
    monitors = [gradmon.attach(watched, opt_watched, config=config)]
    scrapers: dict[str, IntervalScraper] = {}
    try:
        for interval in scrape_intervals:
            model, opt, step = make_step()
            mon = gradmon.attach(model, opt, config=config)
            monitors.append(mon)
            name = f"gradmon, scraped every {interval:g} s"
            scrapers[name] = IntervalScraper(f"http://127.0.0.1:{mon.port}/metrics", interval)
            names.append(name)
            fns.append(scraped(step, scrapers[name]))
        _interleaved(fns, warmup)
        for s in scrapers.values():
            s.reset()  # count the timed steps' scrapes only
        times = _interleaved(fns, steps)
        for mon in monitors:
            assert mon.snapshot() is not None, "the agent collected nothing"
    finally:
        for s in scrapers.values():
            s.close()
        for mon in monitors:
            mon.close()
    arms = arms_from_times(names, times, scrapers)

    params: list[torch.Tensor] = [p for p in watched.parameters() if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    backend = select_backend("auto", grads[0].device, grads[0].dtype)

    # Each arm reads the grads off the parameters, as a step does.
    def foreach_norm() -> None:
        torch._foreach_norm([p.grad for p in params if p.grad is not None])

    def foreach_norm_both() -> None:
        torch._foreach_norm([p.grad for p in params if p.grad is not None])
        torch._foreach_norm(params)

    # The agent's pass and statistics call, as a collection runs them (agent/gather.py,
    # agent/collect.py), every grad taken as fresh each time.
    index = LayerIndex.build(list(watched.named_parameters()), Config())
    gatherer = Gatherer(index, lambda name, why: None, watched, None)
    collector = PartialsCollector("auto", index.numels)

    def agent_call() -> None:
        gatherer.forget()
        collector.collect(gatherer.gather(), lambda stage: contextlib.nullcontext())

    def plain() -> None:
        grads = [p.grad for p in params if p.grad is not None]
        partials_block(torch_stats.compute_partials, grads, params)

    calls = [foreach_norm, foreach_norm_both, agent_call, plain]
    _interleaved(calls, 3)
    norm_t, both_t, agent_t, plain_t = _interleaved(calls, stats_reps)
    norm_ms, both_ms, agent_ms = _median_ms(norm_t), _median_ms(both_t), _median_ms(agent_t)
    return BenchResult(
        steps=steps,
        step_ms_baseline=arms[0].step_ms,
        step_ms_agent=arms[1].step_ms,
        step_overhead=arms[1].ratio,
        arms=arms,
        stats_ms=round(agent_ms, 3),
        foreach_norm_ms=round(norm_ms, 3),
        foreach_norm_both_ms=round(both_ms, 3),
        stats_over_foreach_norm=round(agent_ms / norm_ms, 3),
        stats_over_foreach_norm_both=round(agent_ms / both_ms, 3),
        torch_backend_ms=round(_median_ms(plain_t), 3),
        backend=f"{backend.__module__}.{backend.__name__}",
        params=sum(g.numel() for g in grads),
        tensors=len(grads),
        threads=torch.get_num_threads(),
        load_before=load_before,
        load_after=list(os.getloadavg()),
    )


def format_result(r: BenchResult) -> str:
    load = (
        f"load average {r.load_before[0]:.2f} before, {r.load_after[0]:.2f} after "
        f"({os.cpu_count()} CPUs)"
    )
    return "\n".join(
        [
            f"reference model: {r.params:,} params in {r.tensors} tensors, "
            f"{r.threads} torch threads, {r.steps} rounds, arm order alternating; {load}",
            "step time (median, ratio vs no agent; mean, ratio):",
            *(format_arm(a) for a in r.arms),
            f"  gradmon not scraped / no agent: {r.step_overhead:.4f}  (target <= 1.02)",
            "statistics pass (medians):",
            f"  gradmon's call (grads' partials + weights' norms) {r.stats_ms:7.3f} ms"
            f"  [{r.backend}]",
            f"  _foreach_norm of the grads                        {r.foreach_norm_ms:7.3f} ms"
            f"   gradmon / it {r.stats_over_foreach_norm:.3f}  (target <= 2)",
            f"  _foreach_norm of the grads and of the weights     "
            f"{r.foreach_norm_both_ms:7.3f} ms   gradmon / it {r.stats_over_foreach_norm_both:.3f}",
            f"  gradmon's call, plain torch backend               {r.torch_backend_ms:7.3f} ms",
        ]
    )


def main(steps: int = 30, as_json: bool = False) -> BenchResult:
    result = run_bench(steps=steps)
    print(json.dumps(asdict(result), indent=2) if as_json else format_result(result))
    return result
