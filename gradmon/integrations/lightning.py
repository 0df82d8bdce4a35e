"""A Lightning callback that attaches gradmon to the trainer's module and optimizer.

```python
from gradmon.integrations.lightning import GradmonCallback
callback = GradmonCallback(config={"exporter": {"port": 9400}})
trainer = lightning.pytorch.Trainer(callbacks=[callback])
trainer.fit(model)
```

Works with `lightning` (``lightning.pytorch``) or, when only that is installed, the older
`pytorch_lightning` package.

Where the statistics are taken: Lightning's automatic optimization runs forward and backward
inside a closure that `optimizer.step(closure)` calls, so the optimizer's step pre-hook runs
*before* that step's backward. The callback therefore attaches the agent without the
optimizer and collects in `on_before_optimizer_step`, which Lightning calls after the
closure: the grads are final there (accumulated, all-reduced by DDP, unscaled by the AMP
scaler). Under AMP a step the scaler is about to skip for inf/NaN is collected and counted
as skipped. With `collect.every_n_steps: n`, only every n-th optimizer step is collected
and counted in `gradmon_steps_total`.

Fused optimizers (`fused=True`) under a GradScaler (`16-mixed`) are the exception: Lightning
does not unscale their grads (the fused kernel does, inside its step), so the grads are
still scaled in `on_before_optimizer_step`, and whether the scaler skips the step is known
only inside `scaler.step()`. There the AMP plugin runs the closure itself and then calls
`scaler.step(optimizer)`, so the optimizer's step pre-hook comes after the backward, with
the scaler's `grad_scale`/`found_inf` on the optimizer: the callback attaches the agent
with the optimizer, which unscales on the device and counts the skips the kernel makes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gradmon.agent.monitor import Monitor, attach
from gradmon.config import Config, load_config

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning import Callback  # type: ignore[assignment,unused-ignore]
    except ImportError as exc:
        raise ImportError(
            "gradmon.integrations.lightning needs Lightning: pip install 'gradmon[lightning]' "
            "(or pytorch_lightning)"
        ) from exc

__all__ = ["GradmonCallback"]


def _scaler_of(trainer: Any) -> Any:
    """The AMP GradScaler of the trainer's precision plugin, or None."""
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is None:
        plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    if scaler is not None and callable(getattr(scaler, "get_scale", None)):
        return scaler
    return None


def _unscaled_in_step(scaler: Any, optimizer: Any) -> bool:
    """Whether `optimizer` unscales its grads inside its step (a fused optimizer, which
    GradScaler hands `grad_scale`/`found_inf`) under an enabled scaler: Lightning's AMP
    plugin then leaves the grads scaled until `scaler.step(optimizer)`."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return False
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def _found_inf(scaler: Any, optimizer: Any) -> bool:
    """Whether `scaler.unscale_(optimizer)` found inf/NaN, i.e. `scaler.step()` will skip.

    Reads the flags GradScaler keeps per optimizer; on a GPU this is the same host sync
    that `scaler.step()` does right after, so it adds none of its own.
    """
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return False
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, Mapping):
        return False
    found = states.get(id(optimizer), {}).get("found_inf_per_device", {})
    return any(bool(v.sum().item()) for v in found.values() if isinstance(v, torch.Tensor))


class GradmonCallback(Callback):  # type: ignore[misc,unused-ignore]
    """Attach gradmon on `fit` start, log the training loss, close it when `fit` ends.

    config: as for `gradmon.attach` (None, a dict, a YAML path or a `gradmon.Config`).
    The agent is `.monitor` (None before `fit` starts).
    """

    def __init__(self, config: Config | Mapping[str, Any] | str | None = None) -> None:
        super().__init__()
        # Validated now, so a bad key fails at construction, not after the trainer set up.
        self._config: Config = load_config(config)
        self.monitor: Monitor | None = None
        self._optimizer: Any = None
        self._scaler: Any = None
        self._optimizer_steps = 0
        self._in_step = False  # the agent collects in the optimizer's step pre-hook

    # ------------------------------------------------------------- lifecycle
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._close()
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        self._optimizer = optimizers[0] if optimizers else None
        self._scaler = _scaler_of(trainer)
        self._optimizer_steps = 0
        self._in_step = _unscaled_in_step(self._scaler, self._optimizer)
        if self._in_step:  # fused under a GradScaler: see the module docstring
            self.monitor = attach(
                pl_module, self._optimizer, scaler=self._scaler, config=self._config
            )
            return
        # No optimizer: its step pre-hook would run before the closure's backward (see the
        # module docstring); the statistics are taken in on_before_optimizer_step instead.
        self.monitor = attach(pl_module, scaler=self._scaler, config=self._config)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        mon = self.monitor
        if mon is None or mon.closed or self._in_step:
            return
        inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
        if self._optimizer is not None and inner is not self._optimizer:
            return  # only the first optimizer is monitored
        step = self._optimizer_steps
        self._optimizer_steps += 1
        if step % self._config.collect.every_n_steps == 0:
            mon.collect(step, skipped=_found_inf(self._scaler, inner))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mon = self.monitor
        if mon is None or mon.closed:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            mon.log(loss=loss)  # kept as a tensor, read at scrape time: no sync here
        elif isinstance(loss, int | float) and not isinstance(loss, bool):
            mon.log(loss=loss)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._close()

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
