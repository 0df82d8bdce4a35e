"""TensorBoard event files as a Storage of gradmon/sinks/writer.py, for the TensorBoard sink.

Which writer library (torch.utils.tensorboard's SummaryWriter, or tensorboardX's), the
event records' CRC32C, and what one step becomes in the event files: one event holding
every scalar, the anomalies text table, the histograms. Everything here that does I/O
runs on the sink's storage thread only.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gradmon.config import TensorboardConfig
from gradmon.errors import GradmonError
from gradmon.sinks.tensorboard_histograms import Histograms, histogram_args
from gradmon.snapshot import ANOMALY_KINDS, Snapshot
from gradmon.stats.torch import to_float

__all__ = [
    "ACTIVATION_TAGS",
    "LAYER_TAGS",
    "EventFiles",
    "StepEvents",
    "check_writer",
    "custom_scalars_layout",
    "open_writer",
    "use_native_crc32c",
]

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


def custom_scalars_layout(activations: bool) -> dict[str, Any]:
    """A Custom Scalars layout that puts all layers of a statistic in one chart."""
    tags = [t for t, _ in LAYER_TAGS]
    tags += ["grad_nonfinite", "update_ratio", "anomalies", "nonfinite_origin"]
    if activations:
        tags += [t for t, _ in ACTIVATION_TAGS] + ["activation_nonfinite"]
    return {"gradmon (all layers)": {tag: ["Multiline", [rf"^{tag}/"]] for tag in tags}}


@dataclass
class StepEvents:
    """What the sink queues for one published snapshot."""

    snapshot: Snapshot
    scalars: dict[str, Any]
    histograms: list[Histograms]


class EventFiles:
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

    def write(self, item: StepEvents) -> None:
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
        origin = snap.nonfinite_origin
        if origin is not None:  # where NaN/Inf started: 1 at the steps it started there
            values.append((f"nonfinite_origin/{origin}", 1.0))
        values.extend((f"scalar/{k}", to_float(v)) for k, v in item.scalars.items())
        bins = self._config.histogram_bins
        histograms = [histogram_args(hist, bins) for hist in item.histograms]
        with _storage_errors():  # from here on, only the writer's calls
            self._write_scalars(values, snap.step, wall)
            if snap.anomalies:
                rows = "\n".join(
                    f"| {a.layer} | {a.kind} | {a.value:.4g} |" for a in snap.anomalies
                )
                self._writer.add_text(
                    "anomalies", "| layer | kind | value |\n|---|---|---|\n" + rows, snap.step, wall
                )
            if origin is not None:
                self._writer.add_text(
                    "nonfinite_origin", _origin_text(snap, origin), snap.step, wall
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


def _origin_text(snap: Snapshot, origin: str) -> str:
    """Markdown for the `nonfinite_origin` text summary of a step whose NaN/Inf started at
    `origin`: what the origin is, and every layer whose gradient held NaN/Inf."""
    where = (
        "the first module in forward order whose output held NaN/Inf"
        if origin in snap.activations
        else "the first layer in backward order whose gradient held NaN/Inf"
    )
    bad = [name for name, s in snap.layers.items() if s.nan_count or s.inf_count]
    shown = ", ".join(f"`{name}`" for name in bad[:20])
    more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
    return (
        f"NaN/Inf started in **`{origin}`** ({where}).\n\n"
        f"Layers whose gradient held NaN/Inf at this step ({len(bad)}): {shown}{more}"
    )


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
