"""Sinks: where snapshots go besides Prometheus (TensorBoard event files, a record file).

A sink gets two calls, both on the training thread and both guarded (a failing sink is
counted in gradmon_agent_errors_total{stage="sink"} and training goes on):
- `on_collect(step, grads)` at collection time, with the layer name -> gradient tensors
  of that step; it may launch device work (e.g. a histogram) but must never sync;
- `on_publish(snapshot, scalars)` once the snapshot is final; `scalars` holds the values
  given to Monitor.log(), as given (tensors may live on a GPU: read them off the hot path).
- `close()` waits at most the section's `close_timeout` seconds, then leaves the sink's
  storage thread behind (reported and logged with the path).

No sink touches storage on the caller's thread (gradmon/sinks/writer.py): storage errors
and hangs happen on the sink's own thread and reach the agent through `on_error`, the one
seam between sinks and the agent's counters:

    build_sinks(config, on_error=fn)   # fn(exc): count one gradmon_agent_errors_total{stage="sink"}

`fn` is called from the sinks' storage threads, the shared watchdog thread and the caller's
thread (a dropped snapshot, a close past its timeout): it must be thread-safe, cheap and
never block (the sink itself logs each failure episode once, with the path and errno).
Without `on_error`, errors are kept and raised by the sink's next on_publish()/close(),
where the caller's guard counts them (several at once as one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from gradmon.sinks.writer import ErrorFn
from gradmon.snapshot import Snapshot


class Sink(Protocol):
    def on_collect(self, step: int, grads: Mapping[str, list[torch.Tensor]]) -> None: ...

    def on_publish(self, snapshot: Snapshot, scalars: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def build_sinks(config: Any, on_error: ErrorFn | None = None) -> list[Sink]:
    """The sinks a Config asks for (tensorboard.logdir, record.path); imported lazily.

    Touches no storage: a path that cannot be written is reported through `on_error`
    once the sink's thread tries it. A sink that cannot start for a reason that is not
    storage (a bad `{rank}` template, TensorBoard not installed) raises GradmonError here,
    at attach(), after closing the ones already started.
    """
    sinks: list[Sink] = []
    try:
        if config.record.path is not None:
            from gradmon.sinks.record import RecordSink

            sinks.append(RecordSink(config.record, on_error))
        if config.tensorboard.logdir is not None:
            from gradmon.sinks.tensorboard import TensorBoardSink

            sinks.append(TensorBoardSink(config.tensorboard, config.collect.activations, on_error))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks
