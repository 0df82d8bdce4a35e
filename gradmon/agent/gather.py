"""The gradients of one collection: which are fresh, the views statistics are taken over,
grouped by (device, dtype); what cannot be read is skipped, with its reason."""

from __future__ import annotations

import importlib
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradmon.agent import distributed
from gradmon.agent.layers import LayerIndex, unwrap
from gradmon.stats.torch import real_view

__all__ = ["Gathered", "Gatherer", "Group", "grad_view"]

log = logging.getLogger("gradmon")

GroupKey = tuple[torch.device, torch.dtype]

# Turns the grads a collection kept (strongly, for one pass) into untracked weak references
# (see Gatherer.__init__). Not built: weakref.ref, tracked by the GC.
_weaken: Callable[[list[Any]], None] | None
try:  # by module name: see stats/cpu.py
    _weaken = importlib.import_module("gradmon.stats._cpu_kernel").weaken
except (ImportError, AttributeError):
    _weaken = None


def grad_view(grad: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """The dense real tensor the statistics are taken over, or (None, why not).

    - sparse COO (`nn.Embedding(sparse=True)`): the values of the coalesced grad; the
      entries it leaves out are zeros, added back by collect.fill_implicit_zeros.
    - complex: `real_view`.
    """
    if grad.device.type == "meta":
        return None, "its gradient is on the meta device (no data)"
    if grad.layout == torch.sparse_coo:
        grad = grad.coalesce().values()
    elif grad.layout != torch.strided:
        return None, f"gradient layout {grad.layout} is not supported (strided or sparse_coo)"
    if grad.is_complex():
        return real_view(grad), None
    if not grad.is_floating_point():
        return None, f"gradient dtype {grad.dtype} is neither floating point nor complex"
    return grad, None


@dataclass
class Group:
    """The fresh gradients of one (device, dtype): parameter positions, the tensors the
    statistics are taken over, and the weights (for parameter norms), index-aligned."""

    positions: list[int] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Gathered:
    """One collection's inputs."""

    fresh: list[bool]  # by parameter position: received a gradient since the last one
    groups: dict[GroupKey, Group] = field(default_factory=dict)
    viewed: set[int] = field(default_factory=set)  # through grad_view: sparse, complex, DTensor

    def by_layer(self, index: LayerIndex) -> dict[str, list[torch.Tensor]]:
        """The gradients per layer name (for the sinks' histograms)."""
        out: dict[str, list[torch.Tensor]] = {}
        for group in self.groups.values():
            for i, grad in zip(group.positions, group.grads, strict=True):
                out.setdefault(index.layer_of_param(i), []).append(grad)
        return out


class Gatherer:
    """Finds this collection's gradients. `skip(name, reason)` is told of a parameter
    gradmon cannot read (or that was added to the optimizer after attach)."""

    def __init__(
        self,
        index: LayerIndex,
        skip: Callable[[str, str], None],
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        self._index = index
        self._skip = skip
        self.skipped_positions: set[int] = set()  # monitored parameters left out later
        # The grad each parameter had at the last collection, held weakly (a freed grad
        # whose memory a new one reuses is still told apart, unlike by id()), and its
        # version counter. The weak references are made untracked by the cyclic GC (see
        # _cpu_kernel.weaken): N of them living from one collection to the next set off
        # full collections of the heap (~1 us a tensor per step, measured).
        count = len(index.param_refs)
        self._last_grad: list[Any] = [None] * count  # weakref.ref | None between gathers
        self._last_version = [0] * count
        # Plain tensors (not DTensor, not complex): their dense real grads need no view.
        params = [ref() for ref in index.param_refs]
        self._plain = [
            p is not None and not p.is_complex() and not distributed.is_dtensor(p) for p in params
        ]
        self._warned_gone = False
        self._model_ref = weakref.ref(model)  # weak: the monitor never keeps them alive
        self._optimizer_ref = weakref.ref(optimizer) if optimizer is not None else None
        self._opt_param_ids: set[int] = set()
        self._opt_param_count = 0
        if optimizer is not None:
            self._opt_param_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            self._opt_param_count = _param_count(optimizer)

    def gather(self) -> Gathered:
        """One pass over the parameters. Fresh: the grad tensor or its version counter
        changed since the last collection. Autograd's accumulation does one or the other
        (it steals or creates a new grad, or adds in place), and so does any other writer
        (sharded or manually set grads). Dense real grads of plain tensors take the short
        path; anything else goes through `grad_view`."""
        self._check_new_parameters()
        fresh = [False] * len(self._last_grad)
        out = Gathered(fresh=fresh)
        groups = out.groups
        last, version = self._last_grad, self._last_version
        plain, strided, weaken = self._plain, torch.strided, _weaken
        gone = 0
        # The hot loop of a collection: one pass, each parameter's objects touched once.
        try:
            for i, ref in enumerate(self._index.param_refs):
                p = ref()
                if p is None:
                    gone += 1
                    continue
                g = p.grad
                if g is None:
                    last[i] = None
                    continue
                seen, current = last[i], g._version
                if seen is not None and seen() is g and current == version[i]:
                    continue
                # Held strongly for this pass only: weaken() turns it into a weak reference.
                last[i], version[i] = g if weaken is not None else weakref.ref(g), current
                weight: torch.Tensor = p  # read, never written: no detach needed
                # A dense grad has its (floating) parameter's dtype: torch checks it.
                if not (plain[i] and g.layout is strided):
                    special = self._special(i, p, g, out)
                    if special is None:
                        continue
                    g, weight = special
                fresh[i] = True
                key = (g.device, g.dtype)
                group = groups.get(key)
                if group is None:
                    group = groups[key] = Group()
                group.positions.append(i)
                group.grads.append(g)
                group.weights.append(weight)
        finally:  # never held past this pass, even when a parameter's view raised
            if weaken is not None:
                weaken(last)
        if gone and not self._warned_gone:
            self._warned_gone = True
            log.warning(
                "gradmon: %d of the %d monitored parameters no longer exist: the model's "
                "parameters were replaced after attach() (fully_shard, to_empty, "
                "load_state_dict(assign=True)?); attach after wrapping/sharding the model",
                gone,
                len(self._index.param_refs),
            )
        return out

    def _special(
        self, i: int, p: torch.Tensor, g: torch.Tensor, out: Gathered
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A DTensor, complex, sparse or unreadable grad: (its view, the weight's), or
        None: skipped, with its reason (published as no gradient)."""
        local = distributed.local_tensor  # a DTensor's shard on this rank; else the tensor
        view, reason = grad_view(local(g))
        if view is None:
            self._skip(self._index.param_names[i], str(reason))
            self.skipped_positions.add(i)
            return None
        out.viewed.add(i)
        return view, real_view(local(p).detach())

    def _check_new_parameters(self) -> None:
        """Parameters added to the optimizer after attach() get no hooks and are not
        monitored: say so once per parameter (a cheap length check per collection)."""
        optimizer = self._optimizer_ref() if self._optimizer_ref is not None else None
        if optimizer is None or _param_count(optimizer) == self._opt_param_count:
            return
        self._opt_param_count = _param_count(optimizer)
        model = self._model_ref()
        names = {id(p): n for n, p in unwrap(model).named_parameters()} if model else {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in self._opt_param_ids:
                    self._opt_param_ids.add(id(p))
                    name = names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")
                    self._skip(name, "added after attach() (attach again to monitor it)")


def _param_count(optimizer: torch.optim.Optimizer) -> int:
    return sum(len(group["params"]) for group in optimizer.param_groups)
