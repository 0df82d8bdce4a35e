"""The agent's hooks on torch objects: gradients, the optimizer's step, GradScaler.update.

Hooks hold their monitor weakly and call only its hook protocol (`StepListener`); they
never keep a model or monitor alive.

- Gradient hooks (tensor hooks on the parameters) note the order in which parameters
  received a gradient: a list store, nothing else, and only in the backwards
  GradArrivals asks for; removed in full in between.
- Step hooks: a compiled `optimizer.step()` calls them as an opaque custom op
  (`gradmon::step_hook`, no graph break, with every backend: aot_eager and inductor);
  they reach their monitor through an int key, which dynamo can guard on, not through a
  closure.
- Removal: torch iterates the optimizer's step hooks in Python, so they cannot be removed
  while any thread is inside an optimizer step; then they stay (inert) and go at the next
  backward.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradmon.agent import distributed

__all__ = [
    "RELEARN_EVERY",
    "GradArrivals",
    "StepListener",
    "TorchHooks",
    "merge_order",
    "watch_scaler",
]


class StepListener(Protocol):
    """What the hooks call on their monitor."""

    @property
    def closed(self) -> bool: ...

    def on_optimizer_step(self, optimizer: Any) -> None: ...

    def on_optimizer_step_post(self) -> None: ...

    def on_scaler_update(self, scaler: Any) -> None: ...


# Collections between two backwards whose order the hooks note (see GradArrivals).
RELEARN_EVERY = 32


class GradArrivals:
    """The order in which parameters receive their gradient in a backward: the order
    `Snapshot.nonfinite_origin` reads, as ranks (1 = first; 0 = never seen).

    Hooks note it (TorchHooks.watch_grads), but autograd calls a Python hook for
    ~1.5-2 us per parameter per backward, which is more than the rest of a collection
    costs per tensor. Backward order is a property of the graph, which most models
    repeat step after step, so the hooks are on only for the backward of the first
    collected step, of every RELEARN_EVERY-th collection after it, and of the collection
    after one that held NaN/Inf (`wants_order`); the other collections read the order
    learned last. (Without an optimizer, `collect()` follows its backward, and the next
    backward is hooked or not right after it.)
    """

    def __init__(self, count: int) -> None:
        self.order = [0] * count  # written by the hooks: 1-based rank of first arrival
        self.tick = 0  # the last rank given
        self._learned = np.zeros(count)
        self._since = RELEARN_EVERY  # collections since one learned: learn at once

    def note(self, index: int, *_grad: object) -> None:
        """The gradient hook of parameter `index` (`functools.partial(note, index)`, a
        tensor hook: called with the gradient about to be accumulated, returns None so it
        is kept): runs once per parameter per backward, so it does a few list operations
        and no further call."""
        if not self.order[index]:
            self.tick += 1
            self.order[index] = self.tick

    def wants_order(self) -> bool:
        """Whether the next collected step's backward should be hooked. Not when the
        hooks noted a backward that is not taken yet: that one is about to be learned."""
        return not self.tick and self._since + 1 >= RELEARN_EVERY

    def relearn(self) -> None:
        """Learn the order again at the next collected step (after NaN/Inf was seen)."""
        self._since = RELEARN_EVERY

    def take(self) -> np.ndarray[Any, Any]:
        """This collection's order: the hooks' if they noted this backward (merged into
        what was learned before), else the one learned last. Never modified later."""
        self._since += 1
        if self.tick:
            noted = np.array(self.order, dtype=np.float64)
            self.order[:] = [0] * len(self.order)
            self.tick = 0
            self._learned = merge_order(self._learned, noted)
            self._since = 0
        return self._learned


def merge_order(old: np.ndarray[Any, Any], new: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Ranks from a backward (`new`, 0 where a parameter got no gradient) merged into the
    ranks learned before: where conditional computation (MoE experts, unused branches)
    left parameters out of this backward, each keeps its place after the last parameter
    before it, in the old order, that this backward reached. Never-seen ones stay 0."""
    missing = new == 0
    if not missing.any() or not old.any():
        return new
    order = np.argsort(np.where(old > 0, old, np.inf), kind="stable")
    ranks = new[order]
    anchor = np.maximum.accumulate(ranks)  # the last rank this backward gave, in old order
    step = (np.arange(len(ranks)) + 1) / (len(ranks) + 1)  # < 1, increasing
    merged = np.where(ranks > 0, ranks, anchor + step)
    out = np.empty_like(merged)
    out[order] = merged
    return np.where(missing & (old == 0), 0.0, out)


# torch.compile: the step hook reaches its monitor through a key (an int, which dynamo
# can guard on), not through a closure it would have to trace.
_LISTENERS: dict[int, weakref.ref[StepListener]] = {}
_keys = itertools.count(1)


def _step_hook_by_key(key: int, post: bool = False) -> None:
    ref = _LISTENERS.get(key)
    listener = ref() if ref is not None else None
    if listener is None or listener.closed:
        return
    if post:
        listener.on_optimizer_step_post()
    else:
        listener.on_optimizer_step(None)


@functools.cache
def _compiled_step_hook() -> Callable[[int, bool, list[torch.Tensor]], None]:
    """The step (pre or post) hook as torch.compile runs it: a custom op (opaque to dynamo,
    AOTAutograd and inductor alike, run eagerly at runtime: no graph break), marked as
    having a side effect so that no backend drops it. It takes the optimizer's parameters
    only so that a backend orders it before the step's in-place updates of them; it reads
    nothing from them (the listener finds its gradients itself).

    (`torch._dynamo.decorators.leaf_function`, used before, is not supported by inductor:
    its graph holds the Python callables as attributes, and inductor's `get_attr` asserts
    on them, so the first compiled step crashed the training job.)"""

    @torch.library.custom_op("gradmon::step_hook", mutates_args=())
    def gradmon_step_hook(key: int, post: bool, params: list[torch.Tensor]) -> None:
        _step_hook_by_key(key, post)

    @gradmon_step_hook.register_fake
    def _fake(key: int, post: bool, params: list[torch.Tensor]) -> None:
        return None

    # No output and no mutation: without this, dead-code elimination would drop the call.
    torch.fx.node.has_side_effect(torch.ops.gradmon.step_hook.default)
    hook: Callable[[int, bool, list[torch.Tensor]], None] = gradmon_step_hook
    return hook


def _params_of(optimizer: Any, dtensor: type | None) -> list[torch.Tensor]:
    """The optimizer's parameters as the custom op takes them: plain tensors, a DTensor's
    local shard (an op of gradmon's own has no sharding rule). `dtensor`: the DTensor
    class, looked up outside the traced code (None: no DTensor exists)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if dtensor is None:
        return params
    return [p.to_local() if isinstance(p, dtensor) else p for p in params]  # type: ignore[attr-defined]


_OPTIMIZER_FILE = os.path.join("torch", "optim", "optimizer.py")


def _inside_optimizer_step() -> bool:
    """Whether any thread is inside Optimizer.step's hook-calling wrapper right now."""
    for frame in sys._current_frames().values():
        f: Any = frame
        while f is not None:
            code = f.f_code
            if code.co_name == "wrapper" and code.co_filename.endswith(_OPTIMIZER_FILE):
                return True
            f = f.f_back
    return False


def _remove_at_next_backward(
    param_refs: Sequence[weakref.ref[nn.Parameter]], handles: list[RemovableHandle]
) -> None:
    """Remove `handles` from the first gradient accumulated after this (a backward runs
    outside any optimizer step), then remove that one-shot hook itself."""
    params = (ref() for ref in param_refs)
    param = next((p for p in params if p is not None and p.requires_grad), None)
    if param is None:
        return  # no backward will come: they stay, inert, as long as the optimizer lives
    own: list[RemovableHandle] = []

    def remove(_param: torch.Tensor) -> None:
        for handle in (*handles, *own):
            handle.remove()
        handles.clear()
        own.clear()

    own.append(param.register_post_accumulate_grad_hook(remove))  # type: ignore[no-untyped-call]


def watch_scaler(scaler: Any, listener: StepListener) -> Callable[[], None]:
    """Call `listener.on_scaler_update(scaler)` before every `scaler.update()`.

    One wrapper per scaler, shared by every monitor watching it (several optimizers, one
    scaler); returns the function that stops watching, which restores `scaler.update`
    when the last monitor leaves.
    """
    update = scaler.__dict__.get("update")
    listeners: list[weakref.ref[StepListener]] | None = getattr(update, "_gradmon_monitors", None)
    if listeners is None:
        original = scaler.update
        watching: list[weakref.ref[StepListener]] = []

        def wrapped(new_scale: Any = None) -> Any:
            for ref in list(watching):
                target = ref()
                if target is not None and not target.closed:
                    target.on_scaler_update(scaler)
            return original(new_scale)

        wrapped._gradmon_monitors = watching  # type: ignore[attr-defined]
        scaler.update = wrapped
        update, listeners = wrapped, watching
    ref = weakref.ref(listener)
    listeners.append(ref)

    def unwatch() -> None:
        if ref in listeners:
            listeners.remove(ref)
        if not listeners and scaler.__dict__.get("update") is update:
            del scaler.update

    return unwatch


class TorchHooks:
    """Every hook one monitor installs, and their removal."""

    def __init__(
        self,
        listener: StepListener,
        param_refs: Sequence[weakref.ref[nn.Parameter]],
        arrivals: GradArrivals,
        optimizer: torch.optim.Optimizer | None,
        scaler: Any,
        *,
        post_step: bool,
    ) -> None:
        self._param_refs = param_refs
        self._arrivals = arrivals
        self._handles: list[RemovableHandle] = []
        self._step_handles: list[RemovableHandle] = []
        self._key: int | None = None
        self._unwatch_scaler: Callable[[], None] | None = None
        self.watch_grads(True)
        if optimizer is not None:
            self._install_step_hooks(listener, optimizer, post_step)
        if scaler is not None:
            self._unwatch_scaler = watch_scaler(scaler, listener)

    def watch_grads(self, on: bool) -> None:
        """Hook (on) the parameters' gradients for the next backward, whose order
        GradArrivals asks for, or unhook them.

        Tensor hooks (`register_hook`), removed in full: once a Python hook has been
        registered on a tensor, autograd calls into Python for it in every later backward
        even after `handle.remove()` (~1.5 us a parameter, measured; so do
        `register_post_accumulate_grad_hook` and hooks on AccumulateGrad nodes). Setting
        a tensor's `_backward_hooks` to None clears its hooks in C++ too; it is done only
        where no hook of anyone else's is left in that dict. Hooking costs ~3 us a
        parameter, only before learning backwards."""
        if on == bool(self._handles):
            return
        if not on:
            self._unhook(clear=True)
            return
        note = self._arrivals.note
        for index, ref in enumerate(self._param_refs):
            param = ref()
            if param is not None and param.requires_grad:
                hook = functools.partial(note, index)
                self._handles.append(param.register_hook(hook))  # type: ignore[no-untyped-call]

    def _install_step_hooks(
        self, listener: StepListener, optimizer: torch.optim.Optimizer, post_step: bool
    ) -> None:
        me = weakref.ref(listener)
        key = self._key = next(_keys)
        _LISTENERS[key] = me
        compiled = _compiled_step_hook()
        dtensor = distributed.dtensor_type()  # not looked up inside traced code

        def on_step(opt: Any, _args: Any, _kwargs: Any) -> None:
            if torch.compiler.is_compiling():
                # Traced by dynamo (a compiled optimizer step): an opaque call that runs
                # the eager branch's work at runtime, with no graph break.
                compiled(key, False, _params_of(opt, dtensor))
                return
            target = me()
            if target is not None and not target.closed:
                target.on_optimizer_step(opt)

        self._step_handles.append(optimizer.register_step_pre_hook(on_step))
        if not post_step:  # only when a feature needs it: no post-hook cost otherwise
            return

        def on_step_post(opt: Any, _args: Any, _kwargs: Any) -> None:
            if torch.compiler.is_compiling():
                compiled(key, True, _params_of(opt, dtensor))  # as on_step: an opaque call
                return
            target = me()
            if target is not None and not target.closed:
                target.on_optimizer_step_post()

        self._step_handles.append(optimizer.register_step_post_hook(on_step_post))

    def _unhook(self, clear: bool) -> None:
        """Remove the gradient hooks; with `clear`, also set each hook dict left empty to
        None, which clears the tensor's hooks in C++ (see watch_grads). Only from the
        step hooks: there no backward runs. Another thread may be inside a backward when
        close() runs, and clearing a tensor's C++ hooks while autograd calls them would
        free what it is running; there only the dict entries go (torch tolerates that)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if not clear:
            return
        for ref in self._param_refs:
            param = ref()
            hooks = None if param is None else param._backward_hooks
            if hooks is not None and not hooks:  # an empty dict: clear it in C++ too
                param._backward_hooks = None  # type: ignore[union-attr]

    def remove(self) -> None:
        """Remove every hook. Tensor hooks go at once (torch tolerates their removal while
        it runs them; their C++ side stays, see _unhook); step hooks go at the next
        backward if a step is running now, since removing one there raises "OrderedDict
        mutated during iteration" in that step."""
        self._unhook(clear=False)
        if self._step_handles and _inside_optimizer_step():
            _remove_at_next_backward(self._param_refs, list(self._step_handles))
        else:
            for handle in self._step_handles:
                handle.remove()
        self._step_handles.clear()
        if self._key is not None:
            _LISTENERS.pop(self._key, None)
            self._key = None
        if self._unwatch_scaler is not None:
            self._unwatch_scaler()
            self._unwatch_scaler = None
