"""Which parameters are monitored, under which layer names, and which layers are exported.

Built once at attach(): the selection (trainable, owned by the optimizer, include/exclude),
the parameter -> layer mapping (`collect.granularity`), each parameter's element count on
this rank, and the export cap (`exporter.max_layers`).
"""

from __future__ import annotations

import logging
import re
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradmon.agent import distributed
from gradmon.config import CollectConfig, Config
from gradmon.errors import GradmonError
from gradmon.stats import cpu

__all__ = [
    "ROOT_MODULE",
    "LayerIndex",
    "check_attach_args",
    "layer_name",
    "name_filter",
    "select_parameters",
    "unwrap",
    "warn_over_cap",
]

log = logging.getLogger("gradmon")

ROOT_MODULE = "(root)"  # layer name for parameters owned by the top-level module


def check_attach_args(model: Any, optimizer: Any, scaler: Any) -> None:
    """attach()'s arguments, checked up front with a message naming what is allowed."""
    if not isinstance(model, nn.Module):
        raise GradmonError(f"attach(model=...) needs a torch.nn.Module, not {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise GradmonError(
            "attach(optimizer=...) needs a torch.optim.Optimizer or None, "
            f"not {type(optimizer).__name__}"
        )
    if scaler is not None and not (
        callable(getattr(scaler, "update", None)) and callable(getattr(scaler, "get_scale", None))
    ):
        raise GradmonError(
            f"attach(scaler=...) needs a torch.amp.GradScaler or None, not {type(scaler).__name__}"
        )


def layer_name(param_name: str, granularity: str, depth: int = 1) -> str:
    if granularity == "parameter":
        return param_name
    module = param_name.rpartition(".")[0]
    if granularity == "depth" and module:
        module = ".".join(module.split(".")[:depth])
    return module or ROOT_MODULE


def name_filter(include: str | None, exclude: str | None) -> Callable[[str], bool]:
    """`include`/`exclude` regexes (searched, not matched) as one predicate on a name."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    return lambda name: (
        (inc is None or bool(inc.search(name))) and not (exc is not None and exc.search(name))
    )


def warn_over_cap(what: str, names: Sequence[str], cap: int, families: str) -> list[str]:
    """The first `cap` names; past the cap, one warning saying what is dropped and why."""
    if len(names) > cap:
        log.warning(
            "gradmon: %d %s but exporter.max_layers is %d: %s are exported for the first %d "
            "only (%s ... dropped); statistics and health still cover all of them. Raise "
            "exporter.max_layers or narrow the include/exclude filters (or use "
            "collect.granularity: module).",
            len(names),
            what,
            cap,
            families,
            cap,
            names[cap],
        )
    return list(names[:cap])


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP/DataParallel and torch.compile wrappers: layer names
    stay those of the plain model (no `module.` / `_orig_mod.` prefix)."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, parallel) and isinstance(model.module, nn.Module):
            model = model.module
            continue
        # torch.compile(model) returns an OptimizedModule; dynamo is loaded if one exists.
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")
        optimized = getattr(eval_frame, "OptimizedModule", None)
        if optimized is not None and isinstance(model, optimized):
            model = model._orig_mod
            continue
        return model


def select_parameters(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    cfg: CollectConfig,
    skip: Callable[..., None],
) -> list[tuple[str, nn.Parameter]]:
    """The monitored (name, parameter) pairs, in model order. Left out and told through
    `skip(name, reason)`: frozen parameters and parameters on the meta device."""
    # named_parameters() lists a shared parameter once, under its first name.
    trainable = []
    meta = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            # Frozen layers and integer/bool tensors registered as parameters: no gradient
            # ever; listed in `skipped`, not counted as an agent error.
            skip(n, "requires_grad=False", counted=False)
        elif p.device.type == "meta":
            meta.append(n)
        else:
            trainable.append((n, p))
    kind = type(model).__name__
    if meta and not trainable:
        raise GradmonError(
            f"attach(): every trainable parameter of {kind} is on the meta device (e.g. "
            f"{meta[0]!r}): there is no data to monitor; materialize the model first "
            "(model.to_empty(device=...) and initialisation), then attach()"
        )
    for n in meta:
        skip(n, "on the meta device (no data; attach after materializing the model)")
    if not trainable:
        raise GradmonError(
            f"attach(): {kind} has no parameters with requires_grad=True; "
            "there are no gradients to monitor"
        )
    if optimizer is not None:
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        mine = [(n, p) for n, p in trainable if id(p) in owned]
        if not mine:
            raise GradmonError(
                f"attach(): the optimizer ({type(optimizer).__name__}) owns none of the "
                f"{len(trainable)} trainable parameters of {kind}; "
                "pass the optimizer that trains this model"
            )
        trainable = mine
    wanted = name_filter(cfg.include, cfg.exclude)
    selected = [(n, p) for n, p in trainable if wanted(layer_name(n, cfg.granularity, cfg.depth))]
    if not selected:
        raise GradmonError(
            f"attach(): collect.include={cfg.include!r} / collect.exclude={cfg.exclude!r} "
            f"leave none of the {len(trainable)} trainable parameters; "
            f"names look like {trainable[0][0]!r}"
        )
    return selected


@dataclass(frozen=True)
class LayerIndex:
    """The monitored parameters (by position) and the layers they make up."""

    param_names: list[str]
    # Weak: the monitor never keeps a model alive. Untracked by the cyclic GC where the C
    # kernel is built (stats.cpu.weaken), as `members` are tuples (which the GC untracks):
    # 2N tracked objects held for the run made each full collection of the heap longer
    # (20,000 parameters: ~200 ms against ~187 ms; 182 ms without gradmon).
    param_refs: list[weakref.ref[nn.Parameter]]
    numels: list[int]  # elements measured on this rank (a DTensor's shard; complex: x2)
    layer_names: list[str]
    layer_of: list[int]  # parameter position -> layer position
    members: list[tuple[int, ...]]  # layer position -> parameter positions
    exported: list[str]  # the layers with per-layer series (exporter.max_layers)

    @classmethod
    def build(cls, named: Sequence[tuple[str, nn.Parameter]], cfg: Config) -> LayerIndex:
        layer_names: list[str] = []
        layer_of: list[int] = []
        position: dict[str, int] = {}
        for name, _ in named:
            layer = layer_name(name, cfg.collect.granularity, cfg.collect.depth)
            if layer not in position:
                position[layer] = len(layer_names)
                layer_names.append(layer)
            layer_of.append(position[layer])
        grouped: list[list[int]] = [[] for _ in layer_names]
        for i, layer_index in enumerate(layer_of):
            grouped[layer_index].append(i)
        refs: list[Any] = [p for _, p in named]
        cpu.weaken(refs)
        # Complex parameters are measured as their real and imaginary parts
        # (torch.view_as_real): two entries per element.
        numels = [
            distributed.local_tensor(p).numel() * (2 if p.is_complex() else 1) for _, p in named
        ]
        return cls(
            param_names=[n for n, _ in named],
            param_refs=refs,
            numels=numels,
            layer_names=layer_names,
            layer_of=layer_of,
            members=[tuple(m) for m in grouped],
            exported=warn_over_cap(
                "layers", layer_names, cfg.exporter.max_layers, "per-layer metrics"
            ),
        )

    def layer_of_param(self, i: int) -> str:
        return self.layer_names[self.layer_of[i]]
