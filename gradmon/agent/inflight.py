"""Collections on their way to the host, published in order: the only place that waits.

CPU blocks are "staged" as they are. Device blocks are concatenated per device and copied
without blocking into a pooled pinned buffer behind an event (agent/staging.py); a
collection is published once every one of its copies has landed, checked without waiting
on the training thread (`publish_ready(wait=False)`); only `snapshot(wait=True)` waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradmon.agent.collect import Blocks
from gradmon.agent.features import FeatureRows
from gradmon.agent.staging import Staged, StagingPool
from gradmon.stats import NCOLS

__all__ = ["Inflight", "Pending", "Ready"]


@dataclass
class Pending:
    """A collection whose rows may still be on their way to the host."""

    step: int
    skipped: bool
    started: float  # perf_counter() at the start of the collection
    fresh: list[bool]
    arrival: np.ndarray[Any, Any]  # backward order ranks (hooks.GradArrivals), read-only
    parts: list[tuple[torch.Tensor, list[int]]]  # ([n, NCOLS + 1] host rows, positions)
    staged: list[Staged]  # one device-to-host copy per device
    amp: torch.Tensor | None = None  # fused AMP: [step skipped, skipped so far] (host)
    failed: frozenset[int] = frozenset()  # positions whose group failed: left out
    features: dict[int, FeatureRows] = field(default_factory=dict)  # feature position ->
    waiting: bool = False  # a feature waits for the end of the optimizer step

    def copies(self) -> list[Staged]:
        rows = [copy for rows in self.features.values() for copy, _ in rows]
        return self.staged + rows


@dataclass
class Ready:
    """A collection in host memory, ready to be turned into a Snapshot."""

    step: int
    skipped: bool
    started: float
    fresh: list[bool]
    arrival: np.ndarray[Any, Any]  # backward order ranks (hooks.GradArrivals), read-only
    table: torch.Tensor  # [parameters, NCOLS + 1] float64
    amp: torch.Tensor | None
    failed: frozenset[int]
    features: dict[int, list[tuple[torch.Tensor, Any]]]


class Inflight:
    def __init__(self, pool: StagingPool | None = None) -> None:
        self._pool = pool if pool is not None else StagingPool()
        self._pending: list[Pending] = []
        self._lock = threading.Lock()  # the training thread and snapshot() both publish

    def stage(self, block: torch.Tensor) -> Staged:
        """CPU: the block itself. Otherwise a non-blocking copy into a pooled pinned buffer
        behind an event: published once the event has completed, never waited for here."""
        if block.device.type == "cpu":
            return Staged(block)
        return self._pool.stage(block)

    def stage_blocks(
        self, blocks: Blocks
    ) -> tuple[list[tuple[torch.Tensor, list[int]]], list[Staged], torch.Tensor | None]:
        """One device-to-host copy per device: the blocks of a device are concatenated
        first. Returns the host rows of each block (valid once its copy is ready), the
        copies, and the fused-AMP flag row (the block without positions) if any."""
        parts: list[tuple[torch.Tensor, list[int]]] = []
        staged: list[Staged] = []
        amp = None
        for items in blocks.values():
            whole = items[0][0] if len(items) == 1 else torch.cat([b for b, _ in items])
            copy = self.stage(whole)
            staged.append(copy)
            start = 0
            for block, indices in items:
                rows = copy.host[start : start + block.shape[0]]
                start += block.shape[0]
                if indices is None:
                    amp = rows[0]
                else:
                    parts.append((rows, indices))
        return parts, staged, amp

    def push(self, entry: Pending) -> None:
        with self._lock:
            self._pending.append(entry)

    def publish_ready(self, wait: bool, publish: Callable[[Ready], None]) -> None:
        """Publish finished collections in order; device ones only once their copies
        landed. Serialised: the training thread and snapshot() callers both get here."""
        with self._lock:
            while self._pending:
                entry = self._pending[0]
                if entry.waiting:
                    return  # its optimizer step is still running (the post-hook comes)
                copies = entry.copies()
                if wait:
                    for copy in copies:
                        if copy.event is not None:
                            copy.event.synchronize()  # sync-ok: only from snapshot(wait=True)
                elif not all(copy.ready() for copy in copies):
                    return
                self._pending.pop(0)
                ready = self._read(entry)
                for copy in copies:  # every row is read: the buffers may be reused
                    self._pool.release(copy)
                publish(ready)

    def _read(self, entry: Pending) -> Ready:
        # numpy: torch.zeros of a large table fills it on the intra-op thread pool, whose
        # wake-up cost milliseconds on a busy 2-core machine (measured); calloc does not.
        rows = np.zeros((len(entry.fresh), NCOLS + 1))
        table = torch.from_numpy(rows)
        for block, indices in entry.parts:  # numpy indexing: no tensor per row
            rows[np.asarray(indices, dtype=np.int64)] = block.numpy()
        # Cloned before the buffers go back to the pool (another thread may stage into them).
        features = {
            k: [(copy.host.clone(), meta) for copy, meta in rows]
            for k, rows in entry.features.items()
        }
        amp = entry.amp.clone() if entry.amp is not None else None
        return Ready(
            entry.step,
            entry.skipped,
            entry.started,
            entry.fresh,
            entry.arrival,
            table,
            amp,
            entry.failed,
            features,
        )

    def clear(self) -> None:
        """Forget what is in flight (a forked child: the copies are the parent's)."""
        self._lock = threading.Lock()
        self._pending = []
