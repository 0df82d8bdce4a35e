"""Training while the sinks' storage fails and recovers and scrapers misbehave.

`python bench/chaos.py [--phase-seconds 3] [--hang-seconds 7] [--json]` (gradmon
installed, e.g. `pip install -e .`; as root for the full and read-only phases: they mount
a tmpfs; without mount they are skipped, saying so)

A 4-layer MLP (0.6M parameters, one CPU thread) trains with the agent attached (exporter
on, the record file and TensorBoard event files, histograms every 10th step, under one
directory), phase after phase, each for a fixed wall time:

  healthy    nothing wrong
  full       the filesystem is filled to the last byte (a ballast file)      [mount]
  freed      the ballast is deleted
  deleted    the whole log directory is deleted (rm -rf) at the phase start
  read-only  a read-only tmpfs is mounted over the log directory             [mount]
  remounted  it is unmounted again
  hung       the record file is replaced by a FIFO nobody reads: open() hangs, as on a
             hung NFS/FUSE mount (TensorBoard keeps writing)
  unhung     a reader drains the FIFO
  scrapers   the FIFO is removed (one error: the path is gone; a regular file comes
             back); 20 slowloris clients, 10 silent connections, a client sending
             garbage and one scraping back to back, all at once
  final      nothing wrong

Between phases nobody trains for 1.5 s, so the sinks write what the last phase queued
before the storage changes: each phase's snapshots meet that phase's storage. A polite
scraper GETs /metrics every 0.2 s while the agent trains. The unmonitored twin (same
model, same batches, no agent) trains each phase's wall time just before the monitored
run does (agent idle then), so both meet about the same machine load. Per phase the
table reports steps done by each, their median and worst step time, the agent's
gradmon_agent_errors_total{stage="sink"} (from /metrics), snapshots published vs lines in
the record file (and TensorBoard steps), and the polite scraper's answers. Pushgateway:
not part of gradmon yet, so no phase. Asserts nothing; prints the table for the README.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradmon

PHASES = (
    "healthy",
    "full",
    "freed",
    "deleted",
    "read-only",
    "remounted",
    "hung",
    "unhung",
    "scrapers",
    "final",
)
MOUNT_PHASES = {"full", "freed", "read-only", "remounted"}
SETTLE_S = 1.5  # between phases, no training: two of the sinks' 0.5 s write batches


def model_and_opt() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 1),
    )  # fmt: skip
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


class Batches:
    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(1)

    def next(self) -> torch.Tensor:
        return torch.randn(64, 256, generator=self.gen)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30, check=False)


def fill(directory: Path) -> Path:
    ballast = directory / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
    return ballast


@dataclass
class Phase:
    name: str
    twin_steps: int = 0
    twin_times: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # the monitored run's step numbers
    times: list[float] = field(default_factory=list)
    errors_before: float = 0.0
    errors_after: float = 0.0
    scrapes_ok: int = 0
    scrapes_failed: int = 0
    scrape_worst_s: float = 0.0
    skipped: str = ""


class PoliteScraper:
    """GETs /metrics every 0.2 s; counts answers per phase."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.phase: Phase | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            phase = self.phase
            if phase is None:
                continue
            start = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as resp:
                    ok = resp.status == 200 and b"gradmon_steps_total" in resp.read()
            except OSError:
                ok = False
            phase.scrape_worst_s = max(phase.scrape_worst_s, time.monotonic() - start)
            if ok:
                phase.scrapes_ok += 1
            else:
                phase.scrapes_failed += 1


def sink_errors(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "gradmon_agent_errors_total" and s.labels.get("stage") == "sink":
                return float(s.value)
    return 0.0


class Misbehaving:
    """Scrapers that misbehave: slowloris, silent connections, garbage, a flood."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(30):
            with contextlib.suppress(OSError):
                s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                if i < 20:  # slowloris: a request that never ends
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                self.socks.append(s)
        for target in (self.garbage, self.flood, self.drip):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self.threads.append(t)

    def garbage(self) -> None:
        while not self.stop.is_set():
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=5) as s,
            ):
                s.sendall(os.urandom(4096) + b"\r\n\r\n")
                s.recv(1024)
            self.stop.wait(0.05)

    def flood(self) -> None:
        url = f"http://127.0.0.1:{self.port}/metrics"
        while not self.stop.is_set():
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=10) as r:
                r.read()

    def drip(self) -> None:
        while not self.stop.wait(0.5):  # keep the slowloris clients dripping headers
            for s in self.socks[:20]:
                with contextlib.suppress(OSError):
                    s.sendall(b"X-a: b\r\n")

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


class FifoReader:
    """Opens the FIFO for reading (un-hanging the writer) and counts the lines it gets."""

    def __init__(self, fifo: Path) -> None:
        self.fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.data = b""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            with contextlib.suppress(BlockingIOError):
                self.data += os.read(self.fd, 1 << 20)

    def close(self) -> list[int]:
        self.stop.set()
        self.thread.join(5)
        with contextlib.suppress(BlockingIOError):
            self.data += os.read(self.fd, 1 << 20)
        os.close(self.fd)
        return [json.loads(line)["step"] for line in self.data.splitlines() if line.strip()]


def record_steps(paths: list[Path]) -> set[int]:
    steps: set[int] = set()
    for p in paths:
        if p.is_file():
            data = p.read_bytes()
            # A last line without its newline is being written right now: not counted yet.
            for line in data[: data.rfind(b"\n") + 1].splitlines():
                if line.strip():
                    steps.add(json.loads(line)["step"])  # a torn line here would raise
    return steps


def event_steps(logdir: Path) -> set[int]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(logdir))
        acc.Reload()
        return {e.step for e in acc.Scalars("global/grad_norm")}
    except Exception:
        return set()


def run_chaos(phase_seconds: float = 3.0, hang_seconds: float = 7.0) -> dict[str, Any]:
    torch.set_num_threads(1)
    phases = [Phase(name) for name in PHASES]
    wall = {p.name: hang_seconds if p.name == "hung" else phase_seconds for p in phases}

    # The unmonitored twin (same model, same batch stream) trains each phase's wall time
    # just before the monitored run does, with the agent idle (its queues written out,
    # the polite scraper paused): both see about the same machine load.
    twin, twin_opt = model_and_opt()
    twin_batches = Batches()
    twin_losses: list[float] = []

    def twin_phase(p: Phase) -> None:
        end = time.monotonic() + wall[p.name]
        while time.monotonic() < end:
            t0 = time.perf_counter()
            twin_losses.append(train_step(twin, twin_opt, twin_batches.next()))
            p.twin_times.append(time.perf_counter() - t0)
        p.twin_steps = len(p.twin_times)

    tmp = Path(tempfile.mkdtemp(prefix="gradmon-chaos-"))
    mnt = tmp / "mnt"
    mnt.mkdir()
    try:
        mount("-t", "tmpfs", "-o", "size=32m", "gradmon-chaos", str(mnt))
        mounted = True
    except (OSError, subprocess.CalledProcessError) as exc:
        mounted = False
        why = f"mount not permitted ({exc})"
    run = mnt / "run"
    rec, tb = run / "record.jsonl", run / "tb"
    config = {
        "exporter": {"port": 0},
        "record": {"path": str(rec)},
        "tensorboard": {"logdir": str(tb), "histogram_every": 10},
    }
    model, opt = model_and_opt()
    batches = Batches()
    losses: list[float] = []
    seen_record: set[int] = set()
    seen_events: set[int] = set()
    set_aside: list[Path] = []
    ballast: Path | None = None
    overlay = tmp / "overlay-mounted"
    fifo_reader: FifoReader | None = None
    misbehaving: Misbehaving | None = None
    step = 0
    t_attach = time.perf_counter()
    mon = gradmon.attach(model, opt, config=config)
    attach_s = time.perf_counter() - t_attach
    assert mon.port is not None
    scraper = PoliteScraper(mon.port)

    def keep(what: Callable[[], set[int]], into: set[int]) -> None:
        into |= what()

    try:
        for p in phases:
            if p.name in MOUNT_PHASES and not mounted:
                p.skipped = why
                continue
            # -- let the sinks write what the last phase queued, then break or mend the
            # storage: each phase's snapshots meet that phase's storage
            time.sleep(SETTLE_S)
            twin_phase(p)
            keep(lambda: record_steps([rec, *set_aside]), seen_record)
            keep(lambda: event_steps(tb), seen_events)
            if p.name == "full":
                ballast = fill(mnt)
            elif p.name == "freed" and ballast is not None:
                ballast.unlink()
            elif p.name == "deleted":
                shutil.rmtree(run, ignore_errors=True)
            elif p.name == "read-only":
                run.mkdir(parents=True, exist_ok=True)
                mount("-t", "tmpfs", "-o", "ro,size=1m", "gradmon-chaos-ro", str(run))
                overlay.touch()
            elif p.name == "remounted" and overlay.exists():
                umount(run)
                overlay.unlink()
            elif p.name == "hung":
                aside = run / f"record.before-hang.{step}.jsonl"
                with contextlib.suppress(OSError):
                    rec.rename(aside)
                    set_aside.append(aside)
                os.mkfifo(rec)
            elif p.name == "unhung":
                fifo_reader = FifoReader(rec)
            elif p.name == "scrapers":
                if fifo_reader is not None:  # the FIFO goes, a regular file comes back
                    rec.unlink()
                    seen_record |= set(fifo_reader.close())
                    fifo_reader = None
                misbehaving = Misbehaving(mon.port)
                misbehaving.start()
            elif p.name == "final" and misbehaving is not None:
                misbehaving.close()
                misbehaving = None
            # -- train for the phase's wall time
            p.errors_before = sink_errors(mon.port)
            scraper.phase = p
            end = time.monotonic() + wall[p.name]
            while time.monotonic() < end:
                t0 = time.perf_counter()
                losses.append(train_step(model, opt, batches.next()))
                p.times.append(time.perf_counter() - t0)
                p.steps.append(step)
                step += 1
            scraper.phase = None
            p.errors_after = sink_errors(mon.port)
        t_close = time.perf_counter()
        mon.close()
        close_s = time.perf_counter() - t_close
    finally:
        scraper.stop.set()
        if misbehaving is not None:
            misbehaving.close()
        if fifo_reader is not None:
            seen_record |= set(fifo_reader.close())
        mon.close()
        try:
            keep(lambda: record_steps([rec, *set_aside]), seen_record)
            keep(lambda: event_steps(tb), seen_events)
        finally:
            if overlay.exists():
                umount(run)
            if mounted:
                umount(mnt)
            shutil.rmtree(tmp, ignore_errors=True)

    same = min(len(losses), len(twin_losses))
    rows = []
    for p in phases:
        row: dict[str, Any] = {"phase": p.name}
        if p.skipped:
            row["skipped"] = p.skipped
            rows.append(row)
            continue
        ms = [t * 1e3 for t in p.times]
        twin_ms = [t * 1e3 for t in p.twin_times]
        in_phase = set(p.steps)
        row.update(
            twin_steps=p.twin_steps,
            steps=len(p.steps),
            twin_ms_median=statistics.median(twin_ms) if twin_ms else None,
            ms_median=statistics.median(ms) if ms else None,
            ms_worst=max(ms) if ms else None,
            twin_ms_worst=max(twin_ms) if twin_ms else None,
            sink_errors=p.errors_after - p.errors_before,
            published=len(in_phase),
            record_lines=len(in_phase & seen_record),
            tb_steps=len(in_phase & seen_events),
            scrapes_ok=p.scrapes_ok,
            scrapes_failed=p.scrapes_failed,
            scrape_worst_s=p.scrape_worst_s,
        )
        rows.append(row)
    return {
        "rows": rows,
        "attach_s": attach_s,
        "close_s": close_s,
        "losses_equal": losses[:same] == twin_losses[:same],
        "compared_steps": same,
        "mounted": mounted,
    }


def table(r: dict[str, Any]) -> str:
    head = (
        "| phase | steps (twin) | ms/step median (twin) | worst ms (twin) | sink errors | "
        "record lines / published | TensorBoard steps | polite scrapes ok/failed (worst s) |"
    )
    out = [head, "|" + "---|" * 8]
    for row in r["rows"]:
        if "skipped" in row:
            out.append(f"| {row['phase']} | skipped: {row['skipped']} |" + " |" * 6)
            continue
        out.append(
            f"| {row['phase']} | {row['steps']} ({row['twin_steps']}) | "
            f"{row['ms_median']:.2f} ({row['twin_ms_median']:.2f}) | "
            f"{row['ms_worst']:.0f} ({row['twin_ms_worst']:.0f}) | "
            f"{row['sink_errors']:.0f} | {row['record_lines']} / {row['published']} | "
            f"{row['tb_steps']} | {row['scrapes_ok']}/{row['scrapes_failed']} "
            f"({row['scrape_worst_s']:.2f}) |"
        )
    done = [row for row in r["rows"] if "skipped" not in row]
    steps, twin_steps = sum(x["steps"] for x in done), sum(x["twin_steps"] for x in done)
    lines = sum(x["record_lines"] for x in done)
    published = sum(x["published"] for x in done)
    out.append(
        f"| all | {steps} ({twin_steps}): {steps / twin_steps:.2f}x | | | "
        f"{sum(x['sink_errors'] for x in done):.0f} | {lines} / {published} | "
        f"{sum(x['tb_steps'] for x in done)} | "
        f"{sum(x['scrapes_ok'] for x in done)}/{sum(x['scrapes_failed'] for x in done)} |"
    )
    out.append(
        f"\nattach() {r['attach_s'] * 1e3:.1f} ms, close() {r['close_s'] * 1e3:.0f} ms; "
        f"losses equal to the twin's over {r['compared_steps']} steps: {r['losses_equal']}"
    )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-seconds", type=float, default=3.0)
    parser.add_argument(
        "--hang-seconds", type=float, default=7.0, help="longer than stall_after (5 s)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = run_chaos(args.phase_seconds, args.hang_seconds)
    print(json.dumps(r, indent=2) if args.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
