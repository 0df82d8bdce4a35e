"""The gradients of one collection: which are fresh, the views statistics are taken over,
grouped by (device, dtype); what cannot be read is skipped, with its reason."""

from __future__ import annotations

import functools
import importlib
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from gradmon.agent import distributed
from gradmon.agent.layers import LayerIndex, unwrap
from gradmon.stats import cpu
from gradmon.stats.torch import real_view

__all__ = ["Gathered", "Gatherer", "Group", "Reads", "grad_view"]

log = logging.getLogger("gradmon")

GroupKey = tuple[torch.device, torch.dtype]


def _load_scan() -> ModuleType | None:
    """The pass over the parameters in C++ (gradmon/agent/_scan.cpp), or None: not built
    (no compiler, or no torch at install time), or built against another torch (a torch
    extension is tied to the version it was compiled with). Then Gatherer._scan, the same
    pass in Python, runs."""
    try:  # by module name: see stats/cpu.py
        module = importlib.import_module("gradmon.agent._scan")
    except ImportError:
        return None
    if module.torch_version != torch.__version__:
        log.warning(
            "gradmon: gradmon.agent._scan was built against torch %s, this is torch %s: "
            "using the slower Python pass (reinstall gradmon to rebuild it)",
            module.torch_version,
            torch.__version__,
        )
        return None
    return module


_scan_module = _load_scan()


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


class Reads:
    """What the CPU kernel needs of a group's tensors, read in the C++ pass while they are
    at hand. `table` is int64 [5, capacity]; column k is about the group's k-th grad and
    holds its data pointer and element count, then its weight's data pointer, element
    count and kernel dtype code (cpu.KnownWeights checks these three). `unreadable`: the
    positions of grads the kernel cannot read in place (their pointer is 0: not
    contiguous, or a lazily negated view)."""

    ROWS = 5

    def __init__(self, table: np.ndarray[Any, np.dtype[np.int64]]) -> None:
        self.table = table
        self.unreadable: list[int] = []


@dataclass
class Group:
    """The fresh gradients of one (device, dtype): parameter positions, the tensors the
    statistics are taken over, and the weights (for parameter norms), index-aligned.
    `reads`: see Reads (None where they were not read: the Python pass, other devices)."""

    positions: list[int] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    reads: Reads | None = None

    def lists(self) -> tuple[Any, ...]:
        """What the C++ pass appends to and writes (see _scan.scan's `open_group`)."""
        r = self.reads
        tail = (None, None) if r is None else (r.table, r.unreadable)
        return (self.positions, self.grads, self.weights, *tail)

    def add(self, position: int, grad: torch.Tensor, weight: torch.Tensor) -> None:
        """Appends one parameter (without reads: a group that has them would be left
        index-misaligned, so it drops them and the kernel's wrapper reads them itself)."""
        self.positions.append(position)
        self.grads.append(grad)
        self.weights.append(weight)
        self.reads = None


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
        read_pointers: bool = True,
    ) -> None:
        """`read_pointers`: read what the CPU kernel needs in the pass (Reads); False
        where the configured backend is not the kernel (collect.backend 'torch')."""
        self._index = index
        self._skip = skip
        self._read_pointers = read_pointers
        self._tables: dict[GroupKey, np.ndarray[Any, np.dtype[np.int64]]] = {}  # Reads
        self.skipped_positions: set[int] = set()  # monitored parameters left out later
        # The grad each parameter had at the last collection, held weakly (a freed grad
        # whose memory a new one reuses is still told apart, unlike by id()), and its
        # version counter. The pass makes the weak references untracked by the cyclic GC
        # (see _scan.cpp): N of them living from one collection to the next set off full
        # collections of the heap (~1 us a tensor per step, measured).
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
        path (in C++ where built); anything else goes through `grad_view`."""
        self._check_new_parameters()
        out = Gathered(fresh=[False] * len(self._last_grad))
        specials: list[int] = []  # fresh, but not a dense grad of a plain tensor
        if _scan_module is not None:
            open_group = functools.partial(self._open_group, out.groups)
            gone = _scan_module.scan(
                self._index.param_refs,
                self._last_grad,
                self._last_version,
                self._plain,
                out.fresh,
                open_group,
                specials,
            )
        else:
            gone = self._scan(out, specials)
        for i in specials:
            p = self._index.param_refs[i]()
            g = p.grad if p is not None else None
            special = self._special(i, p, g, out) if p is not None and g is not None else None
            if special is not None:
                out.fresh[i] = True
                view, weight = special
                out.groups.setdefault((view.device, view.dtype), Group()).add(i, view, weight)
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

    def forget(self) -> None:
        """The next gather() takes every grad as fresh (`gradmon bench` times the pass)."""
        self._last_grad = [None] * len(self._last_grad)

    def _open_group(
        self, groups: dict[GroupKey, Group], device: torch.device, dtype: torch.dtype
    ) -> tuple[Any, ...]:
        """The C++ pass's `open_group`: the lists of the (device, dtype) group, made on
        first use, with Reads where the CPU kernel will read the group."""
        group = groups.get((device, dtype))
        if group is None:
            wanted = self._read_pointers and cpu.kernel_takes(device, dtype)
            reads = None
            if wanted:  # one table per group, reused: it is read within the collection
                table = self._tables.get((device, dtype))
                if table is None:
                    shape = (Reads.ROWS, len(self._last_grad))
                    table = self._tables[(device, dtype)] = np.empty(shape, dtype=np.int64)
                reads = Reads(table)
            group = groups[(device, dtype)] = Group(reads=reads)
        return group.lists()

    def _scan(self, out: Gathered, specials: list[int]) -> int:
        """The pass of _scan.scan in Python (where the C++ extension is not built); no
        Reads. Returns the count of parameters that no longer exist."""
        fresh, groups = out.fresh, out.groups
        last, version = self._last_grad, self._last_version
        plain, strided = self._plain, torch.strided
        gone = 0
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
                # Held strongly for this pass only: weaken() turns it into a weak reference
                # (untracked by the cyclic GC where the C kernel is built).
                last[i], version[i] = g, current
                # A dense grad has its (floating) parameter's dtype: torch checks it.
                if not (plain[i] and g.layout is strided):
                    specials.append(i)
                    continue
                fresh[i] = True
                key = (g.device, g.dtype)
                group = groups.get(key)
                if group is None:
                    group = groups[key] = Group()
                group.positions.append(i)
                group.grads.append(g)
                group.weights.append(p)  # read, never written: no detach needed
        finally:  # never held past this pass, even when a parameter raised
            cpu.weaken(last)
        return gone

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
