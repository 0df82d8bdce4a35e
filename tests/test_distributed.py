"""Every parallel layout, 4 real processes (gloo, CPU), through real /metrics over sockets.

One spawn of 4 ranks trains the same tiny model under each layout in turn, in one process
group (a process start costs seconds here): DDP, FSDP2, HSDP (2x2 replicate x shard),
tensor parallel (Colwise/Rowwise over 4 ranks, with a LayerNorm and a Rowwise bias left
replicated), 2-D FSDP+TP (2x2 dp x tp) and a 2-stage pipeline (send/recv, each stage
replicated over 2 ranks by DDP). After every step rank 0 scrapes every rank's /metrics;
the tests combine those scrapes the way the recording rules do (sum over ranks of the
additive series, max of abs_max) and compare them with the same model trained unsharded
in one process. Processes are always joined or killed; each blocking step has a bounded
timeout.
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
from collections.abc import Callable, Iterator
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

WORLD = 4
STEPS = 2
ROWS = 2  # rows of the global batch per data-parallel rank (of 4)
LR = 0.1
TIMEOUT = 240.0  # seconds for the whole multi-process run
ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("ddp", "fsdp2", "hsdp", "tp", "fsdp_tp", "pipeline", "pipeline_tp")
KEPT = (
    "gradmon_grad_sum_squares",
    "gradmon_grad_abs_max",
    "gradmon_grad_global_sum_squares",
    "gradmon_grad_global_norm",
)
Samples = dict[str, list[tuple[dict[str, str], float]]]


# ------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_run(n: int) -> int:
    """A port P with P .. P + n - 1 free (rank r serves on P + r)."""
    for _ in range(50):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port + n - 1 > 65535:
                continue
            try:
                for k in range(1, n):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port + k))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no {n} adjacent free ports")


def free_port_pair() -> int:
    return free_port_run(2)


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


class Net(nn.Module):
    """`up` and `down` are what tensor parallelism shards (Colwise, Rowwise: the Rowwise
    bias stays replicated); `norm` and `head` are left replicated. A pipeline cuts it in two:
    stage 0 keeps up/down, stage 1 norm/head, under the names of the whole model."""

    def __init__(self, stage: int | None = None) -> None:
        super().__init__()
        self.stage = stage
        if stage in (None, 0):
            self.up = nn.Linear(8, 16)
            self.down = nn.Linear(16, 8)
        if stage in (None, 1):
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage in (None, 0):
            x = self.down(torch.relu(self.up(x)))
        if self.stage in (None, 1):
            x = self.head(self.norm(x))
        return x


def seeded_net() -> Net:
    """The same initial weights everywhere: the whole model, built from one seed."""
    torch.manual_seed(0)
    return Net()


def stage_net(stage: int) -> Net:
    whole = seeded_net()
    part = Net(stage)
    part.load_state_dict(whole.state_dict(), strict=False)
    return part


def batches() -> list[torch.Tensor]:
    """The global batch of every step (WORLD * ROWS rows)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * ROWS, 8, generator=gen) for _ in range(STEPS)]


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


# ------------------------------------------------------------------ the ranks
class Rank:
    """One rank's run of the layouts; rank 0 scrapes every rank after every step."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.result: dict[str, Any] = {}

    def run(
        self,
        layout: str,
        monitors: dict[str, gradmon.Monitor],
        step: Callable[[torch.Tensor], None],
    ) -> None:
        import torch.distributed as dist

        ports: dict[str, list[int]] = {}
        for key, mon in monitors.items():
            gathered: list[Any] = [None] * WORLD
            dist.all_gather_object(gathered, mon.port)
            ports[key] = gathered
        steps = []
        for x in batches():
            step(x)
            snaps = {k: mon.snapshot() for k, mon in monitors.items()}
            dist.barrier()  # every rank has stepped: rank 0 scrapes them all
            record: dict[str, Any] = {"layers": {}}
            for key, snap in snaps.items():
                assert snap is not None
                record["layers"][key] = {
                    n: {"numel": s.numel, "sum_squares": s.sum_squares, "norm": s.norm}
                    for n, s in snap.layers.items()
                }
            if self.rank == 0:
                record["scrapes"] = {
                    key: [_kept(scrape(port)) for port in ports[key]] for key in monitors
                }
            steps.append(record)
            dist.barrier()  # nobody steps on before rank 0 has scraped
        if self.rank == 0 and layout == "ddp":  # one full scrape of every rank
            self.result["ddp_full"] = [scrape(p) for p in ports["parameter"]]
        dist.barrier()
        for mon in monitors.values():
            mon.close()
        self.result[layout] = {"ports": ports, "steps": steps}


def _kept(samples: Samples) -> Samples:
    return {k: v for k, v in samples.items() if k in KEPT}


def _rows(x: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    n = x.shape[0] // parts
    return x[index * n : (index + 1) * n]


def _sgd_step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[..., None]:
    def step(x: torch.Tensor) -> None:
        opt.zero_grad()
        loss_of(model(x)).backward()
        opt.step()

    return step


def _ephemeral(**cfg: Any) -> dict[str, Any]:
    return {"exporter": {"port": 0}, **cfg}


def _layouts(me: Rank, base_port: int, master_port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = me.rank
    # ---- DDP, attached BEFORE the process group exists: rank r serves on base + r.
    model = seeded_net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    mon = gradmon.attach(model, opt, config={"exporter": {"port": base_port}})
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=90)
    )
    ddp = DDP(model)
    monitors = {
        "parameter": mon,
        # attached to the wrapper: its process group tells the replicas, group rank 0 exports
        "wrapped": gradmon.attach(ddp, opt, config=_ephemeral()),
    }
    me.run("ddp", monitors, lambda x: _sgd_step(ddp, opt)(_rows(x, rank, WORLD)))

    # ---- FSDP2 over 4 ranks (head.weight [1, 8]: one row, so 3 ranks hold empty shards)
    model = seeded_net()
    for module in (model.up, model.down, model.norm, model.head):
        fully_shard(module)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    mon = gradmon.attach(model, opt, config=_ephemeral())
    me.run("fsdp2", {"parameter": mon}, lambda x: _sgd_step(model, opt)(_rows(x, rank, WORLD)))

    # ---- HSDP: fully_shard on a 2x2 (replicate, shard) mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = seeded_net()
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    mon = gradmon.attach(model, opt, config=_ephemeral())
    me.run("hsdp", {"parameter": mon}, lambda x: _sgd_step(model, opt)(_rows(x, rank, WORLD)))

    # ---- tensor parallel over 4 ranks: every rank sees the whole batch
    tp_plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    model = seeded_net()
    parallelize_module(model, init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",)), tp_plan)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    monitors = {
        "parameter": gradmon.attach(model, opt, config=_ephemeral()),
        # per module, `down` holds a sharded weight and a replicated bias
        "module": gradmon.attach(model, opt, config=_ephemeral(collect={"granularity": "module"})),
    }
    me.run("tp", monitors, _sgd_step(model, opt))

    # ---- 2-D: FSDP over dp, TP over tp on a 2x2 (dp, tp) mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = seeded_net()
    parallelize_module(model, mesh["tp"], tp_plan)
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    mon = gradmon.attach(model, opt, config=_ephemeral())
    dp = rank // 2
    me.run("fsdp_tp", {"parameter": mon}, lambda x: _sgd_step(model, opt)(_rows(x, dp, 2)))

    # ---- pipeline: ranks 0, 1 stage 0 and ranks 2, 3 stage 1, each stage replicated by
    # DDP over its 2 ranks; every rank its own optimizer and monitor (attached unwrapped).
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    stage, replica = divmod(rank, 2)
    part = stage_net(stage)
    opt = torch.optim.SGD(part.parameters(), lr=LR)
    mon = gradmon.attach(part, opt, config=_ephemeral())
    wrapped = DDP(part, process_group=groups[stage])

    def pipeline_step(x: torch.Tensor) -> None:
        opt.zero_grad()
        if stage == 0:
            h = wrapped(_rows(x, replica, 2))
            dist.send(h.detach(), rank + 2)
            grad = torch.empty_like(h)
            dist.recv(grad, rank + 2)
            h.backward(grad)
        else:
            h = torch.empty(x.shape[0] // 2, 8)
            dist.recv(h, rank - 2)
            h.requires_grad_(True)
            loss_of(wrapped(h)).backward()
            dist.send(h.grad, rank - 2)  # type: ignore[arg-type]
        opt.step()

    me.run("pipeline", {"parameter": mon}, pipeline_step)

    # ---- pipeline x tensor parallel on a 2x2 (pp, tp) mesh: stage 0 (ranks 0, 1) shards
    # up/down over tp, stage 1 (ranks 2, 3) runs norm/head replicated on both. No DTensor
    # spans pp, so the store claim tells the stages (different parameters) from replicas.
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    part = stage_net(stage)
    if stage == 0:
        parallelize_module(part, mesh["tp"], tp_plan)
    opt = torch.optim.SGD(part.parameters(), lr=LR)
    mon = gradmon.attach(part, opt, config=_ephemeral())

    def pipeline_tp_step(x: torch.Tensor) -> None:
        opt.zero_grad()
        if stage == 0:  # every tp rank the whole batch; the stage's output is replicated
            h = part(x)
            dist.send(h.detach(), rank + 2)
            grad = torch.empty_like(h)
            dist.recv(grad, rank + 2)
            h.backward(grad)
        else:
            h = torch.empty(x.shape[0], 8)
            dist.recv(h, rank - 2)
            h.requires_grad_(True)
            loss_of(part(h)).backward()
            dist.send(h.grad, rank - 2)  # type: ignore[arg-type]
        opt.step()

    me.run("pipeline_tp", {"parameter": mon}, pipeline_tp_step)


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

    me = Rank(rank)
    try:
        _layouts(me, base_port, master_port)
        # Every rank done with every collective before any tears gloo down: a rank that
        # exits while another is still inside one can abort it (seen once in CI:
        # "terminate called without an active exception", SIGABRT).
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(me.result))


def run_ranks(out_dir: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker,
        args=(free_port(), free_port_run(WORLD), str(out_dir)),
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


def reference_grads(granularity: str = "parameter") -> list[dict[str, dict[str, float]]]:
    """The whole model in one process on the global batch of every step, float64 statistics
    of its grads per layer (a parameter, or the parameters of a module together)."""
    model = seeded_net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for x in batches():
        opt.zero_grad()
        loss_of(model(x)).backward()
        layers: dict[str, dict[str, float]] = {}
        for n, p in model.named_parameters():
            name = n if granularity == "parameter" else n.rpartition(".")[0]
            g = p.grad.double()  # type: ignore[union-attr]
            layer = layers.setdefault(name, {"sum_squares": 0.0, "abs_max": 0.0, "numel": 0})
            layer["sum_squares"] += g.square().sum().item()
            layer["abs_max"] = max(layer["abs_max"], g.abs().max().item())
            layer["numel"] += p.numel()
        out.append(layers)
        opt.step()
    return out


def combine(per_rank: list[Samples]) -> dict[str, Any]:
    """What the recording rules make of the ranks' scrapes: per layer the sum over ranks of
    gradmon_grad_sum_squares (and which ranks exported it), the max of abs_max; the sum
    over ranks of gradmon_grad_global_sum_squares."""
    layers: dict[str, dict[str, Any]] = {}
    total = 0.0
    for rank, samples in enumerate(per_rank):
        for labels, value in samples.get("gradmon_grad_sum_squares", []):
            layer = layers.setdefault(labels["layer"], {"sum_squares": 0.0, "ranks": []})
            layer["sum_squares"] += value
            layer["ranks"].append(rank)
        for labels, value in samples.get("gradmon_grad_abs_max", []):
            layer = layers[labels["layer"]]
            layer["abs_max"] = max(layer.get("abs_max", 0.0), value)
        total += sum(v for _, v in samples.get("gradmon_grad_global_sum_squares", []))
    return {"layers": layers, "global_sum_squares": total}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(tmp_path_factory.mktemp("ranks"))


# ------------------------------------------------------------------ every layout
# (layout, monitor, its collect.granularity)
CASES = [(layout, "parameter", "parameter") for layout in LAYOUTS] + [
    ("ddp", "wrapped", "parameter"),
    ("tp", "module", "module"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "monitor", "granularity"), CASES)
def test_layout_sums_over_ranks_to_the_unsharded_truth(
    ranks: list[dict[str, Any]], layout: str, monitor: str, granularity: str
) -> None:
    want_steps = reference_grads(granularity)
    got_steps = ranks[0][layout]["steps"]
    for step, want in enumerate(want_steps):
        got = combine(got_steps[step]["scrapes"][monitor])
        assert set(got["layers"]) == set(want), (step, "every layer of every stage")
        for name, w in want.items():
            g = got["layers"][name]
            assert g["sum_squares"] == pytest.approx(w["sum_squares"], rel=1e-5), (step, name)
            assert g["abs_max"] == pytest.approx(w["abs_max"], rel=1e-5), (step, name)
        truth = sum(w["sum_squares"] for w in want.values())
        assert got["global_sum_squares"] == pytest.approx(truth, rel=1e-5), step
        # The self-check of the recording rules: the global share and the layer shares
        # combine to the same norm.
        from_layers = sum(g["sum_squares"] for g in got["layers"].values())
        assert math.sqrt(got["global_sum_squares"]) == pytest.approx(
            math.sqrt(from_layers), rel=1e-12
        )


def exporters(ranks: list[dict[str, Any]], layout: str, key: str = "parameter") -> dict[str, Any]:
    return {
        n: layer["ranks"]
        for n, layer in combine(ranks[0][layout]["steps"][-1]["scrapes"][key])["layers"].items()
    }


@pytest.mark.slow
def test_each_distinct_shard_is_exported_by_one_rank(ranks: list[dict[str, Any]]) -> None:
    # DDP: replicas, one rank in all (the first to register with the store).
    ddp = exporters(ranks, "ddp")
    assert len({tuple(r) for r in ddp.values()}) == 1 and all(len(r) == 1 for r in ddp.values())
    # ... and rank 0 when attach() is given the DDP wrapper, whose group tells the replicas.
    assert all(r == [0] for r in exporters(ranks, "ddp", "wrapped").values())
    # FSDP2 over 4: every rank its shard; head.weight (1 row) and head.bias have one
    # non-empty shard, on rank 0; empty shards are exported by nobody.
    fsdp = exporters(ranks, "fsdp2")
    assert fsdp["up.weight"] == [0, 1, 2, 3] and fsdp["head.weight"] == fsdp["head.bias"] == [0]
    # HSDP on (replicate, shard): the replicate coordinate 0 (ranks 0 and 1) exports.
    assert all(r == [0, 1] for n, r in exporters(ranks, "hsdp").items() if n.startswith("up"))
    # TP: sharded weights from every rank, replicated parameters from rank 0 only.
    tp = exporters(ranks, "tp")
    assert tp["up.weight"] == tp["up.bias"] == tp["down.weight"] == [0, 1, 2, 3]
    assert tp["down.bias"] == tp["norm.weight"] == tp["head.weight"] == [0]
    assert exporters(ranks, "tp", "module")["down"] == [0, 1, 2, 3]  # its weight's shards
    # FSDP+TP on (dp, tp): the LayerNorm lives on the dp sub-mesh, replicated over tp.
    two_d = exporters(ranks, "fsdp_tp")
    assert two_d["up.weight"] == [0, 1, 2, 3] and two_d["norm.weight"] == [0, 2]
    assert two_d["down.bias"] == [0, 2]  # Shard over dp, Replicate over tp
    # Pipeline: each stage's layers from one of its two replicas.
    pipe = exporters(ranks, "pipeline")
    assert {len(r) for r in pipe.values()} == {1}
    assert {r[0] // 2 for n, r in pipe.items() if n.startswith(("up", "down"))} == {0}
    assert {r[0] // 2 for n, r in pipe.items() if n.startswith(("norm", "head"))} == {1}
    # Pipeline x TP: stage 0's shards from both its tp ranks, its replicated bias from tp
    # coordinate 0; stage 1's replicated layers from one of ranks 2 and 3.
    pipe_tp = exporters(ranks, "pipeline_tp")
    assert pipe_tp["up.weight"] == pipe_tp["down.weight"] == [0, 1]
    assert pipe_tp["down.bias"] == [0]
    assert pipe_tp["norm.weight"] in ([2], [3]) and pipe_tp["head.bias"] in ([2], [3])


@pytest.mark.slow
def test_snapshots_stay_what_each_rank_saw(ranks: list[dict[str, Any]]) -> None:
    want = reference_grads()
    # DDP: every rank the same statistics, of the all-reduced grads.
    ddp = [r["ddp"]["steps"][0]["layers"]["parameter"] for r in ranks]
    assert all(layers == ddp[0] for layers in ddp)
    assert ddp[0]["up.weight"]["sum_squares"] == pytest.approx(
        want[0]["up.weight"]["sum_squares"], rel=1e-5
    )
    # FSDP2: each rank its own shard: numel adds up to the parameter's, empty shards show.
    fsdp = [r["fsdp2"]["steps"][0]["layers"]["parameter"] for r in ranks]
    for name, w in want[0].items():
        assert sum(layers[name]["numel"] for layers in fsdp) == w["numel"], name
    assert [layers["head.weight"]["numel"] for layers in fsdp] == [8, 0, 0, 0]
    # HSDP: the replicas of a shard saw the same shard; TP: a replicated parameter whole.
    hsdp = [r["hsdp"]["steps"][0]["layers"]["parameter"] for r in ranks]
    assert hsdp[0] == hsdp[2] and hsdp[1] == hsdp[3]
    tp = ranks[3]["tp"]["steps"][0]["layers"]["parameter"]
    assert tp["norm.weight"]["sum_squares"] == pytest.approx(
        want[0]["norm.weight"]["sum_squares"], rel=1e-5
    )
    # A pipeline stage sees only its own layers.
    assert set(ranks[2]["pipeline"]["steps"][0]["layers"]["parameter"]) == {
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
    }


@pytest.mark.slow
def test_ranks_serve_on_port_plus_local_rank_with_rank_labels(
    ranks: list[dict[str, Any]],
) -> None:
    base = ranks[0]["ddp"]["ports"]["parameter"][0]
    assert ranks[0]["ddp"]["ports"]["parameter"] == [base + r for r in range(WORLD)]
    for rank, samples in enumerate(ranks[0]["ddp_full"]):
        # every series carries its rank: gradmon's, the process and platform collectors'
        for name, series in samples.items():
            for labels, _ in series:
                assert labels.get("rank") == str(rank), (rank, name, labels)
        assert samples["gradmon_steps_total"] == [[{"rank": str(rank)}, float(STEPS)]]  # JSON
        assert "gradmon_grad_global_norm" in samples  # global families on every rank
        assert "gradmon_grad_global_sum_squares" in samples
        assert "process_cpu_seconds_total" in samples


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
    ("mode", "rank", "exported"),
    [("auto", 0, True), ("auto", 1, False), ("first", 1, False), ("all", 1, True)],
)
def test_per_layer_ranks(
    monkeypatch: pytest.MonkeyPatch, mode: str, rank: int, exported: bool
) -> None:
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    registry = CollectorRegistry()
    cfg = {"exporter": {"enabled": False, "per_layer_ranks": mode}}
    label = {"rank": str(rank)}
    # No process group, so no store to tell replicas apart: plain parameters are rank 0's.
    with (
        fake_rank(monkeypatch, rank),
        gradmon.attach(net, opt, config=cfg, registry=registry) as mon,
    ):
        _train_one(net, opt)
        got = registry.get_sample_value("gradmon_grad_norm", {"layer": "fc1.weight", **label})
        assert (got is not None) == exported
        assert registry.get_sample_value("gradmon_steps_total", label) == 1
        # The global share is placement-aware whatever per_layer_ranks says.
        snap = mon.snapshot()
        assert snap is not None
        share = registry.get_sample_value("gradmon_grad_global_sum_squares", label)
        assert share == (pytest.approx(snap.global_norm**2) if rank == 0 else 0.0)


def test_one_rank_exports_everything_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    registry = CollectorRegistry()
    with (
        fake_rank(monkeypatch, None),
        gradmon.attach(net, opt, config=NO_SERVER, registry=registry) as mon,
    ):
        _train_one(net, opt)
        snap = mon.snapshot()
        assert snap is not None
        layers = [
            registry.get_sample_value("gradmon_grad_sum_squares", {"layer": n}) for n in snap.layers
        ]
        total = registry.get_sample_value("gradmon_grad_global_sum_squares")
        assert total == pytest.approx(sum(layers)) == pytest.approx(snap.global_norm**2)


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
TORCHRUN_RANKS = 2


@pytest.mark.slow
def test_example_under_torchrun_serves_one_target_per_rank() -> None:
    base = free_port_run(TORCHRUN_RANKS)
    steps = 5
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(TORCHRUN_RANKS),
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
        while len(seen) < TORCHRUN_RANKS:
            if proc.poll() is not None:
                pytest.fail(f"torchrun exited early ({proc.returncode}):\n{proc.stdout.read()}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                pytest.fail("the ranks never reported all their steps")
            for rank in range(TORCHRUN_RANKS):
                with contextlib.suppress(OSError):
                    samples = scrape(base + rank)
                    if samples.get("gradmon_steps_total") == [({"rank": str(rank)}, steps)]:
                        seen[rank] = samples
            time.sleep(0.5)
        for rank, samples in seen.items():
            info = samples["gradmon_info"]
            assert len(info) == 1 and info[0][0]["rank"] == str(rank)
        # DDP replicas: the per-layer families come from one rank, the first to register.
        assert sum("gradmon_grad_norm" in samples for samples in seen.values()) == 1
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
    for rank in range(TORCHRUN_RANKS):
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
