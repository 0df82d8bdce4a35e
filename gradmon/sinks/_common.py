"""What the sinks share: a background writer thread, `{rank}` paths, number conversion."""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

log = logging.getLogger("gradmon")

T = TypeVar("T")


class SinkWriterError(RuntimeError):
    """A sink's writer thread failed or fell behind; raised on the training thread's next
    call, where the monitor counts it (gradmon_agent_errors_total{stage="sink"})."""


class BackgroundWriter(Generic[T]):
    """One daemon thread doing a sink's slow work (formatting, file I/O) off the training
    thread, fed through a bounded queue.

    The thread wakes every `interval` seconds (or once the queue is half full, or on
    close) and drains the queue in one go. Waking per item would cost the training
    thread a GIL hand-over at every step (measured: ~0.5 ms per step on a busy 2-core
    machine); a few wake-ups per second cost nothing noticeable.

    `submit()` never blocks: a full queue drops the item and raises SinkWriterError, so a
    slow disk costs snapshots, never training time. An exception inside `handle` is kept
    and raised by the next `submit()`/`close()`. `idle()` runs after each drain (flush
    there).
    """

    def __init__(
        self,
        name: str,
        handle: Callable[[T], None],
        idle: Callable[[], None],
        max_queue: int,
        interval: float = 0.5,
    ) -> None:
        self.name = name
        self._handle = handle
        self._idle = idle
        self._interval = interval
        self._queue: queue.Queue[T] = queue.Queue(maxsize=max_queue)
        self._wake_at = max(1, max_queue // 2)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.dropped = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"gradmon-{name}", daemon=True)
        self._thread.start()

    def submit(self, item: T) -> None:
        self.raise_pending()
        if self._closed:
            raise SinkWriterError(f"{self.name}: submit() after close()")
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            self._wake.set()
            raise SinkWriterError(
                f"{self.name}: writer queue full ({self._queue.maxsize} items); one dropped "
                f"({self.dropped} so far). Raise max_queue or check the disk."
            ) from None
        if self._queue.qsize() >= self._wake_at:
            self._wake.set()

    def raise_pending(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise SinkWriterError(f"{self.name}: writer thread failed: {error!r}") from error

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        wrote = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._call(self._handle, item)
            wrote = True
        if wrote:
            self._call(self._idle)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # kept for the training thread to count
            if self._error is None:
                self._error = exc

    def close(self, timeout: float = 60.0) -> None:
        """Write what is queued, stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise SinkWriterError(f"{self.name}: writer thread did not finish in {timeout:.0f} s")
        self.raise_pending()


def current_rank() -> int:
    """This process's rank: torch.distributed when initialized, else $RANK, else 0."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def expand_path(template: str, field: str) -> str:
    """`{rank}` in a configured path -> this process's rank (one file per rank)."""
    try:
        return template.format(rank=current_rank())
    except (KeyError, IndexError, ValueError) as exc:
        from gradmon.errors import GradmonError

        raise GradmonError(
            f"{field}={template!r}: only the placeholder {{rank}} is allowed ({exc!r})"
        ) from None


def to_float(value: Any) -> float:
    """A float from a Python number or a one-element tensor. On a GPU tensor this syncs:
    call it on a writer thread, never on the training thread."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(()).item())  # sync-ok: writer thread only
    return float(value)


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/Inf: they are written as null."""
    return value if math.isfinite(value) else None
