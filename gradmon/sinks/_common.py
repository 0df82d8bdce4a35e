"""What the sinks share besides their storage thread (writer.py): `{rank}` paths, numbers."""

from __future__ import annotations

import math
import os
from typing import Any

import torch


def current_rank() -> int:
    """This process's rank: torch.distributed when initialized, else $RANK, else 0."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def expand_path(template: str, field: str) -> str:
    """`{rank}` in a configured path -> this process's rank (one file per rank)."""
    try:
        return template.format(rank=current_rank())
    except (KeyError, IndexError, ValueError) as exc:
        from gradmon.errors import GradmonError

        raise GradmonError(
            f"{field}={template!r}: only the placeholder {{rank}} is allowed ({exc!r})"
        ) from None


def to_float(value: Any) -> float:
    """A float from a Python number or a one-element tensor. On a GPU tensor this syncs:
    call it on a writer thread, never on the training thread."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(()).item())  # sync-ok: writer thread only
    return float(value)


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/Inf: they are written as null."""
    return value if math.isfinite(value) else None
