"""Monitors across process events: a fork (DataLoader workers) and interpreter exit.

- fork: the child gets a copy of every live monitor, its hooks and the server's
  listening socket, but none of its threads. There the monitor is made inert and the
  socket copy closed (`Monitor.after_fork_in_child`): the child collects nothing,
  serves nothing, and the parent's close() frees the port while workers still run.
- exit: monitors still open are closed (hooks removed, sinks flushed, server stopped,
  after its final scrape when the run finished: bounded, see Monitor.close());
  `exiting_after_exception()` tells them whether the process is dying of an exception.
  Every thread of the agent is a daemon thread, so none keeps the process alive.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import weakref
from typing import Protocol


class Tracked(Protocol):
    """What this module calls on a monitor."""

    def after_fork_in_child(self) -> None: ...

    def close(self) -> None: ...


_live: weakref.WeakSet[Tracked] = weakref.WeakSet()


def track(monitor: Tracked) -> None:
    """Follow a monitor until it is garbage: made inert in forked children, closed at exit."""
    _live.add(monitor)


def _after_fork_in_child() -> None:
    for monitor in list(_live):
        with contextlib.suppress(Exception):  # a child must start whatever happens
            monitor.after_fork_in_child()


_exiting = False


def exiting_after_exception() -> bool:
    """Whether the interpreter is exiting because an exception went unhandled (Python
    keeps it in sys.last_exc / sys.last_value): a run that died, not one that finished."""
    return _exiting and (
        getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None
    )


def _close_all() -> None:
    global _exiting
    _exiting = True
    for monitor in list(_live):
        with contextlib.suppress(Exception):
            monitor.close()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all)
