"""Sinks: where snapshots go besides Prometheus (TensorBoard event files, a record file).

A sink gets two calls, both on the training thread and both guarded (a failing sink is
counted in gradmon_agent_errors_total{stage="sink"} and training goes on):
- `on_collect(step, grads)` at collection time, with the layer name -> gradient tensors
  of that step; it may launch device work (e.g. a histogram) but must never sync;
- `on_publish(snapshot, scalars)` once the snapshot is final; `scalars` holds the values
  given to Monitor.log(), as given (tensors may live on a GPU: read them off the hot path).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from gradmon.snapshot import Snapshot


class Sink(Protocol):
    def on_collect(self, step: int, grads: Mapping[str, list[torch.Tensor]]) -> None: ...

    def on_publish(self, snapshot: Snapshot, scalars: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def build_sinks(config: Any) -> list[Sink]:
    """The sinks a Config asks for (tensorboard.logdir, record.path); imported lazily.

    A sink that cannot start (unwritable path, TensorBoard not installed) raises
    GradmonError here, at attach(), after closing the ones already started.
    """
    sinks: list[Sink] = []
    try:
        if config.record.path is not None:
            from gradmon.sinks.record import RecordSink

            sinks.append(RecordSink(config.record))
        if config.tensorboard.logdir is not None:
            from gradmon.sinks.tensorboard import TensorBoardSink

            sinks.append(TensorBoardSink(config.tensorboard, config.collect.activations))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks
