"""What the agent needs from torch.distributed: the rank label, the metrics port, shards.

- DDP: the optimizer's step pre-hook runs after DDP has all-reduced the gradients, so
  every rank computes the same statistics of the same (averaged) gradients.
- FSDP2, HSDP, tensor parallel (DTensor parameters and gradients): each rank computes on
  its local shard (`to_local()`, possibly empty). Which rank exports which shard, so that
  PromQL sums over ranks exactly, is placement.py's.

The process group is often initialised after `attach()`, so the rank is read lazily (at
export), never cached as "no rank" at attach. The port is fixed at attach, from
`LOCAL_RANK` (torchrun, most launchers) or, failing that, the rank of an initialised group.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from gradmon.errors import GradmonError

__all__ = [
    "dtensor_type",
    "is_dtensor",
    "launch_rank",
    "local_rank",
    "local_tensor",
    "metrics_port",
    "process_rank",
    "rank_label",
]


def rank_label() -> int | None:
    """This process's global rank when several ranks train together, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return int(dist.get_rank())
    return None


def process_rank() -> int:
    """This process's rank for naming its files: that of an initialised group, else
    $RANK (set by launchers before the group exists), else 0. The `rank` label is
    rank_label(): only under several ranks."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


# (rank, world size) variables of the launchers, in order: torchrun, SLURM's srun.
_LAUNCH_VARS = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))


def launch_rank() -> int | None:
    """The global rank, also before a process group exists: the group's, else the one
    the launcher set ($RANK with $WORLD_SIZE > 1, or SLURM's $SLURM_PROCID with
    $SLURM_NTASKS > 1), else None (one process). exporter.push groups by it from the
    first push on, which usually comes before init_process_group()."""
    rank = rank_label()
    if rank is not None:
        return rank
    for rank_var, size_var in _LAUNCH_VARS:
        try:
            value, size = int(os.environ[rank_var]), int(os.environ[size_var])
        except (KeyError, ValueError):
            continue
        if size > 1 and 0 <= value < size:
            return value
    return None


def local_rank() -> int:
    """The rank within this host: $LOCAL_RANK, else the global rank of an initialised
    group (single-host launchers that set no LOCAL_RANK), else 0."""
    raw = os.environ.get("LOCAL_RANK", "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 0:
            raise GradmonError(
                f"environment variable LOCAL_RANK={raw!r}: needs a non-negative integer "
                "(the rank of this process on its host; torchrun sets it)"
            )
        return value
    rank = rank_label()
    return rank if rank is not None else 0


def metrics_port(base: int) -> int:
    """The port this rank serves /metrics on: `exporter.port + local_rank` (0 stays 0)."""
    if base == 0:
        return 0
    rank = local_rank()
    port = base + rank
    if port > 65535:
        raise GradmonError(
            f"exporter.port={base} + local rank {rank} = {port} is past 65535; "
            "choose a lower exporter.port"
        )
    return port


def dtensor_type() -> type | None:
    """The DTensor class, or None when torch.distributed.tensor was never imported."""
    # No import: if torch.distributed.tensor was never imported, no DTensor exists.
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls if isinstance(cls, type) else None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: a DTensor's local shard (may hold no element), else `t`."""
    if type(t) is torch.Tensor or type(t) is nn.Parameter:  # the common case, no lookups
        return t
    cls = dtensor_type()
    if cls is not None and isinstance(t, cls):
        local: torch.Tensor = t.to_local()  # type: ignore[attr-defined]
        return local
    return t


def is_dtensor(t: torch.Tensor) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)
