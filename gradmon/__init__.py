"""gradmon: per-layer gradient health of PyTorch training, served as Prometheus metrics.

mon = gradmon.attach(model, optimizer)   # that's all; /metrics on 127.0.0.1:9400
"""

import importlib
from typing import Any

from gradmon.agent.monitor import Monitor, attach
from gradmon.config import Config
from gradmon.errors import GradmonError
from gradmon.snapshot import LayerStats, Snapshot
from gradmon.version import __version__


def __getattr__(name: str) -> Any:
    """`gradmon.viz` and `gradmon.integrations` without an explicit import: loaded on first
    use (viz loads matplotlib only when it draws; integrations' submodules import their
    trainer only when they are imported)."""
    if name in ("viz", "integrations"):
        return importlib.import_module(f"gradmon.{name}")
    raise AttributeError(f"module 'gradmon' has no attribute {name!r}")


__all__ = [
    "Config",
    "GradmonError",
    "LayerStats",
    "Monitor",
    "Snapshot",
    "__version__",
    "attach",
]
