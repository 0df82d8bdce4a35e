"""A tiny DDP training run with gradmon attached, one process per rank.

    torchrun --nproc-per-node 2 examples/ddp_torchrun.py --steps 500 --port 9400

What Prometheus sees: one scrape target per rank. Rank r (LOCAL_RANK r on its host)
serves /metrics on `--port + r`, so 127.0.0.1:9400 is rank 0 and 127.0.0.1:9401 rank 1,
and every series carries a `rank` label. The statistics are of the all-reduced gradients,
the same on every rank, so the per-layer families (gradmon_grad_norm{layer=...}, ...) are
exported by one rank only (`exporter.per_layer_ranks: auto`: the first to register with the
process group's store, since the model is attached before DDP wraps it; attach the DDP
wrapper instead to make it rank 0); the global ones (steps, global norm, skipped steps,
the rank's share of the global sum of squares, ...) by every rank, which is how a stalled
rank shows up.

Runs on CPU with gloo (or on GPUs with nccl when CUDA is available). Rank 0 prints a
Prometheus `scrape_configs` entry for the targets.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import time
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradmon


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`: hooks off, server closed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--port", type=int, default=9400, help="rank r serves on port + r")
    parser.add_argument("--addr", default="127.0.0.1", help="exporter address")
    parser.add_argument(
        "--serve-for", type=float, default=0.0, help="seconds to keep serving after training"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts anyway)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    model.append(nn.Linear(64, 1))
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Attaching before init_process_group is fine: the rank label is read at scrape time,
    # the port (exporter.port + LOCAL_RANK) is fixed now.
    mon = gradmon.attach(model, opt, config={"exporter": {"port": args.port, "addr": args.addr}})
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)

        targets: list[Any] = [None] * world
        dist.all_gather_object(targets, (rank, f"{args.addr}:{mon.port}"))
        if rank == 0:
            print("gradmon: Prometheus scrapes one target per rank:", flush=True)
            for r, target in sorted(targets):
                print(f"  rank {r}: http://{target}/metrics", flush=True)
            listed = ", ".join(f"'{t}'" for _, t in sorted(targets))
            print(
                "  scrape_configs:\n"
                "    - job_name: gradmon\n"
                f"      static_configs: [{{targets: [{listed}]}}]",
                flush=True,
            )

        gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
        for step in range(args.steps):
            x = torch.randn(16, 32, generator=gen).to(device)
            y = x[:, :1].sin()
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            opt.step()
            mon.log(loss=loss.detach())  # a tensor: read at scrape time, no sync here
            if rank == 0 and step % 100 == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
        snap = mon.snapshot(wait=True)
        if snap is not None:
            print(
                f"rank {rank}: {args.steps} steps, global grad norm {snap.global_norm:.3g}",
                flush=True,
            )
        if args.serve_for > 0:
            print(f"rank {rank}: serving /metrics for {args.serve_for:g} s", flush=True)
            time.sleep(args.serve_for)
        dist.barrier()
    finally:
        mon.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
