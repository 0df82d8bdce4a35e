"""DDP and FSDP2 with 2 real processes (gloo, CPU), rank labels and per-rank ports.

One spawn of 2 ranks runs every multi-process scenario (DDP, then FSDP2 in the same
process group: a process start costs seconds here); its results are checked by separate
tests against a single-process float64-checked reference run on the same data.
Processes are always joined or killed; each blocking step has a bounded timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradmon
from gradmon.agent import distributed

from .conftest import SmallNet

WORLD = 2
STEPS = 3
BATCH = 4  # per rank
LR = 0.1
TIMEOUT = 120.0  # seconds for a whole multi-process scenario
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """A port P with P and P + 1 free (rank r serves on P + r)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two adjacent free ports")


def batches() -> list[torch.Tensor]:
    """The global batch of every step; rank r trains on rows [r*BATCH, (r+1)*BATCH)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * BATCH, 8, generator=gen) for _ in range(STEPS)]


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def layer_stats(snap: gradmon.Snapshot) -> dict[str, dict[str, float]]:
    return {
        name: {
            "sum_squares": s.sum_squares,
            "abs_max": s.abs_max,
            "mean": s.mean,
            "numel": s.numel,
            "param_norm": s.param_norm,
            "received": s.received,
        }
        for name, s in snap.layers.items()
    }


# ------------------------------------------------------------------ the ranks
def _worker(rank: int, master_port: int, base_port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
        LOCAL_RANK=str(rank),  # as torchrun sets it
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    result: dict[str, Any] = {}
    torch.manual_seed(0)
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    # Attached BEFORE the process group exists: the rank label must still appear.
    mon = gradmon.attach(model, opt, config={"exporter": {"port": base_port}})
    result["port"] = mon.port
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        # ---- DDP
        ddp = DDP(model)
        result["ddp"] = []
        for x in batches():
            opt.zero_grad()
            ddp(x[rank * BATCH : (rank + 1) * BATCH]).pow(2).mean().backward()
            opt.step()
            snap = mon.snapshot()
            assert snap is not None
            result["ddp"].append({"global_norm": snap.global_norm, "layers": layer_stats(snap)})
        dist.barrier()
        result["scrapes"] = {str(r): scrape(base_port + r) for r in range(WORLD)}
        dist.barrier()  # nobody stops serving before every rank has scraped
        mon.close()

        # ---- FSDP2: same init and data; grads are DTensor shards
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = SmallNet()
        for module in (model.fc1, model.fc2, model.out):
            fully_shard(module)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        registry = CollectorRegistry()
        mon = gradmon.attach(model, opt, config={"exporter": {"enabled": False}}, registry=registry)
        result["fsdp"] = []
        for x in batches():
            opt.zero_grad()
            model(x[rank * BATCH : (rank + 1) * BATCH]).pow(2).mean().backward()
            opt.step()
            snap = mon.snapshot()
            assert snap is not None
            exported = {
                name: registry.get_sample_value(
                    "gradmon_grad_sum_squares", {"layer": name, "rank": str(rank)}
                )
                for name in snap.layers
            }
            result["fsdp"].append(
                {
                    "global_norm": snap.global_norm,
                    "layers": layer_stats(snap),
                    "exported": exported,
                    "anomalies": [(a.layer, a.kind) for a in snap.anomalies],
                }
            )
        mon.close()
        # Both ranks done with every collective before either tears gloo down: a rank that
        # exits while the other is still inside one can abort it (seen once in CI:
        # "terminate called without an active exception", SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _run_ranks(out_dir: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker,
        args=(free_port(), free_port_pair(), str(out_dir)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=1.0):  # raises if a rank failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {TIMEOUT:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run_ranks(tmp_path_factory.mktemp("ranks"))


@pytest.fixture(scope="module")
def reference() -> list[dict[str, dict[str, float]]]:
    """Single process, the global batch of every step: the grads DDP and FSDP average."""
    torch.manual_seed(0)
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for x in batches():
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        out.append(
            {
                n: {
                    "sum_squares": p.grad.double().square().sum().item(),
                    "abs_max": p.grad.abs().max().item(),
                    "mean": p.grad.double().mean().item(),
                    "numel": p.numel(),
                    "param_norm": p.detach().double().norm().item(),
                }
                for n, p in model.named_parameters()
            }
        )
        opt.step()
    return out


# ------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_ddp_statistics_are_of_allreduced_grads_and_equal_on_every_rank(
    ranks: list[dict[str, Any]], reference: list[dict[str, dict[str, float]]]
) -> None:
    r0, r1 = (r["ddp"] for r in ranks)
    assert r0 == r1  # bit-identical on every rank
    for step, want in enumerate(reference):
        got = r0[step]["layers"]
        assert list(got) == list(want)  # no `module.` prefix from the DDP wrapper
        for name, w in want.items():
            for key in ("sum_squares", "abs_max", "mean", "param_norm"):
                assert got[name][key] == pytest.approx(w[key], rel=1e-5, abs=1e-12), (
                    step,
                    name,
                    key,
                )
    # Not the local grads: rank 0's half batch alone gives other norms.
    torch.manual_seed(0)
    local = SmallNet()
    local(batches()[0][:BATCH]).pow(2).mean().backward()
    local_sq = local.fc1.weight.grad.double().square().sum().item()
    assert abs(local_sq - r0[0]["layers"]["fc1.weight"]["sum_squares"]) > 1e-3 * local_sq


@pytest.mark.slow
def test_ddp_ranks_serve_on_port_plus_local_rank_with_rank_labels(
    ranks: list[dict[str, Any]],
) -> None:
    base = ranks[0]["port"]
    assert [r["port"] for r in ranks] == [base, base + 1]
    scrapes = ranks[0]["scrapes"]  # rank 0 scraped both ranks over sockets
    for rank in range(WORLD):
        samples = scrapes[str(rank)]
        # every series carries its rank: gradmon's, the process and platform collectors'
        for name, series in samples.items():
            for labels, _ in series:
                assert labels.get("rank") == str(rank), (rank, name, labels)
        assert samples["gradmon_steps_total"] == [[{"rank": str(rank)}, float(STEPS)]]  # JSON
        assert "gradmon_grad_global_norm" in samples  # global families on every rank
        assert "process_cpu_seconds_total" in samples
        # per-layer families: rank 0 only (exporter.per_layer_ranks: auto, replicated grads)
        layers = {labels["layer"] for labels, _ in samples.get("gradmon_grad_norm", [])}
        assert layers == (set() if rank else {n for n, _ in SmallNet().named_parameters()})


# ------------------------------------------------------------------ FSDP2
@pytest.mark.slow
def test_fsdp2_shard_partials_combine_into_the_unsharded_norms(
    ranks: list[dict[str, Any]], reference: list[dict[str, dict[str, float]]]
) -> None:
    r0, r1 = (r["fsdp"] for r in ranks)
    for step, want in enumerate(reference):
        total_sq = 0.0
        for name, w in want.items():
            parts = [r0[step]["layers"][name], r1[step]["layers"][name]]
            # numel: each rank's local shard; together the whole parameter
            assert sum(p["numel"] for p in parts) == w["numel"]
            # the exported additive partial, combined as the recording rule does
            exported = [r0[step]["exported"][name], r1[step]["exported"][name]]
            assert exported == [p["sum_squares"] for p in parts]
            norm = math.sqrt(sum(exported))
            assert norm == pytest.approx(math.sqrt(w["sum_squares"]), rel=1e-5), (step, name)
            assert max(p["abs_max"] for p in parts) == pytest.approx(w["abs_max"], rel=1e-5)
            pnorm = math.sqrt(sum(p["param_norm"] ** 2 for p in parts))
            assert pnorm == pytest.approx(w["param_norm"], rel=1e-5)
            total_sq += w["sum_squares"]
        combined = math.hypot(r0[step]["global_norm"], r1[step]["global_norm"])
        assert combined == pytest.approx(math.sqrt(total_sq), rel=1e-5)
    # out.weight [1, 16] and out.bias [1] shard into 1 + 0 rows: rank 1 holds empty shards,
    # which count as received, hold nothing, and raise no anomaly.
    empty = r1[0]["layers"]["out.bias"]
    assert (empty["numel"], empty["sum_squares"], empty["received"]) == (0, 0.0, True)
    assert r1[0]["layers"]["out.weight"]["numel"] == 0
    for step in r1:
        assert not [a for a in step["anomalies"] if a[0].startswith("out.")]


# ------------------------------------------------------------------ in-process checks
NO_SERVER = {"exporter": {"enabled": False}}


@contextlib.contextmanager
def fake_rank(monkeypatch: pytest.MonkeyPatch, rank: int | None) -> Iterator[list[int | None]]:
    box = [rank]
    monkeypatch.setattr(distributed, "rank_label", lambda: box[0])
    yield box


def _train_one(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()


@pytest.mark.parametrize(
    ("mode", "sharded", "exported"),
    [("auto", False, False), ("auto", True, True), ("first", True, False), ("all", False, True)],
)
def test_per_layer_ranks(
    monkeypatch: pytest.MonkeyPatch, mode: str, sharded: bool, exported: bool
) -> None:
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    registry = CollectorRegistry()
    cfg = {**NO_SERVER, "exporter": {"enabled": False, "per_layer_ranks": mode}}
    # Sharded or not is read from the parameters (DTensor) at attach: told here instead.
    monkeypatch.setattr(distributed, "is_sharded", lambda _t: sharded)
    with fake_rank(monkeypatch, 1), gradmon.attach(net, opt, config=cfg, registry=registry):
        _train_one(net, opt)
        got = registry.get_sample_value("gradmon_grad_norm", {"layer": "fc1.weight", "rank": "1"})
        assert (got is not None) == exported
        assert registry.get_sample_value("gradmon_steps_total", {"rank": "1"}) == 1


def test_rank_is_read_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    registry = CollectorRegistry()
    with (
        fake_rank(monkeypatch, None) as rank,
        gradmon.attach(net, opt, config=NO_SERVER, registry=registry),
    ):
        _train_one(net, opt)
        assert registry.get_sample_value("gradmon_steps_total") == 1  # one rank: no label
        rank[0] = 3  # init_process_group() ran after attach()
        assert registry.get_sample_value("gradmon_steps_total") is None
        assert registry.get_sample_value("gradmon_steps_total", {"rank": "3"}) == 1
        assert registry.get_sample_value("gradmon_grad_norm", {"layer": "fc1.weight"}) is None


def test_port_is_base_plus_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    base = free_port_pair()
    with gradmon.attach(SmallNet(), config={"exporter": {"port": base}}) as mon:
        assert mon.port == base + 1
    assert distributed.metrics_port(0) == 0  # ephemeral stays ephemeral
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(gradmon.GradmonError, match="LOCAL_RANK='x'"):
        distributed.metrics_port(9400)
    monkeypatch.setenv("LOCAL_RANK", "7")
    with pytest.raises(gradmon.GradmonError, match="past 65535"):
        distributed.metrics_port(65530)


def test_ddp_wrapper_names_are_the_models() -> None:
    # DistributedDataParallel needs a process group; DataParallel is unwrapped the same way.
    model = SmallNet()
    wrapped = nn.DataParallel(model)
    with gradmon.attach(wrapped, config=NO_SERVER) as mon:
        assert mon.layer_names == [n for n, _ in model.named_parameters()]


# ------------------------------------------------------------------ torchrun example
@pytest.mark.slow
def test_example_under_torchrun_serves_one_target_per_rank() -> None:
    base = free_port_pair()
    steps = 5
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(WORLD),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(ROOT / "examples" / "ddp_torchrun.py"),
        "--steps",
        str(steps),
        "--port",
        str(base),
        "--serve-for",
        str(int(TIMEOUT)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: torchrun and both ranks
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        seen: dict[int, dict[str, list[tuple[dict[str, str], float]]]] = {}
        while len(seen) < WORLD:
            if proc.poll() is not None:
                pytest.fail(f"torchrun exited early ({proc.returncode}):\n{proc.stdout.read()}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                pytest.fail("the ranks never reported all their steps")
            for rank in range(WORLD):
                with contextlib.suppress(OSError):
                    samples = scrape(base + rank)
                    if samples.get("gradmon_steps_total") == [({"rank": str(rank)}, steps)]:
                        seen[rank] = samples
            time.sleep(0.5)
        for rank, samples in seen.items():
            info = samples["gradmon_info"]
            assert len(info) == 1 and info[0][0]["rank"] == str(rank)
            assert ("gradmon_grad_norm" in samples) == (rank == 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
    # The example tells which targets Prometheus scrapes.
    for rank in range(WORLD):
        assert f"127.0.0.1:{base + rank}" in out, out


def test_parameters_replaced_after_attach_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    # What fully_shard() after attach() does: the module gets new Parameter objects.
    model = SmallNet()
    with (
        caplog.at_level("WARNING", logger="gradmon"),
        gradmon.attach(model, config=NO_SERVER) as mon,
    ):
        model.fc1.weight = nn.Parameter(model.fc1.weight.detach().clone())
        for _ in range(2):
            model(torch.randn(2, 8)).sum().backward()
            mon.collect()
    warned = [r for r in caplog.records if "no longer exist" in r.getMessage()]
    assert len(warned) == 1 and "1 of the 6 monitored parameters" in warned[0].getMessage()
