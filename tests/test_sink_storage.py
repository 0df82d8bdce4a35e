"""Sinks on real failing storage: /dev/full, a FIFO nobody reads (a hung mount), a
read-only filesystem, a full filesystem, a directory deleted mid-run, a path that is a
directory.

Each test trains a monitored model beside an unmonitored twin (same weights, same
batches) and checks that training is untouched (identical losses), that attach() and the
steps never wait on the storage (run on a thread joined with a bound), that
gradmon_agent_errors_total{stage="sink"} rises in the registry while the storage fails,
that /metrics keeps answering over a real socket, that the failure is logged once with
the path and errno, and, where the storage can come back, that the sink writes again.

Read-only and full filesystems are tmpfs mounts made for the test (`mount -t tmpfs`,
`-o remount,ro`): running as root, chmod would not stop the writer, a mount does. Where
mount is not permitted (no CAP_SYS_ADMIN) those tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import gradmon
from gradmon.sinks import build_sinks
from gradmon.sinks.record import read_record
from tests.conftest import SmallNet
from tests.test_faults import batches, step

# Short stall/close bounds keep the hung-storage tests quick; the defaults are 5 s.
FAST = {"stall_after": 0.5, "close_timeout": 1.0}
BOUND = 60.0  # seconds: the most any wait below may take before the test fails


def until(cond: Callable[[], bool], timeout: float = BOUND) -> bool:
    """Poll a condition (a bounded wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def bounded(fn: Callable[[], Any], what: str) -> Any:
    """Run fn on a thread and fail (rather than hang) if it does not return."""
    box: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), f"{what} waited on the storage"
    if errors:
        raise errors[0]
    return box[0]


class Run:
    """A monitored training run beside its unmonitored twin, served on a real port."""

    STEPS = 60

    def __init__(self, config: dict[str, Any]) -> None:
        model = SmallNet()
        twin = copy.deepcopy(model)
        self.batches = batches(self.STEPS)
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05)
        self.want = [step(twin, twin_opt, x) for x in self.batches]
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.05)
        self.losses: list[float] = []
        cfg = {"exporter": {"port": 0}, **config}
        self.mon: gradmon.Monitor = bounded(
            lambda: gradmon.attach(model, self.opt, config=cfg, registry=CollectorRegistry()),
            "attach()",
        )

    def train(self, n: int) -> list[int]:
        """n more steps (on a bounded thread); the steps' numbers."""
        first = len(self.losses)

        def go() -> None:
            for x in self.batches[first : first + n]:
                self.losses.append(step(self.model, self.opt, x))

        bounded(go, "a training step")
        return list(range(first, first + n))

    def sink_errors(self) -> float:
        value = self.mon.registry.get_sample_value("gradmon_agent_errors_total", {"stage": "sink"})
        return value or 0.0

    def scraped_sink_errors(self) -> float:
        url = f"http://127.0.0.1:{self.mon.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "gradmon_agent_errors_total" and s.labels.get("stage") == "sink":
                    return float(s.value)
        raise AssertionError("no gradmon_agent_errors_total{stage=sink} in /metrics")

    def errors_rise(self, above: float = 0.0) -> None:
        """The counter rises above `above` while the storage fails; scrapes answer."""
        assert until(lambda: self.sink_errors() > above), "storage errors were not counted"
        assert self.scraped_sink_errors() > above

    def finish(self) -> None:
        bounded(self.mon.close, "close()")
        assert self.losses == self.want[: len(self.losses)]  # training untouched


def logged_once(caplog: pytest.LogCaptureFixture, path: Path | str, *words: str) -> None:
    said = [
        r.getMessage()
        for r in caplog.records
        if str(path) in r.getMessage() and " failed: " in r.getMessage()
    ]
    assert len(said) == 1, said
    for word in words:
        assert word in said[0]


def steps_in(path: Path) -> list[int]:
    """The steps of a record file, checking that it holds whole JSON lines only."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "torn last line"
    return [json.loads(line)["step"] for line in data.splitlines()]


def record(path: Path | str, **extra: Any) -> dict[str, Any]:
    return {"record": {"path": str(path), **FAST, **extra}}


# ------------------------------------------------------------------ mounts
class Tmpfs:
    """A tmpfs mounted on a directory for one test; unmounted (lazily) afterwards."""

    def __init__(self, where: Path, size: str) -> None:
        self.where = where
        where.mkdir()
        self._mount("-t", "tmpfs", "-o", f"size={size}", "gradmon-test", str(where))

    @staticmethod
    def _mount(*args: str) -> None:
        subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)

    def readonly(self) -> None:
        self._mount("-o", "remount,ro", str(self.where))

    def writable(self) -> None:
        self._mount("-o", "remount,rw", str(self.where))

    def fill(self) -> Path:
        """Fill the filesystem with a ballast file (to the last byte); its path."""
        ballast = self.where / "ballast"
        with open(ballast, "wb", buffering=0) as f:
            for chunk in (1 << 16, 1 << 12, 1 << 8, 1):
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * chunk)
        return ballast

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.where)], capture_output=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Tmpfs]]:
    made: list[Tmpfs] = []

    def make(size: str = "1m") -> Tmpfs:
        try:
            fs = Tmpfs(tmp_path / f"mnt{len(made)}", size)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"mount -t tmpfs is not permitted here ({exc}): needs CAP_SYS_ADMIN")
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.unmount()


# ------------------------------------------------------------------ record file
def test_dev_full(caplog: pytest.LogCaptureFixture) -> None:
    run = Run(record("/dev/full"))
    run.train(4)
    run.errors_rise()
    seen = run.sink_errors()
    run.train(4)
    run.errors_rise(seen)  # every failing batch counts, while it fails
    run.finish()
    logged_once(caplog, "/dev/full", "[Errno 28 ENOSPC]")


def test_fifo_with_no_reader_is_a_hung_storage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """open() of a FIFO blocks until a reader comes: a hung NFS/FUSE mount, reproducibly."""
    fifo = tmp_path / "record.jsonl"
    os.mkfifo(fifo)
    reader: int | None = None
    try:
        run = Run(record(fifo))  # attach() returns: nothing opened on this thread
        run.train(6)
        run.errors_rise()  # the watchdog counts the hang while it lasts
        said = [r.getMessage() for r in caplog.records if "has not answered" in r.getMessage()]
        assert len(said) == 1 and str(fifo) in said[0] and "open" in said[0]
        # A reader comes (the mount answers again): the queued lines arrive.
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        got = b""

        def read_some() -> bool:
            nonlocal got
            with contextlib.suppress(BlockingIOError):
                got += os.read(reader, 1 << 20)
            return got.count(b"\n") >= 6

        assert until(read_some)
        assert [json.loads(line)["step"] for line in got.splitlines()][:6] == list(range(6))
        run.finish()
    finally:
        if reader is not None:
            os.close(reader)


def test_fifo_hung_at_close_is_left_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fifo = tmp_path / "record.jsonl"
    os.mkfifo(fifo)
    try:
        run = Run(record(fifo))
        run.train(3)
        run.errors_rise()
        snap = run.mon.snapshot()
        assert snap is not None
        run.finish()  # bounded: waits close_timeout, leaves the sink's thread behind
        said = [r.getMessage() for r in caplog.records if "left behind" in r.getMessage()]
        assert len(said) == 1 and str(fifo) in said[0] and "3 snapshots unwritten" in said[0]
        # The monitor's counter is gone with the monitor; the seam got the error.
        errors: list[BaseException] = []
        (sink,) = build_sinks(gradmon.Config.model_validate(record(fifo)), errors.append)
        sink.on_publish(snap, {})
        bounded(sink.close, "a sink's close()")
        assert any("left behind" in str(e) for e in errors)
    finally:
        # Release the threads left behind (a reader opens the FIFO, then goes away).
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))


def test_read_only_filesystem(
    tmpfs: Callable[[str], Tmpfs], caplog: pytest.LogCaptureFixture
) -> None:
    fs = tmpfs("1m")
    fs.readonly()
    path = fs.where / "run" / "record.jsonl"
    run = Run(record(path))
    lost = run.train(4)
    run.errors_rise()
    fs.writable()  # the storage comes back
    kept = run.train(4)
    assert until(lambda: path.exists() and set(kept) <= set(steps_in(path)))
    run.finish()
    assert not set(lost) & set(steps_in(path))  # only what came while it failed is lost
    logged_once(caplog, path, "[Errno 30 EROFS]")
    assert any("writing" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)


def test_full_filesystem_loses_only_what_came_while_full(
    tmpfs: Callable[[str], Tmpfs], caplog: pytest.LogCaptureFixture
) -> None:
    fs = tmpfs("256k")
    path = fs.where / "record.jsonl"
    run = Run(record(path))
    before = run.train(3)
    assert until(lambda: path.exists() and set(before) <= set(steps_in(path)))
    ballast = fs.fill()  # full to the last byte: the next line is written in part, refused
    during = run.train(4)
    run.errors_rise()
    assert steps_in(path)[: len(before)] == before  # whole lines: a refused part is cut off
    ballast.unlink()  # space freed
    after = run.train(4)
    assert until(lambda: set(after) <= set(steps_in(path)))
    run.finish()
    steps = steps_in(path)
    assert steps[: len(before)] == before and steps[-len(after) :] == after
    assert len(steps) < len(before) + len(during) + len(after)  # some were lost, no more
    assert [r["step"] for r in read_record(path)] == steps
    logged_once(caplog, path, "[Errno 28 ENOSPC]")


def test_directory_deleted_mid_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logdir = tmp_path / "logs"
    path = logdir / "record.jsonl"
    run = Run(record(path))
    before = run.train(3)
    assert until(lambda: path.exists() and set(before) <= set(steps_in(path)))
    shutil.rmtree(logdir)
    after = run.train(3)
    run.errors_rise()  # the open file is no longer the path: counted, opened again
    assert until(lambda: path.exists() and set(after) <= set(steps_in(path)))
    run.finish()
    logged_once(caplog, path, "[Errno 2 ENOENT]", "deleted")


def test_path_is_a_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "record.jsonl"
    path.mkdir()
    run = Run(record(path))
    run.train(3)
    run.errors_rise()
    path.rmdir()  # fixed: the sink makes the file
    after = run.train(3)
    assert until(lambda: path.is_file() and set(after) <= set(steps_in(path)))
    run.finish()
    logged_once(caplog, path, f"[Errno {errno.EISDIR} EISDIR]")


def test_torn_last_line_of_a_killed_run_is_cut_before_appending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "record.jsonl"
    run = Run(record(path))
    run.train(2)
    run.finish()
    with open(path, "ab") as f:
        f.write(b'{"step": 99, "layers": {"fc')  # a writer killed mid-line
    with caplog.at_level(logging.WARNING, logger="gradmon"):
        assert [r["step"] for r in read_record(path)] == [0, 1]  # skipped, with a warning
    assert any("torn last line" in r.getMessage() for r in caplog.records)
    again = Run(record(path))  # append mode: the torn line is cut off, not continued
    again.train(2)
    again.finish()
    assert steps_in(path) == [0, 1, 0, 1]


# ------------------------------------------------------------------ TensorBoard
def tensorboard(logdir: Path) -> dict[str, Any]:
    return {"tensorboard": {"logdir": str(logdir), "histogram_every": 1, **FAST}}


def event_steps(logdir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    try:
        mux = EventMultiplexer()
        mux.AddRunsFromDirectory(str(logdir))
        mux.Reload()
        return sorted(e.step for run in mux.Runs() for e in mux.Scalars(run, "global/grad_norm"))
    except Exception:  # not there yet
        return []


def test_tensorboard_read_only_then_writable(
    tmpfs: Callable[[str], Tmpfs], caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("tensorboard")
    fs = tmpfs("4m")
    fs.readonly()
    logdir = fs.where / "tb"
    run = Run(tensorboard(logdir))
    run.train(3)
    run.errors_rise()
    fs.writable()
    after = run.train(3)
    assert until(lambda: set(after) <= set(event_steps(logdir)))
    run.finish()
    logged_once(caplog, logdir, "[Errno 30 EROFS]")


def test_tensorboard_logdir_deleted_mid_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("tensorboard")
    logdir = tmp_path / "tb"
    run = Run(tensorboard(logdir))
    before = run.train(3)
    assert until(lambda: set(before) <= set(event_steps(logdir)))
    shutil.rmtree(logdir)
    run.train(3)
    run.errors_rise()
    after = run.train(3)
    assert until(lambda: set(after) <= set(event_steps(logdir)))  # a new event file
    run.finish()
    logged_once(caplog, logdir, "[Errno 2 ENOENT]")


# TensorBoard's own event thread dies on ENOSPC with a traceback (threading.excepthook);
# the sink sees the error at its next flush, counts it and opens a new writer.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_tensorboard_full_filesystem(
    tmpfs: Callable[[str], Tmpfs], caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("tensorboard")
    fs = tmpfs("512k")
    logdir = fs.where / "tb"
    run = Run(tensorboard(logdir))
    before = run.train(2)
    assert until(lambda: set(before) <= set(event_steps(logdir)))
    ballast = fs.fill()
    run.train(3)
    run.errors_rise()
    ballast.unlink()
    after = run.train(3)
    assert until(lambda: set(after) <= set(event_steps(logdir)))
    run.finish()
    logged_once(caplog, logdir, "ENOSPC")
