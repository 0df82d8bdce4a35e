"""Monitor: wires the agent's parts and holds its public methods.

At attach: layers (which parameters, their layer names), the parts of the pipeline
(pipeline.py: steps -> gather -> collect -> inflight -> publish -> counters), the hooks
that drive it (hooks.py), and the exporter (gradmon/export/).

Training regimes: GradScaler and fused optimizers (steps.py), DDP/FSDP2 (distributed.py),
torch.compile (hooks.py).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from gradmon.agent import distributed, lifecycle
from gradmon.agent.collect import PartialsCollector
from gradmon.agent.counters import Counters, checked_scalars
from gradmon.agent.exposure import Exposure, Sources
from gradmon.agent.features import Feature, build_features
from gradmon.agent.gather import Gatherer
from gradmon.agent.hooks import GradArrivals, TorchHooks
from gradmon.agent.inflight import Inflight
from gradmon.agent.layers import LayerIndex, check_attach_args, select_parameters, unwrap
from gradmon.agent.pipeline import Parts, Pipeline
from gradmon.agent.placement import Placement
from gradmon.agent.publish import Publisher
from gradmon.agent.steps import Steps
from gradmon.config import Config, load_config
from gradmon.errors import GradmonError
from gradmon.export.push import Pusher
from gradmon.health import HealthRules
from gradmon.sinks import Sink, build_sinks
from gradmon.snapshot import Anomaly, Snapshot

__all__ = ["Monitor", "attach"]

log = logging.getLogger("gradmon")

_CLOSING = threading.Lock()

ConfigArg = Config | Mapping[str, Any] | str | os.PathLike[str] | None


class Monitor:
    """Per-layer gradient statistics of one model, served as Prometheus metrics.

    Create it with `gradmon.attach(...)`. It holds the model and its parameters through
    weak references only, so it never keeps a model alive. The collection itself is the
    Pipeline's (pipeline.py), driven by the hooks (hooks.py).
    """

    # Defaults, so that close() works on an instance whose constructor failed half-way.
    _closed = False
    _pipeline: Pipeline | None = None
    _hooks: TorchHooks | None = None
    _features: Sequence[Feature] = ()
    _sinks: Sequence[Sink] = ()
    _exposure: Exposure | None = None
    _pusher: Pusher | None = None
    _failed = False  # a with-block around the run ended in an exception

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
        self.run_id = run_id = (
            cfg.run_id or os.environ.get("GRADMON_RUN_ID") or uuid.uuid4().hex[:12]
        )
        self._counters = counters = Counters()
        named = select_parameters(unwrap(model), optimizer, cfg.collect, counters.skip)
        self._index = index = LayerIndex.build(named, cfg)
        # Before unwrap(): a DistributedDataParallel wrapper tells its replicas' group.
        placement = Placement(index, model)
        self._steps = Steps(cfg.collect.every_n_steps)
        try:
            # Storage errors are reported from the sinks' own threads while they happen;
            # the sinks log each episode themselves.
            self._sinks = build_sinks(cfg, functools.partial(counters.count, "sink"))
            self._features = build_features(cfg, model, index, optimizer)
            arrivals = GradArrivals(len(named))
            read_pointers = cfg.collect.backend != "torch"  # what the C kernel needs
            gatherer = Gatherer(index, counters.skip, model, optimizer, read_pointers)
            health = HealthRules(cfg.health)
            publisher = Publisher(
                index,
                health,
                gatherer.skipped_positions,
                functools.partial(counters.count_error, "publish"),
                owned=placement.owned_parameters,
            )
            parts = Parts(
                index=index,
                counters=counters,
                steps=self._steps,
                arrivals=arrivals,
                gatherer=gatherer,
                partials=PartialsCollector(cfg.collect.backend, index.numels),
                inflight=Inflight(),
                publisher=publisher,
                features=self._features,
                sinks=self._sinks,
            )
            self._pipeline = Pipeline(parts, optimizer)
            post_step = any(f.post_step for f in self._features)
            self._hooks = TorchHooks(
                self._pipeline, index.param_refs, arrivals, optimizer, scaler, post_step=post_step
            )
            self._pipeline.watch_grads = self._hooks.watch_grads
            sources = Sources(
                run_id, counters, self._steps, index, self._features, scaler, placement, health
            )
            self._exposure = exposure = Exposure(cfg, sources, registry)
            if cfg.exporter.push.url is not None:
                # The same families, pushed to a Pushgateway from a thread (export/push.py).
                self._pusher = Pusher(
                    cfg.exporter.push,
                    exposure.registry,
                    rank=distributed.launch_rank,
                    on_error=counters.count,
                )
        except BaseException:
            self._close(linger=False)
            raise
        lifecycle.track(self)

    def after_fork_in_child(self) -> None:
        """In a forked child (a DataLoader worker; see lifecycle.py): inert and holding no
        port. Only this process's copy of the listening socket is closed (the parent's
        close() then frees the port); the sinks are dropped unclosed (their files and
        threads are the parent's)."""
        self._closed = True
        self._sinks = ()  # the parent's files and threads: dropped, not closed
        if self._pipeline is not None:
            self._pipeline.after_fork_in_child()
        self._counters.after_fork()
        self._remove_hooks()
        if self._pusher is not None:
            self._pusher.drop()
        if self._exposure is not None:
            self._exposure.close_in_child()

    # ---------------------------------------------------------------- public
    def collect(self, step: int | None = None, *, skipped: bool = False) -> None:
        """Collect now, for loops that do not call optimizer.step().

        skipped=True: the training loop skipped optimizer.step() itself (e.g. the loss was
        not finite); the step is counted as seen and skipped, and its grads are collected.
        """
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise GradmonError(f"collect(step=...) needs an int or None, not {step!r}")
        if self._closed or self._pipeline is None:
            raise GradmonError("collect() on a closed Monitor; attach again")
        pipeline = self._pipeline
        with self._counters.guard("collect"):
            if step is None:
                step = self._steps.total
            if not pipeline.has_optimizer or skipped:
                pipeline.advance()
            if skipped:
                self._steps.skipped += 1
            pipeline.collect(step, skipped=skipped)

    def snapshot(self, wait: bool = False) -> Snapshot | None:
        """The latest published Snapshot, or None before the first collection.
        wait=True first waits for collections still in flight on a GPU."""
        if self._pipeline is not None:
            self._pipeline.publish_ready(wait=wait)
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
        if self._pipeline is not None:
            self._pipeline.anomaly_callbacks.append(fn)

    @property
    def closed(self) -> bool:
        """Whether close() has run."""
        return self._closed

    @property
    def port(self) -> int | None:
        """The port /metrics is served on (the real one when exporter.port is 0)."""
        server = self._exposure.server if self._exposure is not None else None
        return server.port if server is not None else None

    @property
    def skipped(self) -> dict[str, str]:
        """Parameters that are not monitored, by name, with the reason: requires_grad=False,
        meta device, an unsupported gradient layout or dtype, added after attach()."""
        return self._counters.skipped()

    @property
    def registry(self) -> CollectorRegistry:
        """The prometheus_client registry holding this monitor's families (the one given
        to attach(registry=...), or its own)."""
        assert self._exposure is not None  # set in the constructor
        return self._exposure.registry

    @property
    def layer_names(self) -> list[str]:
        """The monitored layers' names, in model order (parameters, modules or depth
        groups, after collect.include/exclude)."""
        return list(self._index.layer_names)

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Remove every hook, close the sinks and stop the server. Idempotent.

        A run that ended cleanly (no exception ending a `with` block or the process) says
        so: gradmon_run_finished is 1 in the last push, and /metrics stays up until its
        scrapers have seen it (bounded by exporter.linger_seconds; not at all when
        nothing scraped), so that neither GradmonTargetDown nor GradmonPushStale pages."""
        self._close(linger=True)

    def _close(self, linger: bool) -> None:
        with _CLOSING:  # close() from two threads at once: one of them closes
            if self._closed:
                return
            self._closed = True
        # The hooks are inert from here on. One may still be working on the training
        # thread (close() from another thread): let it finish before its handles and
        # sinks go; bounded, so that a stuck hook cannot hang close().
        lock = None
        if self._pipeline is not None:
            self._pipeline.closed = True
            lock = self._pipeline.hook_lock
        acquired = lock.acquire(timeout=5.0) if lock is not None else False
        try:
            self._remove_hooks()
            for sink in self._sinks:
                with self._counters.guard("sink"):
                    sink.close()
        finally:
            if acquired and lock is not None:
                lock.release()
        finished = not (self._failed or lifecycle.exiting_after_exception())
        if finished and self._exposure is not None:
            self._exposure.finish()  # gradmon_run_finished 1, served and pushed
        if self._pusher is not None:
            self._pusher.close()  # the last push
        if self._exposure is not None:
            self._exposure.close(linger=linger and finished)

    def _remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        for feature in self._features:
            feature.remove()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc and exc[0] is not None:
            self._failed = True  # the with-block ended in an exception: not finished
        self.close()

    def __del__(self) -> None:
        # Garbage collection may run on the training thread: close at once, no lingering.
        with suppress(Exception):
            self._close(linger=False)


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
