"""gradmon_update_ratio: ‖Δw‖/‖w‖ of each layer on sampled optimizer steps (opt-in).

`collect.update_ratio_every: K` measures on every K-th collection made at an optimizer
step. In the step pre-hook, after the gradients were collected, the weights of the layers
measured this time are copied into one reusable device buffer; in the step post-hook,
`w_old - w_new` is formed in that buffer (in place: no further memory) and the squared
norms of Δw and of w_new are taken on the device with `_foreach_norm` (fp32 accumulation
for 16-bit weights), combined per layer in float64 on the host once the rows land. No
host sync: the rows travel with the same non-blocking staging as the partials.

Bounded memory: the old-weights buffer holds at most `collect.update_ratio_max_bytes` per
device. When the layers need more, they are split, in order, into consecutive chunks that
fit, and each sample measures the next chunk (round-robin), so every layer is measured
over successive samples. A layer larger than the budget alone is never measured: logged
once at the first sample, listed in `UpdateRatio.too_large`.

Staleness: a layer's value is the one of the last sampled step that measured it (up to
K x chunks collections old), carried in every snapshot until it is measured again.
Steps that did not update the weights: a step GradScaler skips never runs the step hooks
(not sampled, values kept); a fused optimizer that skips the step itself (found_inf)
leaves w unchanged, so the ratio measured is 0, which is what happened.

FSDP2: each rank measures its local shard (‖Δw_shard‖/‖w_shard‖), like the other
per-layer statistics; a rank whose shard of a layer is empty leaves it unmeasured.
Complex weights count their real and imaginary parts (the complex L2 norm).
"""

from __future__ import annotations

import dataclasses
import logging as _logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradmon.agent import distributed
from gradmon.agent.features import FeatureRows, Stage, Work
from gradmon.agent.layers import LayerIndex
from gradmon.config import Config
from gradmon.snapshot import LayerTable, Snapshot
from gradmon.stats import param_sum_squares
from gradmon.stats.torch import real_view

__all__ = ["UpdateRatio", "UpdateRatioFeature"]

log = _logging.getLogger("gradmon")

_ALIGN = 64  # bytes: every view into the uint8 buffer starts aligned for any dtype


def _weight(p: torch.Tensor) -> torch.Tensor:
    """The tensor the ratio is taken over: a DTensor's local shard; complex weights as
    their real and imaginary parts (as Monitor._collect takes them)."""
    return real_view(distributed.local_tensor(p).detach())


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class _Slot:
    param: int  # index into the monitor's parameters
    layer: int
    device: torch.device
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # into the device's buffer, bytes


class UpdateRatio:
    """The sampling schedule, the old-weights buffer and the last measured ratios."""

    def __init__(
        self,
        every: int,
        max_bytes: int,
        layer_names: Sequence[str],
        layer_members: Sequence[Sequence[int]],
        param_refs: Sequence[weakref.ref[torch.nn.Parameter]],
    ) -> None:
        self.every = every
        self.max_bytes = max_bytes
        self._names = list(layer_names)
        self._members = [list(m) for m in layer_members]
        self._refs = list(param_refs)
        self._collections = 0
        self._chunks: list[list[_Slot]] | None = None  # planned at the first sample
        self._cursor = 0  # the chunk measured next
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._measuring: list[_Slot] | None = None
        self.too_large: dict[str, int] = {}  # layer -> bytes on its largest device
        self.last: dict[str, float] = {}  # layer -> ratio of the last sample measuring it
        self.samples = 0  # measurements started (tests, debugging)

    def due(self) -> bool:
        """Called once per collection at an optimizer step: is this one sampled?"""
        due = self._collections % self.every == 0
        self._collections += 1
        return due

    # ------------------------------------------------------------- planning
    def _plan(self) -> list[list[_Slot]]:
        """Layers, in order, packed into consecutive chunks of at most max_bytes per device."""
        chunks: list[list[_Slot]] = []
        chunk: list[_Slot] = []
        used: dict[torch.device, int] = {}
        self.too_large = {}
        for layer, members in enumerate(self._members):
            tensors, need = self._layer_weights(members)
            if not tensors:
                continue
            if max(need.values()) > self.max_bytes:
                self.too_large[self._names[layer]] = max(need.values())
                continue
            if chunk and any(used.get(d, 0) + n > self.max_bytes for d, n in need.items()):
                chunks.append(chunk)
                chunk, used = [], {}
            for i, w in tensors:
                offset = used.get(w.device, 0)
                chunk.append(_Slot(i, layer, w.device, w.dtype, tuple(w.shape), offset))
                used[w.device] = offset + _aligned(w.numel() * w.element_size())
        if chunk:
            chunks.append(chunk)
        if self.too_large:
            log.warning(
                "gradmon: update ratio not measured for %d layer(s) larger than "
                "collect.update_ratio_max_bytes=%d (%s); raise it to measure them",
                len(self.too_large),
                self.max_bytes,
                ", ".join(f"{n}: {b} bytes" for n, b in list(self.too_large.items())[:5]),
            )
        # One buffer per device, as large as the largest chunk's share: allocated once,
        # reused by every sample.
        sizes: dict[torch.device, int] = {}
        for c in chunks:
            for s in c:
                end = s.offset + _aligned(math.prod(s.shape) * s.dtype.itemsize)
                sizes[s.device] = max(sizes.get(s.device, 0), end)
        self._buffers = {d: torch.empty(n, dtype=torch.uint8, device=d) for d, n in sizes.items()}
        return chunks

    def _layer_weights(
        self, members: Sequence[int]
    ) -> tuple[list[tuple[int, torch.Tensor]], dict[torch.device, int]]:
        """A layer's weights to measure on this rank, and the bytes they need per device."""
        need: dict[torch.device, int] = {}
        tensors = []
        for i in members:
            p = self._refs[i]()
            if p is None:
                continue
            w = _weight(p)
            if w.numel() == 0:  # an empty FSDP shard: nothing to measure on this rank
                continue
            tensors.append((i, w))
            need[w.device] = need.get(w.device, 0) + _aligned(w.numel() * w.element_size())
        return tensors, need

    def _old(self, s: _Slot) -> torch.Tensor:
        n = math.prod(s.shape) * s.dtype.itemsize
        return self._buffers[s.device][s.offset : s.offset + n].view(s.dtype).view(s.shape)

    # ------------------------------------------------------------ measuring
    def before_step(self) -> bool:
        """Copy the next chunk's weights into the buffer (device copies, no sync).
        Returns whether a measurement is under way (finished by after_step)."""
        self._measuring = None
        if self._chunks is None:
            self._chunks = self._plan()
        if not self._chunks:
            return False
        chunk = self._chunks[self._cursor % len(self._chunks)]
        weights: list[tuple[_Slot, torch.Tensor]] = []
        for s in chunk:
            p = self._refs[s.param]()
            if p is None:
                continue
            w = _weight(p)
            if (w.device, w.dtype, tuple(w.shape)) != (s.device, s.dtype, s.shape):
                # The weights changed dtype/shape since planning (model.half()...): plan
                # again with the tensors as they are now, measure from the next sample.
                self._chunks = None
                return False
            weights.append((s, w))
        self._cursor = (self._cursor + 1) % len(self._chunks)
        groups: dict[tuple[torch.device, torch.dtype], list[tuple[_Slot, torch.Tensor]]] = {}
        for s, w in weights:
            groups.setdefault((s.device, s.dtype), []).append((s, w))
        for group in groups.values():
            torch._foreach_copy_([self._old(s) for s, _ in group], [w for _, w in group])
        self._measuring = [s for s, _ in weights]
        self.samples += 1
        return bool(self._measuring)

    def after_step(self) -> list[tuple[torch.Tensor, list[int]]]:
        """Per device: [n, 2] float64 rows (‖Δw‖², ‖w_new‖² of each parameter measured)
        on that device, and the layer of each row. Nothing waits for them here."""
        slots, self._measuring = self._measuring, None
        if not slots:
            return []
        groups: dict[tuple[torch.device, torch.dtype], list[tuple[_Slot, torch.Tensor]]] = {}
        for s in slots:
            p = self._refs[s.param]()
            if p is not None:
                groups.setdefault((s.device, s.dtype), []).append((s, _weight(p)))
        by_device: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = {}
        for (device, _), group in groups.items():
            old = [self._old(s) for s, _ in group]
            new = [w for _, w in group]
            torch._foreach_sub_(old, new)  # the buffer now holds w_old - w_new
            rows = torch.stack([param_sum_squares(old), param_sum_squares(new)], dim=1)
            blocks, layers = by_device.setdefault(device, ([], []))
            blocks.append(rows)
            layers.extend(s.layer for s, _ in group)
        return [(torch.cat(blocks), layers) for blocks, layers in by_device.values()]

    def finish(self, parts: Sequence[tuple[torch.Tensor, Sequence[int]]]) -> None:
        """Host rows of one measurement -> the ratio of each layer it covered (float64)."""
        sums: dict[int, list[float]] = {}
        for rows, layers in parts:
            for (dsq, wsq), layer in zip(rows.tolist(), layers, strict=True):  # sync-ok: host
                acc = sums.setdefault(layer, [0.0, 0.0])
                acc[0] += dsq
                acc[1] += wsq
        for layer, (dsq, wsq) in sums.items():
            if wsq > 0 or math.isnan(wsq):
                ratio = math.sqrt(dsq) / math.sqrt(wsq)
            else:  # all-zero weights: no change is 0, any change infinitely large
                ratio = 0.0 if dsq == 0 else math.inf
            self.last[self._names[layer]] = ratio


class UpdateRatioFeature:
    """UpdateRatio behind the features protocol: a sampled collection waits for the end of
    its optimizer step, whose post-hook stages the rows; publication applies the ratios."""

    name = "update_ratio"
    post_step = True
    errors = 0  # its failures happen in the monitor's guarded calls, counted there

    def __init__(self, ratio: UpdateRatio) -> None:
        self.ratio = ratio

    @classmethod
    def from_config(
        cls, cfg: Config, index: LayerIndex, optimizer: torch.optim.Optimizer | None
    ) -> UpdateRatioFeature | None:
        every = cfg.collect.update_ratio_every
        if every and optimizer is None:
            log.warning(
                "gradmon: collect.update_ratio_every is set but attach() got no optimizer: "
                "the update ratio is measured around optimizer.step(), so it is off"
            )
        if not every or optimizer is None:
            return None
        max_bytes = cfg.collect.update_ratio_max_bytes
        return cls(
            UpdateRatio(every, max_bytes, index.layer_names, index.members, index.param_refs)
        )

    def on_step_counted(self, next_collected: bool) -> None:
        pass

    def at_collection(self, stage: Stage, at_optimizer_step: bool) -> Work:
        # After the gradients: the old weights, copied for the step post-hook.
        waits = at_optimizer_step and self.ratio.due() and self.ratio.before_step()
        return Work(wait_for_step_end=waits)

    def at_step_end(self, stage: Stage) -> FeatureRows:
        return [(stage(rows), layers) for rows, layers in self.ratio.after_step()]

    def finish(self, tables: list[tuple[torch.Tensor, Any]], snap: Snapshot) -> Snapshot:
        if tables:
            self.ratio.finish(tables)
        last = self.ratio.last
        if not last or not isinstance(snap.layers, LayerTable):
            return snap
        # The last measured value of each layer (see the module's note on staleness).
        ratios = np.array([last.get(n, np.nan) for n in snap.layers.names], dtype=np.float64)
        return dataclasses.replace(snap, layers=snap.layers.with_column("update_ratio", ratios))

    def export_fields(self) -> dict[str, Any]:
        return {}

    def remove(self) -> None:
        pass
