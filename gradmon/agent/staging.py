"""Pinned host buffers for the device-to-host copies of each collection, reused.

Allocating pinned memory (`cudaHostAlloc`) costs far more than the copy of a few rows of
partials, so every staging buffer comes from a small pool keyed by shape. A buffer goes
back to the pool only once the collection that used it has been published, i.e. its copy
has landed (its event completed) and its rows were read: a copy still in flight is never
overwritten. When every pooled buffer of a shape is still in flight (a slow GPU, a scrape
thread that has not published yet) a spare is allocated instead of waiting: the training
thread never waits. Past `keep` idle buffers per shape, returned spares are dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["EventLike", "Staged", "StagingPool"]


class EventLike(Protocol):
    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass
class Staged:
    """A block on its way to the host: `host` holds its rows once `ready()`."""

    host: torch.Tensor
    event: EventLike | None = None  # None: already on the host (CPU blocks)
    key: tuple[tuple[int, ...], torch.dtype] | None = None  # pool key; None: not pooled

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())


def _pinned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _cuda_event(block: torch.Tensor) -> EventLike:
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(block.device))
    return event


class StagingPool:
    """Reusable staging buffers; `alloc` and `record_event` are the seams for tests on the
    CPU (plain memory, an object whose `query()` says whether the copy landed)."""

    def __init__(
        self,
        keep: int = 4,
        alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] = _pinned,
        record_event: Callable[[torch.Tensor], EventLike] = _cuda_event,
    ) -> None:
        self.keep = keep
        self._alloc = alloc
        self._record_event = record_event
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        # Staging runs on the training thread, releasing on whoever publishes.
        self._lock = threading.Lock()
        self.allocations = 0  # buffers allocated so far (tests: reuse across steps)

    def stage(self, block: torch.Tensor) -> Staged:
        """Start a non-blocking copy of `block` into a pooled buffer, behind an event."""
        key = (tuple(block.shape), block.dtype)
        with self._lock:
            free = self._free.get(key)
            buffer = free.pop() if free else None
        if buffer is None:
            buffer = self._alloc(key[0], key[1])
            self.allocations += 1
        buffer.copy_(block, non_blocking=True)
        return Staged(buffer, self._record_event(block), key)

    def release(self, staged: Staged) -> None:
        """Give a published block's buffer back. One whose copy has not landed (never the
        case after publishing; defensive) is dropped rather than risk overwriting it."""
        if staged.key is None or not staged.ready():
            return
        with self._lock:
            free = self._free.setdefault(staged.key, [])
            if len(free) < self.keep:
                free.append(staged.host)
        staged.key = None  # released once only

    def idle(self) -> int:
        """Buffers waiting in the pool, over every shape."""
        with self._lock:
            return sum(len(f) for f in self._free.values())
