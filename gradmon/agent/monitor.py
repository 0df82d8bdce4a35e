"""Monitor: wires the agent's parts and holds its public methods.

One collection, in the order data flows (each step is a module of gradmon/agent):
hooks (gradients arrived; the optimizer step begins) -> steps (counted, collected?) ->
gather (fresh grads, grouped by device and dtype) -> collect (one backend call per group)
-> inflight (one device-to-host copy per device, published in order once landed) ->
publish (Snapshot + health) -> counters (what /metrics reads), sinks, anomaly callbacks.

Training regimes: GradScaler and fused optimizers (steps.py), DDP/FSDP2 (distributed.py),
torch.compile (hooks.py).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any

import torch
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from torch import nn

from gradmon.agent import distributed, lifecycle
from gradmon.agent.collect import PartialsCollector
from gradmon.agent.counters import Counters, checked_scalars
from gradmon.agent.features import Feature, build_features
from gradmon.agent.gather import Gatherer
from gradmon.agent.hooks import GradArrivals, TorchHooks
from gradmon.agent.inflight import Inflight, Pending, Ready
from gradmon.agent.layers import LayerIndex, check_attach_args, select_parameters, unwrap
from gradmon.agent.publish import Publisher
from gradmon.agent.steps import Steps
from gradmon.config import Config, load_config
from gradmon.errors import GradmonError
from gradmon.exporter import ExportState, GradmonCollector, RankLabelled, scalar_value
from gradmon.health import HealthRules
from gradmon.server import MetricsServer
from gradmon.sinks import Sink, build_sinks
from gradmon.snapshot import Anomaly, Snapshot
from gradmon.version import __version__

__all__ = ["Monitor", "attach"]

log = logging.getLogger("gradmon")

_CLOSING = threading.Lock()

ConfigArg = Config | Mapping[str, Any] | str | os.PathLike[str] | None


class Monitor:
    """Per-layer gradient statistics of one model, served as Prometheus metrics.

    Create it with `gradmon.attach(...)`. It holds the model and its parameters through
    weak references only, so it never keeps a model alive. The methods `on_optimizer_step`,
    `on_optimizer_step_post`, `on_scaler_update` and `after_fork_in_child` are what
    gradmon's own hooks call (hooks.StepListener, lifecycle.py), not for training scripts.
    """

    # Defaults, so that close() works on an instance whose constructor failed half-way.
    _closed = False
    _hooks: TorchHooks | None = None
    _features: Sequence[Feature] = ()
    _sinks: Sequence[Sink] = ()
    _server: MetricsServer | None = None
    _collector: GradmonCollector | None = None
    _registry: CollectorRegistry | None = None
    _own_registry = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scaler: Any = None,
        config: ConfigArg = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        check_attach_args(model, optimizer, scaler)
        self.config = cfg = load_config(config)
        self.run_id = cfg.run_id or os.environ.get("GRADMON_RUN_ID") or uuid.uuid4().hex[:12]
        # Held while a hook works, so that close() from another thread waits for it.
        self._hook_lock = threading.RLock()
        self._counters = counters = Counters()
        named = select_parameters(unwrap(model), optimizer, cfg.collect, counters.skip)
        self._index = index = LayerIndex.build(named, cfg)
        self._steps = Steps(cfg.collect.every_n_steps)
        self._arrivals = GradArrivals(len(named))
        self._gatherer = Gatherer(index, counters.skip, model, optimizer)
        self._partials = PartialsCollector(cfg.collect.backend, index.numels)
        self._inflight = Inflight()
        self._publisher = Publisher(
            index,
            HealthRules(cfg.health),
            self._gatherer.skipped_positions,
            functools.partial(counters.count_error, "publish"),
        )
        self._optimizer_ref = weakref.ref(optimizer) if optimizer is not None else None
        self._scaler = scaler
        self._waiting: Pending | None = None  # the collection awaiting its step post-hook
        self._anomaly_callbacks: list[Callable[[list[Anomaly]], object]] = []
        self._rank: int | None = None  # read lazily: the group may be initialised later
        try:
            self._sinks = build_sinks(cfg)
            self._features = build_features(cfg, model, index, optimizer)
            post_step = any(f.post_step for f in self._features)
            self._hooks = TorchHooks(
                self, index.param_refs, self._arrivals, optimizer, scaler, post_step=post_step
            )
            self._own_registry = registry is None
            self._registry = registry if registry is not None else _default_registry(self)
            on_error = _export_error_fn(counters)
            self._collector = GradmonCollector(self._export_state, on_error)
            self._registry.register(self._collector)
            if cfg.exporter.enabled:
                port = distributed.metrics_port(cfg.exporter.port)
                render = functools.partial(self._collector.exposition, self._registry)
                self._server = MetricsServer(
                    cfg.exporter, port, self._registry, on_error=on_error, render=render
                )
        except BaseException:
            self.close()
            raise
        lifecycle.track(self)

    # ------------------------------------------------------ the hooks' protocol
    @property
    def closed(self) -> bool:
        return self._closed

    def on_optimizer_step(self, optimizer: Any) -> None:
        """The optimizer's step pre-hook: the grads are final here."""
        with self._hook_lock, self._counters.guard("hook"):
            if self._closed:  # closed by another thread while this step waited
                return
            step, due = self._advance(stepped=True)
            if optimizer is None:
                optimizer = self._optimizer()
            # Set by GradScaler.step() on fused optimizers only, for the step's duration.
            grad_scale = getattr(optimizer, "grad_scale", None)
            flag = self._steps.count_fused_skip(getattr(optimizer, "found_inf", None))
            if due:
                self._collect(step, False, grad_scale=grad_scale, skip_flag=flag, at_step=True)

    def on_optimizer_step_post(self) -> None:
        """After optimizer.step(): the features that waited for it stage their rows."""
        with self._hook_lock:  # as the pre-hook: close() from another thread waits for it
            entry, self._waiting = self._waiting, None
            if self._closed or entry is None:
                return
            try:
                with self._counters.guard("hook"):
                    for k, feature in enumerate(self._features):
                        if feature.post_step:
                            rows = feature.at_step_end(self._inflight.stage)
                            entry.features.setdefault(k, []).extend(rows)
            finally:
                entry.waiting = False  # published with the rows, or (on a failure) without
            self._publish_ready(wait=False)

    def on_scaler_update(self, scaler: Any) -> None:
        """Before `scaler.update()`: a step the scaler skipped never reached our step hook,
        so it is counted here and its (unscaled, non-finite) grads are collected."""
        with self._hook_lock, self._counters.guard("scaler"):
            if self._closed or not self._steps.skipped_at_scaler_update(scaler, self._optimizer()):
                return
            step, due = self._advance()
            self._steps.skipped += 1
            if due:
                self._collect(step, skipped=True)

    def after_fork_in_child(self) -> None:
        """In a forked child (a DataLoader worker): inert and holding no port. The parent's
        threads do not exist here: only this process's copy of the listening socket is
        closed (the parent's close() then frees the port), the sinks are dropped unclosed
        (their files and threads are the parent's), and locks are made anew."""
        self._hook_lock = threading.RLock()
        self._counters.after_fork()
        self._inflight.clear()
        self._closed = True
        self._sinks = ()
        self._remove_hooks()
        if self._server is not None:
            self._server.close_in_child()

    # ------------------------------------------------------------ collection
    def _optimizer(self) -> Any:
        return self._optimizer_ref() if self._optimizer_ref is not None else None

    def _advance(self, *, stepped: bool = False) -> tuple[int, bool]:
        step, due = self._steps.advance(stepped=stepped)
        collect_next = self._steps.next_is_collected()
        for feature in self._features:
            feature.on_step_counted(collect_next)
        return step, due

    def _collect(
        self,
        step: int,
        skipped: bool,
        grad_scale: torch.Tensor | float | None = None,
        skip_flag: torch.Tensor | None = None,
        at_step: bool = False,
    ) -> None:
        started = time.perf_counter()
        if self._waiting is not None:  # the last sampled step raised before its post-hook
            self._waiting.waiting, self._waiting = False, None
        self._publish_ready(wait=False)
        guard = self._counters.guard
        gathered = self._gatherer.gather(self._arrivals.take())
        blocks, failed = self._partials.collect(gathered, guard, grad_scale)
        if skip_flag is not None:  # the fused-AMP flags ride in their device's copy
            row = self._steps.amp_row(skip_flag)
            blocks.setdefault(row.device, []).append((row, None))
        parts, staged, amp = self._inflight.stage_blocks(blocks)
        if self._sinks:
            by_layer = gathered.by_layer(self._index)
            for sink in self._sinks:
                with guard("sink"):
                    sink.on_collect(step, by_layer)
        entry = Pending(
            step, skipped, started, gathered.fresh, gathered.arrival, parts, staged, amp
        )
        entry.failed = frozenset(failed)
        for k, feature in enumerate(self._features):
            with guard("hook"):
                work = feature.at_collection(self._inflight.stage, at_step)
                entry.features[k] = work.rows
                entry.waiting |= work.wait_for_step_end
        if entry.waiting:
            self._waiting = entry
        self._inflight.push(entry)
        self._publish_ready(wait=False)

    def _publish_ready(self, wait: bool) -> None:
        with self._counters.guard("publish"):
            self._inflight.publish_ready(wait, self._publish)

    def _publish(self, ready: Ready) -> None:
        guard = self._counters.guard
        with guard("publish"):
            skipped = ready.skipped
            if ready.amp is not None:
                skipped = self._steps.read_amp(ready.amp) or skipped
            snap = self._publisher.build(ready, skipped)
        for k, feature in enumerate(self._features):
            with guard("publish"):  # a failing feature leaves the snapshot without it
                snap = feature.finish(ready.features.get(k, []), snap)
        self._counters.record(snap, time.perf_counter() - ready.started)
        for a in snap.anomalies:
            log.debug("gradmon: step %d %s %s (%.3g)", snap.step, a.kind, a.layer, a.value)
        if self._sinks:
            scalars = self._counters.current_scalars()
            for sink in self._sinks:
                with guard("sink"):
                    sink.on_publish(snap, scalars)
        if snap.anomalies:
            for callback in list(self._anomaly_callbacks):
                with guard("callback"):
                    callback(list(snap.anomalies))

    # ---------------------------------------------------------------- public
    def collect(self, step: int | None = None, *, skipped: bool = False) -> None:
        """Collect now, for loops that do not call optimizer.step().

        skipped=True: the training loop skipped optimizer.step() itself (e.g. the loss was
        not finite); the step is counted as seen and skipped, and its grads are collected.
        """
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise GradmonError(f"collect(step=...) needs an int or None, not {step!r}")
        if self._closed:
            raise GradmonError("collect() on a closed Monitor; attach again")
        with self._counters.guard("collect"):
            if step is None:
                step = self._steps.total
            if self._optimizer_ref is None or skipped:
                self._advance()
            if skipped:
                self._steps.skipped += 1
            self._collect(step, skipped=skipped)

    def snapshot(self, wait: bool = False) -> Snapshot | None:
        """The latest published Snapshot, or None before the first collection.
        wait=True first waits for collections still in flight on a GPU."""
        self._publish_ready(wait=wait)
        return self._counters.snapshot

    def log(self, **scalars: Any) -> None:
        """Record user scalars (loss, lr...) as gradmon_scalar{name}. Tensors are kept as
        they are and read at scrape time on the exporter's thread: no sync here."""
        self._counters.log_scalars(checked_scalars(scalars))

    def on_anomaly(self, fn: Callable[[list[Anomaly]], object]) -> None:
        """Call `fn(anomalies)` for every collection that has any, where it is published
        (on CPU at once, on the training thread; on CUDA once its copy has landed). A
        failing `fn` is counted in gradmon_agent_errors_total{stage="callback"}."""
        if not callable(fn):
            raise GradmonError(f"on_anomaly(fn): fn must be callable, not {type(fn).__name__}")
        self._anomaly_callbacks.append(fn)

    @property
    def port(self) -> int | None:
        """The port /metrics is served on (the real one when exporter.port is 0)."""
        return self._server.port if self._server is not None else None

    @property
    def skipped(self) -> dict[str, str]:
        """Parameters that are not monitored, by name, with the reason: requires_grad=False,
        meta device, an unsupported gradient layout or dtype, added after attach()."""
        return self._counters.skipped()

    @property
    def registry(self) -> CollectorRegistry:
        assert self._registry is not None  # set in the constructor
        return self._registry

    @property
    def layer_names(self) -> list[str]:
        return list(self._index.layer_names)

    # ---------------------------------------------------------------- export
    def _exports_layers(self, rank: int | None) -> bool:
        """Whether this rank exports the per-layer families (exporter.per_layer_ranks)."""
        cfg = self.config.exporter
        if not cfg.per_layer:
            return False
        if rank is None or rank == 0 or cfg.per_layer_ranks == "all":
            return True
        # auto: replicated grads (DDP) are the same on every rank, rank 0 speaks for all;
        # sharded ones (FSDP) are additive partials, every rank exports its own.
        return cfg.per_layer_ranks == "auto" and self._index.sharded

    def _rank_now(self) -> int | None:
        """The rank label; looked up until a process group of several ranks exists."""
        if self._rank is None:
            self._rank = distributed.rank_label()
        return self._rank

    def _export_state(self) -> ExportState:
        rank = self._rank_now()
        extra: dict[str, Any] = {}
        for feature in self._features:
            extra.update(feature.export_fields())
        state = self._counters.export_state(
            version=__version__,
            run_id=self.run_id,
            rank=rank,
            steps_total=self._steps.total,
            skipped_steps_total=self._steps.skipped_total,
            layer_names=self._index.exported,
            per_layer=self._exports_layers(rank),
            **extra,
        )
        state.errors_total["hook"] += sum(f.errors for f in self._features)
        # Tensor scalars and the loss scale are read here, on the scrape thread: on CUDA
        # that read waits for the GPU on this thread only, never on the training thread.
        with self._counters.guard("export"):
            scalars = self._counters.current_scalars()
            state.scalars = {k: scalar_value(v) for k, v in scalars.items()}
            if self._scaler is not None:
                state.loss_scale = float(self._scaler.get_scale())
        return state

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Remove every hook, close the sinks and stop the server. Idempotent."""
        with _CLOSING:  # close() from two threads at once: one of them closes
            if self._closed:
                return
            self._closed = True
        # The hooks are inert from here on. One may still be working on the training
        # thread (close() from another thread): let it finish before its handles and
        # sinks go; bounded, so that a stuck hook cannot hang close().
        lock = getattr(self, "_hook_lock", None)
        acquired = lock.acquire(timeout=5.0) if lock is not None else False
        try:
            self._remove_hooks()
            for sink in self._sinks:
                with self._counters.guard("sink"):
                    sink.close()
        finally:
            if acquired and lock is not None:
                lock.release()
        if self._server is not None:
            self._server.close()
        # A registry of the user's own stops showing this monitor; ours keeps its final
        # values readable (mon.registry) after close().
        if self._registry is not None and self._collector is not None and not self._own_registry:
            with suppress(KeyError):
                self._registry.unregister(self._collector)

    def _remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        for feature in self._features:
            feature.remove()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with suppress(Exception):
            self.close()


def _default_registry(monitor: Monitor) -> CollectorRegistry:
    """A registry of the monitor's own, so attach/close/attach never collides on names.
    The process and platform series get `rank` too under several ranks."""
    registry = CollectorRegistry(auto_describe=False)
    me = weakref.ref(monitor)  # the registry must not keep the monitor alive

    def rank() -> int | None:
        mon = me()
        return mon._rank_now() if mon is not None else None

    registry.register(RankLabelled(ProcessCollector(registry=None), rank))
    registry.register(RankLabelled(PlatformCollector(registry=None), rank))
    return registry


def _export_error_fn(counters: Counters) -> Callable[[BaseException], None]:
    """For the exporter and the server: count a scrape-time failure under `export`."""
    return functools.partial(counters.count_error, "export")


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: Any = None,
    config: ConfigArg = None,
    registry: CollectorRegistry | None = None,
) -> Monitor:
    """Attach gradmon to a model (and its optimizer) in one line. See Monitor."""
    return Monitor(model, optimizer, scaler=scaler, config=config, registry=registry)
