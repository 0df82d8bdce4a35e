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
- Non-finite numbers (NaN, +-Inf) are written as JSON `null`; for layers, `nan_count`
  and `inf_count` say which. `min`/`max` are null when a layer has no finite entry.
- Lines are in publication order; a resumed run may repeat steps (readers keep the last).
- `record.every: n` writes every n-th snapshot, plus every snapshot with an anomaly or a
  skipped step. A line costs ~200 bytes per layer (~100 KiB at 500 layers).

Readable without gradmon: `pandas.read_json(path, lines=True)` (one row per snapshot;
`pandas.json_normalize(df["layers"])` for the per-layer columns), or `json.loads` per line.

Lines are formatted and written by a background thread (the training thread only queues
the snapshot), flushed whenever the queue is drained, and on `Monitor.close()`.
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import torch

from gradmon.config import RecordConfig
from gradmon.errors import GradmonError
from gradmon.sinks._common import BackgroundWriter, expand_path, finite_or_none, to_float
from gradmon.snapshot import ActivationStats, LayerStats, Snapshot

__all__ = ["RecordSink", "read_record", "snapshot_record"]


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
    record = {
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
    return record


class RecordSink:
    """Appends one JSON line per published snapshot to `record.path`."""

    def __init__(self, config: RecordConfig) -> None:
        assert config.path is not None
        self.path = Path(expand_path(config.path, "record.path"))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Opened here, on attach(), so an unwritable path fails early.
            self._file: TextIO = open(  # noqa: SIM115 - closed in close()
                self.path, "a" if config.mode == "append" else "w", encoding="utf-8"
            )
        except OSError as exc:
            raise GradmonError(
                f"record.path={config.path!r}: cannot open {self.path} for writing "
                f"({exc.strerror or exc})"
            ) from None
        self._every = config.every
        self._published = 0
        self._writer: BackgroundWriter[tuple[Snapshot, dict[str, Any]]] = BackgroundWriter(
            "record", self._write, self._file.flush, config.max_queue
        )
        self._closed = False
        # The writer thread is a daemon: a script that never closes its Monitor still gets
        # the queued lines written at exit.
        atexit.register(self.close)

    def on_collect(self, step: int, grads: Mapping[str, list[torch.Tensor]]) -> None:
        pass

    def on_publish(self, snapshot: Snapshot, scalars: Mapping[str, Any]) -> None:
        count, self._published = self._published, self._published + 1
        if count % self._every and not (snapshot.anomalies or snapshot.skipped):
            return
        self._writer.submit((snapshot, dict(scalars)))

    def _write(self, item: tuple[Snapshot, dict[str, Any]]) -> None:
        line = json.dumps(snapshot_record(*item), allow_nan=False, separators=(",", ":"))
        self._file.write(line + "\n")

    def close(self) -> None:
        """Write what is queued and close the file. Idempotent; also runs at exit."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self._writer.close()
        finally:
            self._file.close()


def read_record(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a record file as dicts (nulls kept as None), in file order.

    Raises GradmonError for a missing, unreadable or empty file or a line that is not a
    JSON object; a torn last line (the writer was killed mid-line) is ignored.
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
                break  # torn last line of a killed run
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
