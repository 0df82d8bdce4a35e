"""GPU benchmark of gradmon's statistics pass and of the agent's cost per training step.

    python bench/gpu_bench.py [--json PATH] [--quick] [--dry-run]

(a) The statistics pass (`gradmon.stats.triton.compute_partials`, one launch per group plus
    a small per-tensor fold) over GPT-2-small-shaped (124M) and 1.3B-shaped gradients
    (24 layers, d_model 2048, vocab 50257), bf16 and fp32, each tensor its own allocation.
    Against `dst.copy_(src)` of the same bytes (bandwidth counted as bytes read, so the copy,
    which also writes, is the conservative bar) and against `torch._foreach_norm` of the same
    grads (what clip_grad_norm_ costs). CUDA events, the functions interleaved, medians. A
    small sweep of kernel configurations (chunk, block, warps) on the 124M grads says which
    defaults to keep.
(b) Step overhead: a GPT-2-small-shaped model (nn.TransformerEncoder, pre-norm, causal,
    tied head) under bf16 autocast with AdamW; two identical copies, one with the agent
    attached (statistics every step, exporter off), their steps interleaved, medians. Host
    syncs counted with torch.cuda.set_sync_debug_mode("warn"), with and without the agent.

Targets: >= 0.8x the copy's read bandwidth, <= 1.2x _foreach_norm's time, step overhead
<= 1%, 0 syncs. Prints a table; writes JSON to --json, or to $OUT/gpu_bench.json when OUT
is set. Installs nothing. --dry-run runs everything on the CPU with tiny shapes and the
torch backend, to check the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from _readings import agent_errors

import gradmon
from gradmon.stats import param_sum_squares
from gradmon.stats import torch as torch_stats

TARGETS = {
    "stats_vs_copy_read_bw_min": 0.8,
    "stats_vs_foreach_norm_time_max": 1.2,
    "step_overhead_max": 0.01,
    "syncs_per_step_max": 0,
}
Shapes = list[tuple[int, ...]]


# ------------------------------------------------------------------------ shapes
def gpt2_shapes(vocab: int, ctx: int, d: int, layers: int) -> Shapes:
    """Parameter shapes of a GPT-2 (HF layout: Conv1D weights are [in, out])."""
    shapes: Shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1
        shapes += [(d, 3 * d), (3 * d,)]  # attn.c_attn
        shapes += [(d, d), (d,)]  # attn.c_proj
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(d, 4 * d), (4 * d,)]  # mlp.c_fc
        shapes += [(4 * d, d), (d,)]  # mlp.c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


SHAPE_SETS: dict[str, Callable[[], Shapes]] = {
    "gpt2-124M": lambda: gpt2_shapes(50257, 1024, 768, 12),
    "gpt-1.3B": lambda: gpt2_shapes(50257, 1024, 2048, 24),
}
DRY_SHAPE_SETS: dict[str, Callable[[], Shapes]] = {
    "tiny-a": lambda: gpt2_shapes(1000, 64, 64, 2),
    "tiny-b": lambda: gpt2_shapes(2000, 64, 96, 3),
}
SWEEP = [  # (chunk, block, num_warps); the first is the default
    (65536, 2048, 8),
    (65536, 1024, 4),
    (65536, 4096, 8),
    (32768, 2048, 8),
    (16384, 2048, 8),
    (16384, 1024, 4),
    (131072, 4096, 8),
]


# ------------------------------------------------------------------------ timing
class Timer:
    """Median per-call milliseconds of interleaved functions: CUDA events on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fns: dict[str, Callable[[], object]], reps: int, trials: int) -> dict[str, float]:
        for fn in fns.values():  # warm-up: compiles, builds tables, fills caches
            fn()
            fn()
        self.sync()
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(trials):
            for name, fn in fns.items():
                if self.cuda:
                    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                    start.record()
                    for _ in range(reps):
                        fn()
                    end.record()
                    end.synchronize()
                    samples[name].append(start.elapsed_time(end) / reps)
                else:
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    samples[name].append((time.perf_counter() - t0) * 1e3 / reps)
        return {name: statistics.median(v) for name, v in samples.items()}

    def host_ms(self, fn: Callable[[], object], reps: int) -> float:
        """Host time per call, the device left to run behind (no sync inside the loop)."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        elapsed = time.perf_counter() - t0
        self.sync()
        return elapsed * 1e3 / reps


def make_grads(shapes: Shapes, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    return [torch.randn(s, dtype=dtype, device=device, generator=gen) * 1e-3 for s in shapes]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------- (a) stats pass
def bench_stats(
    device: torch.device,
    shape_sets: dict[str, Callable[[], Shapes]],
    stats_fn: Callable[..., torch.Tensor],
    reps: int,
    trials: int,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for set_name, make in shape_sets.items():
        for dtype in (torch.bfloat16, torch.float32):
            rows.append(_stats_row(device, set_name, make(), dtype, stats_fn, reps, trials))
            print(format_stats_row(rows[-1]), flush=True)
            free(device)
    return rows


def _stats_row(
    device: torch.device,
    set_name: str,
    shapes: Shapes,
    dtype: torch.dtype,
    stats_fn: Callable[..., torch.Tensor],
    reps: int,
    trials: int,
) -> dict[str, Any]:
    timer = Timer(device)
    grads = make_grads(shapes, dtype, device)
    numel = sum(g.numel() for g in grads)
    nbytes = numel * grads[0].element_size()
    src = torch.empty(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    times = timer.run(
        {
            "copy": lambda: dst.copy_(src),
            "foreach_norm": lambda: torch._foreach_norm(grads),
            "stats": lambda: stats_fn(grads),
            "param_norms": lambda: param_sum_squares(grads),
        },
        reps,
        trials,
    )
    host = timer.host_ms(lambda: stats_fn(grads), reps)
    torch_ms = timer.run({"torch": lambda: torch_stats.compute_partials(grads)}, 1, 3)["torch"]
    copy_read_gbps = nbytes / times["copy"] / 1e6
    stats_gbps = nbytes / times["stats"] / 1e6
    return {
        "shapes": set_name,
        "dtype": str(dtype).removeprefix("torch."),
        "tensors": len(grads),
        "params": numel,
        "mbytes": round(nbytes / 1e6, 1),
        "copy_ms": round(times["copy"], 4),
        "copy_read_gbps": round(copy_read_gbps, 1),
        "foreach_norm_ms": round(times["foreach_norm"], 4),
        "stats_ms": round(times["stats"], 4),
        "stats_host_ms": round(host, 4),
        "stats_gbps": round(stats_gbps, 1),
        "stats_vs_copy_read_bw": round(stats_gbps / copy_read_gbps, 3),
        "stats_vs_foreach_norm_time": round(times["stats"] / times["foreach_norm"], 3),
        "param_norms_ms": round(times["param_norms"], 4),
        "torch_backend_ms": round(torch_ms, 3),
    }


def bench_sweep(
    device: torch.device, shapes: Shapes, reps: int, trials: int
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for dtype in (torch.bfloat16, torch.float32):
        out += _sweep_dtype(device, shapes, dtype, reps, trials)
        free(device)
    return out


def _sweep_dtype(
    device: torch.device, shapes: Shapes, dtype: torch.dtype, reps: int, trials: int
) -> list[dict[str, Any]]:
    from gradmon.stats import triton as tb

    grads = make_grads(shapes, dtype, device)
    nbytes = sum(g.numel() for g in grads) * grads[0].element_size()

    def config(chunk: int, block: int, warps: int) -> Callable[[], object]:
        return lambda: tb.compute_partials(grads, chunk=chunk, block=block, num_warps=warps)

    fns = {f"{c}/{b}/{w}": config(c, b, w) for c, b, w in SWEEP}
    out: list[dict[str, Any]] = []
    for name, ms in Timer(device).run(fns, reps, trials).items():
        chunk, block, warps = (int(v) for v in name.split("/"))
        row = {
            "dtype": str(dtype).removeprefix("torch."),
            "chunk": chunk,
            "block": block,
            "num_warps": warps,
            "ms": round(ms, 4),
            "gbps": round(nbytes / ms / 1e6, 1),
        }
        out.append(row)
        print(
            f"  sweep {row['dtype']:>8} chunk {chunk:>6} block {block:>4} warps {warps}"
            f"  {ms:8.4f} ms  {row['gbps']:8.1f} GB/s",
            flush=True,
        )
    return out


# ------------------------------------------------------------ (b) step overhead
class GPT(nn.Module):
    """GPT-2-shaped: token + position embeddings, pre-norm causal blocks, tied head."""

    mask: torch.Tensor

    def __init__(self, vocab: int, ctx: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        block = nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.h = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device)
        x = self.h(self.wte(tokens) + self.wpe(pos), mask=self.mask[:t, :t], is_causal=True)
        out: torch.Tensor = self.ln_f(x) @ self.wte.weight.t()
        return out


def bench_step(
    device: torch.device,
    model_cfg: dict[str, int],
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    backend: str,
) -> dict[str, Any]:
    timer = Timer(device)
    torch.manual_seed(0)
    base = GPT(**model_cfg).to(device)
    watched = copy.deepcopy(base)
    opt_base = torch.optim.AdamW(base.parameters(), lr=1e-4)
    opt_watched = torch.optim.AdamW(watched.parameters(), lr=1e-4)
    tokens = torch.randint(0, model_cfg["vocab"], (batch, seq), device=device)
    amp_dtype = torch.bfloat16

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype):
            logits = model(tokens)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    config = {"exporter": {"enabled": False}, "collect": {"backend": backend}}
    mon = gradmon.attach(watched, opt_watched, config=config)
    try:
        pair = [(base, opt_base), (watched, opt_watched)]
        times: list[list[float]] = [[], []]
        for i in range(warmup + steps):
            order = (0, 1) if i % 2 == 0 else (1, 0)  # alternate who goes first
            for k in order:
                timer.sync()
                t0 = time.perf_counter()
                step(*pair[k])
                timer.sync()
                if i >= warmup:
                    times[k].append(time.perf_counter() - t0)
        syncs = {"baseline": 0, "agent": 0}
        if device.type == "cuda":
            n = 3
            for name, (model, opt) in zip(("baseline", "agent"), pair, strict=True):
                timer.sync()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        for _ in range(n):
                            step(model, opt)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                syncs[name] = sum("synchroniz" in str(w.message) for w in caught)
        snap = mon.snapshot(wait=True)
        errors = agent_errors(mon)
    finally:
        mon.close()
    base_ms = statistics.median(times[0]) * 1e3
    agent_ms = statistics.median(times[1]) * 1e3
    params = sum(p.numel() for p in watched.parameters())
    return {
        "model": model_cfg,
        "params": params,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "backend": backend,
        "step_ms_baseline": round(base_ms, 3),
        "step_ms_agent": round(agent_ms, 3),
        "step_overhead": round(agent_ms / base_ms - 1.0, 5),
        "step_ms_baseline_all": [round(t * 1e3, 3) for t in times[0]],
        "step_ms_agent_all": [round(t * 1e3, 3) for t in times[1]],
        "syncs_baseline_3_steps": syncs["baseline"],
        "syncs_agent_3_steps": syncs["agent"],
        "syncs_per_step": (syncs["agent"] - syncs["baseline"]) / 3,
        "last_snapshot_step": snap.step if snap is not None else None,
        "agent_errors": errors,
    }


# ------------------------------------------------------------------------ output
def format_stats_row(r: dict[str, Any]) -> str:
    return (
        f"  {r['shapes']:>10} {r['dtype']:>8} {r['tensors']:>4} t {r['params'] / 1e6:8.1f}M"
        f" | copy {r['copy_read_gbps']:7.0f} GB/s(read) | foreach_norm {r['foreach_norm_ms']:8.4f}"
        f" ms | stats {r['stats_ms']:8.4f} ms {r['stats_gbps']:7.0f} GB/s"
        f" = {r['stats_vs_copy_read_bw']:5.2f}x copy, {r['stats_vs_foreach_norm_time']:5.2f}x"
        f" foreach | host {r['stats_host_ms']:.3f} ms | param norms {r['param_norms_ms']:.4f} ms"
        f" | torch backend {r['torch_backend_ms']:.2f} ms"
    )


def verdicts(result: dict[str, Any]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for r in result.get("stats", []):
        key = f"{r['shapes']}/{r['dtype']}"
        out[f"{key} >= {TARGETS['stats_vs_copy_read_bw_min']}x copy read bw"] = (
            r["stats_vs_copy_read_bw"] >= TARGETS["stats_vs_copy_read_bw_min"]
        )
        out[f"{key} <= {TARGETS['stats_vs_foreach_norm_time_max']}x foreach_norm"] = (
            r["stats_vs_foreach_norm_time"] <= TARGETS["stats_vs_foreach_norm_time_max"]
        )
    step = result.get("step")
    if step:
        out["step overhead <= 1%"] = step["step_overhead"] <= TARGETS["step_overhead_max"]
        out["0 syncs per step"] = step["syncs_per_step"] <= TARGETS["syncs_per_step_max"]
        out["no agent errors"] = not step["agent_errors"]
    return out


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["sms"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, torch backend")
    parser.add_argument("--quick", action="store_true", help="124M shapes only, fewer reps")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-step", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    dry = args.dry_run
    if dry:
        device = torch.device("cpu")
        shape_sets = DRY_SHAPE_SETS
        stats_fn: Callable[..., torch.Tensor] = torch_stats.compute_partials
        backend = "torch"
        reps, trials = 2, 3
        model_cfg = {"vocab": 1000, "ctx": 64, "d": 64, "layers": 2, "heads": 4}
        batch, seq, steps, warmup = 2, 32, 4, 1
    else:
        if not torch.cuda.is_available():
            print("gpu_bench: no CUDA device (use --dry-run to check the script on a CPU)")
            return 2
        from gradmon.stats import triton as tb

        device = torch.device("cuda")
        shape_sets = dict(SHAPE_SETS)
        if args.quick:
            shape_sets.pop("gpt-1.3B")
        stats_fn = tb.compute_partials
        backend = "auto"
        reps, trials = (10, 5) if args.quick else (20, 7)
        model_cfg = {"vocab": 50257, "ctx": 1024, "d": 768, "layers": 12, "heads": 12}
        batch, seq, steps, warmup = args.batch, 1024, args.steps, 5

    result: dict[str, Any] = {
        "environment": environment(device),
        "targets": TARGETS,
        "dry_run": dry,
    }
    failed: list[str] = []
    print(f"gpu_bench: {json.dumps(result['environment'])}", flush=True)

    path = args.json
    if path is None and os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_bench.json"

    def write() -> None:  # after every section: a timeout later keeps what was measured
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            result["verdicts"] = verdicts(result)
            path.write_text(json.dumps(result, indent=2))

    def section(name: str, fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        print(f"--- {name}", flush=True)
        try:
            result[name] = fn()
        except Exception:  # report it, go on with the other sections
            failed.append(name)
            result[f"{name}_error"] = traceback.format_exc()
            traceback.print_exc()
        print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        free(device)
        write()

    section("stats", lambda: bench_stats(device, shape_sets, stats_fn, reps, trials))
    if not dry and not args.no_sweep:
        section("sweep", lambda: bench_sweep(device, SHAPE_SETS["gpt2-124M"](), reps, trials))
    if not args.no_step:
        section("step", lambda: bench_step(device, model_cfg, batch, seq, steps, warmup, backend))

    result["verdicts"] = verdicts(result)
    print("\n=== summary")
    for r in result.get("stats", []):
        print(format_stats_row(r))
    if "step" in result:
        s = result["step"]
        print(
            f"  step: baseline {s['step_ms_baseline']:.2f} ms, with agent {s['step_ms_agent']:.2f}"
            f" ms, overhead {s['step_overhead'] * 100:+.2f}% ({s['params'] / 1e6:.1f}M params,"
            f" batch {s['batch']}x{s['seq']}, {s['steps']} interleaved steps, backend "
            f"{s['backend']}); syncs/step {s['syncs_per_step']:g}; agent errors "
            f"{s['agent_errors'] or 0}"
        )
    for name, ok in result["verdicts"].items():
        print(f"  [{'PASS' if ok else 'MISS'}] {name}")
    if failed:
        print(f"  sections that failed: {failed}")

    if failed:
        result["failed_sections"] = failed
    write()
    if path is not None:
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
