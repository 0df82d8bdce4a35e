"""A Hugging Face `TrainerCallback` that attaches gradmon to the Trainer's model and optimizer.

```python
from gradmon.integrations.transformers import GradmonCallback
trainer = transformers.Trainer(model=model, args=args, callbacks=[GradmonCallback()])
trainer.train()
```

The Trainer steps the optimizer after backward (and gradient clipping), so the agent's
optimizer step pre-hook sees the final grads. Accelerate wraps the optimizer in an
`AcceleratedOptimizer`: the agent is attached to the torch optimizer inside it, and to the
AMP GradScaler the wrapper carries (fp16 training), so steps the scaler skips are counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradmon.agent.monitor import Monitor, attach
from gradmon.config import Config, load_config
from gradmon.errors import GradmonError

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError(
        "gradmon.integrations.transformers needs transformers: pip install 'gradmon[transformers]'"
    ) from exc

__all__ = ["GradmonCallback"]


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside Accelerate's (or another) wrapper, or None."""
    for _ in range(8):  # wrappers keep the wrapped optimizer in `.optimizer`
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _scaler_of(optimizer: Any, accelerator: Any) -> Any:
    for owner in (optimizer, accelerator):
        scaler = getattr(owner, "scaler", None)
        if scaler is not None and callable(getattr(scaler, "get_scale", None)):
            return scaler
    return None


class GradmonCallback(TrainerCallback):  # type: ignore[misc,unused-ignore]
    """Attach gradmon when training begins, log the Trainer's logs, close when it ends.

    config: as for `gradmon.attach` (None, a dict, a YAML path or a `gradmon.Config`).
    The agent is `.monitor` (None before training begins).
    """

    def __init__(self, config: Config | Mapping[str, Any] | str | None = None) -> None:
        super().__init__()
        self._config: Config = load_config(config)  # a bad key fails here, not mid-run
        self.monitor: Monitor | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise GradmonError(
                "GradmonCallback.on_train_begin: the Trainer passed no torch.nn.Module "
                f"as model (got {type(model).__name__})"
            )
        wrapped = kwargs.get("optimizer")
        optimizer = _torch_optimizer(wrapped)
        scaler = _scaler_of(wrapped, kwargs.get("accelerator"))
        self.monitor = attach(model, optimizer, scaler=scaler, config=self._config)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        mon = self.monitor
        if mon is None or mon.closed or not isinstance(logs, Mapping):
            return
        scalars = {
            str(k): float(v)
            for k, v in logs.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if scalars:
            mon.log(**scalars)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
