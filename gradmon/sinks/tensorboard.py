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
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import math
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from gradmon.config import TensorboardConfig
from gradmon.errors import GradmonError
from gradmon.sinks._common import expand_path, to_float
from gradmon.sinks.writer import ErrorFn, StorageWriter
from gradmon.snapshot import ANOMALY_KINDS, Snapshot

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

# A histogram row: [lo, hi, num, sum, sum_squares, counts[bins]...] in float64.
HIST_HEAD = 5

# Statistic -> LayerStats attribute, in the order the sections appear.
LAYER_TAGS: tuple[tuple[str, str], ...] = (
    ("grad_norm", "norm"),
    ("grad_rms", "rms"),
    ("grad_abs_max", "abs_max"),
    ("grad_mean", "mean"),
    ("grad_zero_ratio", "zero_ratio"),
    ("param_norm", "param_norm"),
)
# The same for ActivationStats (collect.activations), after the gradient sections.
ACTIVATION_TAGS: tuple[tuple[str, str], ...] = (
    ("activation_rms", "rms"),
    ("activation_mean", "mean"),
    ("activation_zero_ratio", "zero_ratio"),
)


def _masked(crc: int) -> int:
    """TFRecord's masked CRC32C (as tensorboard's record writer computes it)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def use_native_crc32c(library: str) -> bool:
    """Frame event records with google-crc32c's C CRC32C instead of a pure-Python one.

    Both writers checksum every record in pure Python unless a native CRC32C is around:
    ~0.2 µs per byte, i.e. ~1 ms of writer-thread CPU (GIL held) per step for 20 layers,
    ~25 ms for 500. google-crc32c (in the `tensorboard` extra) computes the same values
    ~1000x faster. Only the writer module's own binding of the pure-Python function is
    replaced, and only while it is still that function; readers are left alone (they
    verify the checksums). Returns whether a native CRC32C is in use.
    """
    try:
        import google_crc32c
    except ImportError:
        return False
    if getattr(google_crc32c, "implementation", "c") != "c":
        return False
    if library == "torch":
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as stub
        from tensorboard.summary.writer import record_writer

        def masked_crc32c(data: bytes) -> int:
            return _masked(google_crc32c.value(data))

        if record_writer.masked_crc32c is stub.masked_crc32c:
            record_writer.masked_crc32c = masked_crc32c
        return record_writer.masked_crc32c is not stub.masked_crc32c
    from tensorboardX import crc32c as pure
    from tensorboardX import record_writer as x_writer

    if pure._crc32c_native is not None:  # tensorboardX found the `crc32c` package itself
        return True
    if x_writer.crc32c is pure.crc32c:
        x_writer.crc32c = google_crc32c.value
    return x_writer.crc32c is not pure.crc32c


def _writer_library(config: TensorboardConfig) -> tuple[str, Any]:
    """("torch" | "tensorboardX", its SummaryWriter class): imports only, no I/O."""
    choice = config.writer
    errors: list[str] = []
    if choice in ("auto", "torch"):
        try:
            from torch.utils.tensorboard import SummaryWriter

            return "torch", SummaryWriter
        except ImportError as exc:
            errors.append(f"torch.utils.tensorboard: {exc}")
    if choice in ("auto", "tensorboardX"):
        try:
            import tensorboardX

            return "tensorboardX", tensorboardX.SummaryWriter
        except ImportError as exc:
            errors.append(f"tensorboardX: {exc}")
    raise GradmonError(
        f"tensorboard.logdir is set (writer: {choice}) but no TensorBoard writer can be "
        f"imported ({'; '.join(errors)}): pip install 'gradmon[tensorboard]'"
    )


def check_writer(config: TensorboardConfig) -> None:
    """Raise GradmonError at attach() when no TensorBoard writer can be imported."""
    _writer_library(config)


def open_writer(logdir: str, config: TensorboardConfig) -> tuple[Any, Any]:
    """(SummaryWriter, Summary proto class or None) for the configured writer library.
    Makes the logdir and an event file: call it on the storage thread only.

    The proto class lets the writer thread put all of a step's scalars in one event
    (~5x cheaper than one add_scalar call per value); None falls back to add_scalar.
    """
    library, writer_class = _writer_library(config)
    writer = writer_class(logdir, max_queue=100, flush_secs=config.flush_secs)
    use_native_crc32c(library)
    try:
        if library == "torch":
            from tensorboard.compat.proto import summary_pb2
        else:
            from tensorboardX.proto import summary_pb2
    except ImportError:  # pragma: no cover - both libraries ship their protos
        return writer, None
    return writer, summary_pb2.Summary


HistogramMethod = Literal["auto", "histc", "sort"]


def histogram_row(
    tensors: list[torch.Tensor], bins: int, max_elements: int, method: HistogramMethod = "auto"
) -> torch.Tensor:
    """One layer's histogram as a float64 row on the grads' device, without a device sync.

    Bins split [finite min, finite max] of the layer into `bins` equal parts; NaN/Inf
    entries are left out (the layer's nan/inf counts are in the scalars). A grad of more
    than `max_elements` entries is sampled with an odd stride (so a power-of-two row
    length never aliases onto a single column).

    method: "histc" masks non-finite entries and rescales to [0, 1] for torch.histc,
    all on the device; "sort" counts with a sort and searchsorted instead (torch.histc
    on CUDA refuses torch.use_deterministic_algorithms); "auto" is "histc", except for
    CPU tensors with no NaN/Inf, where reading min/max costs nothing and two passes do.
    """
    flat = []
    for t in tensors:
        v = t.detach().reshape(-1)
        if v.numel() > max_elements:
            stride = -(-v.numel() // max_elements) | 1
            v = v[::stride]
        flat.append(v)
    x = flat[0] if len(flat) == 1 else torch.cat(flat)
    if x.dtype != torch.float64:
        x = x.float()
    device = x.device
    if x.numel() == 0:
        return torch.zeros(HIST_HEAD + bins, dtype=torch.float64, device=device)
    if method == "auto" and device.type == "cpu":
        # Host memory: reading a value costs no device sync. min/max propagate NaN and
        # Inf, so finite ones mean every entry is finite: two passes instead of eight.
        lo, hi = torch.aminmax(x)
        lo_f, hi_f = float(lo), float(hi)
        if math.isfinite(lo_f) and math.isfinite(hi_f):
            x64 = x.to(torch.float64)
            head = torch.tensor([lo_f, hi_f, float(x.numel())], dtype=torch.float64)
            if hi_f > lo_f:  # bincount: ~3x faster than torch.histc on the CPU
                index = ((x - lo_f) * (bins / (hi_f - lo_f))).long().clamp_(0, bins - 1)
                counts = torch.bincount(index, minlength=bins).to(torch.float64)
            else:
                counts = torch.zeros(bins, dtype=torch.float64)
                counts[0] = x.numel()
            return torch.cat([head, x64.sum().reshape(1), torch.dot(x64, x64).reshape(1), counts])
    # Device path: no Python branch on a value, no host->device copy (torch.tensor(...,
    # device=cuda) would be one, and a blocking copy syncs); scalars go in as Python numbers.
    finite = torch.isfinite(x)
    lo = x.masked_fill(~finite, math.inf).amin()
    hi = x.masked_fill(~finite, -math.inf).amax()
    any_finite = hi >= lo  # False when no entry is finite (lo=+inf, hi=-inf)
    lo = torch.where(any_finite, lo, 0.0)
    hi = torch.where(any_finite, hi, 0.0)
    span = torch.where(hi > lo, hi - lo, 1.0)
    # Finite entries land in [0, 1]; the others at -1, outside the histogram's range.
    unit = torch.where(finite, (x - lo) / span, -1.0)
    if method == "sort":
        ordered = unit.sort().values
        edges = torch.linspace(0.0, 1.0, bins + 1, dtype=x.dtype, device=device)
        starts = torch.searchsorted(ordered, edges[:-1])
        end = torch.searchsorted(ordered, edges[-1:], right=True)
        counts = torch.diff(torch.cat([starts, end])).to(torch.float64)
    else:
        counts = torch.histc(unit, bins=bins, min=0.0, max=1.0).to(torch.float64)
    kept = x.masked_fill(~finite, 0.0).to(torch.float64)
    head = torch.stack(
        [
            lo.to(torch.float64),
            hi.to(torch.float64),
            finite.sum().to(torch.float64),
            kept.sum(),
            torch.dot(kept, kept),
        ]
    )
    return torch.cat([head, counts])


@dataclass
class _Histograms:
    step: int
    parts: list[tuple[list[str], torch.Tensor, Any]]  # (layers, [L, 5+bins] rows, event)


@dataclass
class _Item:
    snapshot: Snapshot
    scalars: dict[str, Any]
    histograms: list[_Histograms]


class _EventFiles:
    """TensorBoard event files as a Storage (gradmon/sinks/writer.py): the SummaryWriter is
    made (mkdir, a new event file), written, flushed and closed on the storage thread only.

    After a failure the writer is dropped and the next batch opens a new one: a new event
    file in the same logdir (TensorBoard reads every event file of a run), so the sink
    goes on once the storage is back, and a file that may end in a torn record is never
    appended to again (readers stop at a torn last record).
    """

    def __init__(self, logdir: str, config: TensorboardConfig, layout: dict[str, Any]) -> None:
        self.logdir = logdir
        self._config = config
        self._layout = layout
        self._writer: Any = None
        self._summary: Any = None

    def open(self) -> None:
        self._writer, self._summary = open_writer(self.logdir, self._config)
        self._writer.add_custom_scalars(self._layout)

    def verify(self) -> None:
        if "://" not in self.logdir and not os.path.isdir(self.logdir):
            raise FileNotFoundError(errno.ENOENT, "the logdir was deleted", self.logdir)

    def flush(self) -> None:
        with _storage_errors():
            self._writer.flush()
            # tensorboardX's event thread dies on a write error without telling anyone.
            file_writer = self._writer._get_file_writer()
            worker: Any = getattr(getattr(file_writer, "event_writer", None), "_worker", False)
            if worker is None or (worker is not False and not worker.is_alive()):
                raise OSError(errno.EIO, "tensorboardX's event writer thread died")

    def abandon(self) -> None:
        writer, self._writer = self._writer, None
        with contextlib.suppress(Exception):
            writer.close()

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with _storage_errors():
                writer.close()

    def write(self, item: _Item) -> None:
        snap = item.snapshot
        wall = snap.timestamp or None
        values: list[tuple[str, float]] = [
            ("global/grad_norm", snap.global_norm),
            ("global/nonfinite", float(snap.nonfinite)),
            ("global/skipped", float(snap.skipped)),
        ]
        for name, s in snap.layers.items():
            values.extend((f"{tag}/{name}", float(getattr(s, attr))) for tag, attr in LAYER_TAGS)
            values.append((f"grad_nonfinite/{name}", float(s.nan_count + s.inf_count)))
            if s.update_ratio is not None:
                values.append((f"update_ratio/{name}", s.update_ratio))
        for name, act in snap.activations.items():
            values.extend((f"{t}/{name}", float(getattr(act, attr))) for t, attr in ACTIVATION_TAGS)
            values.append((f"activation_nonfinite/{name}", float(act.nan_count + act.inf_count)))
        kinds = dict.fromkeys(ANOMALY_KINDS, 0)
        for a in snap.anomalies:
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        values.extend((f"anomalies/{kind}", float(n)) for kind, n in kinds.items())
        values.extend((f"scalar/{k}", to_float(v)) for k, v in item.scalars.items())
        histograms = [self._histogram_args(hist) for hist in item.histograms]
        with _storage_errors():  # from here on, only the writer's calls
            self._write_scalars(values, snap.step, wall)
            if snap.anomalies:
                rows = "\n".join(
                    f"| {a.layer} | {a.kind} | {a.value:.4g} |" for a in snap.anomalies
                )
                self._writer.add_text(
                    "anomalies", "| layer | kind | value |\n|---|---|---|\n" + rows, snap.step, wall
                )
            for hist_args in histograms:
                for kwargs in hist_args:
                    self._writer.add_histogram_raw(**kwargs, walltime=wall)

    def _write_scalars(
        self, values: list[tuple[str, float]], step: int, wall: float | None
    ) -> None:
        if self._summary is not None:
            summary = self._summary()
            add = summary.value.add  # 3x faster than building Value objects first
            for tag, v in values:
                add(tag=tag, simple_value=v)
            self._writer._get_file_writer().add_summary(summary, step, wall)
        else:  # pragma: no cover - both libraries ship their protos
            for tag, v in values:
                self._writer.add_scalar(tag, v, step, wall)

    def _histogram_args(self, hist: _Histograms) -> list[dict[str, Any]]:
        bins = self._config.histogram_bins
        out: list[dict[str, Any]] = []
        for names, table, event in hist.parts:
            if event is not None:
                event.synchronize()  # sync-ok: the storage thread, not the training thread
            rows = table.cpu().tolist()
            for name, row in zip(names, rows, strict=True):
                lo, hi, num, total, sum_sq = row[:HIST_HEAD]
                counts = row[HIST_HEAD:]
                if num <= 0:
                    continue  # no finite entry: nothing to draw
                if hi > lo:
                    limits = [lo + (hi - lo) * (k + 1) / bins for k in range(bins)]
                else:  # every finite entry has the same value
                    limits, counts = [hi], [num]
                out.append(
                    {
                        "tag": f"grad_hist/{name}",
                        "min": lo,
                        "max": hi,
                        "num": num,
                        "sum": total,
                        "sum_squares": sum_sq,
                        "bucket_limits": limits,
                        "bucket_counts": counts,
                        "global_step": hist.step,
                    }
                )
        return out


@contextlib.contextmanager
def _storage_errors() -> Iterator[None]:
    """Whatever the event writer raises is a storage failure (its thread re-raises a write
    error on every later call): an OSError, so the storage thread opens a new writer."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        raise OSError(errno.EIO, f"event writer failed: {exc!r}") from exc


class TensorBoardSink:
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
        self._histograms: list[_Histograms] = []  # computed, waiting for their snapshot
        # on_publish may run on a thread calling Monitor.snapshot() while the training
        # thread is in on_collect.
        self._lock = threading.Lock()
        tags = [t for t, _ in LAYER_TAGS] + ["grad_nonfinite", "update_ratio", "anomalies"]
        if activations:
            tags += [t for t, _ in ACTIVATION_TAGS] + ["activation_nonfinite"]
        layout = {"gradmon (all layers)": {tag: ["Multiline", [rf"^{tag}/"]] for tag in tags}}
        self._thread: StorageWriter[_Item] = StorageWriter(
            "tensorboard",
            self.logdir,
            _EventFiles(self.logdir, config, layout),
            max_queue=config.max_queue,
            on_error=on_error,
            stall_after=config.stall_after,
            close_timeout=config.close_timeout,
        )
        self._closed = False
        # The writer thread is a daemon: a script that never closes its Monitor still gets
        # the queued snapshots written at exit (within close_timeout).
        atexit.register(self.close)

    @property
    def lost(self) -> int:
        """Snapshots that did not reach the event files (storage errors, full queue, close)."""
        return self._thread.lost

    @property
    def written(self) -> int:
        """Snapshots the event writer accepted."""
        return self._thread.written

    # ------------------------------------------------------------ training thread
    def on_collect(self, step: int, grads: Mapping[str, list[torch.Tensor]]) -> None:
        every = self._config.histogram_every
        count, self._collections = self._collections, self._collections + 1
        if not every or count % every:
            return
        # torch.histc on CUDA raises under torch.use_deterministic_algorithms(True).
        deterministic = torch.are_deterministic_algorithms_enabled()
        by_device: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
        for name, tensors in grads.items():
            if not tensors:
                continue
            device = tensors[0].device
            row = histogram_row(
                tensors,
                self._config.histogram_bins,
                self._config.histogram_max_elements,
                "sort" if deterministic and device.type == "cuda" else "auto",
            )
            names, rows = by_device.setdefault(device, ([], []))
            names.append(name)
            rows.append(row)
        hist = _Histograms(step, [])
        for device, (names, rows) in by_device.items():
            table = torch.stack(rows)
            event = None
            if device.type == "cuda":
                # As the monitor does with its partials: a non-blocking copy into pinned
                # memory behind an event; only the writer thread waits for it.
                staging = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
                staging.copy_(table, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(torch.cuda.current_stream(device))
                table = staging
            hist.parts.append((names, table, event))
        with self._lock:
            self._histograms.append(hist)

    def on_publish(self, snapshot: Snapshot, scalars: Mapping[str, Any]) -> None:
        # Snapshots are published in collection order: this step's histogram goes along,
        # with any older one whose snapshot never came (its publish failed).
        ready: list[_Histograms] = []
        with self._lock:
            for i, hist in enumerate(self._histograms):
                if hist.step == snapshot.step:
                    ready = self._histograms[: i + 1]
                    del self._histograms[: i + 1]
                    break
            else:
                del self._histograms[:-_MAX_PENDING_HISTOGRAMS]  # bounded, whatever happens
        self._thread.submit(_Item(snapshot, dict(scalars), ready))

    def close(self) -> None:
        """Write what is queued and close the event file, waiting at most
        tensorboard.close_timeout seconds. Idempotent; also runs at exit."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._thread.close()
