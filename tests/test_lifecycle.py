"""close() at any point, process exit and signals, fork: no hung thread, no bound port.

Real training, a real server on port 0; "the port is free" is checked by listening on
it again. Subprocesses are given generous timeouts: a hang fails, speed is not judged.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import gradmon
from gradmon.stats import Col, reference
from tests.conftest import SmallNet, train_step

from . import probes, readings

SERVED = {"exporter": {"port": 0}}
ROOT = Path(__file__).resolve().parents[1]


def port_is_free(port: int) -> bool:
    """Whether a new socket can listen on the port (SO_REUSEADDR, as the server sets it:
    connections in TIME_WAIT do not count, a socket listening in any process does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


def scrape_ok(port: int | None) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return bool(resp.status == 200 and b"gradmon_steps_total" in resp.read())


def hooks_left(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Gradient hooks a backward runs, plus step hooks (a SmallNet takes [n, 8])."""
    per_param = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    armed = probes.armed_grad_hooks(model, torch.randn(2, 8))
    return per_param + armed + len(opt._optimizer_step_pre_hooks)


def test_close_inside_a_backward_hook(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradmon.attach(net, opt, config=SERVED)
    port = mon.port
    assert port is not None
    train_step(net, opt)
    # fc1 accumulates last in backward: the agent closes while autograd is running.
    user_hook = net.fc1.weight.register_post_accumulate_grad_hook(lambda p: mon.close())
    before = [p.detach().clone() for p in net.parameters()]
    train_step(net, opt)
    assert mon.closed and readings.steps(mon) == 1  # the step after close() was not collected
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    user_hook.remove()
    assert hooks_left(net, opt) == 0
    assert port_is_free(port)


def test_close_between_backward_and_step_then_twice(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradmon.attach(net, opt, config=SERVED)
    opt.zero_grad()
    net(torch.randn(4, 8)).pow(2).mean().backward()
    mon.close()
    opt.step()
    mon.close()  # idempotent
    assert mon.closed and readings.steps(mon) == 0 and hooks_left(net, opt) == 0
    with pytest.raises(gradmon.GradmonError, match="closed"):
        mon.collect()


@pytest.mark.parametrize("attempt", range(3))
def test_close_from_another_thread_while_training(net: SmallNet, attempt: int) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradmon.attach(net, opt, config=SERVED)
    port = mon.port
    assert port is not None
    closed = threading.Event()
    started = threading.Event()

    def closer() -> None:
        started.wait()
        mon.close()
        closed.set()

    thread = threading.Thread(target=closer)
    thread.start()
    steps_after = 0
    for i in range(10_000):  # the trainer: must see no exception, whenever close() lands
        train_step(net, opt)
        if i == 2 + attempt:
            started.set()
        if closed.is_set():
            steps_after += 1
            if steps_after == 3:
                break
    thread.join(timeout=30)
    assert not thread.is_alive() and mon.closed
    assert hooks_left(net, opt) == 0
    assert port_is_free(port)
    assert not any(t.name == "gradmon-metrics" and t.is_alive() for t in threading.enumerate())


def test_attach_again_after_close(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    first = gradmon.attach(net, opt, config=SERVED)
    for _ in range(3):
        train_step(net, opt)
    first.close()
    with gradmon.attach(net, opt, config=SERVED) as mon:
        assert mon.port is not None and not mon.closed
        # One set of hooks, not two: the first backward's order is learned (gradient hooks).
        assert hooks_left(net, opt) == len(list(net.parameters())) + 1
        train_step(net, opt)
        snap = mon.snapshot()
        assert snap is not None and snap.step == 0 and readings.steps(mon) == 1
        for name, p in net.named_parameters():
            assert p.grad is not None
            want = math.sqrt(reference.tensor_partials(p.grad)[Col.SUM_SQ])
            assert snap.layers[name].norm == pytest.approx(want, rel=1e-6)
        assert scrape_ok(mon.port)
        assert hooks_left(net, opt) == 1  # the step hook; gradient hooks only when learning


SCRIPT = """
import signal, sys, time, torch
from torch import nn
import gradmon

mode = sys.argv[1]
if mode == "sigterm-exit":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
config = {"exporter": {"port": 0}}
if len(sys.argv) > 2:
    config["record"] = {"path": sys.argv[2]}
mon = gradmon.attach(model, opt, config=config)

def step():
    opt.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()

step()
print(mon.port, flush=True)
if mode == "return":
    step()  # and main returns without close(): exit must not wait on any thread
else:
    while True:
        step()
        time.sleep(0.001)
"""


def run_script(mode: str, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), proc.stderr.read() if proc.stderr else line
    return proc, int(line)


@pytest.mark.parametrize(("mode", "code"), [("sigterm", -signal.SIGTERM), ("sigterm-exit", 143)])
def test_sigterm_exits_promptly_and_frees_the_port(mode: str, code: int, tmp_path: Path) -> None:
    proc, port = run_script(mode, tmp_path)
    assert scrape_ok(port)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == code
    finally:
        proc.kill()
    assert port_is_free(port)


def test_returning_from_main_exits_and_flushes(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    proc, port = run_script("return", tmp_path, str(record))
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert port_is_free(port)
    assert len(record.read_text().splitlines()) >= 2  # closed at exit: the sink flushed


def child_report(mon: gradmon.Monitor, net: SmallNet, opt: torch.optim.Optimizer) -> str:
    """In a forked child: is the monitor inert? (That the child let go of the listening
    socket shows in the parent: its close() frees the port while the child lives.)"""
    steps, collections, snap = readings.steps(mon), readings.collections(mon), mon.snapshot()
    train_step(net, opt)
    inert = (
        mon.closed
        and readings.steps(mon) == steps
        and readings.collections(mon) == collections
        and mon.snapshot() is snap
        and hooks_left(net, opt) == 0
    )
    return str(int(inert))


def test_fork_child_is_inert_and_parent_close_frees_the_port(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradmon.attach(net, opt, config=SERVED)
    port = mon.port
    assert port is not None
    train_step(net, opt)
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then stay alive until the parent is done
        code = 1
        try:
            os.write(report_w, child_report(mon, net, opt).encode())
            os.read(go_r, 1)
            code = 0
        finally:
            os._exit(code)
    try:
        assert os.read(report_r, 100).decode() == "1"
        train_step(net, opt)
        assert readings.steps(mon) == 2 and scrape_ok(port)  # the parent goes on as before
        mon.close()
        assert port_is_free(port)  # while the child is still alive
    finally:
        os.write(go_w, b"x")
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


class Probe(Dataset[Any]):
    """Each item tells whether the monitor is inert in the (forked) worker process."""

    def __init__(self, mon: gradmon.Monitor, net: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.mon, self.net, self.opt = mon, net, opt

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([self.mon.closed, hooks_left(self.net, self.opt) == 0])


def test_dataloader_fork_workers(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradmon.attach(net, opt, config=SERVED)
    port = mon.port
    assert port is not None
    loader = DataLoader(
        Probe(mon, net, opt),
        batch_size=2,
        num_workers=2,
        multiprocessing_context="fork",
        persistent_workers=True,
    )
    batches = iter(loader)
    first = next(batches)
    assert bool(first.all())  # in the worker: closed, no hooks
    assert not mon.closed and hooks_left(net, opt) > 0 and scrape_ok(port)
    train_step(net, opt)
    assert readings.steps(mon) == 1
    mon.close()
    assert port_is_free(port)  # the workers are alive (persistent) and hold no copy
    assert all(bool(b.all()) for b in batches)
    del batches, loader


@pytest.mark.parametrize("user_hook_first", [True, False])
def test_close_from_a_step_hook_running_beside_ours(net: SmallNet, user_hook_first: bool) -> None:
    """A user's step pre-hook that closes the monitor while Optimizer.step iterates the
    hooks (torch raises "OrderedDict mutated during iteration" if ours is removed there):
    the step completes, ours is inert, and it is removed at the next backward."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    box: dict[str, Any] = {}
    if user_hook_first:
        opt.register_step_pre_hook(lambda *_: box["mon"].close())
    box["mon"] = mon = gradmon.attach(net, opt, config=SERVED)
    if not user_hook_first:
        opt.register_step_pre_hook(lambda *_: mon.close())
    train_step(net, opt)  # the user's hook closes the monitor inside this step
    assert mon.closed and port_is_free(mon.port or 0)
    steps = readings.steps(mon)
    train_step(net, opt)  # the backward removes the deferred hook; the step runs none
    assert readings.steps(mon) == steps
    assert len(opt._optimizer_step_pre_hooks) == 1  # the user's own hook only
    assert sum(len(p._post_accumulate_grad_hooks or {}) for p in net.parameters()) == 0


def test_close_from_another_thread_while_the_step_iterates_hooks(net: SmallNet) -> None:
    """Deterministic: the training thread is held inside Optimizer.step's hook loop (a
    user hook before ours waits) while another thread closes the monitor."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    inside, closed = threading.Event(), threading.Event()

    def hold(*_: Any) -> None:
        if not closed.is_set():
            inside.set()
            closed.wait(timeout=30)

    opt.register_step_pre_hook(hold)
    mon = gradmon.attach(net, opt, config=SERVED)
    closer = threading.Thread(target=lambda: (inside.wait(30), mon.close(), closed.set()))
    closer.start()
    train_step(net, opt)  # raised RuntimeError before the removal was deferred
    closer.join(timeout=30)
    assert mon.closed and not closer.is_alive()
    train_step(net, opt)
    assert len(opt._optimizer_step_pre_hooks) == 1  # only `hold` is left
