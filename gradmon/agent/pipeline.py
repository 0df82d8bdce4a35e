"""One collection, in the order data flows: the composition the hooks drive.

steps (counted, collected?) -> gather (fresh grads, grouped by device and dtype) ->
collect (one backend call per group) -> inflight (one device-to-host copy per device,
published in order once landed) -> publish (Snapshot + health) -> counters (what
/metrics reads), sinks, features, anomaly callbacks.

`Pipeline` is what the hooks call (hooks.StepListener). It holds no reference to the
Monitor; the Monitor owns it, and the hooks hold it weakly.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradmon.agent.collect import PartialsCollector
from gradmon.agent.counters import Counters
from gradmon.agent.features import Feature
from gradmon.agent.gather import Gatherer
from gradmon.agent.hooks import GradArrivals
from gradmon.agent.inflight import Inflight, Pending, Ready
from gradmon.agent.layers import LayerIndex
from gradmon.agent.publish import Publisher
from gradmon.agent.steps import Steps
from gradmon.sinks import Sink
from gradmon.snapshot import Anomaly

__all__ = ["Parts", "Pipeline"]

log = logging.getLogger("gradmon")


@dataclass
class Parts:
    """The rooms one collection passes through, built by the Monitor at attach."""

    index: LayerIndex
    counters: Counters
    steps: Steps
    arrivals: GradArrivals
    gatherer: Gatherer
    partials: PartialsCollector
    inflight: Inflight
    publisher: Publisher
    features: Sequence[Feature]
    sinks: Sequence[Sink]


class Pipeline:
    def __init__(self, parts: Parts, optimizer: torch.optim.Optimizer | None) -> None:
        self.parts = parts
        self.closed = False
        # Held while a hook works, so that close() from another thread waits for it.
        self.hook_lock = threading.RLock()
        self.anomaly_callbacks: list[Callable[[list[Anomaly]], object]] = []
        self._optimizer_ref = weakref.ref(optimizer) if optimizer is not None else None
        self._waiting: Pending | None = None  # the collection awaiting its step post-hook
        # Turns the gradient hooks on and off (hooks.TorchHooks.watch_grads), set once the
        # hooks exist. Only under every_n_steps > 1 with an optimizer: then the steps to
        # come are known, and the backward of a step that is not collected needs none.
        self.watch_grads: Callable[[bool], None] | None = None

    # ------------------------------------------------------ the hooks' protocol
    def on_optimizer_step(self, optimizer: Any) -> None:
        """The optimizer's step pre-hook: the grads are final here."""
        with self.hook_lock, self.parts.counters.guard("hook"):
            if self.closed:  # closed by another thread while this step waited
                return
            step, due = self.advance(stepped=True)
            if optimizer is None:
                optimizer = self._optimizer()
            # Set by GradScaler.step() on fused optimizers only, for the step's duration.
            grad_scale = getattr(optimizer, "grad_scale", None)
            flag = self.parts.steps.count_fused_skip(getattr(optimizer, "found_inf", None))
            if due:
                self.collect(step, False, grad_scale=grad_scale, skip_flag=flag, at_step=True)

    def on_optimizer_step_post(self) -> None:
        """After optimizer.step(): the features that waited for it stage their rows."""
        with self.hook_lock:  # as the pre-hook: close() from another thread waits for it
            entry, self._waiting = self._waiting, None
            if self.closed or entry is None:
                return
            try:
                with self.parts.counters.guard("hook"):
                    for k, feature in enumerate(self.parts.features):
                        if feature.post_step:
                            rows = feature.at_step_end(self.parts.inflight.stage)
                            entry.features.setdefault(k, []).extend(rows)
            finally:
                entry.waiting = False  # published with the rows, or (on a failure) without
            self.publish_ready(wait=False)

    def on_scaler_update(self, scaler: Any) -> None:
        """Before `scaler.update()`: a step the scaler skipped never reached our step hook,
        so it is counted here and its (unscaled, non-finite) grads are collected."""
        steps = self.parts.steps
        with self.hook_lock, self.parts.counters.guard("scaler"):
            if self.closed or not steps.skipped_at_scaler_update(scaler, self._optimizer()):
                return
            step, due = self.advance()
            steps.skipped += 1
            if due:
                self.collect(step, skipped=True)

    # ------------------------------------------------------------ collection
    def _optimizer(self) -> Any:
        return self._optimizer_ref() if self._optimizer_ref is not None else None

    @property
    def has_optimizer(self) -> bool:
        return self._optimizer_ref is not None

    def advance(self, *, stepped: bool = False) -> tuple[int, bool]:
        """Count a step: (its number, whether it is collected). Features learn whether the
        next one is collected (activation hooks compute only before those)."""
        steps = self.parts.steps
        step, due = steps.advance(stepped=stepped)
        collect_next = steps.next_is_collected()
        for feature in self.parts.features:
            feature.on_step_counted(collect_next)
        self._hook_next_backward()
        return step, due

    def _hook_next_backward(self) -> None:
        """Gradient hooks for the next backward if it is collected and its order is to be
        learned (hooks.GradArrivals). Without an optimizer, collect() follows each
        backward: the next one belongs to the next collection."""
        if self.watch_grads is None:
            return
        wanted = self.parts.arrivals.wants_order()
        if self.has_optimizer:
            wanted = wanted and self.parts.steps.next_is_collected()
        self.watch_grads(wanted)

    def collect(
        self,
        step: int,
        skipped: bool,
        grad_scale: torch.Tensor | float | None = None,
        skip_flag: torch.Tensor | None = None,
        at_step: bool = False,
    ) -> None:
        started = time.perf_counter()
        p = self.parts
        if self._waiting is not None:  # the last sampled step raised before its post-hook
            self._waiting.waiting, self._waiting = False, None
        self.publish_ready(wait=False)
        guard = p.counters.guard
        arrival = p.arrivals.take()
        gathered = p.gatherer.gather()
        blocks, failed = p.partials.collect(gathered, guard, grad_scale)
        if skip_flag is not None:  # the fused-AMP flags ride in their device's copy
            row = p.steps.amp_row(skip_flag)
            blocks.setdefault(row.device, []).append((row, None))
        parts, staged, amp = p.inflight.stage_blocks(blocks)
        if p.sinks:
            by_layer = gathered.by_layer(p.index)
            for sink in p.sinks:
                with guard("sink"):
                    sink.on_collect(step, by_layer)
        entry = Pending(step, skipped, started, gathered.fresh, arrival, parts, staged, amp)
        entry.failed = frozenset(failed)
        for k, feature in enumerate(p.features):
            with guard("hook"):
                work = feature.at_collection(p.inflight.stage, at_step)
                entry.features[k] = work.rows
                entry.waiting |= work.wait_for_step_end
        if entry.waiting:
            self._waiting = entry
        p.inflight.push(entry)
        self.publish_ready(wait=False)
        # A published NaN asks for the order of the next collected backward: decided here,
        # on the hook path (hooks are installed only where no backward can run).
        self._hook_next_backward()

    def publish_ready(self, wait: bool) -> None:
        with self.parts.counters.guard("publish"):
            self.parts.inflight.publish_ready(wait, self._publish)

    def _publish(self, ready: Ready) -> None:
        p = self.parts
        guard = p.counters.guard
        try:
            skipped = ready.skipped
            if ready.amp is not None:
                skipped = p.steps.read_amp(ready.amp) or skipped
            snap = p.publisher.build(ready, skipped)
        except Exception as exc:  # this collection is lost (counted); training goes on
            p.counters.count_error("publish", exc)
            return
        for k, feature in enumerate(p.features):
            with guard("publish"):  # a failing feature leaves the snapshot without it
                snap = feature.finish(ready.features.get(k, []), snap)
        p.counters.record(snap, time.perf_counter() - ready.started)
        if snap.nonfinite:  # where the next NaN starts is worth an exact backward order
            p.arrivals.relearn()  # from the next collected step on (collect() ends so)
        for a in snap.anomalies:
            log.debug("gradmon: step %d %s %s (%.3g)", snap.step, a.kind, a.layer, a.value)
        if p.sinks:
            scalars = p.counters.current_scalars()
            for sink in p.sinks:
                with guard("sink"):
                    sink.on_publish(snap, scalars)
        if snap.anomalies:
            for callback in list(self.anomaly_callbacks):
                with guard("callback"):
                    callback(list(snap.anomalies))

    def after_fork_in_child(self) -> None:
        """Locks another thread held at fork time would never be released: made anew."""
        self.hook_lock = threading.RLock()
        self.closed = True
        self.parts.inflight.clear()
        self.parts.sinks = ()  # the parent's files and threads
