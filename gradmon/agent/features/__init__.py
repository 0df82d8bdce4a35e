"""Opt-in extras measured alongside the gradients, behind one protocol.

A feature takes part in a collection at three points, all on the training thread:
`at_collection` (in the step pre-hook, after the gradients were collected: it may stage
tables to the host, and may ask the collection to wait for the end of the optimizer
step), `at_step_end` (the step post-hook of a collection that waited) and `finish` (at
publication, with its tables in host memory: it returns the snapshot with its results).
A new feature is a new module here and one line in `build_features`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from gradmon.agent.layers import LayerIndex
from gradmon.agent.staging import Staged
from gradmon.config import Config
from gradmon.snapshot import Snapshot

__all__ = ["Feature", "FeatureRows", "Stage", "Work", "build_features"]

# A block of device rows -> its (possibly still in flight) host copy.
Stage = Callable[[torch.Tensor], Staged]
# A feature's staged tables, each with what the feature needs to read it back.
FeatureRows = list[tuple[Staged, Any]]


@dataclass
class Work:
    """What a feature did at a collection."""

    rows: FeatureRows = field(default_factory=list)
    wait_for_step_end: bool = False  # publish only after at_step_end


class Feature(Protocol):
    name: str
    post_step: bool  # needs the optimizer's step post-hook

    def on_step_counted(self, next_collected: bool) -> None: ...

    def at_collection(self, stage: Stage, at_optimizer_step: bool) -> Work: ...

    def at_step_end(self, stage: Stage) -> FeatureRows: ...

    def finish(self, tables: list[tuple[torch.Tensor, Any]], snap: Snapshot) -> Snapshot: ...

    def export_fields(self) -> dict[str, Any]: ...

    @property
    def errors(self) -> int: ...  # failures inside its own hooks (gradmon_agent_errors_total)

    def remove(self) -> None: ...


def build_features(
    cfg: Config, model: nn.Module, index: LayerIndex, optimizer: torch.optim.Optimizer | None
) -> list[Feature]:
    """The features the config turns on, in a fixed order."""
    from gradmon.agent.features.activations import ActivationFeature
    from gradmon.agent.features.update_ratio import UpdateRatioFeature

    features: list[Feature] = []
    ratio = UpdateRatioFeature.from_config(cfg, index, optimizer)
    if ratio is not None:
        features.append(ratio)
    if cfg.collect.activations:
        features.append(ActivationFeature(model, cfg))
    return features
