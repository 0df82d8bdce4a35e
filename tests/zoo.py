"""The signal-quality zoo: healthy runs of common shapes and injected faults, each a small
real training run with the agent attached (public API only: `attach`, `snapshot`).

Healthy cases must raise no anomaly at all; each fault must be found within 2 collections
of the step it is injected at, naming the right layer. `python -m tests.zoo` prints the
README table (false alarms and detection latency per case); tests/test_signal_zoo.py runs
the same cases in CI.

Each case is built from a seed: a model, an optimizer and a `train(step)` that does one
whole step (forward, backward, optional clipping, optimizer step, scheduler step). A fault
is a `inject(step)` called before the step's forward; it names the layers that must be
reported (`culprit`) and the kinds that count as found.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gradmon
from gradmon.snapshot import GLOBAL_LAYER, Anomaly, Snapshot

NO_SERVER: dict[str, Any] = {"exporter": {"enabled": False}}


@dataclass
class Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train: Callable[[int], float]  # one whole training step; returns the loss


@dataclass
class Fault:
    step: int  # injected before this step's forward
    inject: Callable[[Run, int], None]  # (run, step), called before every step from `step` on
    kinds: frozenset[str]  # anomaly kinds that count as detection
    culprit: Callable[[list[Anomaly]], bool]  # the collection's anomalies name the right layer


@dataclass
class Case:
    name: str
    description: str
    build: Callable[[torch.Generator], Run]
    steps: int
    fault: Fault | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    case: str
    collections: int
    false_alarms: list[Anomaly]  # anomalies on a healthy run, or before the fault
    latency: int | None  # collections from the fault step to detection (1 = that step's own)
    found: list[Anomaly]  # the detecting collection's anomalies
    named: bool  # the detecting collection names the right layer
    seconds: float
    snapshots: list[Snapshot]


# ------------------------------------------------------------------------------- helpers
def _step(
    run_parts: tuple[nn.Module, torch.optim.Optimizer],
    loss_fn: Callable[[], Tensor],
    clip: float | None = None,
    scheduler: Any = None,
) -> float:
    model, opt = run_parts
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


def _teacher(gen: torch.Generator, n_in: int, n_out: int) -> Callable[[Tensor], Tensor]:
    a = torch.randn(n_in, 32, generator=gen) / math.sqrt(n_in)
    b = torch.randn(32, n_out, generator=gen) / math.sqrt(32)
    return lambda x: torch.tanh(x @ a) @ b


# --------------------------------------------------------------------------- healthy runs
class _TinyTransformer(nn.Module):
    def __init__(self, vocab: int, length: int, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(
            layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        out: Tensor = self.head(self.encoder(self.embed(tokens) + self.position))
        return out


def transformer(gen: torch.Generator, steps: int = 240) -> Run:
    """Sorting tokens with label noise; AdamW, linear warm-up then cosine decay, clip 1.0."""
    vocab, length = 12, 10
    model = _TinyTransformer(vocab, length)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    warmup = 24
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))
    )

    def loss() -> Tensor:
        tokens = torch.randint(0, vocab, (32, length), generator=gen)
        target = tokens.sort(dim=1).values
        noisy = torch.rand(target.shape, generator=gen) < 0.1
        target = torch.where(noisy, torch.randint(0, vocab, target.shape, generator=gen), target)
        logits = model(tokens)
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

    return Run(model, opt, lambda s: _step((model, opt), loss, clip=1.0, scheduler=sched))


def cnn_batchnorm(gen: torch.Generator) -> Run:
    """Conv2d with its default bias in front of BatchNorm (the bias gradient is ~0 by
    construction), SGD with momentum, 10 classes of 8x8 images from a random teacher."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    teacher = nn.Conv2d(3, 10, 8)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(teacher.weight.shape, generator=gen))

    def loss() -> Tensor:
        x = torch.randn(32, 3, 8, 8, generator=gen)
        with torch.no_grad():
            y = teacher(x).flatten(1).argmax(1)
        return nn.functional.cross_entropy(model(x), y)

    return Run(model, opt, lambda s: _step((model, opt), loss))


class _LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        y: Tensor = self.head(out[:, -1])
        return y


def lstm(gen: torch.Generator) -> Run:
    """A 2-layer LSTM summing a noisy sequence; Adam, gradient clipping at 5."""
    model = _LSTMNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss() -> Tensor:
        x = torch.randn(32, 20, 4, generator=gen)
        y = x[:, :, :2].sum(dim=(1, 2)).unsqueeze(1) / 4
        return nn.functional.mse_loss(model(x), y)

    return Run(model, opt, lambda s: _step((model, opt), loss, clip=5.0))


def sum_reduced(gen: torch.Generator) -> Run:
    """Regression with `reduction="sum"` over a batch of 512: healthy norms of 1e3 and up."""
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 8))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=2e-6, momentum=0.9)
    teacher = _teacher(gen, 16, 8)

    def loss() -> Tensor:
        x = torch.randn(512, 16, generator=gen)
        return nn.functional.mse_loss(model(x), 5 * teacher(x), reduction="sum")

    return Run(model, opt, lambda s: _step((model, opt), loss))


class _MoE(nn.Module):
    """Top-1 routing with noisy gates over small experts, and the Switch balancing loss."""

    def __init__(self, gen: torch.Generator, width: int = 16, experts: int = 16) -> None:
        super().__init__()
        self.gen = gen
        self.inp = nn.Linear(8, width)
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, width))
            for _ in range(experts)
        )
        self.out = nn.Linear(width, 2)
        self.aux = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        logits = self.router(h)
        noise = torch.randn(logits.shape, generator=self.gen)
        probs = torch.softmax(logits + noise, dim=-1)
        top = probs.argmax(dim=-1)
        mixed = torch.zeros_like(h)
        n = len(self.experts)
        for e, expert in enumerate(self.experts):
            idx = (top == e).nonzero().squeeze(1)
            if idx.numel():
                mixed = mixed.index_add(0, idx, expert(h[idx]) * probs[idx, e : e + 1])
        share = torch.bincount(top, minlength=n).float() / len(top)
        self.aux = n * (share * probs.mean(0)).sum()
        y: Tensor = self.out(h + mixed)
        return y


def moe(gen: torch.Generator) -> Run:
    """16 experts, 24 tokens a step: an expert often gets no token for several steps."""
    model = _MoE(gen)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    teacher = _teacher(gen, 8, 2)

    def loss() -> Tensor:
        x = torch.randn(24, 8, generator=gen)
        return nn.functional.mse_loss(model(x), teacher(x)) + 0.01 * model.aux

    return Run(model, opt, lambda s: _step((model, opt), loss))


def frozen_backbone(gen: torch.Generator) -> Run:
    """A frozen feature extractor (requires_grad=False, eval-mode BatchNorm), a new head."""
    backbone = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64),
                             nn.ReLU())  # fmt: skip
    backbone.requires_grad_(False)
    backbone.eval()
    model = nn.Sequential(backbone, nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-3)
    teacher = _teacher(gen, 16, 4)

    def loss() -> Tensor:
        x = torch.randn(64, 16, generator=gen)
        return nn.functional.mse_loss(model(x), teacher(x))

    return Run(model, opt, lambda s: _step((model, opt), loss))


def plateau(gen: torch.Generator) -> Run:
    """A deep linear net from a small init: a long plateau, then the loss drops sharply and
    the gradient grows by orders of magnitude on the way out (saddle escape)."""
    model = nn.Sequential(*(nn.Linear(16, 16, bias=False) for _ in range(3)))
    with torch.no_grad():
        for lin in model:
            assert isinstance(lin, nn.Linear)
            lin.weight.copy_(torch.randn(16, 16, generator=gen) * 0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    u, v = torch.randn(16, 3, generator=gen), torch.randn(3, 16, generator=gen)
    target = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ v / 16  # rank 3

    def loss() -> Tensor:
        x = torch.randn(64, 16, generator=gen)
        y = x @ target + 0.1 * torch.randn(64, 16, generator=gen)
        return nn.functional.mse_loss(model(x), y)

    return Run(model, opt, lambda s: _step((model, opt), loss))


# ---------------------------------------------------------------------------------- faults
class _ResMLP(nn.Module):
    """Pre-norm residual MLP blocks, each branch scaled down by a constant (as deep
    residual nets do, e.g. 1/depth): a branch's weights carry a small share of the norm."""

    def __init__(self, width: int = 32, depth: int = 4, scale: float = 1e-3) -> None:
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.blocks = nn.ModuleList(_Block(width, scale) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        y: Tensor = self.head(h)
        return y


class _Block(nn.Module):
    def __init__(self, width: int, scale: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.scale = scale

    def forward(self, h: Tensor) -> Tensor:
        return h + self.scale * self.fc2(torch.relu(self.fc1(self.norm(h))))


def resmlp(gen: torch.Generator) -> Run:
    model = _ResMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    teacher = _teacher(gen, 16, 4)

    def loss() -> Tensor:
        x = torch.randn(64, 16, generator=gen)
        return nn.functional.mse_loss(model(x), teacher(x))

    return Run(model, opt, lambda s: _step((model, opt), loss))


def mlp(gen: torch.Generator) -> Run:
    """A plain 5-layer ReLU MLP (no normalisation), Adam."""
    sizes = [16, 64, 64, 64, 64, 4]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    teacher = _teacher(gen, 16, 4)

    def loss() -> Tensor:
        x = torch.randn(64, 16, generator=gen)
        return nn.functional.mse_loss(model(x), teacher(x))

    return Run(model, opt, lambda s: _step((model, opt), loss))


FAULT_STEP = 60


def _lr_spike(run: Run, step: int) -> None:
    # x1000 for the fault step only; its effect shows in the next step's gradient.
    for group in run.optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * (1000 if step == FAULT_STEP else 1)


def _blow_up(run: Run, step: int) -> None:
    if step == FAULT_STEP:  # a bad write into one layer's weights (e.g. a bad restore)
        with torch.no_grad():
            run.model.get_submodule("4").weight.mul_(1000)


def _nan_forward(run: Run, step: int) -> None:
    if step == FAULT_STEP:  # one NaN in the output of the 3rd Linear, this step only

        def poison(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            out = out.clone()
            out[0, 0] = math.nan
            handle.remove()
            return out

        handle = run.model.get_submodule("4").register_forward_hook(poison)


def _inf_backward(run: Run, step: int) -> None:
    if step == FAULT_STEP:  # forward finite; an Inf enters the gradient at the 3rd Linear

        def poison(module: nn.Module, grad_out: Any) -> tuple[Tensor]:
            g = grad_out[0].clone()
            g[0, 0] = math.inf
            handle.remove()
            return (g,)

        handle = run.model.get_submodule("4").register_full_backward_pre_hook(poison)


def _branch_jump(run: Run, step: int) -> None:
    if step == FAULT_STEP:  # a broken custom backward: one weight's gradient x1000 from now on
        weight = run.model.get_submodule("blocks.2.fc1").weight
        weight.register_hook(lambda g: g * 1000)


def _names(anomalies: list[Anomaly], kinds: frozenset[str]) -> list[str]:
    return [a.layer for a in anomalies if a.kind in kinds]


def _first_layer_is(prefix: str, kinds: frozenset[str]) -> Callable[[list[Anomaly]], bool]:
    """The first per-layer anomaly of the given kinds is in the culprit layer."""

    def check(found: list[Anomaly]) -> bool:
        named = [n for n in _names(found, kinds) if n != GLOBAL_LAYER]
        return bool(named) and named[0].startswith(prefix)

    return check


def _global(found: list[Anomaly]) -> bool:
    return any(a.layer == GLOBAL_LAYER and a.kind == "spike" for a in found)


# Forward order of mlp(): 0, 2, 4, 6, 8; the NaN/Inf enters at module 4. A NaN in the
# forward reaches the loss, so every layer's gradient may hold it: the injected module must
# be among them (which one is the origin is Snapshot.nonfinite_origin's job).
def _nonfinite_includes_injected(found: list[Anomaly]) -> bool:
    return "4.weight" in _names(found, frozenset({"nonfinite"}))


def _inf_only_upstream(found: list[Anomaly]) -> bool:
    """An Inf entering the backward at module 4 reaches 4 and the layers before it only."""
    named = set(_names(found, frozenset({"nonfinite"})))
    return "4.weight" in named and not named & {"6.weight", "6.bias", "8.weight", "8.bias"}


JUMP = frozenset({"spike", "exploding"})

CASES: list[Case] = [
    Case("transformer", "2-layer pre-norm Transformer, AdamW, warm-up + cosine, clip 1.0",
         transformer, 240),
    Case("cnn_batchnorm", "3 Conv2d (default bias) + BatchNorm, SGD momentum", cnn_batchnorm, 150),
    Case("lstm", "2-layer LSTM, Adam, clip 5", lstm, 150),
    Case("sum_reduced", "MLP, MSE reduction=sum over batch 512, SGD", sum_reduced, 150),
    Case("moe", "16 experts, top-1 noisy routing, balancing loss, 24 tokens/step", moe, 240),
    Case("frozen_backbone", "frozen backbone (eval BatchNorm), new head, AdamW",
         frozen_backbone, 120),
    Case("plateau", "deep linear net, small init: plateau, then a sharp drop", plateau, 240),
    Case("lr_spike", "MLP, Adam; LR x1000 for one step", mlp, 100,
         Fault(FAULT_STEP, _lr_spike, frozenset({"spike"}), _global)),
    Case("layer_blowup", "MLP, Adam; one Linear's weights x1000", mlp, 100,
         Fault(FAULT_STEP, _blow_up, JUMP, _first_layer_is("4.", JUMP))),
    Case("nan_forward", "MLP, Adam; a NaN in the 3rd Linear's output for one step", mlp, 100,
         Fault(FAULT_STEP, _nan_forward, frozenset({"nonfinite"}), _nonfinite_includes_injected)),
    Case("inf_backward", "MLP, Adam; an Inf in the gradient entering the 3rd Linear", mlp, 100,
         Fault(FAULT_STEP, _inf_backward, frozenset({"nonfinite"}), _inf_only_upstream)),
    Case("branch_jump", "residual MLP, branches scaled by 1e-3; one branch weight's gradient x1000",
         resmlp, 100,
         Fault(FAULT_STEP, _branch_jump, JUMP, _first_layer_is("blocks.2.fc1.weight", JUMP))),
]  # fmt: skip
BY_NAME = {c.name: c for c in CASES}


def run_case(case: Case, seed: int = 0, config: dict[str, Any] | None = None) -> Result:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    run = case.build(gen)
    cfg = {**NO_SERVER, **case.config, **(config or {})}
    snapshots: list[Snapshot] = []
    false_alarms: list[Anomaly] = []
    latency: int | None = None
    found: list[Anomaly] = []
    named = False
    fault = case.fault
    started = time.perf_counter()
    with gradmon.attach(run.model, run.optimizer, config=cfg) as mon:
        for step in range(case.steps):
            if fault is not None and step >= fault.step:
                fault.inject(run, step)
            run.train(step)
            snap = mon.snapshot()
            assert snap is not None
            snapshots.append(snap)
            if fault is None or step < fault.step:
                false_alarms += snap.anomalies
            elif latency is None and any(a.kind in fault.kinds for a in snap.anomalies):
                latency = step - fault.step + 1
                found = snap.anomalies
                named = fault.culprit(found)
    return Result(
        case.name, len(snapshots), false_alarms, latency, found, named,
        time.perf_counter() - started, snapshots,
    )  # fmt: skip


def _describe(found: list[Anomaly], first: int = 3) -> str:
    """The first anomalies, then how many more (and the global spike if it is among them)."""
    text = ", ".join(f"{a.kind} {a.layer}" for a in found[:first])
    rest = found[first:]
    if rest:
        glob = " incl. spike global" if any(a.layer == GLOBAL_LAYER for a in rest) else ""
        text += f" (+{len(rest)} more{glob})"
    return text


def table(results: list[Result]) -> str:
    lines = [
        "| case | what | collections | false alarms | detected after | first anomalies |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        case = BY_NAME[r.case]
        if case.fault is None:
            detected = "—"
        elif r.latency is None:
            detected = "**missed**"
        else:
            detected = f"{r.latency} collection(s)" + ("" if r.named else " (**wrong layer**)")
        lines.append(
            f"| {r.case} | {case.description} | {r.collections} | {len(r.false_alarms)} | "
            f"{detected} | {_describe(r.found) or '—'} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    names = argv or [c.name for c in CASES]
    results = [run_case(BY_NAME[n]) for n in names]
    print(table(results))
    for r in results:
        if r.false_alarms:
            print(f"{r.case}: {_describe(r.false_alarms)} (first at step {r.false_alarms[0].step})")


if __name__ == "__main__":
    main(sys.argv[1:])
