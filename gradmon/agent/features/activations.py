"""Activation statistics (opt-in, `collect.activations: true`): forward hooks on modules.

What is recorded. Each selected module (default: every leaf module, i.e. one without
children; see `collect.activations_include`) gets a forward hook. Its output, or for a
tuple/list output the first floating-point tensor in it, gives five additive partials:
sum of squares and sum of the finite entries, and the counts of exact zeros, NaN and Inf
entries, plus the number of entries. An output with no floating-point tensor (ints,
None, a dict) is not recorded. The partials add up over every forward before one
collection (gradient-accumulation micro-batches; a module called twice per forward) and
become `ActivationStats` (rms, mean, zero_ratio, nan_count, inf_count) at publication.

When. Only the forwards before a collected step compute anything: the monitor keeps
`armed` True exactly while the next optimizer step is a collected one
(`steps % every_n_steps == 0`), so with every_n_steps=100 the hook returns at once in 99
of 100 steps. Forwards under torch.no_grad / inference_mode (evaluation) and forwards
re-run during backward (activation checkpointing) are not counted.

On the hot path, as for the gradients: no host sync. The partials are added, on the
output's device, into a preallocated float64 table ([modules, 6], one per device) and
travel with the gradient partials at collection (a non-blocking copy into pinned memory
behind an event on CUDA). The hook computes at hook time, from a detached alias it never
writes: a following in-place op (nn.ReLU(inplace=True), x.add_()) cannot change what was
measured, autograd's version counter is not touched, and no reference to the output is
kept past the hook. Eager CPU outputs go through the C kernel of gradmon.stats (one pass
over the data); other devices, and `collect.backend: torch`, use the plain torch ops of
`activation_row` (the Triton kernel is built for the gradients' fixed tensor list and
uploads a pointer table per new list, so it is not used for per-forward tensors).

torch.compile. Dynamo traces the hook: `activation_row` is pure torch and the table
update an in-place add on a graph input, so inductor fuses the statistics into the
compiled forward with no graph break. `armed` is a guarded Python bool: with
every_n_steps > 1 the model compiles twice (with and without the statistics), and both
graphs are reused from then on. Measured alternatives (torch 2.13, the 4-module Probe of
tests/test_activations.py under aot_eager): this traced hook, 0 graph breaks and 1 graph
per forward; a `torch.compiler.disable`d hook, 4 graph breaks per forward (one per hooked
module) and 4 graphs; a `leaf_function` fails to lower in inductor (an assertion on
its `_LeafCallable` attribute; the step hook is a custom op for that reason). An output on another
device than the table (a module moved after attach) takes a disabled eager call there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradmon.agent.features import FeatureRows, Stage, Work
from gradmon.agent.layers import ROOT_MODULE, name_filter, unwrap, warn_over_cap
from gradmon.config import CollectConfig, Config
from gradmon.errors import GradmonError
from gradmon.snapshot import ActivationStats, Snapshot
from gradmon.stats import Col, cpu_kernel, cpu_kernel_takes
from gradmon.stats.torch import activation_row, dense_view, first_float_tensor

__all__ = ["ActivationFeature", "ActivationTracker", "select_modules"]

log = logging.getLogger("gradmon")

# Columns of the activation table; every one combines with a plain sum.
SUM_SQ, SUM, ZEROS, NANS, INFS, NUMEL = range(6)
NCOLS = 6
# The C kernel's 8-column row -> the first five columns above.
_FROM_KERNEL = torch.tensor([Col.SUM_SQ, Col.SUM, Col.ZERO_COUNT, Col.NAN_COUNT, Col.INF_COUNT])


def select_modules(
    model: nn.Module, cfg: CollectConfig, root_name: str
) -> list[tuple[str, nn.Module]]:
    """The modules to hook, by name, in model order (see CollectConfig.activations_include)."""
    wanted = name_filter(cfg.activations_include, cfg.activations_exclude)
    named = [(name or root_name, m) for name, m in model.named_modules()]
    chosen = []
    for name, module in named:
        if cfg.activations_include is None and next(module.children(), None) is not None:
            continue  # a container: its leaves are hooked instead
        if wanted(name):
            chosen.append((name, module))
    if not chosen:
        raise GradmonError(
            f"attach(): collect.activations_include={cfg.activations_include!r} / "
            f"collect.activations_exclude={cfg.activations_exclude!r} leave none of the "
            f"{len(named)} modules of {type(model).__name__}; names look like "
            f"{named[-1][0]!r}"
        )
    return chosen


def _home_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


class ActivationTracker:
    """Forward hooks on the selected modules and the per-device tables they add into."""

    def __init__(
        self,
        model: nn.Module,
        cfg: CollectConfig,
        root_name: str,
        home: torch.device | None = None,  # the table's device: the model's by default
    ) -> None:
        modules = select_modules(model, cfg, root_name)
        self.names = [name for name, _ in modules]
        self.armed = True  # set by the monitor: the next optimizer step is collected
        self.errors = 0  # failures in the hooks, counted in gradmon_agent_errors_total{hook}
        self._use_kernel = cfg.backend != "torch"
        # Forward order of this window: order[i] is 0 or the 1-based rank of module i's
        # first eager call (a list store; compiled forwards leave it 0: model order then).
        self.order = [0] * len(modules)
        self._calls = 0
        home = home if home is not None else _home_device(model)
        # Allocated before any forward, so a compiled forward writes into a graph input.
        self._home = torch.zeros((len(modules), NCOLS), dtype=torch.float64, device=home)
        self._tables: dict[torch.device, torch.Tensor] = {home: self._home}
        self._handles: list[RemovableHandle] = []
        me = weakref.ref(self)  # the model must not keep the tracker (and monitor) alive
        for index, (_, module) in enumerate(modules):
            self._handles.append(module.register_forward_hook(_make_hook(me, index)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------ forward hooks
    def observe(self, index: int, x: torch.Tensor) -> None:
        """Eager: add this output's partials to row `index`. Never raises."""
        try:
            if torch._C._current_graph_task_id() != -1:
                return  # a forward re-run inside backward (checkpointing): counted already
            if not self.order[index]:
                self._calls += 1
                self.order[index] = self._calls
            x = dense_view(x.detach())
            kernel = cpu_kernel() if self._use_kernel and cpu_kernel_takes(x) else None
            if kernel is not None:
                # Host memory: one pass of the C kernel over the data.
                row = kernel([x])[0].index_select(0, _FROM_KERNEL)
            else:
                row = activation_row(x)
            table = self._tables.get(x.device)
            if table is None:  # a module whose output lives elsewhere (another GPU)
                table = torch.zeros_like(self._home, device=x.device)
                self._tables[x.device] = table
            dst = table[index]
            dst[:NUMEL] += row
            dst[NUMEL] += x.numel()
        except Exception as exc:
            self.errors += 1
            if self.errors == 1:
                log.warning(
                    "gradmon: activation hook failed (counted in "
                    'gradmon_agent_errors_total{stage="hook"}; training goes on, further '
                    "errors are not logged): %r",
                    exc,
                    exc_info=True,
                )

    def observe_traced(self, index: int, x: torch.Tensor) -> None:
        """Under torch.compile: the same update as pure torch ops dynamo puts in the graph."""
        table = self._home
        if x.device != table.device:
            _observe_outside_graph(self, index, x)
            return
        dst = table[index]
        dst[:NUMEL] += activation_row(x)
        dst[NUMEL] += x.numel()

    # -------------------------------------------------------------- collection
    def take(self, stage: Stage) -> FeatureRows:
        """The window's tables on their way to the host, each with the window's forward
        order; the tables start over. Stream order puts the zeroing after the copy."""
        order, self.order, self._calls = self.order, [0] * len(self.order), 0
        parts: FeatureRows = []
        for table in self._tables.values():
            parts.append((stage(table.clone()), order))
            table.zero_()
        return parts

    def first_nonfinite(self, stats: dict[str, ActivationStats], order: list[int]) -> str | None:
        """The first module in forward order whose output held NaN/Inf (modules the window
        did not order, e.g. compiled forwards, come after, in model order)."""
        bad = [i for i, n in enumerate(self.names) if n in stats and stats[n].nonfinite]
        if not bad:
            return None
        first = min(bad, key=lambda i: (order[i] == 0, order[i], i))
        return self.names[first]

    def finalize(self, parts: Sequence[torch.Tensor]) -> dict[str, ActivationStats]:
        """Per-module statistics from host tables; modules not run in the window are left out."""
        if not parts:
            return {}
        total = parts[0] if len(parts) == 1 else torch.stack(list(parts)).sum(0)
        out: dict[str, ActivationStats] = {}
        for name, row in zip(self.names, total.tolist(), strict=True):  # sync-ok: host
            numel = row[NUMEL]
            if numel <= 0:
                continue
            finite = numel - row[NANS] - row[INFS]
            out[name] = ActivationStats(
                numel=int(numel),
                rms=math.sqrt(row[SUM_SQ] / finite) if finite > 0 else 0.0,
                mean=row[SUM] / finite if finite > 0 else 0.0,
                zero_ratio=row[ZEROS] / numel,
                nan_count=int(row[NANS]),
                inf_count=int(row[INFS]),
                sum_squares=row[SUM_SQ],
            )
        return out


def _observe_eagerly(tracker: ActivationTracker, index: int, x: torch.Tensor) -> None:
    tracker.observe(index, x)


def _observe_outside_graph(tracker: ActivationTracker, index: int, x: torch.Tensor) -> None:
    """An output on another device than the compiled table: run eagerly (a graph break).
    Wrapped on first use: torch.compiler.disable imports dynamo (and triton), which
    `import gradmon` must not."""
    global _disabled_observe
    if _disabled_observe is None:
        _disabled_observe = torch.compiler.disable(_observe_eagerly)  # type: ignore[no-untyped-call]
    _disabled_observe(tracker, index, x)


_disabled_observe: Callable[[ActivationTracker, int, torch.Tensor], None] | None = None


def _make_hook(
    ref: weakref.ref[ActivationTracker], index: int
) -> Callable[[nn.Module, Any, Any], None]:
    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        tracker = ref()
        # Cheapest checks first: unarmed forwards (most steps) stop here.
        if tracker is None or not tracker.armed or not torch.is_grad_enabled():
            return
        x = first_float_tensor(output)
        if x is None:
            return
        if torch.compiler.is_compiling():
            tracker.observe_traced(index, x)
        else:
            tracker.observe(index, x)

    return hook


class ActivationFeature:
    """ActivationTracker behind the features protocol."""

    name = "activations"
    post_step = False

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        self.tracker = ActivationTracker(unwrap(model), cfg.collect, ROOT_MODULE)
        self._exported = warn_over_cap(
            "modules with activation statistics",
            self.tracker.names,
            cfg.exporter.max_layers,
            "gradmon_activation_* series",
        )

    @property
    def errors(self) -> int:
        return self.tracker.errors

    def on_step_counted(self, next_collected: bool) -> None:
        self.tracker.armed = next_collected  # only the forwards before a collected step

    def at_collection(self, stage: Stage, at_optimizer_step: bool) -> Work:
        return Work(rows=self.tracker.take(stage))

    def at_step_end(self, stage: Stage) -> FeatureRows:
        return []

    def finish(self, tables: list[tuple[torch.Tensor, Any]], snap: Snapshot) -> Snapshot:
        if not tables:
            return snap
        acts = self.tracker.finalize([t for t, _ in tables])
        origin = self.tracker.first_nonfinite(acts, tables[0][1])
        # With activations, NaN/Inf is traced to the first module in forward order whose
        # output held it; a fault only in the backward keeps the gradient's origin.
        return dataclasses.replace(
            snap, activations=acts, nonfinite_origin=origin or snap.nonfinite_origin
        )

    def export_fields(self) -> dict[str, Any]:
        return {"activation_names": self._exported}

    def remove(self) -> None:
        self.tracker.remove()
