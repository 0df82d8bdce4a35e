"""What the sinks share: a storage thread of their own (writer.py) behind QueuedSink,
`{rank}` paths, numbers."""

from __future__ import annotations

import atexit
import math
from typing import Generic, Protocol, TypeVar

from gradmon.agent.distributed import process_rank
from gradmon.sinks.writer import ErrorFn, Storage, StorageWriter

T = TypeVar("T")


class QueueSettings(Protocol):
    max_queue: int
    stall_after: float
    close_timeout: float


class QueuedSink(Generic[T]):
    """A sink's storage thread (a StorageWriter), its counts, and its close: once, bounded
    by close_timeout, and also at exit (the thread is a daemon: a script that never closes
    its Monitor still gets what is queued written)."""

    def __init__(
        self,
        kind: str,
        where: str,
        storage: Storage[T],
        config: QueueSettings,
        on_error: ErrorFn | None,
    ) -> None:
        self._writer: StorageWriter[T] = StorageWriter(
            kind,
            where,
            storage,
            max_queue=config.max_queue,
            on_error=on_error,
            stall_after=config.stall_after,
            close_timeout=config.close_timeout,
        )
        self._closed = False
        atexit.register(self.close)

    @property
    def lost(self) -> int:
        """Snapshots that did not reach the storage (storage errors, full queue, close)."""
        return self._writer.lost

    @property
    def written(self) -> int:
        """Snapshots the storage accepted."""
        return self._writer.written

    def close(self) -> None:
        """Write what is queued and close the storage, waiting at most close_timeout
        seconds. Idempotent; also runs at exit."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._writer.close()


def expand_path(template: str, field: str) -> str:
    """`{rank}` in a configured path -> this process's rank (one file per rank)."""
    try:
        return template.format(rank=process_rank())
    except (KeyError, IndexError, ValueError) as exc:
        from gradmon.errors import GradmonError

        raise GradmonError(
            f"{field}={template!r}: only the placeholder {{rank}} is allowed ({exc!r})"
        ) from None


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/Inf: they are written as null."""
    return value if math.isfinite(value) else None
