"""Gradients -> per-device partial tables: one backend call per (device, dtype) group.

Each block is [rows, NCOLS + 1] float64 on the gradients' device: the partials (see
stats/layout.py) and, in the last column, the parameter's squared norm. Nothing here
syncs with the device. A group whose backend fails leaves only its own layers out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from gradmon.agent.gather import Gathered, Group, GroupKey
from gradmon.stats import Col, PartialsFn, partials_block, select_backend
from gradmon.stats.cpu import KnownWeights

__all__ = ["Blocks", "PartialsCollector", "fill_implicit_zeros", "unscale_partials"]

# Per device, the blocks to copy to the host together, each with the parameter positions
# of its rows (None: the fused-AMP flag row, see steps.Steps.amp_row).
Blocks = dict[torch.device, list[tuple[torch.Tensor, list[int] | None]]]


def fill_implicit_zeros(partials: torch.Tensor, implicit: dict[int, int]) -> torch.Tensor:
    """Rows of sparse grads: the entries missing from their values are zeros, counted in
    ZERO_COUNT and taken into MIN/MAX (sums and abs-max are unchanged by zeros). Columns
    after the partials (a block's parameter norm) are kept as they are."""
    partials = partials.clone()
    for row, zeros in implicit.items():
        partials[row, Col.ZERO_COUNT] += zeros
        partials[row, Col.MIN] = partials[row, Col.MIN].clamp(max=0.0)
        partials[row, Col.MAX] = partials[row, Col.MAX].clamp(min=0.0)
    return partials


def unscale_partials(partials: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Partials of grad / scale from those of grad, on the partials' device, no host sync:
    sum of squares times 1/s**2; sum, abs-max, min, max times 1/s; counts unchanged, and
    so are the columns after the partials (a block's parameter norm)."""
    if isinstance(scale, torch.Tensor):
        inv: torch.Tensor | float = (
            scale.detach()
            .to(device=partials.device, dtype=torch.float64, non_blocking=True)
            .reshape(())
            .reciprocal()
        )
    else:
        inv = 1.0 / float(scale)
    factors = torch.ones(partials.shape[1], dtype=torch.float64, device=partials.device)
    factors[Col.SUM_SQ : Col.MAX + 1] = inv  # a fill / device copy, not a host list
    factors[Col.SUM_SQ] = inv * inv
    return partials * factors


BackendChooser = Callable[[str, torch.device, torch.dtype], PartialsFn]


class PartialsCollector:
    """Runs the configured backend over each group; backends are chosen once per group
    (by `choose_backend`, default `select_backend`: where a failing kernel is injected)."""

    def __init__(
        self,
        backend: str,
        numels: list[int],
        choose_backend: BackendChooser | None = None,
    ) -> None:
        self._backend_name = backend
        self._numels = numels
        self._choose = choose_backend
        self._backends: dict[GroupKey, PartialsFn] = {}
        self._known: dict[GroupKey, KnownWeights] = {}  # the C kernel's check of weights

    def collect(
        self,
        gathered: Gathered,
        guard: Callable[[str], AbstractContextManager[Any]],
        grad_scale: torch.Tensor | float | None = None,
    ) -> tuple[Blocks, set[int]]:
        """The blocks per device, and the positions whose group failed (counted by
        `guard("collect")`, left out of the snapshot rather than shown as zeros)."""
        blocks: Blocks = {}
        failed: set[int] = set()
        for key, group in gathered.groups.items():
            done = False
            with guard("collect"):
                block = self._group_block(key, group, gathered.viewed, grad_scale)
                blocks.setdefault(block.device, []).append((block, group.positions))
                done = True
            if not done:  # the guard counted the error and let training go on
                failed.update(group.positions)
        return blocks, failed

    def _group_block(
        self,
        key: GroupKey,
        group: Group,
        viewed: set[int],
        grad_scale: torch.Tensor | float | None,
    ) -> torch.Tensor:
        backend = self._backends.get(key)
        if backend is None:
            # Looked up at call time: `select_backend` of this module is the seam for tests.
            choose = self._choose or select_backend
            backend = self._backends[key] = choose(self._backend_name, *key)  # type: ignore[arg-type]
        # Grads are strided tensors of the group's device and dtype (gather grouped them).
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = KnownWeights()
        block = partials_block(backend, group.grads, group.weights, known, group.reads)
        # Sparse grads: their values leave out the (implicit) zero entries. Only a grad
        # that needed a view can be one: dense ones are not looked at.
        implicit = dict(_implicit_zeros(group, self._numels, viewed)) if viewed else {}
        if implicit:
            block = fill_implicit_zeros(block, implicit)
        if grad_scale is not None:
            # A fused optimizer under a GradScaler sees scaled grads: unscale on the device.
            block = unscale_partials(block, grad_scale)
        if block.device.type == "cpu":
            # The kernel's block is a buffer its next call reuses, and this one may wait
            # in flight beside a device copy: a copy (numpy: a few us, torch's tens).
            return torch.from_numpy(block.numpy().copy())
        return block


def _implicit_zeros(group: Group, numels: list[int], viewed: set[int]) -> Iterator[tuple[int, int]]:
    for row, (i, g) in enumerate(zip(group.positions, group.grads, strict=True)):
        if i in viewed and numels[i] != g.numel():
            yield row, numels[i] - g.numel()
