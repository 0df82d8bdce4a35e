"""The record file: one JSON line per snapshot (JSONL), read by `gradmon plot`.

Set `record.path` (`{rank}` in it is replaced by the rank). Each published snapshot
becomes one line, appended (`record.mode: append`, the default, so a resumed run goes on
in the same file) or written to a fresh file (`overwrite`):

    {"step": 120, "time": 1767225600.25, "global_norm": 0.83, "nonfinite": false,
     "skipped": false, "scalars": {"loss": 0.41, "lr": 0.001},
     "layers": {"fc1.weight": {"norm": 0.52, "rms": 0.0081, "abs_max": 0.044,
                               "mean": -1.2e-05, "min": -0.044, "max": 0.039,
                               "zero_ratio": 0.0, "nan_count": 0, "inf_count": 0,
                               "param_norm": 9.7, "numel": 4096, "received": true}, ...},
     "anomalies": [{"layer": "fc1.weight", "kind": "vanishing", "value": 3e-09}],
     "activations": {"fc1": {"rms": 0.93, "mean": 0.02, "zero_ratio": 0.0,
                             "nan_count": 0, "inf_count": 0, "numel": 65536}, ...}}

- `time`: Unix seconds of the collection; `scalars`: the latest values given to
  `Monitor.log()` when the snapshot was published (tensors read on the writer thread).
- Layer fields are those of gradmon.LayerStats: magnitudes over finite entries, NaN/Inf
  entries counted in `nan_count`/`inf_count`; `received: false` means no gradient reached
  the layer since the previous collection; `update_ratio` (‖Δw‖/‖w‖, see
  gradmon/agent/features/update_ratio.py) is present only under
  `collect.update_ratio_every`, once the layer was measured.
- `activations` (only with `collect.activations: true`, and only at steps where some
  module ran): gradmon.ActivationStats of each module's forward output over the forwards
  before the step (`numel` adds up over them). Lines without it (older records, or
  activations off) simply have no activation statistics; readers use `.get`.
- `nonfinite_origin` (only on lines whose gradients held NaN/Inf): where it started, as
  `Snapshot.nonfinite_origin` (a layer, or a module with `collect.activations`).
- Non-finite numbers (NaN, +-Inf) are written as JSON `null`; for layers, `nan_count`
  and `inf_count` say which. `min`/`max` are null when a layer has no finite entry.
- Lines are in publication order; a resumed run may repeat steps (readers keep the last).
- `record.every: n` writes every n-th snapshot, plus every snapshot with an anomaly or a
  skipped step. A line costs ~200 bytes per layer (~100 KiB at 500 layers).

Readable without gradmon: `pandas.read_json(path, lines=True)` (one row per snapshot;
`pandas.json_normalize(df["layers"])` for the per-layer columns), or `json.loads` per line.

Storage. The training thread only queues the snapshot: a storage thread
(gradmon/sinks/writer.py) makes the directory, opens the file, formats and appends the
lines (one write per line), and fsyncs after each batch (`record.fsync`; twice a second
at most), so a full, read-only, deleted or hung storage never blocks `attach()` or a
training step. While the storage fails, each failed batch counts one
`gradmon_agent_errors_total{stage="sink"}` (a hung call counts once per 0.5 s after
`record.stall_after` seconds), the first failure is logged with the path and errno, the
snapshots of that time are lost, and the next batch opens the file again, so writing goes
on once the storage is back (a deleted directory is made again). The file holds whole
lines only: a line the storage refused part of is cut off again, and a torn last line left
by a killed writer is cut off before appending (readers skip one with a warning).
`Monitor.close()` waits at most `record.close_timeout` seconds for the queued lines.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gradmon.config import RecordConfig
from gradmon.errors import GradmonError
from gradmon.sinks._common import QueuedSink, expand_path, finite_or_none
from gradmon.sinks.writer import ErrorFn
from gradmon.snapshot import ActivationStats, LayerStats, Snapshot
from gradmon.stats.torch import to_float

__all__ = ["RecordSink", "read_record", "snapshot_record"]

log = logging.getLogger("gradmon")


def _layer_record(s: LayerStats) -> dict[str, Any]:
    f = finite_or_none
    out = {
        "norm": f(s.norm),
        "rms": f(s.rms),
        "abs_max": f(s.abs_max),
        "mean": f(s.mean),
        "min": f(s.min),
        "max": f(s.max),
        "zero_ratio": f(s.zero_ratio),
        "nan_count": s.nan_count,
        "inf_count": s.inf_count,
        "param_norm": f(s.param_norm),
        "numel": s.numel,
        "received": s.received,
    }
    if s.update_ratio is not None:  # collect.update_ratio_every, once measured
        out["update_ratio"] = f(s.update_ratio)
    return out


def _activation_record(a: ActivationStats) -> dict[str, Any]:
    f = finite_or_none
    return {
        "rms": f(a.rms),
        "mean": f(a.mean),
        "zero_ratio": f(a.zero_ratio),
        "nan_count": a.nan_count,
        "inf_count": a.inf_count,
        "numel": a.numel,
    }


def snapshot_record(snapshot: Snapshot, scalars: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object of one record line (tensor scalars are read here: may sync)."""
    record: dict[str, Any] = {
        "step": snapshot.step,
        "time": snapshot.timestamp,
        "global_norm": finite_or_none(snapshot.global_norm),
        "nonfinite": snapshot.nonfinite,
        "skipped": snapshot.skipped,
        "scalars": {k: finite_or_none(to_float(v)) for k, v in scalars.items()},
        "layers": {name: _layer_record(s) for name, s in snapshot.layers.items()},
        "anomalies": [
            {"layer": a.layer, "kind": a.kind, "value": finite_or_none(float(a.value))}
            for a in snapshot.anomalies
        ],
    }
    if snapshot.activations:
        record["activations"] = {n: _activation_record(a) for n, a in snapshot.activations.items()}
    if snapshot.nonfinite_origin is not None:
        record["nonfinite_origin"] = snapshot.nonfinite_origin
    return record


class _RecordFile:
    """The record file's storage, driven by the sink's storage thread only.

    Appends with O_APPEND, one os.write per line. A line the storage refused part of
    (ENOSPC after a partial write) is cut off again with ftruncate, so the file holds
    whole lines only; if even that fails, the cut is retried before the next line. A
    torn last line left in the file by a killed writer is cut off at open. (Both for
    regular files; a FIFO or a device gets the bytes as they come.)
    """

    def __init__(self, path: Path, mode: str, fsync: bool) -> None:
        self.path = path
        self._truncate = mode == "overwrite"  # only the first successful open
        self._fsync = fsync
        self._fd: int | None = None
        self._ident: tuple[int, int] = (0, 0)
        self._regular = False
        self._good = 0  # size of the file up to its last whole line
        self._dirty = False  # a failed write may have left bytes past _good

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        if self._truncate:
            flags |= os.O_TRUNC
        fd = os.open(self.path, flags, 0o644)  # a FIFO with no reader blocks here
        try:
            st = os.fstat(fd)
            self._regular = stat.S_ISREG(st.st_mode)
            self._good = _cut_torn_tail(fd, st.st_size, self.path) if self._regular else 0
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._ident, self._dirty = fd, (st.st_dev, st.st_ino), False
        self._truncate = False

    def verify(self) -> None:
        assert self._fd is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, "the record file was deleted while open", str(self.path)
            ) from None
        if (st.st_dev, st.st_ino) != self._ident:
            raise FileNotFoundError(
                errno.ENOENT, "the record file was replaced while open", str(self.path)
            )
        if self._regular and not self._dirty:
            self._good = os.fstat(self._fd).st_size

    def write(self, item: tuple[Snapshot, dict[str, Any]]) -> None:
        assert self._fd is not None
        line = json.dumps(snapshot_record(*item), allow_nan=False, separators=(",", ":"))
        raw = (line + "\n").encode()
        data = memoryview(raw)
        if self._dirty:
            os.ftruncate(self._fd, self._good)
            self._dirty = False
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            if self._regular:
                self._dirty = True
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._good)  # no torn line: cut it off
                    self._dirty = False
            raise
        if self._regular:
            self._good += len(raw)

    def flush(self) -> None:
        if self._fsync and self._regular and self._fd is not None:
            # A network filesystem (NFS) reports write errors at fsync/close, not write.
            os.fsync(self._fd)

    def abandon(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _cut_torn_tail(fd: int, size: int, path: Path) -> int:
    """Cut a torn last line (no newline at the end) off a record file; the new size.
    `fd` is write-only (a FIFO opened read-write would never block nor reach a reader):
    the tail is read through a second, read-only descriptor."""
    if size == 0:
        return size
    rfd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if os.pread(rfd, 1, size - 1) == b"\n":
            return size
        end = size
        while end > 0:
            start = max(0, end - 65536)
            cut = os.pread(rfd, end - start, start).rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
    finally:
        os.close(rfd)
    os.ftruncate(fd, end)
    log.warning(
        "gradmon: record file %s ended in a torn line (%d bytes, left by a writer that was "
        "killed or whose storage failed): cut off before appending",
        path,
        size - end,
    )
    return end


class RecordSink(QueuedSink[tuple[Snapshot, dict[str, Any]]]):
    """Appends one JSON line per published snapshot to `record.path`.

    Nothing touches the storage on the caller's thread: the file is made, opened, written
    and closed by a StorageWriter thread (gradmon/sinks/writer.py), so a hung or failing
    storage costs snapshots, never training time. A path that cannot be written is
    reported through `on_error` (gradmon_agent_errors_total{stage="sink"}) while it fails
    and logged once with the errno, not raised at attach().
    """

    def __init__(self, config: RecordConfig, on_error: ErrorFn | None = None) -> None:
        assert config.path is not None
        self.path = Path(expand_path(config.path, "record.path"))
        self._every = config.every
        self._published = 0
        storage = _RecordFile(self.path, config.mode, config.fsync)
        super().__init__("record", str(self.path), storage, config, on_error)

    def on_collect(self, step: int, grads: Mapping[str, list[torch.Tensor]]) -> None:
        pass

    def on_publish(self, snapshot: Snapshot, scalars: Mapping[str, Any]) -> None:
        count, self._published = self._published, self._published + 1
        if count % self._every and not (snapshot.anomalies or snapshot.skipped):
            return
        self._writer.submit((snapshot, dict(scalars)))


def read_record(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a record file as dicts (nulls kept as None), in file order.

    Raises GradmonError for a missing, unreadable or empty file or a line that is not a
    JSON object; a torn last line (the writer was killed mid-line) is skipped with a
    warning.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GradmonError(
            f"record file {p} does not exist (set record.path in the gradmon config to write one)"
        ) from None
    except OSError as exc:
        raise GradmonError(f"cannot read record file {p}: {exc.strerror or exc}") from None
    lines = text.splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                log.warning(
                    "gradmon: record file %s: skipping a torn last line (line %d, %d bytes; "
                    "its writer was killed mid-line)",
                    p,
                    number,
                    len(line),
                )
                break
            raise GradmonError(f"record file {p}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or "step" not in obj or "layers" not in obj:
            raise GradmonError(
                f"record file {p}, line {number}: not a gradmon record line "
                "(a JSON object with step, layers, ...)"
            )
        records.append(obj)
    if not records:
        raise GradmonError(f"record file {p} holds no snapshots (is training collecting?)")
    return records
