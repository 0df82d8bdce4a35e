"""The agent: hooks on the model and optimizer, one fused collection per optimizer step.

Flow (see DESIGN.md): post-accumulate-grad hooks mark which parameters received a
gradient; the optimizer's step pre-hook is where gradients are final (accumulated over
micro-batches, all-reduced by DDP, unscaled by GradScaler), so statistics are taken
there, in one backend call per (device, dtype) group. CPU results are published at once;
CUDA results are copied without blocking into pinned memory and published once their
event has completed, never waited for on the training thread.

Training regimes:
- GradScaler, plain optimizers: the scaler unscales the grads before `optimizer.step()`;
  a step it skips for inf/NaN never reaches the step hook, so `scaler.update()` is
  watched and the skipped step (its unscaled, non-finite grads) is collected there.
- GradScaler, fused optimizers (`fused=True`): the step hook sees scaled grads and the
  `grad_scale`/`found_inf` tensors the scaler hands the optimizer; the partials are
  divided by the scale on the device, and skipped steps are counted from `found_inf` on
  the device, read back with the partials (no host sync).
- DDP / FSDP2: see gradmon/distributed.py.
- torch.compile: the model's hooks sit on leaf parameters, outside compiled graphs; a
  compiled `optimizer.step()` calls the step hook as an opaque leaf function (no graph
  break) where torch has `torch._dynamo.decorators.leaf_function`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import re
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradmon import distributed, lifecycle
from gradmon.activations import ActivationTracker
from gradmon.config import Config, load_config
from gradmon.errors import GradmonError
from gradmon.export.collector import (
    AGENT_STAGES,
    DURATION_BUCKETS,
    GLOBAL_NORM_BUCKETS,
    ExportState,
    GradmonCollector,
    Histogram,
    RankLabelled,
    scalar_value,
)
from gradmon.export.server import MetricsServer
from gradmon.health import HealthRules
from gradmon.sinks import Sink, build_sinks
from gradmon.snapshot import (
    LayerStats,
    Snapshot,
    combine_rows,
    finalize_layer,
    global_norm,
    no_grad_layer,
)
from gradmon.staging import Staged, StagingPool
from gradmon.stats import NCOLS, Col, PartialsFn, partials_and_param_sum_squares, select_backend
from gradmon.update_ratio import UpdateRatio
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
    staged: list[Staged]  # one device-to-host copy per device; released once published
    # Fused optimizers under a GradScaler: [this step skipped (0/1), skipped steps so far]
    amp: torch.Tensor | None = None
    # Parameters whose (device, dtype) group failed: their layers are left out.
    failed: frozenset[int] = frozenset()
    # collect.update_ratio_every: a sampled step waits for its step post-hook's rows.
    held: bool = False
    update: list[tuple[Staged, list[int]]] | None = None
    # collect.activations: the window's [modules, 6] tables, on their way to the host
    activations: list[Staged] = field(default_factory=list)


def _layer_name(param_name: str, granularity: str, depth: int = 1) -> str:
    if granularity == "parameter":
        return param_name
    module = param_name.rpartition(".")[0]
    if granularity == "depth" and module:
        module = ".".join(module.split(".")[:depth])
    return module or ROOT_MODULE


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP/DataParallel and torch.compile wrappers: layer names
    stay those of the plain model (no `module.` / `_orig_mod.` prefix)."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, parallel) and isinstance(model.module, nn.Module):
            model = model.module
            continue
        # torch.compile(model) returns an OptimizedModule; dynamo is loaded if one exists.
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")
        optimized = getattr(eval_frame, "OptimizedModule", None)
        if optimized is not None and isinstance(model, optimized):
            model = model._orig_mod
            continue
        return model


def _param_count(optimizer: torch.optim.Optimizer) -> int:
    return sum(len(group["params"]) for group in optimizer.param_groups)


def _fill_implicit_zeros(partials: torch.Tensor, implicit: dict[int, int]) -> torch.Tensor:
    """Rows of sparse grads: the entries missing from their values are zeros, counted in
    ZERO_COUNT and taken into MIN/MAX (sums and abs-max are unchanged by zeros)."""
    partials = partials.clone()
    for row, zeros in implicit.items():
        partials[row, Col.ZERO_COUNT] += zeros
        partials[row, Col.MIN] = partials[row, Col.MIN].clamp(max=0.0)
        partials[row, Col.MAX] = partials[row, Col.MAX].clamp(min=0.0)
    return partials


def _unscale_partials(partials: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Partials of grad / scale from those of grad, on the partials' device, no host sync:
    sum of squares times 1/s**2; sum, abs-max, min, max times 1/s; counts unchanged."""
    if isinstance(scale, torch.Tensor):
        inv: torch.Tensor | float = (
            scale.detach()
            .to(device=partials.device, dtype=torch.float64, non_blocking=True)
            .reshape(())
            .reciprocal()
        )
    else:
        inv = 1.0 / float(scale)
    factors = torch.ones(NCOLS, dtype=torch.float64, device=partials.device)
    factors[Col.SUM_SQ : Col.MAX + 1] = inv  # a fill / device copy, not a host list
    factors[Col.SUM_SQ] = inv * inv
    return partials * factors


def _scaler_stepped(scaler: Any, optimizer: torch.optim.Optimizer) -> bool | None:
    """Whether `scaler.step(optimizer)` ran since the last update (skipped or not), from
    the scaler's per-optimizer stage; None when this GradScaler does not tell."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, Mapping):
        return None
    state = states.get(id(optimizer))  # .get: no entry made in the defaultdict
    if state is None:
        return False
    name = getattr(state.get("stage"), "name", None) if isinstance(state, Mapping) else None
    return None if name is None else name == "STEPPED"


def _watch_scaler(scaler: Any, monitor: Monitor) -> Callable[[], None]:
    """Call `monitor._on_scaler_update(scaler)` before every `scaler.update()`.

    One wrapper per scaler, shared by every monitor watching it (several optimizers, one
    scaler); returns the function that stops watching, which restores `scaler.update`
    when the last monitor leaves.
    """
    update = scaler.__dict__.get("update")
    monitors: list[weakref.ref[Monitor]] | None = getattr(update, "_gradmon_monitors", None)
    if monitors is None:
        original = scaler.update
        watching: list[weakref.ref[Monitor]] = []

        def wrapped(new_scale: Any = None) -> Any:
            for ref in list(watching):
                mon = ref()
                if mon is not None:
                    mon._on_scaler_update(scaler)
            return original(new_scale)

        wrapped._gradmon_monitors = watching  # type: ignore[attr-defined]
        scaler.update = wrapped
        update, monitors = wrapped, watching
    ref = weakref.ref(monitor)
    monitors.append(ref)

    def unwatch() -> None:
        if ref in monitors:
            monitors.remove(ref)
        if not monitors and scaler.__dict__.get("update") is update:
            del scaler.update

    return unwatch


# torch.compile: the step hook reaches its monitor through a key (an int, which dynamo
# can guard on), not through a closure it would have to trace.
_STEP_HOOK_MONITORS: dict[int, weakref.ref[Monitor]] = {}
_step_hook_keys = itertools.count(1)


def _step_hook_by_key(key: int, post: bool = False) -> None:
    ref = _STEP_HOOK_MONITORS.get(key)
    mon = ref() if ref is not None else None
    if mon is not None:
        if post:
            mon._on_optimizer_step_post()
        else:
            mon._on_optimizer_step()


@functools.cache
def _compiled_step_hook(post: bool = False) -> Callable[[int], None]:
    """The step (pre or post) hook as torch.compile runs it: a leaf function (an opaque
    call in the graph, run eagerly at runtime: no graph break), or where this torch has no
    `leaf_function`, a `torch.compiler.disable`d call (correct, with a graph break)."""
    try:
        from torch._dynamo.decorators import leaf_function
    except ImportError:
        fallback: Callable[[int], None] = torch.compiler.disable(  # type: ignore[no-untyped-call]
            functools.partial(_step_hook_by_key, post=post)
        )
        return fallback

    def gradmon_step_hook(key: int) -> None:
        _step_hook_by_key(key, post)

    if post:  # a name of its own: the leaf is an op named after the function
        gradmon_step_hook.__name__ = gradmon_step_hook.__qualname__ = "gradmon_step_post_hook"
    leaf = leaf_function(gradmon_step_hook)

    @leaf.register_fake  # type: ignore[attr-defined,untyped-decorator]
    def _fake(key: int) -> None:
        return None

    hook: Callable[[int], None] = leaf
    return hook


_OPTIMIZER_FILE = os.path.join("torch", "optim", "optimizer.py")


def _inside_optimizer_step() -> bool:
    """Whether any thread is inside Optimizer.step's hook-calling wrapper right now."""
    for frame in sys._current_frames().values():
        f: Any = frame
        while f is not None:
            code = f.f_code
            if code.co_name == "wrapper" and code.co_filename.endswith(_OPTIMIZER_FILE):
                return True
            f = f.f_back
    return False


def _remove_at_next_backward(
    param_refs: list[weakref.ref[nn.Parameter]], handles: list[RemovableHandle]
) -> None:
    """Remove `handles` from the first gradient accumulated after this (a backward runs
    outside any optimizer step), then remove that one-shot hook itself."""
    params = (ref() for ref in param_refs)
    param = next((p for p in params if p is not None and p.requires_grad), None)
    if param is None:
        return  # no backward will come: they stay, inert, as long as the optimizer lives
    own: list[RemovableHandle] = []

    def remove(_param: torch.Tensor) -> None:
        for handle in (*handles, *own):
            handle.remove()
        handles.clear()
        own.clear()

    own.append(param.register_post_accumulate_grad_hook(remove))  # type: ignore[no-untyped-call]


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
        # Held while a hook works, so that close() from another thread waits for it.
        self._hook_lock = threading.RLock()
        self._closed = False
        self._handles: list[RemovableHandle] = []
        # The optimizer's step hooks: torch iterates their dict in Python, so they cannot be
        # removed while any thread is inside an optimizer step (see _remove_hooks).
        self._step_handles: list[RemovableHandle] = []
        # Parameters left out, by name, with the reason (see `Monitor.skipped`).
        self._skipped: dict[str, str] = {}
        self._skip_counted = 0  # skips that count in gradmon_agent_errors_total{collect}
        self._skipped_index: set[int] = set()  # monitored parameters skipped at collection

        named = self._select_parameters(_unwrap(model), optimizer)
        self._param_refs = [weakref.ref(p) for _, p in named]
        self._param_names = [n for n, _ in named]
        layer_names: list[str] = []
        self._layer_of: list[int] = []
        for name, _ in named:
            layer = _layer_name(name, cfg.collect.granularity, cfg.collect.depth)
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
        # Under FSDP2 a parameter is a DTensor: this rank's statistics are of its shard.
        # Complex parameters are measured as their real and imaginary parts
        # (torch.view_as_real): two entries per element.
        self._numels = [
            distributed.local_tensor(p).numel() * (2 if p.is_complex() else 1) for _, p in named
        ]
        self._sharded = any(distributed.is_sharded(p) for _, p in named)
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
        self._staging = StagingPool()  # pinned host buffers of the CUDA copies, reused
        # Opt-in gradmon_update_ratio (gradmon/update_ratio.py): needs the optimizer's step.
        self._update: UpdateRatio | None = None
        self._held: _Pending | None = None  # the sampled collection awaiting its post-hook
        if cfg.collect.update_ratio_every and optimizer is None:
            log.warning(
                "gradmon: collect.update_ratio_every is set but attach() got no optimizer: "
                "the update ratio is measured around optimizer.step(), so it is off"
            )
        elif cfg.collect.update_ratio_every:
            self._update = UpdateRatio(
                cfg.collect.update_ratio_every,
                cfg.collect.update_ratio_max_bytes,
                layer_names,
                self._layer_members,
                self._param_refs,
            )

        # State the exporter copies under self._lock.
        self._steps = 0
        self._collections = 0
        self._nonfinite_steps = 0
        self._skipped_steps = 0
        self._snapshot: Snapshot | None = None
        self._anomalies_total: dict[tuple[str, str], int] = {}
        self._layer_nonfinite: dict[str, int] = {}
        self._errors: dict[str, int] = dict.fromkeys(AGENT_STAGES, 0)
        self._errors["collect"] += self._skip_counted
        self._errors_logged: set[str] = set()
        self._warned_gone = False
        self._scalars: dict[str, Any] = {}
        self._norm_hist = Histogram(GLOBAL_NORM_BUCKETS)
        self._duration_hist = Histogram(DURATION_BUCKETS)
        self._health = HealthRules(cfg.health)
        self._rank: int | None = None  # read lazily: the group may be initialised later
        # Fused optimizers under a GradScaler: steps skipped for inf/NaN, counted on the
        # device and read back with the partials of each collection.
        self._fused_skips: torch.Tensor | None = None
        self._fused_skipped = 0
        self.run_id = cfg.run_id or os.environ.get("GRADMON_RUN_ID") or uuid.uuid4().hex[:12]

        self._sinks: list[Sink] = build_sinks(cfg)
        self._model_ref = weakref.ref(model)
        self._optimizer_ref = weakref.ref(optimizer) if optimizer is not None else None
        # Parameters added to the optimizer after attach() are not monitored: told once.
        self._opt_param_ids: set[int] = set()
        self._opt_param_count = 0
        if optimizer is not None:
            self._opt_param_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            self._opt_param_count = _param_count(optimizer)
        self._scaler = scaler
        self._step_seen_since_update = False
        self._unwatch_scaler: Callable[[], None] | None = None
        self._hook_key: int | None = None
        self._activations: ActivationTracker | None = None
        self._activation_nonfinite: dict[str, int] = {}
        self._exported_activations: list[str] = []

        try:
            self._install_hooks(named, optimizer, scaler)
            if cfg.collect.activations:
                self._activations = ActivationTracker(_unwrap(model), cfg.collect, ROOT_MODULE)
                self._exported_activations = self._activations.names[: cfg.exporter.max_layers]
                if len(self._activations.names) > cfg.exporter.max_layers:
                    log.warning(
                        "gradmon: %d modules with activation statistics but "
                        "exporter.max_layers is %d: gradmon_activation_* series are exported "
                        "for the first %d only; narrow collect.activations_include/exclude",
                        len(self._activations.names),
                        cfg.exporter.max_layers,
                        cfg.exporter.max_layers,
                    )
            self._registry = registry if registry is not None else self._default_registry()
            self._collector = GradmonCollector(self._export_state, self._export_error_fn())
            self._registry.register(self._collector)
            self._server: MetricsServer | None = None
            if cfg.exporter.enabled:
                port = distributed.metrics_port(cfg.exporter.port)
                self._server = MetricsServer(
                    cfg.exporter,
                    port,
                    self._registry,
                    on_error=self._export_error_fn(),
                    render=functools.partial(self._collector.exposition, self._registry),
                )
        except BaseException:
            self.close()
            raise
        lifecycle.track(self)

    # ----------------------------------------------------------------- set-up
    def _select_parameters(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> list[tuple[str, nn.Parameter]]:
        cfg = self.config.collect
        # named_parameters() lists a shared parameter once, under its first name.
        trainable = []
        meta = []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                # Frozen layers and integer/bool tensors registered as parameters: no
                # gradient ever; listed in `skipped`, not counted as an agent error.
                self._skipped[n] = "requires_grad=False"
            elif p.device.type == "meta":
                meta.append(n)
            else:
                trainable.append((n, p))
        if meta and not trainable:
            raise GradmonError(
                f"attach(): every trainable parameter of {type(model).__name__} is on the meta "
                f"device (e.g. {meta[0]!r}): there is no data to monitor; materialize the "
                "model first (model.to_empty(device=...) and initialisation), then attach()"
            )
        for n in meta:
            self._skip(n, "on the meta device (no data; attach after materializing the model)")
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
            layer = _layer_name(name, cfg.granularity, cfg.depth)
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

    def _skip(self, name: str, reason: str) -> None:
        """Leave a parameter out: named in `skipped`, counted once in
        gradmon_agent_errors_total{stage="collect"}, warned once."""
        with self._lock:
            if name in self._skipped:
                return
            self._skipped[name] = reason
        if hasattr(self, "_errors"):
            with self._lock:
                self._errors["collect"] += 1
        else:  # during attach: counted once the counters exist
            self._skip_counted += 1
        log.warning(
            "gradmon: parameter %r is not monitored: %s (counted in "
            'gradmon_agent_errors_total{stage="collect"}; see Monitor.skipped)',
            name,
            reason,
        )

    def _grad_view(self, i: int, grad: torch.Tensor) -> torch.Tensor | None:
        """The dense real tensor whose entries the statistics are taken over, or None
        (the parameter is skipped, with its reason) for a gradient gradmon cannot read.

        - sparse COO (`nn.Embedding(sparse=True)`): the values of the coalesced grad; the
          entries it leaves out are zeros, added back by `_fill_implicit_zeros`.
        - complex: `torch.view_as_real`, so every statistic is over the real and
          imaginary parts as separate entries (the norm is the complex L2 norm).
        """
        reason = None
        if grad.device.type == "meta":
            reason = "its gradient is on the meta device (no data)"
        elif grad.layout == torch.sparse_coo:
            grad = grad.coalesce().values()
        elif grad.layout != torch.strided:
            reason = f"gradient layout {grad.layout} is not supported (strided or sparse_coo)"
        if reason is None and grad.is_complex():
            grad = torch.view_as_real(grad.resolve_conj())
        elif reason is None and not grad.is_floating_point():
            reason = f"gradient dtype {grad.dtype} is neither floating point nor complex"
        if reason is not None:
            self._skip(self._param_names[i], reason)
            self._skipped_index.add(i)
            return None
        return grad

    def _check_new_parameters(self) -> None:
        """Parameters added to the optimizer after attach() get no hooks and are not
        monitored: say so once per parameter (a cheap length check per collection)."""
        optimizer = self._optimizer_ref() if self._optimizer_ref is not None else None
        if optimizer is None or _param_count(optimizer) == self._opt_param_count:
            return
        self._opt_param_count = _param_count(optimizer)
        model = self._model_ref()
        names = {id(p): n for n, p in _unwrap(model).named_parameters()} if model else {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in self._opt_param_ids:
                    self._opt_param_ids.add(id(p))
                    name = names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")
                    self._skip(name, "added after attach() (attach again to monitor it)")

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
            key = self._hook_key = next(_step_hook_keys)
            _STEP_HOOK_MONITORS[key] = me
            compiled_hook = _compiled_step_hook()

            def on_step(opt: Any, _args: Any, _kwargs: Any) -> None:
                if torch.compiler.is_compiling():
                    # Traced by dynamo (a compiled optimizer step): an opaque call that
                    # runs the eager branch's work at runtime, with no graph break.
                    compiled_hook(key)
                    return
                mon = me()
                if mon is not None and not mon._closed:
                    mon._on_optimizer_step(opt)

            self._step_handles.append(optimizer.register_step_pre_hook(on_step))

            if self._update is not None:  # only then: no post-hook cost when it is off
                compiled_post = _compiled_step_hook(post=True)

                def on_step_post(opt: Any, _args: Any, _kwargs: Any) -> None:
                    if torch.compiler.is_compiling():
                        compiled_post(key)  # as on_step: an opaque leaf call
                        return
                    mon = me()
                    if mon is not None:
                        mon._on_optimizer_step_post()

                self._step_handles.append(optimizer.register_step_post_hook(on_step_post))

        if scaler is not None:
            self._unwatch_scaler = _watch_scaler(scaler, self)

    def _default_registry(self) -> CollectorRegistry:
        # A registry of our own, so attach/close/attach never collides on names. The
        # process and platform series get `rank` too under several ranks.
        registry = CollectorRegistry(auto_describe=False)
        me = weakref.ref(self)

        def rank() -> int | None:
            mon = me()
            return mon._rank_now() if mon is not None else None

        registry.register(RankLabelled(ProcessCollector(registry=None), rank))
        registry.register(RankLabelled(PlatformCollector(registry=None), rank))
        return registry

    def _rank_now(self) -> int | None:
        """The rank label; looked up until a process group of several ranks exists."""
        if self._rank is None:
            self._rank = distributed.rank_label()
        return self._rank

    # ------------------------------------------------------------ hot path
    def _on_optimizer_step(self, optimizer: Any = None) -> None:
        with self._hook_lock, self._guard("hook"):
            if self._closed:  # closed by another thread while this step waited
                return
            self._step_seen_since_update = True
            step = self._steps
            self._advance()
            if optimizer is None and self._optimizer_ref is not None:
                optimizer = self._optimizer_ref()
            # Set by GradScaler.step() on fused optimizers only, for the step's duration.
            grad_scale = getattr(optimizer, "grad_scale", None)
            skip_flag = self._count_fused_skip(getattr(optimizer, "found_inf", None))
            if step % self.config.collect.every_n_steps == 0:
                measure = self._update is not None and self._update.due()
                self._collect(
                    step, False, grad_scale=grad_scale, skip_flag=skip_flag, measure=measure
                )

    def _on_optimizer_step_post(self) -> None:
        """After optimizer.step() of a sampled collection: the update ratio's rows, staged
        like the partials; the collection is published with them."""
        with self._hook_lock:  # as the pre-hook: close() from another thread waits for it
            if self._closed:
                return
            entry, self._held = self._held, None
            if entry is None or self._update is None:
                return
            try:
                with self._guard("hook"):
                    parts = self._update.after_step()
                    entry.update = [(self._to_host(rows), layers) for rows, layers in parts]
            finally:
                entry.held = False  # published with the ratios, or (on a failure) without
            with self._guard("publish"):
                self._publish_ready(wait=False)

    def _advance(self) -> None:
        """Count a step; arm the activation hooks when the next step is a collected one."""
        self._steps += 1
        if self._activations is not None:
            self._activations.armed = self._steps % self.config.collect.every_n_steps == 0

    def _count_fused_skip(self, found_inf: Any) -> torch.Tensor | None:
        """A fused optimizer skips a step with inf/NaN inside its kernel: add the step's
        found_inf (0/1) to a device counter. Returns the step's flag, still on the device."""
        if not isinstance(found_inf, torch.Tensor):
            return None
        flag = found_inf.detach().sum().gt(0).to(torch.float64)
        if self._fused_skips is None or self._fused_skips.device != flag.device:
            self._fused_skips = torch.zeros((), dtype=torch.float64, device=flag.device)
        self._fused_skips.add_(flag)
        return flag

    def _on_scaler_update(self, scaler: Any) -> None:
        """Before `scaler.update()`: was our optimizer's step skipped in this iteration?"""
        if self._closed:
            return
        with self._hook_lock, self._guard("scaler"):
            seen = self._step_seen_since_update
            self._step_seen_since_update = False
            optimizer = self._optimizer_ref() if self._optimizer_ref is not None else None
            if seen or optimizer is None:
                return  # stepped (fused skips are counted on the device), or cannot tell
            if _scaler_stepped(scaler, optimizer) is False:
                return  # scaler.step() did not run for our optimizer in this iteration
            # GradScaler found inf/NaN and skipped optimizer.step(): our step hook never
            # ran, so count the step here and look at the (unscaled, non-finite) grads.
            step = self._steps
            self._advance()
            self._skipped_steps += 1
            if step % self.config.collect.every_n_steps == 0:
                self._collect(step, skipped=True)

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
                self._advance()
            if skipped:
                self._skipped_steps += 1
            self._collect(step, skipped=skipped)

    def _collect(
        self,
        step: int,
        skipped: bool,
        grad_scale: torch.Tensor | float | None = None,
        skip_flag: torch.Tensor | None = None,
        measure: bool = False,
    ) -> None:
        started = time.perf_counter()
        if self._held is not None:  # the last sampled step raised before its post-hook
            self._held.held = False
            self._held = None
        self._publish_ready(wait=False)
        self._check_new_parameters()
        fresh = self._fresh_gradients()
        local = distributed.local_tensor  # a DTensor's shard on this rank; else the tensor
        grads: dict[int, torch.Tensor] = {}
        weights: dict[int, torch.Tensor] = {}
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        gone = 0
        for i, ref in enumerate(self._param_refs):
            p = ref()
            gone += p is None
            if fresh[i] and p is not None and p.grad is not None:
                g = self._grad_view(i, local(p.grad))
                if g is None:
                    fresh[i] = False  # skipped, with its reason: published as no gradient
                    continue
                grads[i] = g
                w = local(p).detach()
                weights[i] = torch.view_as_real(w.resolve_conj()) if w.is_complex() else w
                groups.setdefault((g.device, g.dtype), []).append(i)
        if gone and not self._warned_gone:
            self._warned_gone = True
            log.warning(
                "gradmon: %d of the %d monitored parameters no longer exist: the model's "
                "parameters were replaced after attach() (fully_shard, to_empty, "
                "load_state_dict(assign=True)?); attach after wrapping/sharding the model",
                gone,
                len(self._param_refs),
            )
        blocks: dict[torch.device, list[tuple[torch.Tensor, list[int] | None]]] = {}
        failed: set[int] = set()
        for (device, dtype), indices in groups.items():
            # A failing group (its backend, its dtype) leaves only its own layers out.
            failed.update(indices)
            with self._guard("collect"):
                backend = self._backends.get((device, dtype))
                if backend is None:
                    backend = select_backend(self.config.collect.backend, device, dtype)
                    self._backends[(device, dtype)] = backend
                partials, param_sq = partials_and_param_sum_squares(
                    backend, [grads[i] for i in indices], [weights[i] for i in indices]
                )
                # Sparse grads: their values leave out the (implicit) zero entries.
                implicit = {
                    row: self._numels[i] - grads[i].numel()
                    for row, i in enumerate(indices)
                    if self._numels[i] != grads[i].numel()
                }
                if implicit:
                    partials = _fill_implicit_zeros(partials, implicit)
                if grad_scale is not None:
                    # A fused optimizer under a GradScaler sees scaled grads: unscale the
                    # statistics on the device.
                    partials = _unscale_partials(partials, grad_scale)
                block = torch.cat([partials, param_sq.unsqueeze(1).to(partials.device)], dim=1)
                blocks.setdefault(block.device, []).append((block, indices))
                failed.difference_update(indices)
        if skip_flag is not None and self._fused_skips is not None:
            # The fused-AMP flags ride in one extra row of their device's copy.
            flags = torch.stack([skip_flag, self._fused_skips])
            row = torch.cat([flags, flags.new_zeros(NCOLS - 1)]).unsqueeze(0)
            blocks.setdefault(row.device, []).append((row, None))
        parts, staged, amp = self._stage_blocks(blocks)
        if self._sinks:
            by_layer: dict[str, list[torch.Tensor]] = {}
            for indices in groups.values():
                for i in indices:
                    name = self._layer_names[self._layer_of[i]]
                    by_layer.setdefault(name, []).append(grads[i])
            for sink in self._sinks:
                with self._guard("sink"):
                    sink.on_collect(step, by_layer)
        acts = self._activations.take(self._to_host) if self._activations else []
        for i in range(len(self._received)):
            self._received[i] = False
        entry = _Pending(
            step, skipped, started, parts, fresh, staged, amp, frozenset(failed), activations=acts
        )
        if measure and self._update is not None:
            with self._guard("hook"):
                # After the gradients: the old weights, copied for the step post-hook.
                entry.held = self._update.before_step()
        if entry.held:
            self._held = entry
        self._pending.append(entry)
        self._publish_ready(wait=False)

    def _stage_blocks(
        self, blocks: dict[torch.device, list[tuple[torch.Tensor, list[int] | None]]]
    ) -> tuple[list[tuple[torch.Tensor, list[int]]], list[Staged], torch.Tensor | None]:
        """One device-to-host copy per device: the blocks of a device are concatenated
        first. Returns the host rows of each block (valid once its copy is ready), the
        copies, and the fused-AMP flag row (the block without indices) if any."""
        parts: list[tuple[torch.Tensor, list[int]]] = []
        staged: list[Staged] = []
        amp = None
        for items in blocks.values():
            whole = items[0][0] if len(items) == 1 else torch.cat([b for b, _ in items])
            copy = self._to_host(whole)
            staged.append(copy)
            start = 0
            for block, indices in items:
                rows = copy.host[start : start + block.shape[0]]
                start += block.shape[0]
                if indices is None:
                    amp = rows[0, :2]
                else:
                    parts.append((rows, indices))
        return parts, staged, amp

    def _to_host(self, block: torch.Tensor) -> Staged:
        """CPU: the block itself. Otherwise a non-blocking copy into a pooled pinned buffer
        behind an event: published once the event has completed, never waited for here."""
        if block.device.type == "cpu":
            return Staged(block)
        return self._staging.stage(block)

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
                if entry.held:
                    return  # its optimizer step is still running (the post-hook comes)
                copies = entry.staged + entry.activations + [copy for copy, _ in entry.update or []]
                if wait:
                    for copy in copies:
                        if copy.event is not None:
                            copy.event.synchronize()  # sync-ok: only from snapshot(wait=True)
                elif not all(copy.ready() for copy in copies):
                    return
                self._pending.pop(0)
                self._publish_entry(entry, copies)

    def _publish_entry(self, entry: _Pending, copies: list[Staged]) -> None:
        table = torch.zeros((len(entry.fresh), NCOLS + 1), dtype=torch.float64)
        for block, indices in entry.parts:
            table[indices] = block
        skipped = entry.skipped
        if entry.amp is not None:
            step_skipped, skipped_so_far = entry.amp.tolist()  # sync-ok: host memory by now
            skipped = skipped or step_skipped > 0
            with self._lock:
                self._fused_skipped = max(self._fused_skipped, int(skipped_so_far))
        if entry.update and self._update is not None:
            with self._guard("publish"):
                self._update.finish([(copy.host, layers) for copy, layers in entry.update])
        # Read before the buffers go back to the pool (another thread may stage into them).
        activation_tables = [copy.host.clone() for copy in entry.activations]
        for copy in copies:  # every row is read: the buffers may be reused
            self._staging.release(copy)
        self._publish(
            entry.step,
            skipped,
            entry.started,
            table,
            entry.fresh,
            entry.failed,
            activation_tables,
        )

    def _publish(
        self,
        step: int,
        skipped: bool,
        started: float,
        table: torch.Tensor,
        fresh: list[bool],
        failed: frozenset[int] = frozenset(),
        activation_tables: list[torch.Tensor] | None = None,
    ) -> None:
        with self._guard("publish"):
            rows = table.tolist()  # sync-ok: a host tensor by now
            layers: dict[str, LayerStats] = {}
            for name, members in zip(self._layer_names, self._layer_members, strict=True):
                if failed and any(i in failed for i in members):
                    continue  # its group failed (counted): left out, not shown as zeros
                try:
                    layers[name] = self._layer_stats(members, rows, fresh)
                except Exception as exc:  # one bad layer leaves the others published
                    self._count_error("publish", exc)
            ratios = self._update.last if self._update is not None else None
            if ratios:  # the last measured value of each layer (update_ratio.py: staleness)
                layers = {
                    n: dataclasses.replace(s, update_ratio=ratios.get(n)) for n, s in layers.items()
                }
            norm = global_norm(layers)
            # An empty shard (FSDP: a rank may hold no element of a small parameter) is
            # neither vanishing nor dead: leave it to the ranks that hold the elements.
            # A layer whose every parameter is skipped (Monitor.skipped) is not judged either.
            left_out = self._skipped_index
            judged = {
                n: layers[n]
                for n, members in zip(self._layer_names, self._layer_members, strict=True)
                if n in layers  # left out: its group or its statistics failed (counted)
                and layers[n].numel > 0
                and not (left_out and all(i in left_out for i in members))
            }
            anomalies = self._health.evaluate(step, judged, norm)
            nonfinite = any(s.nan_count or s.inf_count for s in layers.values())
            acts = {}
            if self._activations is not None and activation_tables:
                acts = self._activations.finalize(activation_tables)
            snap = Snapshot(
                step=step,
                global_norm=norm,
                nonfinite=nonfinite,
                layers=layers,
                anomalies=anomalies,
                timestamp=time.time(),
                skipped=skipped,
                activations=acts,
            )
            with self._lock:
                self._snapshot = snap
                self._collections += 1
                self._nonfinite_steps += nonfinite
                for name, s in layers.items():
                    if s.nan_count or s.inf_count:
                        self._layer_nonfinite[name] = self._layer_nonfinite.get(name, 0) + 1
                for name, act in acts.items():
                    if act.nan_count or act.inf_count:
                        count = self._activation_nonfinite.get(name, 0) + 1
                        self._activation_nonfinite[name] = count
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

    def _layer_stats(
        self, members: list[int], rows: list[list[float]], fresh: list[bool]
    ) -> LayerStats:
        if len(members) == 1:  # parameter granularity: no combining needed
            i = members[0]
            row = rows[i]
            if fresh[i]:
                return finalize_layer(row, self._numels[i], row[NCOLS])
            return no_grad_layer(self._numels[i], row[NCOLS])
        got = [i for i in members if fresh[i]]
        param_sq = sum(rows[i][NCOLS] for i in members)
        numel = sum(self._numels[i] for i in (got or members))
        if got:
            return finalize_layer(combine_rows([rows[i] for i in got]), numel, param_sq)
        return no_grad_layer(numel, param_sq)

    @contextlib.contextmanager
    def _guard(self, stage: str) -> Iterator[None]:
        """Never let a failure inside the agent stop training: count it, warn once."""
        try:
            yield
        except Exception as exc:
            self._count_error(stage, exc)

    def _count_error(self, stage: str, exc: BaseException) -> None:
        with self._lock:
            self._errors[stage] = self._errors.get(stage, 0) + 1
            first = stage not in self._errors_logged
            self._errors_logged.add(stage)
        if first:
            log.warning(
                "gradmon: error in stage %r (counted in gradmon_agent_errors_total; "
                "training goes on, further errors of this stage are not logged): %r",
                stage,
                exc,
                exc_info=exc,
            )

    def _export_error_fn(self) -> Callable[[BaseException], None]:
        """For the exporter and the server: count a scrape-time failure under `export`.
        Holds the monitor weakly (the server thread must not keep it alive)."""
        me = weakref.ref(self)

        def on_error(exc: BaseException) -> None:
            mon = me()
            if mon is not None:
                mon._count_error("export", exc)

        return on_error

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
    def skipped(self) -> dict[str, str]:
        """Parameters that are not monitored, by name, with the reason: requires_grad=False,
        meta device, an unsupported gradient layout or dtype, added after attach()."""
        with self._lock:
            return dict(self._skipped)

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    @property
    def layer_names(self) -> list[str]:
        return list(self._layer_names)

    def _exports_layers(self, rank: int | None) -> bool:
        """Whether this rank exports the per-layer families (exporter.per_layer_ranks)."""
        cfg = self.config.exporter
        if not cfg.per_layer:
            return False
        if rank is None or rank == 0 or cfg.per_layer_ranks == "all":
            return True
        # auto: replicated grads (DDP) are the same on every rank, rank 0 speaks for all;
        # sharded ones (FSDP) are additive partials, every rank exports its own.
        return cfg.per_layer_ranks == "auto" and self._sharded

    def _export_state(self) -> ExportState:
        rank = self._rank_now()
        with self._lock:
            scalars = dict(self._scalars)
            errors = dict(self._errors)
            if self._activations is not None:
                errors["hook"] = errors.get("hook", 0) + self._activations.errors
            state = ExportState(
                version=__version__,
                run_id=self.run_id,
                rank=rank,
                steps_total=self._steps,
                collections_total=self._collections,
                nonfinite_steps_total=self._nonfinite_steps,
                skipped_steps_total=self._skipped_steps + self._fused_skipped,
                snapshot=self._snapshot,
                layer_names=self._exported_layers,
                anomalies_total=dict(self._anomalies_total),
                layer_nonfinite_total=dict(self._layer_nonfinite),
                errors_total=errors,
                global_norm_hist=self._norm_hist.copy(),
                duration_hist=self._duration_hist.copy(),
                per_layer=self._exports_layers(rank),
                activation_names=self._exported_activations,
                activation_nonfinite_total=dict(self._activation_nonfinite),
            )
        # Tensor scalars and the loss scale are read here, on the scrape thread: on CUDA
        # that read waits for the GPU on this thread only (item() releases the GIL), never
        # on the training thread.
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
        # The hooks are inert from here on. One may still be working on the training
        # thread (close() from another thread): let it finish before its handles and
        # sinks go; bounded, so that a stuck hook cannot hang close().
        acquired = self._hook_lock.acquire(timeout=5.0)
        try:
            self._remove_hooks()
            for sink in getattr(self, "_sinks", []):
                with self._guard("sink"):
                    sink.close()
        finally:
            if acquired:
                self._hook_lock.release()
        server = getattr(self, "_server", None)
        if server is not None:
            server.close()
        registry = getattr(self, "_registry", None)
        collector = getattr(self, "_collector", None)
        if registry is not None and collector is not None:
            with contextlib.suppress(KeyError):
                registry.unregister(collector)

    def _remove_hooks(self) -> None:
        # Tensor and module hooks can go at any time (torch tolerates their removal while
        # it runs them). The optimizer's step hooks cannot: Optimizer.step iterates their
        # OrderedDict in Python, and removing one there (close() from another thread, or
        # from a user's step hook that runs before ours) raises "OrderedDict mutated
        # during iteration" in the training step. Then they stay (inert: the monitor is
        # closed) and go at the next backward, when no step is running.
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        step_handles = getattr(self, "_step_handles", [])
        if step_handles and _inside_optimizer_step():
            _remove_at_next_backward(self._param_refs, list(step_handles))
        else:
            for handle in step_handles:
                handle.remove()
        step_handles.clear()
        if getattr(self, "_hook_key", None) is not None:
            _STEP_HOOK_MONITORS.pop(self._hook_key, None)  # type: ignore[arg-type]
        unwatch = getattr(self, "_unwatch_scaler", None)
        if unwatch is not None:
            unwatch()
        activations = getattr(self, "_activations", None)
        if activations is not None:
            activations.remove()

    def _after_fork_in_child(self) -> None:
        """In a forked child (a DataLoader worker): inert and holding no port.

        The parent's threads do not exist here: the server is not shut down (that would
        wait forever for a serve thread), only this process's copy of its listening
        socket is closed, so that the parent's close() frees the port; the sinks are
        dropped unclosed (their files and writer threads are the parent's). Locks another
        thread held at fork time would never be released here: they are made anew.
        """
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._hook_lock = threading.RLock()
        self._closed = True
        self._sinks = []
        self._pending = []
        self._remove_hooks()
        server = getattr(self, "_server", None)
        if server is not None:
            server.close_in_child()

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
