"""How many of gradmon's gradient hooks a backward runs: counted by watching the Python
calls of a real backward (CPU autograd runs the hooks on the calling thread)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from torch import nn

_HOOK_FILE = os.path.join("gradmon", "agent", "hooks.py")


def grad_hook_calls(run: Callable[[], object]) -> int:
    """How many times gradmon's gradient hooks ran during `run()` (on this thread)."""
    calls = 0

    def profile(frame: FrameType, event: str, _arg: Any) -> None:
        nonlocal calls
        code = frame.f_code
        if event == "call" and code.co_name == "note" and code.co_filename.endswith(_HOOK_FILE):
            calls += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


def armed_grad_hooks(model: nn.Module, x: torch.Tensor) -> int:
    """Run one backward of `model(x).sum()` and count gradmon's gradient-hook calls. The
    parameters' grads are put back as they were (the same tensors), so a monitor sees no
    new gradient (its hooks do note the backward)."""
    params = list(model.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        return grad_hook_calls(lambda: model(x).sum().backward())
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
