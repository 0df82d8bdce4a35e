"""gradmon.viz.maximize_activation: the input a unit likes best; plot_inputs draws them."""

from __future__ import annotations

import difflib
import math
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradmon.errors import GradmonError
from gradmon.stats.torch import first_float_tensor
from gradmon.viz._common import new_figure, save_png

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

_START_SCALES = (0.1, 1.0, 4.0)  # noise levels maximize_activation starts from, in turn


def maximize_activation(
    model: nn.Module,
    module_name: str,
    unit: int,
    input_shape: Sequence[int],
    steps: int = 200,
    lr: float = 0.05,
    l2: float = 1e-3,
    tv: float = 1e-2,
    jitter: int = 2,
    seed: int = 0,
) -> torch.Tensor:
    """The input that maximizes the mean activation of channel `unit` of a module.

    Gradient ascent (Adam) on the input, starting from faint Gaussian noise (stronger
    noise when the unit gives no gradient there, e.g. a silent ReLU): the objective is the
    mean over batch and spatial positions of output channel `unit` (dim 1) of
    `module_name`, read with a forward hook, minus `l2` × mean(x²) and `tv` × total
    variation (for inputs with spatial dims). `jitter` > 0 shifts the input by up to that
    many pixels each step (robustness to translation, fewer high-frequency artefacts).
    The model runs in eval mode with its parameters frozen; its mode, `requires_grad`
    flags and `.grad`s are as before afterwards. Returns the optimized input, detached,
    on the model's device.
    """
    shape = _check_arguments(model, input_shape, steps, lr, l2, tv, jitter)
    activation = _UnitActivation(model, module_name, unit)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    with activation, _frozen_eval(model), torch.enable_grad():
        x = _starting_point(activation, noise)
        optimizer = torch.optim.Adam([x], lr=lr)
        shifts = random.Random(seed)
        for _ in range(steps):
            inp = _shifted(x, shifts, jitter) if jitter and len(shape) >= 3 else x
            loss = _loss(activation, inp, x, l2, tv)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return x.detach()


def _check_arguments(
    model: nn.Module,
    input_shape: Sequence[int],
    steps: int,
    lr: float,
    l2: float,
    tv: float,
    jitter: int,
) -> tuple[int, ...]:
    """maximize_activation's arguments checked; the input shape as a tuple of ints."""
    if not isinstance(model, nn.Module):
        raise GradmonError(f"maximize_activation() needs an nn.Module, not {type(model).__name__}")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise GradmonError(
            f"maximize_activation(input_shape={tuple(input_shape)!r}): needs (batch, channels, "
            "...) with every size >= 1, e.g. (1, 3, 32, 32)"
        )
    if steps < 1 or lr <= 0 or l2 < 0 or tv < 0 or jitter < 0:
        raise GradmonError(
            "maximize_activation(): needs steps >= 1, lr > 0, l2 >= 0, tv >= 0, jitter >= 0 "
            f"(got steps={steps}, lr={lr}, l2={l2}, tv={tv}, jitter={jitter})"
        )
    return shape


class _UnitActivation:
    """Calling it runs the model and returns the mean of output channel `unit` of the
    module, read with a forward hook; the hook is in place inside `with`."""

    def __init__(self, model: nn.Module, module_name: str, unit: int) -> None:
        self.model, self.module_name, self.unit = model, module_name, unit
        self.module = _resolve_module(model, module_name)
        self._captured: list[torch.Tensor] = []
        self._handle: RemovableHandle | None = None

    def __enter__(self) -> _UnitActivation:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self._captured.append(first_float_tensor(output))  # type: ignore[arg-type]

    def __call__(self, inp: torch.Tensor) -> torch.Tensor:
        self._captured.clear()
        self.model(inp)
        out = self._captured[0] if self._captured else None
        if out is None:
            raise GradmonError(
                f"maximize_activation(): module {self.module_name!r} did not run in the forward "
                "pass, or its output is not a tensor"
            )
        if out.dim() < 2 or not 0 <= self.unit < out.shape[1]:
            size = out.shape[1] if out.dim() >= 2 else 0
            raise GradmonError(
                f"maximize_activation(unit={self.unit}): module {self.module_name!r} outputs "
                f"shape {tuple(out.shape)}; unit must be in 0..{size - 1} (a channel of dim 1)"
            )
        return out[:, self.unit].float().mean()


def _resolve_module(model: nn.Module, module_name: str) -> nn.Module:
    modules: dict[str, nn.Module] = dict(model.named_modules())
    if module_name in modules:
        return modules[module_name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(module_name, names, n=3, cutoff=0.5)
    shown = close + [n for n in names if n not in close][: max(0, 6 - len(close))]
    raise GradmonError(
        f"maximize_activation(module_name={module_name!r}): {type(model).__name__} has no "
        f"such module; valid names include {', '.join(repr(n) for n in shown) or '(none)'}"
        + (f" ({len(names)} in all)" if len(names) > len(shown) else "")
    )


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """The model in eval mode with its parameters frozen; its mode and `requires_grad`
    flags restored afterwards."""
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)


def _starting_point(activation: _UnitActivation, noise: torch.Tensor) -> torch.Tensor:
    """The input the ascent starts from, requiring grad."""
    # Start from faint noise (the picture is then what the ascent drew). A unit behind a
    # ReLU may be silent there, with no gradient to climb: then start from stronger noise.
    for scale in _START_SCALES:
        x = (noise * scale).requires_grad_(True)
        act = activation(x)
        if not act.requires_grad:
            raise GradmonError(
                f"maximize_activation(): the output of module {activation.module_name!r} does "
                "not depend on the input (no gradient reaches it)"
            )
        (grad,) = torch.autograd.grad(act, x, allow_unused=True)
        if grad is not None and bool(grad.abs().sum() > 0):  # one sync, before the loop
            break
    return x


def _shifted(x: torch.Tensor, shifts: random.Random, jitter: int) -> torch.Tensor:
    """x rolled by up to `jitter` positions along its spatial dims (the last one or two)."""
    dy, dx = shifts.randint(-jitter, jitter), shifts.randint(-jitter, jitter)
    if x.dim() >= 4:
        return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return torch.roll(x, shifts=dx, dims=-1)


def _loss(
    activation: _UnitActivation, inp: torch.Tensor, x: torch.Tensor, l2: float, tv: float
) -> torch.Tensor:
    """What the ascent minimizes: minus the activation on `inp` (x, maybe shifted), plus
    `l2` × mean(x²) and, for inputs with spatial dims, `tv` × total variation of x."""
    loss = -activation(inp) + l2 * x.float().pow(2).mean()
    if tv and x.dim() >= 3:
        loss = loss + tv * _total_variation(x.float())
    return loss


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbours along the last two (spatial) dims."""
    tv = (x[..., 1:] - x[..., :-1]).abs().mean()
    if x.dim() >= 4:
        tv = tv + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return tv


def plot_inputs(
    inputs: Sequence[torch.Tensor],
    out_png: str | os.PathLike[str],
    titles: Sequence[str] | None = None,
) -> Path:
    """A grid of inputs (e.g. from maximize_activation) as a PNG; returns its path.

    Each input's first batch item is shown: 3 channels as RGB, others as the channel
    mean in grey, each scaled to its own min..max; inputs without spatial dims as bars.
    """
    if not inputs:
        raise GradmonError("plot_inputs(): no inputs to draw")
    count = len(inputs)
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    fig = new_figure(2.6 * cols, 2.6 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= count:
            ax.set_axis_off()
            continue
        item = inputs[k].detach().float().cpu()[0]
        if titles is not None and k < len(titles):
            ax.set_title(titles[k], fontsize=9)
        if item.dim() >= 3 or (item.dim() == 2 and item.shape[0] > 1):
            image = item if item.dim() >= 3 else item.unsqueeze(0)
            image = image.reshape(image.shape[0], image.shape[-2], image.shape[-1])
            lo, hi = image.min(), image.max()
            image = (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)
            if image.shape[0] == 3:
                ax.imshow(image.permute(1, 2, 0).numpy())
            else:
                ax.imshow(image.mean(0).numpy(), cmap="gray")
            ax.set_axis_off()
        else:
            values = item.reshape(-1).numpy()
            ax.bar(range(len(values)), values, color="#1f77b4")
            ax.tick_params(labelsize=7)
    return save_png(fig, out_png)
