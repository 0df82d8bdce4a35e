"""The agent: hooks on the model and optimizer, one fused collection per optimizer step.

Flow (see DESIGN.md): post-accumulate-grad hooks mark which parameters received a
gradient; the optimizer's step pre-hook is where gradients are final (accumulated over
micro-batches, all-reduced by DDP, unscaled by GradScaler), so statistics are taken
there, in one backend call per (device, dtype) group. CPU results are published at once;
CUDA results are copied without blocking into pinned memory and published once their
event has completed, never waited for on the training thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradmon.config import Config, load_config
from gradmon.errors import GradmonError
from gradmon.exporter import (
    AGENT_STAGES,
    DURATION_BUCKETS,
    GLOBAL_NORM_BUCKETS,
    ExportState,
    GradmonCollector,
    Histogram,
    scalar_value,
)
from gradmon.health import HealthRules
from gradmon.server import MetricsServer
from gradmon.sinks import Sink, build_sinks
from gradmon.snapshot import (
    LayerStats,
    Snapshot,
    combine_rows,
    finalize_layer,
    global_norm,
    no_grad_layer,
)
from gradmon.stats import NCOLS, PartialsFn, param_sum_squares, select_backend
from gradmon.version import __version__

log = logging.getLogger("gradmon")

ROOT_MODULE = "(root)"  # layer name for parameters owned by the top-level module


@dataclass
class _Pending:
    """A collection whose partials are still on their way to the host (CUDA)."""

    step: int
    skipped: bool
    started: float
    parts: list[tuple[torch.Tensor, list[int]]]  # ([n, NCOLS + 1] host rows, param indices)
    fresh: list[bool]
    events: list[torch.cuda.Event]


def _layer_name(param_name: str, granularity: str) -> str:
    if granularity == "module":
        return param_name.rpartition(".")[0] or ROOT_MODULE
    return param_name


def _distributed_rank() -> int | None:
    """The rank label, only when several ranks train together."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return int(dist.get_rank())
    return None


class Monitor:
    """Per-layer gradient statistics of one model, served as Prometheus metrics.

    Create it with `gradmon.attach(...)`. It holds the model and its parameters through
    weak references only, so it never keeps a model alive.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scaler: Any = None,
        config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise GradmonError(
                f"attach(model=...) needs a torch.nn.Module, not {type(model).__name__}"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise GradmonError(
                "attach(optimizer=...) needs a torch.optim.Optimizer or None, "
                f"not {type(optimizer).__name__}"
            )
        if scaler is not None and not (
            callable(getattr(scaler, "update", None))
            and callable(getattr(scaler, "get_scale", None))
        ):
            raise GradmonError(
                "attach(scaler=...) needs a torch.amp.GradScaler or None, "
                f"not {type(scaler).__name__}"
            )
        self.config = cfg = load_config(config)
        self._lock = threading.Lock()  # guards what the exporter copies
        self._publish_lock = threading.Lock()  # serialises publishing of pending collections
        self._closed = False
        self._handles: list[RemovableHandle] = []

        named = self._select_parameters(model, optimizer)
        self._param_refs = [weakref.ref(p) for _, p in named]
        self._param_names = [n for n, _ in named]
        layer_names: list[str] = []
        self._layer_of: list[int] = []
        for name, _ in named:
            layer = _layer_name(name, cfg.collect.granularity)
            if not layer_names or layer_names[-1] != layer:
                if layer in layer_names:
                    self._layer_of.append(layer_names.index(layer))
                    continue
                layer_names.append(layer)
            self._layer_of.append(len(layer_names) - 1)
        self._layer_names = layer_names
        self._layer_members: list[list[int]] = [[] for _ in layer_names]
        for i, layer_index in enumerate(self._layer_of):
            self._layer_members[layer_index].append(i)
        self._numels = [p.numel() for _, p in named]
        self._exported_layers = layer_names[: cfg.exporter.max_layers]
        if len(layer_names) > cfg.exporter.max_layers:
            log.warning(
                "gradmon: %d layers but exporter.max_layers is %d: per-layer metrics are "
                "exported for the first %d only (%s ... dropped); statistics, health and "
                "global metrics still cover every layer. Raise exporter.max_layers, narrow "
                "collect.include/exclude, or use collect.granularity: module.",
                len(layer_names),
                cfg.exporter.max_layers,
                cfg.exporter.max_layers,
                layer_names[cfg.exporter.max_layers],
            )

        # Written by the hooks, read at collection: plain lists, no tensors, no locks.
        self._received = [False] * len(named)
        self._last_grad: list[tuple[int, int] | None] = [None] * len(named)
        self._backends: dict[tuple[torch.device, torch.dtype], PartialsFn] = {}
        self._pending: list[_Pending] = []

        # State the exporter copies under self._lock.
        self._steps = 0
        self._collections = 0
        self._nonfinite_steps = 0
        self._skipped_steps = 0
        self._snapshot: Snapshot | None = None
        self._anomalies_total: dict[tuple[str, str], int] = {}
        self._layer_nonfinite: dict[str, int] = {}
        self._errors: dict[str, int] = dict.fromkeys(AGENT_STAGES, 0)
        self._errors_logged: set[str] = set()
        self._scalars: dict[str, Any] = {}
        self._norm_hist = Histogram(GLOBAL_NORM_BUCKETS)
        self._duration_hist = Histogram(DURATION_BUCKETS)
        self._health = HealthRules(cfg.health)
        self._rank = _distributed_rank()
        self.run_id = cfg.run_id or os.environ.get("GRADMON_RUN_ID") or uuid.uuid4().hex[:12]

        self._sinks: list[Sink] = build_sinks(cfg)
        self._model_ref = weakref.ref(model)
        self._optimizer_ref = weakref.ref(optimizer) if optimizer is not None else None
        self._scaler = scaler
        self._step_seen_since_update = False

        try:
            self._install_hooks(named, optimizer, scaler)
            self._registry = registry if registry is not None else self._default_registry()
            self._collector = GradmonCollector(self._export_state)
            self._registry.register(self._collector)
            self._server: MetricsServer | None = None
            if cfg.exporter.enabled:
                port = cfg.exporter.port
                if port:
                    port += int(os.environ.get("LOCAL_RANK", "0"))
                self._server = MetricsServer(cfg.exporter, port, self._registry)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- set-up
    def _select_parameters(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> list[tuple[str, nn.Parameter]]:
        cfg = self.config.collect
        # named_parameters() lists a shared parameter once, under its first name.
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise GradmonError(
                f"attach(): {type(model).__name__} has no parameters with requires_grad=True; "
                "there are no gradients to monitor"
            )
        if optimizer is not None:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            mine = [(n, p) for n, p in trainable if id(p) in owned]
            if not mine:
                raise GradmonError(
                    f"attach(): the optimizer ({type(optimizer).__name__}) owns none of the "
                    f"{len(trainable)} trainable parameters of {type(model).__name__}; "
                    "pass the optimizer that trains this model"
                )
            trainable = mine
        include = re.compile(cfg.include) if cfg.include else None
        exclude = re.compile(cfg.exclude) if cfg.exclude else None
        selected = []
        for name, p in trainable:
            layer = _layer_name(name, cfg.granularity)
            if include and not include.search(layer):
                continue
            if exclude and exclude.search(layer):
                continue
            selected.append((name, p))
        if not selected:
            raise GradmonError(
                f"attach(): collect.include={cfg.include!r} / collect.exclude={cfg.exclude!r} "
                f"leave none of the {len(trainable)} trainable parameters; "
                f"names look like {trainable[0][0]!r}"
            )
        return selected

    def _install_hooks(
        self,
        named: list[tuple[str, nn.Parameter]],
        optimizer: torch.optim.Optimizer | None,
        scaler: Any,
    ) -> None:
        me = weakref.ref(self)
        received = self._received

        for index, (_, param) in enumerate(named):

            def on_grad(_param: torch.Tensor, index: int = index) -> None:
                # Runs once per parameter per backward: a list store, nothing else.
                received[index] = True

            handle = param.register_post_accumulate_grad_hook(on_grad)  # type: ignore[no-untyped-call]
            self._handles.append(handle)

        if optimizer is not None:

            @torch.compiler.disable  # type: ignore[untyped-decorator]
            def on_step(_opt: Any, _args: Any, _kwargs: Any) -> None:
                mon = me()
                if mon is not None:
                    mon._on_optimizer_step()

            self._handles.append(optimizer.register_step_pre_hook(on_step))

        if scaler is not None:
            original_update = scaler.update

            def update(new_scale: Any = None) -> Any:
                mon = me()
                if mon is not None:
                    mon._on_scaler_update()
                return original_update(new_scale)

            scaler.update = update

            def restore() -> None:
                if scaler.__dict__.get("update") is update:
                    del scaler.update

            self._restore_scaler: Callable[[], None] | None = restore
        else:
            self._restore_scaler = None

    def _default_registry(self) -> CollectorRegistry:
        # A registry of our own, so attach/close/attach never collides on names.
        registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        return registry

    # ------------------------------------------------------------ hot path
    def _on_optimizer_step(self) -> None:
        with self._guard("hook"):
            self._step_seen_since_update = True
            step = self._steps
            self._steps += 1
            if step % self.config.collect.every_n_steps == 0:
                self._collect(step, skipped=False)

    def _on_scaler_update(self) -> None:
        with self._guard("scaler"):
            if not self._step_seen_since_update:
                # GradScaler found inf/NaN and skipped optimizer.step(): our step hook never
                # ran, so count the step here and look at the (unscaled, non-finite) grads.
                step = self._steps
                self._steps += 1
                self._skipped_steps += 1
                if step % self.config.collect.every_n_steps == 0:
                    self._collect(step, skipped=True)
            self._step_seen_since_update = False

    def collect(self, step: int | None = None, *, skipped: bool = False) -> None:
        """Collect now, for loops that do not call optimizer.step().

        skipped=True: the training loop skipped optimizer.step() itself (e.g. the loss was
        not finite); the step is counted as seen and skipped, and its grads are collected.
        """
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise GradmonError(f"collect(step=...) needs an int or None, not {step!r}")
        if self._closed:
            raise GradmonError("collect() on a closed Monitor; attach again")
        with self._guard("collect"):
            if step is None:
                step = self._steps
            if self._optimizer_ref is None or skipped:
                self._steps += 1
            if skipped:
                self._skipped_steps += 1
            self._collect(step, skipped=skipped)

    def _collect(self, step: int, skipped: bool) -> None:
        started = time.perf_counter()
        self._publish_ready(wait=False)
        fresh = self._fresh_gradients()
        params: list[torch.Tensor | None] = [ref() for ref in self._param_refs]
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            if fresh[i] and p is not None and p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(i)
        parts: list[tuple[torch.Tensor, list[int]]] = []
        events: list[torch.cuda.Event] = []
        for (device, dtype), indices in groups.items():
            backend = self._backends.get((device, dtype))
            if backend is None:
                backend = select_backend(self.config.collect.backend, device, dtype)
                self._backends[(device, dtype)] = backend
            grads = [params[i].grad for i in indices]  # type: ignore[union-attr]
            weights = [params[i] for i in indices]
            partials = backend(grads)  # type: ignore[arg-type]
            param_sq = param_sum_squares(weights)  # type: ignore[arg-type]
            block = torch.cat([partials, param_sq.unsqueeze(1)], dim=1)
            if device.type != "cpu":
                # Non-blocking copy into pinned memory behind an event: published once the
                # event has completed, never waited for on the training thread.
                staging = torch.empty(block.shape, dtype=torch.float64, pin_memory=True)
                staging.copy_(block, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(torch.cuda.current_stream(device))
                events.append(event)
                block = staging
            parts.append((block, indices))
        if self._sinks:
            by_layer: dict[str, list[torch.Tensor]] = {}
            for indices in groups.values():
                for i in indices:
                    name = self._layer_names[self._layer_of[i]]
                    by_layer.setdefault(name, []).append(params[i].grad)  # type: ignore[union-attr,arg-type]
            for sink in self._sinks:
                with self._guard("sink"):
                    sink.on_collect(step, by_layer)
        for i in range(len(self._received)):
            self._received[i] = False
        self._pending.append(_Pending(step, skipped, started, parts, fresh, events))
        self._publish_ready(wait=False)

    def _fresh_gradients(self) -> list[bool]:
        """Which parameters received a gradient since the last collection.

        The hook is the main signal; a changed grad tensor or version counter catches grads
        written without autograd's accumulation (sharded or manually set grads).
        """
        fresh = []
        for i, ref in enumerate(self._param_refs):
            p = ref()
            g = None if p is None else p.grad
            key = None if g is None else (id(g), g._version)
            fresh.append(g is not None and (self._received[i] or key != self._last_grad[i]))
            self._last_grad[i] = key
        return fresh

    def _publish_ready(self, wait: bool) -> None:
        """Publish finished collections in order; CUDA ones only once their copy landed.

        Runs on the training thread and on whoever calls snapshot(): serialised by a lock.
        """
        with self._publish_lock:
            while self._pending:
                entry = self._pending[0]
                if wait:
                    for event in entry.events:
                        event.synchronize()  # sync-ok: only from snapshot(wait=True)
                elif not all(event.query() for event in entry.events):  # type: ignore[no-untyped-call]
                    return
                self._pending.pop(0)
                self._publish_entry(entry)

    def _publish_entry(self, entry: _Pending) -> None:
        table = torch.zeros((len(entry.fresh), NCOLS + 1), dtype=torch.float64)
        for block, indices in entry.parts:
            table[indices] = block
        self._publish(entry.step, entry.skipped, entry.started, table, entry.fresh)

    def _publish(
        self, step: int, skipped: bool, started: float, table: torch.Tensor, fresh: list[bool]
    ) -> None:
        with self._guard("publish"):
            rows = table.tolist()  # sync-ok: a host tensor by now
            layers: dict[str, LayerStats] = {}
            for name, members in zip(self._layer_names, self._layer_members, strict=True):
                if len(members) == 1:  # parameter granularity: no combining needed
                    i = members[0]
                    row = rows[i]
                    if fresh[i]:
                        layers[name] = finalize_layer(row, self._numels[i], row[NCOLS])
                    else:
                        layers[name] = no_grad_layer(self._numels[i], row[NCOLS])
                    continue
                got = [i for i in members if fresh[i]]
                param_sq = sum(rows[i][NCOLS] for i in members)
                numel = sum(self._numels[i] for i in (got or members))
                if got:
                    row = combine_rows([rows[i] for i in got])
                    layers[name] = finalize_layer(row, numel, param_sq)
                else:
                    layers[name] = no_grad_layer(numel, param_sq)
            norm = global_norm(layers)
            anomalies = self._health.evaluate(step, layers, norm)
            nonfinite = any(s.nan_count or s.inf_count for s in layers.values())
            snap = Snapshot(
                step=step,
                global_norm=norm,
                nonfinite=nonfinite,
                layers=layers,
                anomalies=anomalies,
                timestamp=time.time(),
                skipped=skipped,
            )
            with self._lock:
                self._snapshot = snap
                self._collections += 1
                self._nonfinite_steps += nonfinite
                for name, s in layers.items():
                    if s.nan_count or s.inf_count:
                        self._layer_nonfinite[name] = self._layer_nonfinite.get(name, 0) + 1
                for a in anomalies:
                    key = (a.layer, a.kind)
                    self._anomalies_total[key] = self._anomalies_total.get(key, 0) + 1
                self._norm_hist.observe(norm)
                self._duration_hist.observe(time.perf_counter() - started)
            for a in anomalies:
                log.debug("gradmon: step %d %s %s (%.3g)", step, a.kind, a.layer, a.value)
            if self._sinks:
                with self._lock:
                    scalars = dict(self._scalars)
                for sink in self._sinks:
                    with self._guard("sink"):
                        sink.on_publish(snap, scalars)

    @contextlib.contextmanager
    def _guard(self, stage: str) -> Iterator[None]:
        """Never let a failure inside the agent stop training: count it, warn once."""
        try:
            yield
        except Exception as exc:
            with self._lock:
                self._errors[stage] = self._errors.get(stage, 0) + 1
            if stage not in self._errors_logged:
                self._errors_logged.add(stage)
                log.warning(
                    "gradmon: error in stage %r (counted in gradmon_agent_errors_total; "
                    "training goes on, further errors of this stage are not logged): %r",
                    stage,
                    exc,
                    exc_info=True,
                )

    # -------------------------------------------------------------- reading
    def snapshot(self, wait: bool = False) -> Snapshot | None:
        """The latest published Snapshot, or None before the first collection.

        wait=True first waits for collections still in flight on a GPU.
        """
        with self._guard("publish"):
            self._publish_ready(wait=wait)
        return self._snapshot

    def log(self, **scalars: Any) -> None:
        """Record user scalars (loss, lr...) as gradmon_scalar{name}. Tensors are kept as
        they are and read at scrape time on the exporter's thread: no sync here."""
        for name, value in scalars.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise GradmonError(
                        f"log({name}=...): a tensor must hold one element, got shape "
                        f"{tuple(value.shape)}"
                    )
                value = value.detach()
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise GradmonError(
                    f"log({name}=...): needs a number or a one-element tensor, "
                    f"not {type(value).__name__}"
                )
        with self._lock:
            self._scalars.update(
                {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in scalars.items()}
            )

    @property
    def port(self) -> int | None:
        """The port /metrics is served on (the real one when exporter.port is 0)."""
        return self._server.port if self._server is not None else None

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    @property
    def layer_names(self) -> list[str]:
        return list(self._layer_names)

    def _export_state(self) -> ExportState:
        with self._lock:
            scalars = dict(self._scalars)
            state = ExportState(
                version=__version__,
                run_id=self.run_id,
                rank=self._rank,
                steps_total=self._steps,
                collections_total=self._collections,
                nonfinite_steps_total=self._nonfinite_steps,
                skipped_steps_total=self._skipped_steps,
                snapshot=self._snapshot,
                layer_names=self._exported_layers,
                anomalies_total=dict(self._anomalies_total),
                layer_nonfinite_total=dict(self._layer_nonfinite),
                errors_total=dict(self._errors),
                global_norm_hist=self._norm_hist.copy(),
                duration_hist=self._duration_hist.copy(),
                per_layer=self.config.exporter.per_layer,
            )
        # Tensor scalars and the loss scale are read here, on the scrape thread.
        with self._guard("export"):
            state.scalars = {k: scalar_value(v) for k, v in scalars.items()}
            if self._scaler is not None:
                state.loss_scale = float(self._scaler.get_scale())
        return state

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Remove every hook and stop the server. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if getattr(self, "_restore_scaler", None) is not None:
            self._restore_scaler()  # type: ignore[misc]
        for sink in getattr(self, "_sinks", []):
            with self._guard("sink"):
                sink.close()
        server = getattr(self, "_server", None)
        if server is not None:
            server.close()
        registry = getattr(self, "_registry", None)
        collector = getattr(self, "_collector", None)
        if registry is not None and collector is not None:
            with contextlib.suppress(KeyError):
                registry.unregister(collector)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: Any = None,
    config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    registry: CollectorRegistry | None = None,
) -> Monitor:
    """Attach gradmon to a model (and its optimizer) in one line. See Monitor."""
    return Monitor(model, optimizer, scaler=scaler, config=config, registry=registry)
