"""Which rank exports each (layer, shard), so that a plain sum over ranks is exact.

Every distinct shard of every layer is exported by exactly one rank, a replica of a shard
that another rank exports by none, and every layer of every pipeline stage by its stage:
then `sum by (layer)` over ranks of the additive series (`gradmon_grad_sum_squares`,
`gradmon_grad_global_sum_squares`) is the unsharded value, `max` of `abs_max` too.

Decided per parameter, from what the parameters and the model say about the layout:

- DTensor (FSDP2, HSDP, tensor parallel, 2-D meshes): its placements on its device mesh.
  Along a mesh dimension where it is `Replicate` (HSDP's replicate dimension, the bias of
  RowwiseParallel) the rank at coordinate 0 exports it; along a `Shard` dimension each
  rank exports its own shard. A DTensor on a sub-mesh (FSDP's data-parallel mesh under
  FSDP+TP holds the LayerNorm that the tensor-parallel plan left alone) is a replica along
  the dimensions of the root mesh that the model's other DTensors span and its own mesh
  does not: coordinate 0 there.
- A plain tensor in a model with DTensors: replicated along every dimension they span.
- A model handed to attach() inside DistributedDataParallel: replicated over its process
  group (group rank 0 exports).
- What no placement tells: a model of plain tensors only (DDP wrapped after attach,
  pipeline stages, each rank its own stage and monitor), or dimensions of the root mesh
  that no DTensor spans (pipeline stages on a (pp, dp, tp) mesh, DDP over tensor
  parallelism). Ranks that monitor the same parameters (names, shapes, dtypes) at the
  same coordinates of the spanned dimensions hold the same shards: the first of them to
  claim that key in the default process group's store exports them (one `store.add`,
  once, when the rank is first needed), the others none. Stages hold different
  parameters, so every stage exports its own. Without a reachable store: rank 0 for a
  plain model, every rank for a DTensor model.
- An empty shard (FSDP2 over a parameter with fewer rows than ranks) is exported by none.

Partial placements (a gradient not reduced yet) count as distinct: statistics of a partial
sum are not those of the sum, and no placement choice can make them so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gradmon.agent import distributed
from gradmon.agent.layers import LayerIndex
from gradmon.snapshot import LayerStats, LayerTable

__all__ = ["OWNED_SUM_SQUARES", "Layout", "Placement", "Shares", "Sums", "layout_of"]

log = logging.getLogger("gradmon")

# The LayerTable column publish.py adds where a layer mixes exported and replicated
# parameters: the sum of squares of its exported ones only.
OWNED_SUM_SQUARES = "owned_sum_squares"

OWN, REPLICA, EMPTY = 1, 0, 2  # a parameter's share on this rank

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Shares:
    """This rank's part of the cross-rank sums, per layer (in LayerIndex order)."""

    exported: Array  # bool: the layer holds a shard this rank exports
    mixed: Array  # bool: exported, and also holds a replica that another rank exports

    def sums(self, layers: Mapping[str, LayerStats], position: Mapping[str, int]) -> Sums:
        """This rank's additive shares of one snapshot: its global sum of squares and,
        for the mixed layers, the sum of squares of their exported parameters."""
        if isinstance(layers, LayerTable):
            names = layers.names
            sq = layers.column("sum_squares")
            owned_col = _column(layers, OWNED_SUM_SQUARES) if self.mixed.any() else None
        else:  # any Mapping of LayerStats (no owned column: no mixed layers allowed)
            names = list(layers)
            sq = np.array([layers[n].sum_squares for n in names], dtype=np.float64)
            owned_col = None
        if len(names) == len(self.exported):  # every layer, in LayerIndex order
            exported, mixed = self.exported, self.mixed
        else:  # a failed group left some out
            at = np.fromiter((position[n] for n in names), dtype=np.int64, count=len(names))
            exported, mixed = self.exported[at], self.mixed[at]
        owned = np.where(exported, sq, 0.0)
        overrides: dict[str, float] = {}
        if owned_col is not None:
            owned = np.where(mixed, owned_col, owned)
            overrides = {names[i]: float(owned_col[i]) for i in np.flatnonzero(mixed)}
        return Sums(float(owned.sum()), overrides)


def _column(layers: LayerTable, name: str) -> Array | None:
    try:
        return layers.column(name)
    except KeyError:  # a table built without it: the layers' own sums stand
        return None


@dataclass(frozen=True)
class Sums:
    global_sum_squares: float
    layer_sum_squares: dict[str, float]  # where it differs from the layer's own value


def _root_mesh(mesh: Any) -> Any:
    get = getattr(mesh, "_get_root_mesh", None)
    if callable(get):
        return get()
    try:  # older torch
        from torch.distributed.device_mesh import _mesh_resources

        return _mesh_resources.get_root_mesh(mesh)
    except Exception:
        return mesh


def _covered_dims(root: Any, mesh: Any) -> frozenset[int]:
    """The dimensions of `root` along which `mesh` (this rank's slice of a sub-mesh, or a
    flattening of several dimensions) reaches other ranks."""
    grid = root.mesh
    mine = root.get_coordinate()
    # DeviceMesh.mesh is a CPU tensor of ranks, read once at attach.
    members = set(mesh.mesh.flatten().tolist())  # sync-ok: CPU ranks, at attach
    covered = set()
    for d in range(grid.ndim):
        for v in range(grid.shape[d]):
            if v == mine[d]:
                continue
            at = list(mine)
            at[d] = v
            if int(grid[tuple(at)]) in members:
                covered.add(d)
                break
    return frozenset(covered)


@dataclass
class _Root:
    coordinate: tuple[int, ...]
    shape: tuple[int, ...]
    spanned: set[int]  # dimensions spanned by some DTensor parameter of the model


@dataclass(frozen=True)
class Layout:
    """What the parameters and the model tell of this rank's shares."""

    shares: list[int]  # per parameter: OWN, REPLICA or EMPTY
    # Set when ranks may hold replicas that nothing in the model tells apart (a plain
    # model, or root-mesh dimensions no DTensor spans: DDP over tensor parallelism, or
    # pipeline stages): the ranks that claim the same key hold the same shards, and one
    # of them exports. The key holds this rank's coordinates along the spanned dimensions.
    claim: tuple[int, ...] | None


def _dtensor_layout(params: Sequence[torch.Tensor]) -> Layout:
    """Shares of a model with DTensor parameters (see the module docstring)."""
    roots: dict[tuple[Any, ...], _Root] = {}
    placed: dict[int, tuple[tuple[Any, ...], frozenset[int]]] = {}  # param -> root, covered
    meshes: dict[int, tuple[tuple[Any, ...], frozenset[int]]] = {}
    for i, p in enumerate(params):
        if not distributed.is_dtensor(p):
            continue
        mesh = p.device_mesh  # type: ignore[attr-defined]
        if id(mesh) not in meshes:
            root = _root_mesh(mesh)
            ranks = root.mesh.flatten().tolist()  # sync-ok: CPU ranks, read at attach
            key = (tuple(root.mesh.shape), tuple(ranks))
            if key not in roots:
                roots[key] = _Root(tuple(root.get_coordinate()), tuple(root.mesh.shape), set())
            meshes[id(mesh)] = (key, _covered_dims(root, mesh))
        key, covered = meshes[id(mesh)]
        roots[key].spanned |= covered
        placed[i] = (key, covered)
    main = max(roots.values(), key=lambda r: len(r.spanned))
    shares = []
    for i, p in enumerate(params):
        if i not in placed:  # a plain tensor beside DTensors: replicated where they span
            shares.append(OWN if all(main.coordinate[d] == 0 for d in main.spanned) else REPLICA)
            continue
        if distributed.local_tensor(p).numel() == 0:
            shares.append(EMPTY)
            continue
        key, covered = placed[i]
        root = roots[key]
        mesh = p.device_mesh  # type: ignore[attr-defined]
        within = all(
            c == 0
            for c, pl in zip(mesh.get_coordinate(), p.placements, strict=True)  # type: ignore[attr-defined]
            if pl.is_replicate()
        )
        outside = all(root.coordinate[d] == 0 for d in root.spanned - covered)
        shares.append(OWN if within and outside else REPLICA)
    # Dimensions of the root mesh that no parameter spans: stages holding other layers,
    # or replicas made by something other than DTensor (DDP over tensor parallelism).
    unspanned = [d for d, n in enumerate(main.shape) if n > 1 and d not in main.spanned]
    claim = tuple(main.coordinate[d] for d in sorted(main.spanned)) if unspanned else None
    return Layout(shares, claim)


def _ddp_group_rank(model: nn.Module) -> int | None:
    """This rank within the process group of a DistributedDataParallel `model`, else None."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    group = getattr(model, "process_group", None)
    return int(torch.distributed.get_rank(group))


def layout_of(params: Sequence[torch.Tensor], model: nn.Module) -> Layout:
    """What the parameters (DTensors) and the model (a DDP wrapper) tell of this rank's
    shares; the rest is settled by a claim in the process group's store."""
    ddp_rank = _ddp_group_rank(model)
    if any(distributed.is_dtensor(p) for p in params):
        layout = _dtensor_layout(params)
    else:  # plain tensors: replicas, or stages, or both; the claim tells
        layout = Layout([OWN] * len(params), ())
    if ddp_rank is None:
        return layout
    # The DDP group's replicas: its rank 0 exports, and they need no claim.
    shares = [REPLICA if ddp_rank and s == OWN else s for s in layout.shares]
    return Layout(shares, None)


# Monitors attached in this process over the same parameters: the n-th one of every rank
# claims the same store key (attaching again after close() claims afresh).
_ATTACHED: Counter[str] = Counter()
_ATTACHED_LOCK = threading.Lock()


def _fingerprint(index: LayerIndex) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    for name, ref in zip(index.param_names, index.param_refs, strict=True):
        p = ref()
        shape = tuple(p.shape) if p is not None else ()
        h.update(f"{name}:{shape}:{getattr(p, 'dtype', None)};".encode())
    return h.hexdigest()[:16]


def _claim(key: str) -> bool | None:
    """Whether this rank is the first to claim `key` in the default group's store; None
    when there is no store to ask."""
    try:
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
        return int(store.add(key, 1)) == 1
    except Exception as exc:  # no store (a custom launcher): the caller falls back
        log.warning(
            "gradmon: cannot reach the process group's store to tell replicated ranks "
            "apart (%r); of a model of plain tensors rank 0 exports the per-layer series "
            "(exact for DDP, not for pipeline stages), of a DTensor model every rank what "
            "its placements say",
            exc,
        )
        return None


class Placement:
    """Built at attach: the share of every monitored parameter where the parameters tell
    it, and the store key that settles the rest once this rank is known."""

    def __init__(self, index: LayerIndex, model: nn.Module) -> None:
        self._index = index
        params = [p for p in (ref() for ref in index.param_refs) if p is not None]
        try:
            self._layout = layout_of(params, model)
        except Exception as exc:  # a layout gradmon cannot read: never fail attach()
            log.warning(
                "gradmon: cannot tell the shards of this model's parameters apart (%r); "
                "every rank exports the per-layer series of what it holds, replicas too",
                exc,
            )
            self._layout = Layout([OWN] * len(params), None)
        self._key: str | None = None
        if self._layout.claim is not None:
            fp = _fingerprint(index)
            with _ATTACHED_LOCK:
                _ATTACHED[fp] += 1
                nth = _ATTACHED[fp]
            # Elastic restarts keep the store: each attempt claims its own keys.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            run = os.environ.get("TORCHELASTIC_RUN_ID", "")
            at = ",".join(map(str, self._layout.claim))
            self._key = f"gradmon/placement/{run}/{attempt}/{fp}/{nth}/{at}"
        self._shares: Shares | None = None
        self._lock = threading.Lock()

    @property
    def owned_parameters(self) -> list[bool] | None:
        """Per parameter, whether this rank exports its shard; given only where some layer
        mixes exported and replicated parameters (publish.py then adds the
        OWNED_SUM_SQUARES column), else None. (A claim decides for every parameter at
        once, so it mixes nothing.)"""
        static = self._layout.shares
        shares = self._layer_shares(static)
        return [s == OWN for s in static] if shares.mixed.any() else None

    def shares(self, rank: int) -> Shares:
        """This rank's shares (`rank`: its global rank in a group of several)."""
        with self._lock:
            if self._shares is None:
                self._shares = self._layer_shares(self._param_shares(rank))
            return self._shares

    def _param_shares(self, rank: int) -> list[int]:
        shares = self._layout.shares
        if self._key is None:
            return shares
        first = _claim(self._key)
        if first is None:  # no store: a plain model's rank 0 speaks for all (DDP); a
            # DTensor model's ranks each export what their placements say
            first = rank == 0 if not self._layout.claim else True
        return shares if first else [REPLICA if s == OWN else s for s in shares]

    def _layer_shares(self, params: list[int]) -> Shares:
        members = self._index.members
        exported = np.array([any(params[i] == OWN for i in m) for m in members], dtype=bool)
        replica = np.array([any(params[i] == REPLICA for i in m) for m in members], dtype=bool)
        return Shares(exported=exported, mixed=exported & replica)
