"""Sinks: TensorBoard event files and the JSONL record, written during real training and
read back (EventAccumulator, json), checked against the monitor's own snapshots."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import gradmon
from gradmon.sinks import build_sinks
from gradmon.sinks.record import read_record
from gradmon.sinks.tensorboard import (
    HIST_HEAD,
    HistogramMethod,
    histogram_row,
    use_native_crc32c,
)
from gradmon.sinks.writer import SinkWriterError, StorageWriter
from gradmon.snapshot import ANOMALY_KINDS, Snapshot
from tests.conftest import SmallNet

NO_SERVER: dict[str, Any] = {"exporter": {"enabled": False}}


def _config(**sections: Any) -> dict[str, Any]:
    return {**NO_SERVER, **sections}


def _train(
    net: SmallNet,
    mon: gradmon.Monitor,
    opt: torch.optim.Optimizer,
    steps: int,
    nan_at: int | None = None,
) -> tuple[list[Snapshot], list[float]]:
    """Train, logging the loss as a tensor; returns each step's snapshot and the value of
    `loss` the sinks saw with it (log() comes after step(): the previous step's loss)."""
    snaps, seen = [], []
    last = math.nan
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = net(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        if i == nan_at:
            assert net.fc2.weight.grad is not None
            net.fc2.weight.grad[0, :3] = torch.tensor([math.nan, math.inf, math.nan])
        opt.step()
        snap = mon.snapshot()
        assert snap is not None
        snaps.append(snap)
        seen.append(last)
        mon.log(loss=loss.detach())
        last = float(loss.detach())
        if i == nan_at:  # keep training finite after the bad step
            with torch.no_grad():
                for p in net.parameters():
                    p.nan_to_num_(0.0, 0.0, 0.0)
    return snaps, seen


def _events(logdir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _f32(x: float) -> float:
    return float(np.float32(x))


# ------------------------------------------------------------------ TensorBoard
@pytest.mark.parametrize("library", ["torch", "tensorboardX"])
def test_tensorboard_event_files_hold_every_step(
    library: str, net: SmallNet, tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard")  # EventAccumulator reads both libraries' files
    if library == "tensorboardX":
        pytest.importorskip("tensorboardX")
    logdir = tmp_path / "tb"
    cfg = _config(tensorboard={"logdir": str(logdir), "histogram_every": 4, "writer": library})
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gradmon.attach(net, opt, config=cfg) as mon:
        snaps, losses = _train(net, mon, opt, steps=10, nan_at=6)
    acc = _events(logdir)
    tags = acc.Tags()
    layers = [n for n, _ in net.named_parameters()]
    stats = ["grad_norm", "grad_rms", "grad_abs_max", "grad_mean", "grad_zero_ratio"]
    for stat in [*stats, "param_norm", "grad_nonfinite"]:
        assert {f"{stat}/{layer}" for layer in layers} <= set(tags["scalars"]), stat
    for layer in layers:
        norms = acc.Scalars(f"grad_norm/{layer}")
        assert [e.step for e in norms] == list(range(10))
        for event, snap in zip(norms, snaps, strict=True):
            assert event.value == _f32(snap.layers[layer].norm)
            assert event.wall_time == pytest.approx(snap.timestamp)
        zero = acc.Scalars(f"grad_zero_ratio/{layer}")
        assert [e.value for e in zero] == [_f32(s.layers[layer].zero_ratio) for s in snaps]
    globals_ = [e.value for e in acc.Scalars("global/grad_norm")]
    assert globals_ == [_f32(s.global_norm) for s in snaps]
    loss = acc.Scalars("scalar/loss")  # absent from step 0 (nothing logged yet)
    assert [e.step for e in loss] == list(range(1, 10))
    assert [e.value for e in loss] == [_f32(v) for v in losses[1:]]

    # Step 6: NaN/Inf in fc2.weight -> counted, and reported as an anomaly (scalar + text).
    bad = {e.step: e.value for e in acc.Scalars("grad_nonfinite/fc2.weight")}
    assert bad[6] == 3 and bad[5] == 0
    nonfinite = {e.step: e.value for e in acc.Scalars("anomalies/nonfinite")}
    assert nonfinite[6] == sum(a.kind == "nonfinite" for a in snaps[6].anomalies) >= 1
    assert nonfinite[5] == 0
    assert {f"anomalies/{k}" for k in ANOMALY_KINDS} <= set(tags["scalars"])
    texts = acc.Tensors("anomalies/text_summary") if library == "torch" else None
    if texts is not None:
        assert 6 in [t.step for t in texts]
        assert b"fc2.weight" in texts[[t.step for t in texts].index(6)].tensor_proto.string_val[0]
    assert "custom_scalars__config__" in tags["tensors"]
    # ... and where it started: a point at that step only, and a text naming it.
    assert snaps[6].nonfinite_origin == "fc2.weight"
    assert [t for t in tags["scalars"] if t.startswith("nonfinite_origin/")] == [
        "nonfinite_origin/fc2.weight"
    ]
    assert [(e.step, e.value) for e in acc.Scalars("nonfinite_origin/fc2.weight")] == [(6, 1.0)]
    if library == "torch":
        (origin,) = acc.Tensors("nonfinite_origin/text_summary")
        assert origin.step == 6
        assert b"NaN/Inf started in **`fc2.weight`**" in origin.tensor_proto.string_val[0]

    # Histograms every 4th collection, of the finite entries only.
    for layer in layers:
        hist = acc.Histograms(f"grad_hist/{layer}")
        assert [h.step for h in hist] == [0, 4, 8]
        for h in hist:
            s = snaps[h.step].layers[layer]
            v = h.histogram_value
            assert v.num == s.numel - s.nan_count - s.inf_count == sum(v.bucket)
            assert v.min == pytest.approx(s.min) and v.max == pytest.approx(s.max)
            assert v.sum_squares == pytest.approx(s.norm**2, rel=1e-5)
            assert v.bucket_limit[-1] == pytest.approx(s.max)


def test_tensorboard_histogram_of_a_nonfinite_step(net: SmallNet, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    cfg = _config(tensorboard={"logdir": str(tmp_path), "histogram_every": 1})
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gradmon.attach(net, opt, config=cfg) as mon:
        snaps, _ = _train(net, mon, opt, steps=3, nan_at=1)
    hist = _events(tmp_path).Histograms("grad_hist/fc2.weight")
    assert [h.step for h in hist] == [0, 1, 2]
    assert hist[1].histogram_value.num == 16 * 16 - 3
    assert hist[1].histogram_value.max == pytest.approx(snaps[1].layers["fc2.weight"].max)


@pytest.mark.parametrize("library", ["torch", "tensorboardX"])
def test_native_crc32c_matches_the_writers_own(library: str) -> None:
    pytest.importorskip("google_crc32c")
    pytest.importorskip("tensorboard" if library == "torch" else "tensorboardX")
    assert use_native_crc32c(library)
    if library == "torch":
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as pure
        from tensorboard.summary.writer.record_writer import masked_crc32c as fast
    else:
        from tensorboardX.crc32c import crc32c as pure
        from tensorboardX.record_writer import crc32c as fast
    for data in (b"", b"x", bytes(range(256)) * 7):
        assert fast(data) == pure(data)


def _reference_counts(x: np.ndarray, bins: int) -> tuple[float, float, list[float]]:
    finite = x[np.isfinite(x)]
    lo, hi = float(finite.min()), float(finite.max())
    counts, _ = np.histogram(finite, bins=bins, range=(lo, hi))
    return lo, hi, counts.tolist()


@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("method", ["auto", "histc", "sort"])
def test_histogram_row_against_numpy(method: HistogramMethod, nonfinite: bool) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 7, generator=g) * 1e-3
    b = torch.randn(50, generator=g)
    if nonfinite:
        a[3, 2], a[10, 0], b[7] = math.nan, math.inf, -math.inf
    row = histogram_row([a, b], bins=16, max_elements=10**6, method=method)
    assert row.dtype == torch.float64 and row.shape == (HIST_HEAD + 16,)
    x = torch.cat([a.reshape(-1), b]).double().numpy()
    lo, hi, counts = _reference_counts(x, 16)
    finite = x[np.isfinite(x)]
    got = row.tolist()
    assert got[:3] == [pytest.approx(lo), pytest.approx(hi), finite.size]
    assert got[3] == pytest.approx(finite.sum()) and got[4] == pytest.approx((finite**2).sum())
    # Float32 rescaling may move an entry sitting on a bin edge to its neighbour.
    assert sum(got[HIST_HEAD:]) == finite.size
    assert np.abs(np.array(got[HIST_HEAD:]) - counts).sum() <= 4


def test_histogram_row_edge_cases() -> None:
    none_finite = histogram_row([torch.full((5,), math.nan)], 8, 100)
    assert none_finite[2] == 0 and none_finite[HIST_HEAD:].sum() == 0
    for method in ("auto", "histc", "sort"):
        constant = histogram_row([torch.zeros(10, dtype=torch.bfloat16)], 8, 100, method)
        assert constant[:3].tolist() == [0.0, 0.0, 10.0] and constant[HIST_HEAD] == 10
    empty = histogram_row([torch.zeros(0)], 8, 100)
    assert empty.abs().sum() == 0
    # A big grad is sampled with an odd stride: bounded work, every column still seen.
    big = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) % 64
    sampled = histogram_row([big], 64, 1000)
    assert sampled[2] <= 1000 and (sampled[HIST_HEAD:] > 0).all()


def _sink_errors(mon: gradmon.Monitor) -> float:
    value = mon.registry.get_sample_value("gradmon_agent_errors_total", {"stage": "sink"})
    return value or 0.0


def _until(cond: Any, timeout: float = 30.0) -> bool:
    """Poll a condition (a bounded wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _scalar_count(logdir: Path, tag: str) -> int:
    """Events of a tag so far; 0 while the storage thread has not made the logdir."""
    try:
        return len(_events(logdir).Scalars(tag))
    except Exception:
        return 0


def test_tensorboard_histograms_off_and_failures_are_counted(net: SmallNet, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    logdir = tmp_path / "tb"
    cfg = _config(tensorboard={"logdir": str(logdir), "histogram_every": 0})
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gradmon.attach(net, opt, config=cfg) as mon:
        _train(net, mon, opt, steps=2)
        assert _until(lambda: _scalar_count(logdir, "global/grad_norm") == 2)
        assert _sink_errors(mon) == 0
        # The logdir is replaced by a regular file: no event file can be made there.
        shutil.rmtree(logdir)
        logdir.write_text("not a directory")
        _train(net, mon, opt, steps=2)
        assert _until(lambda: _sink_errors(mon) >= 1)
        logdir.unlink()  # storage back: a new event file, later steps arrive
        _train(net, mon, opt, steps=2)
        assert _until(lambda: _scalar_count(logdir, "global/grad_norm") == 2)
    assert _events(logdir).Tags()["histograms"] == []


def test_tensorboard_missing_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, net: SmallNet, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(gradmon.GradmonError, match=r"pip install 'gradmon\[tensorboard\]'"):
        gradmon.attach(net, config=_config(tensorboard={"logdir": str(tmp_path)}))


def test_build_sinks_closes_started_sinks_when_one_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from gradmon.sinks import record

    closed = []
    monkeypatch.setattr(record.RecordSink, "close", lambda self: closed.append(self))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    cfg = gradmon.Config.model_validate(
        {"record": {"path": str(tmp_path / "r.jsonl")}, "tensorboard": {"logdir": str(tmp_path)}}
    )
    with pytest.raises(gradmon.GradmonError):
        build_sinks(cfg)
    assert len(closed) == 1


# ------------------------------------------------------------------ record file
def test_record_lines_match_snapshots(net: SmallNet, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "run.jsonl"
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gradmon.attach(net, opt, config=_config(record={"path": str(path)})) as mon:
        snaps, losses = _train(net, mon, opt, steps=8, nan_at=3)
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # strict JSON
    assert len(lines) == 8
    keys = {"step", "time", "global_norm", "nonfinite", "skipped", "scalars", "layers"}
    for line, snap, loss in zip(lines, snaps, losses, strict=True):
        origin = {"nonfinite_origin"} if snap.nonfinite else set()
        assert set(line) == keys | {"anomalies"} | origin
        assert line["step"] == snap.step and line["time"] == snap.timestamp
        assert line["global_norm"] == snap.global_norm
        assert line["nonfinite"] is snap.nonfinite and line["skipped"] is False
        assert line["scalars"] == ({} if math.isnan(loss) else {"loss": loss})
        assert list(line["layers"]) == list(snap.layers)
        for name, s in snap.layers.items():
            got = line["layers"][name]
            for field in ("norm", "rms", "abs_max", "mean", "min", "max", "zero_ratio"):
                want = getattr(s, field)
                assert got[field] == (want if math.isfinite(want) else None), (name, field)
            assert (got["nan_count"], got["inf_count"]) == (s.nan_count, s.inf_count)
            assert (got["param_norm"], got["numel"]) == (s.param_norm, s.numel)
        assert line["anomalies"] == [
            {"layer": a.layer, "kind": a.kind, "value": a.value} for a in snap.anomalies
        ]
    bad = lines[3]["layers"]["fc2.weight"]
    assert (bad["nan_count"], bad["inf_count"]) == (2, 1)
    assert lines[3]["nonfinite_origin"] == "fc2.weight"  # the only layer it was put into
    assert any(a["kind"] == "nonfinite" for a in lines[3]["anomalies"])
    assert read_record(path) == lines


def test_record_writes_nonfinite_as_null(tmp_path: Path) -> None:
    from gradmon.sinks.record import RecordSink
    from gradmon.snapshot import LayerStats

    nan, inf = math.nan, math.inf
    layer = LayerStats(4, 0.0, 0.0, 0.0, 0.0, nan, nan, 0.0, 2, 2, inf)
    snap = Snapshot(step=7, global_norm=inf, nonfinite=True, layers={"w": layer})
    cfg = gradmon.Config.model_validate({"record": {"path": str(tmp_path / "r.jsonl")}})
    sink = RecordSink(cfg.record)
    sink.on_publish(snap, {"loss": torch.tensor(nan), "lr": 0.1})
    sink.close()
    (line,) = read_record(tmp_path / "r.jsonl")
    assert line["global_norm"] is None and line["scalars"] == {"loss": None, "lr": 0.1}
    assert line["layers"]["w"]["min"] is None and line["layers"]["w"]["param_norm"] is None


def test_record_is_readable_with_pandas(net: SmallNet, tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "run.jsonl"
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gradmon.attach(net, opt, config=_config(record={"path": str(path)})) as mon:
        _train(net, mon, opt, steps=4, nan_at=2)
    df = pd.read_json(path, lines=True)
    assert df["step"].tolist() == [0, 1, 2, 3]
    layers = pd.json_normalize(df["layers"].tolist())
    assert layers["fc2.weight.nan_count"].tolist() == [0, 0, 2, 0]


def test_record_modes_and_rank_placeholder(
    monkeypatch: pytest.MonkeyPatch, net: SmallNet, tmp_path: Path
) -> None:
    monkeypatch.setenv("RANK", "3")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    template = str(tmp_path / "run-{rank}.jsonl")
    for mode, steps, total in (("append", 2, 2), ("append", 3, 5), ("overwrite", 1, 1)):
        cfg = _config(record={"path": template, "mode": mode})
        with gradmon.attach(net, opt, config=cfg) as mon:
            _train(net, mon, opt, steps=steps)
        assert len(read_record(tmp_path / "run-3.jsonl")) == total


def test_record_every_keeps_anomalies(net: SmallNet, tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    cfg = _config(record={"path": str(path), "every": 3})
    with gradmon.attach(net, opt, config=cfg) as mon:
        _train(net, mon, opt, steps=10, nan_at=4)
    assert [line["step"] for line in read_record(path)] == [0, 3, 4, 6, 9]


def test_sinks_are_drained_at_exit_without_close(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    script = f"""
import torch, gradmon
net = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
cfg = {{"exporter": {{"enabled": False}}, "record": {{"path": {str(tmp_path / "r.jsonl")!r}}},
       "tensorboard": {{"logdir": {str(tmp_path / "tb")!r}}}}}
mon = gradmon.attach(net, opt, config=cfg)
for _ in range(7):
    opt.zero_grad(); net(torch.randn(3, 4)).sum().backward(); opt.step()
"""  # no mon.close(): the script just ends
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert [line["step"] for line in read_record(tmp_path / "r.jsonl")] == list(range(7))
    assert len(_events(tmp_path / "tb").Scalars("global/grad_norm")) == 7


def test_record_bad_paths_are_counted_not_raised(
    net: SmallNet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = blocker / "r.jsonl"  # under a regular file: mkdir fails, on the sink's thread
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gradmon.attach(net, opt, config=_config(record={"path": str(path)})) as mon:
        _train(net, mon, opt, steps=2)
        assert _until(lambda: _sink_errors(mon) >= 1)
    said = [r.getMessage() for r in caplog.records if "record sink: open of" in r.getMessage()]
    assert len(said) == 1 and str(path) in said[0] and "[Errno 17 EEXIST]" in said[0]
    # A bad template is bad input, not storage: it still fails at attach().
    with pytest.raises(gradmon.GradmonError, match=r"only the placeholder \{rank\}"):
        gradmon.attach(net, config=_config(record={"path": str(tmp_path / "{step}.jsonl")}))


def test_read_record_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(gradmon.GradmonError, match="does not exist"):
        read_record(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(gradmon.GradmonError, match="holds no snapshots"):
        read_record(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0, "layers": {}}\nnot json\n{"step": 1, "layers": {}}\n')
    with pytest.raises(gradmon.GradmonError, match="line 2: not JSON"):
        read_record(bad)
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"step": 0, "layers": {}}\n{"step": 1, "lay')
    with caplog.at_level(logging.WARNING, logger="gradmon"):
        assert [r["step"] for r in read_record(torn)] == [0]
    assert any("torn last line" in r.getMessage() for r in caplog.records)
    other = tmp_path / "other.jsonl"
    other.write_text("[1, 2]\n")
    with pytest.raises(gradmon.GradmonError, match="not a gradmon record line"):
        read_record(other)


def test_config_keys() -> None:
    cfg = gradmon.Config.model_validate({"tensorboard": {"logdir": "x", "histogram_every": 0}})
    assert cfg.tensorboard.histogram_every == 0 and cfg.record.mode == "append"
    for bad in (
        {"tensorboard": {"histogram_evry": 5}},
        {"tensorboard": {"histogram_every": -1}},
        {"tensorboard": {"writer": "tf"}},
        {"record": {"mode": "truncate"}},
        {"record": {"flush": True}},
    ):
        with pytest.raises(gradmon.GradmonError):
            gradmon.attach(torch.nn.Linear(2, 2), config={**NO_SERVER, **bad})


# ------------------------------------------------------------- storage thread
class _Held:
    """A Storage whose write waits for `release` (a storage call that does not return)."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.seen: list[int] = []

    def open(self) -> None:
        pass

    def verify(self) -> None:
        pass

    def write(self, item: int) -> None:
        self.started.set()
        self.release.wait(60)
        self.seen.append(item)

    def flush(self) -> None:
        pass

    def abandon(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_storage_writer_drops_when_full_never_blocks(caplog: pytest.LogCaptureFixture) -> None:
    storage = _Held()
    errors: list[BaseException] = []
    writer: StorageWriter[int] = StorageWriter(
        "test", "held", storage, max_queue=1, on_error=errors.append, interval=0.05
    )
    writer.submit(1)
    assert storage.started.wait(10)  # the thread holds item 1 and waits
    writer.submit(2)  # queued
    writer.submit(3)  # dropped, at once, reported
    writer.submit(4)
    assert writer.lost == 2 and "queue full" in str(errors[-1]) and len(errors) == 2
    said = [r.getMessage() for r in caplog.records if "queue is full" in r.getMessage()]
    assert len(said) == 1 and "held" in said[0]  # logged once, with the path
    storage.release.set()
    writer.close()
    assert storage.seen == [1, 2] and writer.written == 2


def test_storage_writer_without_on_error_raises_on_the_next_call() -> None:
    class Full(_Held):
        def write(self, item: int) -> None:
            raise OSError(28, "No space left on device")

    writer: StorageWriter[int] = StorageWriter("test", "full", Full(), max_queue=4)
    writer.submit(1)
    with pytest.raises(SinkWriterError, match="No space left"):
        writer.close()
    writer.close()  # idempotent
    assert writer.lost == 1


def test_storage_writer_item_failure_loses_that_item_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Picky(_Held):
        def write(self, item: int) -> None:
            if item % 2:
                raise ValueError(f"cannot format {item}")
            self.seen.append(item)

    storage = Picky()
    errors: list[BaseException] = []
    writer: StorageWriter[int] = StorageWriter(
        "test", "picky", storage, max_queue=8, on_error=errors.append
    )
    for i in range(4):
        writer.submit(i)
    writer.close()
    assert storage.seen == [0, 2] and writer.lost == 2 and len(errors) == 2
    said = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(said) == 1 and "picky" in said[0]


def test_storage_writer_reports_a_hang_and_leaves_it_behind_at_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = _Held()
    errors: list[BaseException] = []
    writer: StorageWriter[int] = StorageWriter(
        "test",
        "/hung/mount",
        storage,
        max_queue=4,
        on_error=errors.append,
        interval=0.05,
        stall_after=0.2,
        close_timeout=0.2,
    )
    try:
        writer.submit(1)
        assert _until(lambda: any("has not returned" in str(e) for e in errors))
        writer.close()  # returns although the storage call never does
        assert writer.left_behind and "left behind" in str(errors[-1])
        said = [r.getMessage() for r in caplog.records if "/hung/mount" in r.getMessage()]
        assert any("has not answered" in m for m in said)
        assert any("left behind" in m for m in said)
    finally:
        storage.release.set()


# ------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensorboard_on_collect_never_syncs_on_cuda(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    net = SmallNet().cuda()
    cfg = _config(tensorboard={"logdir": str(tmp_path), "histogram_every": 1})
    (sink,) = build_sinks(gradmon.Config.model_validate(cfg))
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            try:
                net.zero_grad()
                net(torch.randn(4, 8, device="cuda")).pow(2).mean().backward()
                grads = {n: [p.grad] for n, p in net.named_parameters()}
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    sink.on_collect(0, grads)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            finally:
                torch.use_deterministic_algorithms(False)
    finally:
        sink.close()
    hist = _events(tmp_path).Histograms("grad_hist/fc1.weight")
    assert hist and hist[0].histogram_value.num == 16 * 8
