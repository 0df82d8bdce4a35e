"""Step and skip accounting: which optimizer steps happened, were skipped, are collected.

- Plain optimizers under a GradScaler: a step the scaler skips for inf/NaN never reaches
  `optimizer.step()`; `scaler.update()` is watched (see hooks.watch_scaler) and such a step
  is counted there (`Steps.skipped_at_scaler_update`).
- Fused optimizers (`fused=True`): the scaler hands the optimizer `grad_scale`/`found_inf`
  and the kernel skips the step itself; `found_inf` is added to a counter on the device
  and read back with the partials of the next collection (no host sync).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gradmon.stats import NCOLS

__all__ = ["Steps", "scaler_stepped"]


def scaler_stepped(scaler: Any, optimizer: torch.optim.Optimizer) -> bool | None:
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


class Steps:
    """Counts optimizer steps (skipped ones included) and says which are collected."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n = every_n_steps
        self.total = 0  # gradmon_steps_total
        self.skipped = 0  # steps skipped by the scaler or by the training loop
        self.fused_skipped = 0  # steps a fused optimizer skipped, as last read back
        self._stepped_since_update = False
        self._fused_counter: torch.Tensor | None = None  # on the device

    def advance(self, *, stepped: bool = False) -> tuple[int, bool]:
        """Count one step: returns (its step number, whether it is collected)."""
        step = self.total
        self.total += 1
        self._stepped_since_update |= stepped
        return step, step % self.every_n == 0

    def next_is_collected(self) -> bool:
        return self.total % self.every_n == 0

    def skipped_at_scaler_update(self, scaler: Any, optimizer: Any) -> bool:
        """Before `scaler.update()`: True when our optimizer's step was skipped in this
        iteration (the scaler found inf/NaN), so the monitor counts and collects it."""
        stepped, self._stepped_since_update = self._stepped_since_update, False
        if stepped or optimizer is None:
            return False  # stepped (fused skips are counted on the device), or cannot tell
        return scaler_stepped(scaler, optimizer) is not False

    def count_fused_skip(self, found_inf: Any) -> torch.Tensor | None:
        """A fused optimizer skips a step with inf/NaN inside its kernel: add the step's
        found_inf (0/1) to a device counter. Returns the step's flag, still on the device."""
        if not isinstance(found_inf, torch.Tensor):
            return None
        flag = found_inf.detach().sum().gt(0).to(torch.float64)
        if self._fused_counter is None or self._fused_counter.device != flag.device:
            self._fused_counter = torch.zeros((), dtype=torch.float64, device=flag.device)
        self._fused_counter.add_(flag)
        return flag

    def amp_row(self, flag: torch.Tensor) -> torch.Tensor:
        """[1, NCOLS + 1]: this step's flag and the skips so far, to ride in the copy of
        the partials (one device-to-host copy per device)."""
        assert self._fused_counter is not None  # count_fused_skip made the flag
        flags = torch.stack([flag, self._fused_counter])
        return torch.cat([flags, flags.new_zeros(NCOLS - 1)]).unsqueeze(0)

    def read_amp(self, host_row: torch.Tensor) -> bool:
        """The amp row, in host memory now: whether that step was skipped."""
        step_skipped, skipped_so_far = host_row[:2].tolist()  # sync-ok: host memory
        self.fused_skipped = max(self.fused_skipped, int(skipped_so_far))
        return bool(step_skipped > 0)

    @property
    def skipped_total(self) -> int:
        return self.skipped + self.fused_skipped
