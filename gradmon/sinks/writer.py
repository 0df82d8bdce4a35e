"""A sink's storage thread: every open, mkdir, write, flush, fsync and close of a sink runs
here, fed by a bounded queue, so that storage that fails or hangs never touches training.

The training thread only calls `submit()` (a non-blocking put) and `close()` (which waits
at most `close_timeout` seconds). Storage errors are reported while they happen:

- a storage call that raises (ENOSPC, EROFS, EISDIR, a deleted directory...): the batch
  being written is lost, one error is reported, the failure is logged once per episode
  with the path and errno, and the next batch tries again (reopening: mkdir, open), so
  the sink recovers when the storage does; the recovery is logged with what was lost;
- a storage call that does not return (a hung NFS/FUSE mount; a FIFO nobody reads):
  a shared watchdog thread reports one error per `interval` once the call has run for
  `stall_after` seconds, and logs it once with the path and the call;
- a full queue (the storage thread is slower than training, or hung): the snapshot is
  dropped and one error is reported;
- `close()` past its timeout: the thread is left behind (daemon; it finishes on its own if
  the storage ever answers), one error is reported and the path is logged.

Errors are reported through `on_error(exc)`: the agent's seam into
gradmon_agent_errors_total{stage="sink"}; it is called from the storage thread, the
watchdog thread or the caller's thread, so it must be thread-safe. Without one, errors are
kept and raised (several as one SinkWriterError) by the next `submit()`/`close()` on the
caller's thread, where a guard can count them.
"""

from __future__ import annotations

import errno as errno_module
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("gradmon")

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

ErrorFn = Callable[[BaseException], None]

__all__ = [
    "ErrorFn",
    "SinkWriterError",
    "Storage",
    "StorageWriter",
    "describe_error",
]


class SinkWriterError(RuntimeError):
    """A sink's storage failed, hung, fell behind or was left behind at close."""


class Storage(Protocol[T_contra]):
    """The I/O of one sink. Only its StorageWriter's thread ever calls these."""

    def open(self) -> None:
        """Make directories, open files. Called before a batch whenever not open."""

    def verify(self) -> None:
        """Raise OSError when what is open no longer is the configured path (deleted or
        replaced): the writer then reopens. Called before each batch while open."""

    def write(self, item: T_contra) -> None:
        """Write one item. OSError means the storage failed (the rest of the batch is lost
        and the storage reopened); any other exception loses only this item."""

    def flush(self) -> None:
        """After each batch: push what was written to the storage (flush, fsync)."""

    def abandon(self) -> None:
        """Forget what is open after a failure; never raises."""

    def close(self) -> None:
        """Close what is open (the writer is stopping)."""


def describe_error(exc: BaseException) -> str:
    """`[Errno 28 ENOSPC] No space left on device` for an OSError, else repr()."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno_module.errorcode.get(exc.errno, "?")
        return f"[Errno {exc.errno} {name}] {exc.strerror or exc}"
    return repr(exc)


class StorageWriter(Generic[T]):
    """One daemon thread driving a Storage, fed through a bounded queue (see module doc).

    The thread wakes every `interval` seconds (or once the queue is half full, or on
    close) and writes what is queued in one batch, then flushes. Waking per item would
    cost the training thread a GIL hand-over at every step (measured: ~0.5 ms per step on
    a busy 2-core machine); a few wake-ups per second cost nothing noticeable.
    """

    def __init__(
        self,
        name: str,
        path: str,
        storage: Storage[T],
        *,
        max_queue: int,
        on_error: ErrorFn | None = None,
        interval: float = 0.5,
        stall_after: float = 5.0,
        close_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.path = path
        self._storage = storage
        self._on_error = on_error
        self._interval = interval
        self._stall_after = stall_after
        self._close_timeout = close_timeout
        self._queue: queue.Queue[T] = queue.Queue(maxsize=max_queue)
        self._wake_at = max(1, max_queue // 2)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the counters below and the pending errors
        self._pending: list[BaseException] = []
        self.written = 0  # items the storage accepted
        self.lost = 0  # items dropped: failed writes, a full queue, left behind at close
        self.errors = 0  # errors reported (what on_error got)
        self._opened = False
        self._in_hand = 0  # items the storage thread took from the queue and is writing
        self._failing = False  # inside a failure episode (logged once per episode)
        self._item_failure_logged = False
        self._drop_logged = False
        self._episode_errors = 0
        self._episode_lost = 0
        # (call, monotonic start) of the storage call in progress: read by the watchdog
        self._busy: tuple[str, float] | None = None
        self._stalled = False
        self._next_stall_report = 0.0
        self._closed = False
        self.left_behind = False
        self._thread = threading.Thread(target=self._run, name=f"gradmon-{name}", daemon=True)
        self._thread.start()
        _watchdog.add(self)

    # ------------------------------------------------------------- caller's thread
    def submit(self, item: T) -> None:
        """Queue an item; never blocks. A full queue drops it (reported)."""
        self._raise_pending()
        if self._closed:
            raise SinkWriterError(f"{self.name} sink ({self.path}): submit() after close()")
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.lost += 1
                self._episode_lost += 1
            self._wake.set()
            if not self._drop_logged:
                self._drop_logged = True
                log.warning(
                    "gradmon: %s sink: %d snapshots are waiting for the storage at %s; "
                    "the queue is full, so snapshots are dropped until it drains (counted in "
                    'gradmon_agent_errors_total{stage="sink"}; further drops are not logged)',
                    self.name,
                    self._queue.maxsize,
                    self.path,
                )
            self._report(
                SinkWriterError(
                    f"{self.name} sink ({self.path}): queue full ({self._queue.maxsize} "
                    f"snapshots waiting for storage); one dropped ({self.lost} lost so far)"
                )
            )
            self._raise_pending()
            return
        if self._queue.qsize() >= self._wake_at:
            self._wake.set()

    def close(self) -> None:
        """Write what is queued and close the storage, waiting at most close_timeout
        seconds; past it the thread is left behind (reported, logged with the path).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(self._close_timeout)
        _watchdog.discard(self)
        if self._thread.is_alive():
            self.left_behind = True
            busy = self._busy
            doing = f"{busy[0]} running for {time.monotonic() - busy[1]:.1f} s" if busy else "busy"
            unwritten = self._queue.qsize() + self._in_hand
            with self._lock:
                self.lost += unwritten
            log.warning(
                "gradmon: %s sink: storage at %s did not finish within close_timeout=%.1f s "
                "(%s); left behind with %d snapshots unwritten (its thread finishes on its "
                "own if the storage answers)",
                self.name,
                self.path,
                self._close_timeout,
                doing,
                unwritten,
            )
            self._report(
                SinkWriterError(
                    f"{self.name} sink ({self.path}): left behind at close after "
                    f"{self._close_timeout:.1f} s ({doing})"
                )
            )
        self._raise_pending()

    def _raise_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:
            more = f" (+{len(pending) - 1} more)" if len(pending) > 1 else ""
            raise SinkWriterError(f"{pending[-1]}{more}") from pending[-1]

    # ------------------------------------------------------------ any thread
    def _report(self, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
            self._episode_errors += 1
            if self._on_error is None:
                self._pending.append(exc)
                del self._pending[:-100]  # bounded, however long nobody asks
                return
        try:
            self._on_error(exc)
        except Exception:  # the agent's counter must not kill the storage thread
            log.debug("gradmon: %s sink: on_error failed", self.name, exc_info=True)

    def check_stall(self, now: float) -> None:
        """The watchdog's call: report a storage call that has not returned."""
        busy = self._busy
        if busy is None or now - busy[1] < self._stall_after or now < self._next_stall_report:
            return
        self._next_stall_report = now + self._interval
        call, since = busy
        if not self._stalled:
            self._stalled = True
            log.warning(
                "gradmon: %s sink: storage at %s has not answered for %.1f s (%s); counted in "
                'gradmon_agent_errors_total{stage="sink"} every %.1f s while it hangs, '
                "snapshots queue up and are dropped when the queue is full",
                self.name,
                self.path,
                now - since,
                call,
                self._interval,
            )
        self._report(
            SinkWriterError(
                f"{self.name} sink ({self.path}): {call} has not returned for {now - since:.1f} s"
            )
        )

    # ------------------------------------------------------------ storage thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            self._drain()
        self._drain()
        if self._opened:
            try:
                self._call("close", self._storage.close)
            except Exception as exc:
                self._failed("close", exc, 0)

    def _call(self, call: str, fn: Callable[..., None], *args: object) -> None:
        self._busy = (call, time.monotonic())
        try:
            fn(*args)
        finally:
            self._busy = None
            if self._stalled:
                self._stalled = False
                log.warning(
                    "gradmon: %s sink: storage at %s answered again (%s)",
                    self.name,
                    self.path,
                    call,
                )

    def _drain(self) -> None:
        items: list[T] = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not items:
            return
        self._in_hand = len(items)
        try:
            self._write_batch(items)
        finally:
            self._in_hand = 0

    def _write_batch(self, items: list[T]) -> None:
        done = failed_items = 0
        call = "open"
        try:
            if self._opened:
                call = "check"
                try:
                    self._call("check", self._storage.verify)
                except OSError as exc:  # deleted or replaced: reopen below, nothing lost
                    self._failed("check", exc, 0)
                    self._abandon()
            if not self._opened:
                call = "open"
                self._call("open", self._storage.open)
                self._opened = True
            call = "write"
            for item in items:
                try:
                    self._call("write", self._storage.write, item)
                except OSError:
                    raise
                except Exception as exc:  # this item only (formatting, a bad scalar)
                    failed_items += 1
                    self._failed("write", exc, 1, storage=False)
                done += 1
            call = "flush"
            self._call("flush", self._storage.flush)
        except Exception as exc:
            lost = len(items) - (failed_items if call == "flush" else done)
            self._failed(call, exc, lost)
            self._abandon()
            return
        with self._lock:
            self.written += len(items) - failed_items
        if self._failing:
            self._failing = False
            with self._lock:
                errors, lost = self._episode_errors, self._episode_lost
            log.warning(
                "gradmon: %s sink: writing %s again (%d errors, %d snapshots lost meanwhile)",
                self.name,
                self.path,
                errors,
                lost,
            )
        with self._lock:
            self._episode_errors = self._episode_lost = 0

    def _abandon(self) -> None:
        if self._opened:
            self._opened = False
            self._storage.abandon()

    def _failed(self, call: str, exc: BaseException, lost: int, storage: bool = True) -> None:
        with self._lock:
            self.lost += lost
            self._episode_lost += lost
        if storage and not self._failing:
            self._failing = True
            log.warning(
                "gradmon: %s sink: %s of %s failed: %s; counted in "
                'gradmon_agent_errors_total{stage="sink"}, snapshots are dropped until it '
                "works again (tried every %.1f s while snapshots come)",
                self.name,
                call,
                self.path,
                describe_error(exc),
                self._interval,
            )
        elif not storage and not self._item_failure_logged:
            self._item_failure_logged = True
            log.warning(
                "gradmon: %s sink: a snapshot could not be written to %s and was dropped "
                '(counted in gradmon_agent_errors_total{stage="sink"}; further ones are not '
                "logged): %r",
                self.name,
                self.path,
                exc,
                exc_info=exc,
            )
        self._report(SinkWriterError(f"{self.name} sink ({self.path}): {call} failed: {exc}"))


class _Watchdog:
    """One daemon thread for all live StorageWriters: reports storage calls that hang.
    Runs only while some writer is open, waking every 0.25 s."""

    PERIOD = 0.25

    def __init__(self) -> None:
        self._writers: weakref.WeakSet[StorageWriter[object]] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, writer: StorageWriter[T]) -> None:
        with self._lock:
            self._writers.add(writer)  # type: ignore[arg-type]
            if self._thread is None or not self._thread.is_alive():  # none yet, or forked
                self._thread = threading.Thread(
                    target=self._run, name="gradmon-sink-watchdog", daemon=True
                )
                self._thread.start()

    def reset_in_child(self) -> None:
        """After fork: the parent's writers and watchdog thread do not exist here."""
        self._writers = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread = None

    def discard(self, writer: StorageWriter[T]) -> None:
        with self._lock:
            self._writers.discard(writer)  # type: ignore[arg-type]

    def _run(self) -> None:
        while True:
            time.sleep(self.PERIOD)
            with self._lock:
                writers = list(self._writers)
                if not writers:
                    self._thread = None
                    return
            now = time.monotonic()
            for writer in writers:
                try:
                    writer.check_stall(now)
                except Exception:  # pragma: no cover - never stop watching the others
                    log.debug("gradmon: sink watchdog failed", exc_info=True)


_watchdog = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_watchdog.reset_in_child)
