"""The demo's scenarios: small models trained for real, each with the optimizer, data and
loss that make it healthy or break it.

Every scenario is a small model trained for real; the faulty ones break through genuine
training dynamics, never through gradients written by hand:

- healthy:   a 2-layer Transformer learns to sort tokens with 10% label noise (AdamW,
             warm-up, cosine decay). gradmon must report nothing at all.
- exploding: an 8-layer tanh MLP without normalization, plain SGD at lr 2.0 (it trains at
             0.1 and diverges from about 1.5): after ten calm steps every update
             overshoots further, and the gradient norm grows by orders of magnitude
             (spike, exploding). Then the tanh units saturate: where tanh is exactly +-1
             its derivative is exactly 0, so the layers below get all-zero gradients
             (dead) while the loss overflows to inf.
- vanishing: an 8-layer sigmoid MLP: the gradient shrinks 4-8x per layer on its way
             back, so the first three layers get an rms below 1e-7 (vanishing).
- nonfinite: an MLP fed a corrupt sample (one NaN feature) at step 20 and every 100
             steps after; the loss and every gradient become NaN. As most training loops
             do, the demo skips the optimizer step when the loss is not finite, and calls
             `mon.collect()` so the agent still sees those gradients (nonfinite).
- dead:      an MLP with a ReLU side branch whose activity carries an L1 penalty that is
             far too strong: it drives every unit below zero for every input, after which
             the branch gets exactly zero gradient and never recovers (dead).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_STEPS", "DESCRIPTIONS", "SCENARIOS", "Batch", "Scenario", "build"]

SCENARIOS: tuple[str, ...] = ("healthy", "exploding", "vanishing", "nonfinite", "dead")

DESCRIPTIONS: dict[str, str] = {
    "healthy": "a 2-layer Transformer learns to sort 12 tokens (AdamW); expect no anomaly",
    "exploding": "an 8-layer tanh MLP, plain SGD at lr 2.0, far too high; expect exploding, spike",
    "vanishing": "an 8-layer sigmoid MLP; expect vanishing on the first layers",
    "nonfinite": "an MLP fed a NaN feature at step 20 and every 100 steps; expect nonfinite",
    "dead": "a ReLU side branch under a far too strong L1 penalty; expect dead",
}


Batch = tuple[Tensor, Tensor]


@dataclass
class Scenario:
    """What one scenario trains: the model, its optimizer, a batch per step, the loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], Batch]  # step -> (inputs, targets)
    loss: Callable[[Tensor, Tensor], Tensor]  # (inputs, targets) -> scalar loss
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None


class _SortTransformer(nn.Module):
    """Encoder-only Transformer: reads a sequence of tokens, emits it sorted."""

    def __init__(self, vocab: int, length: int, width: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            nhead=4,
            dim_feedforward=2 * width,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        # Pre-norm layers cannot use the nested-tensor fast path; say so to avoid a warning.
        self.encoder = nn.TransformerEncoder(
            layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        out: Tensor = self.head(self.encoder(self.embed(tokens) + self.position))
        return out


def _mlp(sizes: list[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _regression_task(
    gen: torch.Generator, pixels: bool = False, n_in: int = 16, n_out: int = 4
) -> Callable[[int], Batch]:
    """A fixed random teacher y = tanh(x A) B: smooth, learnable, targets of order one.

    Inputs are standard normal, or with pixels=True image-like intensities in [0, 1].
    """
    a = torch.randn(n_in, 32, generator=gen) / math.sqrt(n_in)
    b = torch.randn(32, n_out, generator=gen) / math.sqrt(32)

    def batch(step: int) -> Batch:
        if pixels:
            x = torch.rand(128, n_in, generator=gen)
            return x, torch.tanh((2 * x - 1) @ a) @ b
        x = torch.randn(128, n_in, generator=gen)
        return x, torch.tanh(x @ a) @ b

    return batch


LABEL_NOISE = 0.1  # healthy: fraction of target tokens replaced by random ones


def _healthy(gen: torch.Generator, steps: int) -> Scenario:
    vocab, length = 16, 12
    model = _SortTransformer(vocab, length)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    # The usual Transformer recipe: a short linear warm-up, then cosine decay to zero.
    warmup = max(1, min(100, steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))),
    )

    def batch(step: int) -> Batch:
        tokens = torch.randint(0, vocab, (64, length), generator=gen)
        target = tokens.sort(dim=1).values
        # Label noise, as real data has: the loss keeps a floor (about 0.58 nats here)
        # instead of going to zero. At zero loss the gradient norm becomes heavy-tailed
        # (a rare wrong token gives 10-60x the median norm), which the spike rule flags.
        noisy = torch.rand(target.shape, generator=gen) < LABEL_NOISE
        random = torch.randint(0, vocab, target.shape, generator=gen)
        return tokens, torch.where(noisy, random, target)

    def loss(tokens: Tensor, target: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model(tokens).flatten(0, 1), target.flatten())

    return Scenario(model, opt, batch, loss, scheduler)


def _exploding(gen: torch.Generator, steps: int) -> Scenario:
    # No normalization and plain SGD at lr 2.0: this net trains at 0.1 and diverges from
    # about 1.5. Tanh rather than ReLU: a diverging deep ReLU net mostly switches its
    # units off and calms down again, a tanh net keeps overshooting.
    model = _mlp([16] + [64] * 8 + [4], nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    task = _regression_task(gen)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(x), y)

    return Scenario(model, opt, task, loss)


def _vanishing(gen: torch.Generator, steps: int) -> Scenario:
    # sigmoid' <= 1/4 and PyTorch's default init gives |W| < 1: each layer scales the
    # gradient down, and eight of them leave the first layers with almost nothing.
    model = _mlp([16] + [32] * 8 + [4], nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    task = _regression_task(gen)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(x), y)

    return Scenario(model, opt, task, loss)


POISON_FIRST, POISON_EVERY = 20, 100  # nonfinite: steps whose batch holds a corrupt sample


def _nonfinite(gen: torch.Generator, steps: int) -> Scenario:
    model = _mlp([16, 64, 64, 4], nn.ReLU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    task = _regression_task(gen)

    def batch(step: int) -> Batch:
        x, y = task(step)
        if step >= POISON_FIRST and (step - POISON_FIRST) % POISON_EVERY == 0:
            x[0, 0] = math.nan  # one sensor reading came through as NaN
        return x, y

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(x), y)

    return Scenario(model, opt, batch, loss)


class _SideBranch(nn.Module):
    """A main MLP plus a ReLU side branch whose activity carries an L1 penalty."""

    def __init__(self) -> None:
        super().__init__()
        self.main = _mlp([16, 64, 64, 4], nn.ReLU)
        self.side_in = nn.Linear(16, 32)
        self.side_out = nn.Linear(32, 4)
        self.activity = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.relu(self.side_in(x))
        self.activity = hidden.mean()
        out: Tensor = self.main(x) + self.side_out(hidden)
        return out


def _dead(gen: torch.Generator, steps: int) -> Scenario:
    model = _SideBranch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # Non-negative inputs: once a unit's weights and bias are all negative it is off for
    # every possible input, its gradient is exactly zero, and nothing can revive it.
    task = _regression_task(gen, pixels=True)
    penalty = 3.0  # meant to make the branch sparse; far too strong, it switches it off

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(x), y) + penalty * model.activity

    return Scenario(model, opt, task, loss)


# Long enough to watch in a terminal: about a minute for healthy on two CPU cores; the
# faulty scenarios show their condition within their first 30 steps.
DEFAULT_STEPS = {"healthy": 5000, "exploding": 200, "vanishing": 300, "nonfinite": 300, "dead": 300}

_BUILDERS: dict[str, Callable[[torch.Generator, int], Scenario]] = {
    "healthy": _healthy,
    "exploding": _exploding,
    "vanishing": _vanishing,
    "nonfinite": _nonfinite,
    "dead": _dead,
}


def build(scenario: str, gen: torch.Generator, steps: int) -> Scenario:
    """A fresh model, optimizer and data for `scenario`, drawn from `gen`, for `steps`."""
    return _BUILDERS[scenario](gen, steps)
