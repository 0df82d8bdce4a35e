"""TensorBoard event files (`tensorboard.logdir`; `pip install gradmon[tensorboard]`).

Every collected step writes, at the snapshot's step:

- per layer, one tag per statistic, so TensorBoard shows a section per statistic with a
  chart per layer: `grad_norm/<layer>`, `grad_rms/<layer>`, `grad_abs_max/<layer>`,
  `grad_mean/<layer>`, `grad_zero_ratio/<layer>`, `grad_nonfinite/<layer>` (NaN + Inf
  entries), `param_norm/<layer>`, and `update_ratio/<layer>` where measured
  (collect.update_ratio_every);
- with `collect.activations`, per module that ran before the step:
  `activation_rms/<layer>`, `activation_mean/<layer>`, `activation_zero_ratio/<layer>`,
  `activation_nonfinite/<layer>` (NaN + Inf entries of the module's output);
- `global/grad_norm`, `global/nonfinite` (0/1), `global/skipped` (0/1);
- `anomalies/<kind>`: anomalies of each kind at this step (0 when none), and a text
  `anomalies` table (layer, kind, value) at the steps that had any;
- where NaN/Inf started (`Snapshot.nonfinite_origin`), at the steps whose gradients held
  any: `nonfinite_origin/<layer>` = 1 (a chart per origin, with a point at each such
  step), and a text `nonfinite_origin` naming it and the layers that held NaN/Inf;
- `scalar/<name>`: the values given to `Monitor.log()`;
- every `tensorboard.histogram_every` collections, `grad_hist/<layer>`: a histogram of
  the layer's finite gradient entries (`histogram_bins` equal bins over [min, max]).
A Custom Scalars layout puts all layers of a statistic in one chart.

Cost on the training thread. The histogram is computed on the grads' device in
`on_collect` with a few sync-free tensor ops (finite min/max, torch.histc over the values
rescaled to [0, 1]; a strided sample past `histogram_max_elements`), and on CUDA copied
without blocking into pinned memory behind an event; nothing waits for it there.
`on_publish` only queues the snapshot: a writer thread, woken twice a second, builds the
summaries (one event per step holding every scalar) and, for histograms, waits for the
event, so reading device values only ever blocks that thread. A full queue drops the
snapshot and counts an agent error rather than slow training down. Event records are
checksummed with google-crc32c when installed (see use_native_crc32c). Measured overhead:
README, "TensorBoard, record file and plots".

Storage. The SummaryWriter itself (mkdir of the logdir, a new event file) is made on that
thread too, never at attach(), and every write is followed by a flush there, which
surfaces the errors of TensorBoard's own event thread. A failure (ENOSPC, EROFS, a logdir
deleted or turned into a file) drops the writer: the batch is lost and counted in
gradmon_agent_errors_total{stage="sink"} (through build_sinks' on_error), the episode is
logged once with the logdir and errno, and the next batch opens a new writer, i.e. a new
event file in the same logdir, so the sink goes on when the storage does. A hung storage
is reported by the watchdog of gradmon/sinks/writer.py; close() waits at most
`tensorboard.close_timeout` seconds.

Uses torch.utils.tensorboard's SummaryWriter (needs the `tensorboard` package) or,
when that is missing or `tensorboard.writer: tensorboardX`, tensorboardX's.

This module is the sink (queueing, pairing histograms with their snapshot); the event
files it writes through are gradmon/sinks/tensorboard_events.py, the histograms
gradmon/sinks/tensorboard_histograms.py.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

from gradmon.config import TensorboardConfig
from gradmon.sinks._common import QueuedSink, expand_path
from gradmon.sinks.tensorboard_events import (
    EventFiles,
    StepEvents,
    check_writer,
    custom_scalars_layout,
    open_writer,
    use_native_crc32c,
)
from gradmon.sinks.tensorboard_histograms import (
    HIST_HEAD,
    HistogramMethod,
    Histograms,
    device_histograms,
    histogram_row,
)
from gradmon.sinks.writer import ErrorFn
from gradmon.snapshot import Snapshot

# The histogram and event-file helpers are importable from here too, with the sink.
__all__ = [
    "HIST_HEAD",
    "HistogramMethod",
    "TensorBoardSink",
    "check_writer",
    "histogram_row",
    "open_writer",
    "use_native_crc32c",
]

_MAX_PENDING_HISTOGRAMS = 8


class TensorBoardSink(QueuedSink[StepEvents]):
    """Writes snapshots as TensorBoard scalars, text and histograms (see module doc).

    Nothing touches the storage on the caller's thread: the SummaryWriter is made (mkdir,
    event file) and used on a StorageWriter thread (gradmon/sinks/writer.py); a logdir
    that cannot be written is reported through `on_error` while it fails, not raised at
    attach(). A missing TensorBoard library still fails at attach().
    """

    def __init__(
        self,
        config: TensorboardConfig,
        activations: bool = False,
        on_error: ErrorFn | None = None,
    ) -> None:
        assert config.logdir is not None
        self.logdir = expand_path(config.logdir, "tensorboard.logdir")
        self._config = config
        check_writer(config)
        self._collections = 0
        self._histograms: list[Histograms] = []  # computed, waiting for their snapshot
        # on_publish may run on a thread calling Monitor.snapshot() while the training
        # thread is in on_collect.
        self._lock = threading.Lock()
        files = EventFiles(self.logdir, config, custom_scalars_layout(activations))
        super().__init__("tensorboard", self.logdir, files, config, on_error)

    # ------------------------------------------------------------ training thread
    def on_collect(self, step: int, grads: Mapping[str, list[torch.Tensor]]) -> None:
        every = self._config.histogram_every
        count, self._collections = self._collections, self._collections + 1
        if not every or count % every:
            return
        hist = device_histograms(
            step, grads, self._config.histogram_bins, self._config.histogram_max_elements
        )
        with self._lock:
            self._histograms.append(hist)

    def on_publish(self, snapshot: Snapshot, scalars: Mapping[str, Any]) -> None:
        # Snapshots are published in collection order: this step's histogram goes along,
        # with any older one whose snapshot never came (its publish failed).
        ready: list[Histograms] = []
        with self._lock:
            for i, hist in enumerate(self._histograms):
                if hist.step == snapshot.step:
                    ready = self._histograms[: i + 1]
                    del self._histograms[: i + 1]
                    break
            else:
                del self._histograms[:-_MAX_PENDING_HISTOGRAMS]  # bounded, whatever happens
        self._writer.submit(StepEvents(snapshot, dict(scalars), ready))
