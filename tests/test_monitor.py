"""Hook semantics of the agent, with real training of small models."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradmon
from gradmon import GradmonError
from gradmon.agent import collect as agent_collect
from gradmon.agent import monitor as agent_monitor
from gradmon.agent.hooks import RELEARN_EVERY
from gradmon.stats import Col, reference

from . import probes, readings
from .conftest import SmallNet, train_step

NO_SERVER = {"exporter": {"enabled": False}}


def expected_norms(model: nn.Module) -> dict[str, float]:
    """float64 reference norms of the grads as they are now."""
    return {
        n: math.sqrt(reference.tensor_partials(p.grad)[Col.SUM_SQ])
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def test_one_collection_per_step_on_final_grads(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: grads stay inspectable
    with gradmon.attach(net, opt, config=NO_SERVER) as mon:
        opt.zero_grad()
        for _ in range(4):  # four micro-batches accumulate into one step
            net(torch.randn(4, 8)).pow(2).mean().backward()
        want = expected_norms(net)
        opt.step()
        snap = mon.snapshot()
        assert snap is not None and snap.step == 0
        assert readings.collections(mon) == 1
        for name, norm in want.items():
            assert snap.layers[name].norm == pytest.approx(norm, rel=1e-6)
        assert snap.global_norm == pytest.approx(math.sqrt(sum(v * v for v in want.values())))
        assert snap.anomalies == []


def test_layer_stats_match_reference(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with gradmon.attach(net, opt, config=NO_SERVER) as mon:
        opt.zero_grad()
        net(torch.randn(16, 8)).pow(2).mean().backward()
        rows = {n: reference.tensor_partials(p.grad) for n, p in net.named_parameters()}
        pnorm = {n: p.detach().double().norm().item() for n, p in net.named_parameters()}
        opt.step()
        snap = mon.snapshot()
    assert snap is not None
    for name, row in rows.items():
        s = snap.layers[name]
        assert s.numel == dict(net.named_parameters())[name].numel()
        assert s.sum_squares == pytest.approx(row[Col.SUM_SQ], rel=1e-6)
        assert s.mean == pytest.approx(row[Col.SUM] / s.numel, rel=1e-5, abs=1e-12)
        assert s.rms == pytest.approx(math.sqrt(row[Col.SUM_SQ] / s.numel), rel=1e-6)
        assert (s.min, s.max, s.abs_max) == (row[Col.MIN], row[Col.MAX], row[Col.ABS_MAX])
        assert s.zero_ratio == row[Col.ZERO_COUNT] / s.numel
        assert s.param_norm == pytest.approx(pnorm[name], rel=1e-6)


def test_every_n_steps(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with gradmon.attach(net, opt, config={**NO_SERVER, "collect": {"every_n_steps": 3}}) as mon:
        steps = []
        for _ in range(7):
            train_step(net, opt)
            snap = mon.snapshot()
            steps.append(snap.step if snap else None)
        assert steps == [0, 0, 0, 3, 3, 3, 6]
        assert readings.steps(mon) == 7 and readings.collections(mon) == 3


def grad_hooks(model: nn.Module) -> int:
    """Gradient hooks armed for the next backward (a Branchy takes [n, 4])."""
    return probes.armed_grad_hooks(model, torch.randn(2, 4))


def test_gradient_hooks_only_for_the_backwards_that_learn_the_order(net: SmallNet) -> None:
    """every_n_steps: 3: autograd's per-parameter Python hook is paid only in the backward
    of the first collected step and of every RELEARN_EVERY-th collection after it (they
    learn the backward order, hooks.GradArrivals); what was collected is unchanged (the
    unused layer is told apart from the used ones, and the statistics are those of that
    step's grads)."""
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    config = {**NO_SERVER, "collect": {"every_n_steps": 3}}
    params = sum(1 for n, _ in model.named_parameters() if not n.startswith("unused."))
    steps = 3 * RELEARN_EVERY + 2
    with gradmon.attach(model, opt, config=config) as mon:
        seen = []
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            backward = model(torch.randn(2, 4)).sum().backward
            seen.append(probes.grad_hook_calls(backward))
            want = float(model.used.weight.grad.norm())  # type: ignore[union-attr]
            opt.step()
            snap = mon.snapshot()
            assert snap is not None
            if step % 3 == 0:
                assert snap.layers["used.weight"].norm == pytest.approx(want, rel=1e-6)
                assert not snap.layers["unused.weight"].received
        learning = {0, 3 * RELEARN_EVERY}
        assert seen == [params if s in learning else 0 for s in range(steps)]
    assert grad_hooks(model) == 0


def test_between_learning_backwards_no_parameter_carries_a_hook() -> None:
    """A removed tensor hook still costs a call into Python per parameter per backward
    unless the tensor's hook dict is cleared (None); a hook of the user's stays."""
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen: list[int] = []
    model.used.weight.register_hook(lambda g: seen.append(1))  # type: ignore[no-untyped-call]
    with gradmon.attach(model, opt, config=NO_SERVER):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
        for name, p in model.named_parameters():
            if name != "used.weight":
                assert p._backward_hooks is None, name
        assert len(model.used.weight._backward_hooks) == 1  # the user's
    assert len(seen) == 3


def test_a_collection_with_nan_relearns_the_order_at_the_next() -> None:
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    params = sum(1 for n, _ in model.named_parameters() if not n.startswith("unused."))
    healthy = {k: v.clone() for k, v in model.state_dict().items()}
    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        seen = []
        for step in range(5):
            opt.zero_grad(set_to_none=True)
            x = torch.randn(2, 4)
            if step == 2:
                x[0, 0] = float("nan")
            seen.append(probes.grad_hook_calls(model(x).sum().backward))
            opt.step()
            if step == 2:  # the NaN reached the weights (lr 0 * NaN): put them back
                model.load_state_dict(healthy)
        assert mon.snapshot() is not None
    assert seen == [params, 0, 0, params, 0]


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.tanh(self.shared(self.used(x))))


def test_unused_parameters_are_dead_after_dead_window() -> None:
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = {**NO_SERVER, "health": {"dead_window": 2}}
    with gradmon.attach(model, opt, config=cfg) as mon:
        for step in range(3):
            opt.zero_grad(set_to_none=False)  # zeros, not None: still "no gradient"
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            snap = mon.snapshot()
            assert snap is not None
            assert not snap.layers["unused.weight"].received
            assert snap.layers["used.weight"].received
            dead = {a.layer for a in snap.anomalies if a.kind == "dead"}
            assert dead == (set() if step == 0 else {"unused.weight", "unused.bias"})


def test_shared_parameter_counted_once() -> None:
    model = Branchy()
    model.alias = model.shared  # the same module under a second name
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        want = expected_norms(model)["shared.weight"]
        opt.step()
        snap = mon.snapshot()
    assert snap is not None
    assert "alias.weight" not in snap.layers
    assert snap.layers["shared.weight"].norm == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing(reentrant: bool) -> None:
    class Checkpointed(SmallNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = checkpoint(self.fc1, x, use_reentrant=reentrant)
            h = checkpoint(lambda t: self.fc2(torch.relu(t)), h, use_reentrant=reentrant)
            return self.out(torch.relu(h))

    model = Checkpointed()
    plain = SmallNet()
    plain.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(5, 8, requires_grad=reentrant)
    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        snap = mon.snapshot()
        assert readings.collections(mon) == 1
    plain(x).pow(2).mean().backward()
    assert snap is not None
    for name, norm in expected_norms(plain).items():
        assert snap.layers[name].norm == pytest.approx(norm, rel=1e-5)


def test_collect_without_optimizer(net: SmallNet) -> None:
    with gradmon.attach(net, config=NO_SERVER) as mon:
        assert mon.snapshot() is None
        net(torch.randn(2, 8)).sum().backward()
        mon.collect()
        net(torch.randn(2, 8)).sum().backward()
        mon.collect(step=41)
        snap = mon.snapshot()
        assert snap is not None and snap.step == 41
        assert readings.collections(mon) == 2 and readings.steps(mon) == 2
        with pytest.raises(GradmonError, match="collect\\(step=...\\)"):
            mon.collect(step="3")  # type: ignore[arg-type]


def test_include_exclude_and_module_granularity(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    cfg = {**NO_SERVER, "collect": {"include": "^fc", "exclude": "bias$"}}
    with gradmon.attach(net, opt, config=cfg) as mon:
        train_step(net, opt)
        snap = mon.snapshot()
        assert snap is not None and list(snap.layers) == ["fc1.weight", "fc2.weight"]
    cfg = {**NO_SERVER, "collect": {"granularity": "module"}}
    with gradmon.attach(net, opt, config=cfg) as mon:
        opt.zero_grad()
        net(torch.randn(4, 8)).pow(2).mean().backward()
        per_param = expected_norms(net)
        opt.step()
        snap = mon.snapshot()
    assert snap is not None and list(snap.layers) == ["fc1", "fc2", "out"]
    fc1 = math.sqrt(per_param["fc1.weight"] ** 2 + per_param["fc1.bias"] ** 2)
    assert snap.layers["fc1"].norm == pytest.approx(fc1, rel=1e-6)
    assert snap.layers["fc1"].numel == 8 * 16 + 16


def test_close_removes_every_hook(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    mon = gradmon.attach(net, opt, config=NO_SERVER)
    train_step(net, opt)
    mon.close()
    mon.close()  # idempotent
    assert mon.closed
    train_step(net, opt)
    assert readings.collections(mon) == 1 and readings.steps(mon) == 1
    assert not opt._optimizer_step_pre_hooks
    for p in net.parameters():
        assert not p._post_accumulate_grad_hooks
    with pytest.raises(GradmonError, match="closed"):
        mon.collect()
    # re-attaching after close works
    with gradmon.attach(net, opt, config=NO_SERVER) as again:
        train_step(net, opt)
        assert readings.collections(again) == 1


def test_monitor_does_not_keep_grads_alive() -> None:
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        train_step(model, opt)
        assert readings.collections(mon) == 1
        grads = [weakref.ref(p.grad) for p in model.parameters() if p.grad is not None]
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert grads and all(g() is None for g in grads)


def test_monitor_does_not_keep_model_alive() -> None:
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = gradmon.attach(model, opt, config=NO_SERVER)
    train_step(model, opt)
    ref = weakref.ref(model)
    del model, opt
    gc.collect()
    assert ref() is None
    mon.close()


def test_bad_arguments() -> None:
    with pytest.raises(GradmonError, match="needs a torch.nn.Module, not list"):
        gradmon.attach([1, 2])  # type: ignore[arg-type]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(GradmonError, match="no parameters with requires_grad=True"):
        gradmon.attach(frozen, config=NO_SERVER)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(GradmonError, match="owns none of the 2 trainable parameters"):
        gradmon.attach(nn.Linear(2, 2), other, config=NO_SERVER)
    with pytest.raises(GradmonError, match="needs a torch.optim.Optimizer"):
        gradmon.attach(nn.Linear(2, 2), "sgd", config=NO_SERVER)  # type: ignore[arg-type]
    with pytest.raises(GradmonError, match="needs a torch.amp.GradScaler"):
        gradmon.attach(nn.Linear(2, 2), scaler=object(), config=NO_SERVER)
    with pytest.raises(GradmonError, match="leave none of the"):
        gradmon.attach(nn.Linear(2, 2), config={**NO_SERVER, "collect": {"include": "nope"}})
    with pytest.raises(GradmonError, match="log\\(loss=...\\)"):
        gradmon.attach(nn.Linear(2, 2), config=NO_SERVER).log(loss="low")


def test_nonfinite_gradients_counted_not_dropped(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with gradmon.attach(net, opt, config=NO_SERVER) as mon:
        opt.zero_grad()
        x = torch.randn(4, 8)
        x[0, 0] = float("inf")
        net(x).pow(2).mean().backward()
        opt.step()
        snap = mon.snapshot()
    assert snap is not None and snap.nonfinite
    assert readings.nonfinite_steps(mon) == 1
    fc1 = snap.layers["fc1.weight"]
    assert fc1.nan_count + fc1.inf_count > 0
    assert math.isfinite(snap.global_norm)
    assert ("fc1.weight", "nonfinite") in {(a.layer, a.kind) for a in snap.anomalies}


def test_failure_inside_agent_does_not_stop_training(
    net: SmallNet, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_grads: object) -> torch.Tensor:
        raise RuntimeError("injected")

    # The seam the agent picks its kernel through: every kernel it gets fails.
    monkeypatch.setattr(agent_collect, "select_backend", lambda *_: broken)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with gradmon.attach(net, opt, config=NO_SERVER) as mon:
        before = [p.detach().clone() for p in net.parameters()]
        for _ in range(3):
            train_step(net, opt)
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
        assert readings.errors(mon)["collect"] == 3  # the statistics stage; the step went on
        assert readings.steps(mon) == 3
    assert sum("error in stage 'collect'" in r.getMessage() for r in caplog.records) == 1


def test_log_accepts_tensors_without_sync(net: SmallNet) -> None:
    with gradmon.attach(net, config=NO_SERVER) as mon:
        mon.log(loss=torch.tensor(0.5), lr=1e-3, step_time=2)
        scalars = {n: readings.value(mon, "gradmon_scalar", name=n) for n in ("loss", "lr")}
        assert scalars == {"loss": 0.5, "lr": 1e-3}
        assert readings.value(mon, "gradmon_scalar", name="step_time") == 2.0
        with pytest.raises(GradmonError, match="one element"):
            mon.log(loss=torch.ones(3))


def test_grad_scaler_skipped_steps_are_counted(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with gradmon.attach(net, opt, scaler=scaler, config=NO_SERVER) as mon:
        for i in range(4):
            opt.zero_grad()
            x = torch.randn(4, 8)
            if i == 2:
                x[0, 0] = float("nan")  # poisoned batch: the scaler skips this step
            scaler.scale(net(x).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
            if i == 0:
                snap = mon.snapshot()
                assert snap is not None and not snap.skipped
                unscaled = snap.global_norm
        assert readings.steps(mon) == 4 and readings.skipped_steps(mon) == 1
        assert readings.nonfinite_steps(mon) == 1
        assert readings.loss_scale(mon) == 2.0**7
        assert unscaled < 100  # statistics of unscaled grads, not x256
    assert "update" not in scaler.__dict__  # close() restored the scaler


def test_collect_skipped_counts_a_skipped_step(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with gradmon.attach(net, opt, config=NO_SERVER) as mon:
        train_step(net, opt)
        opt.zero_grad()
        net(torch.randn(2, 8)).sum().backward()
        mon.collect(skipped=True)  # the loop skipped optimizer.step() itself
        train_step(net, opt)
        snap = mon.snapshot()
        assert snap is not None and snap.step == 2
        assert (readings.steps(mon), readings.skipped_steps(mon), readings.collections(mon)) == (
            3,
            1,
            3,
        )


class RecordingSink:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.collected: list[tuple[int, dict[str, list[torch.Tensor]]]] = []
        self.published: list[tuple[object, dict[str, object]]] = []
        self.closed = False

    def on_collect(self, step: int, grads: dict[str, list[torch.Tensor]]) -> None:
        if self.fail:
            raise OSError("disk full")
        self.collected.append((step, dict(grads)))

    def on_publish(self, snapshot: object, scalars: dict[str, object]) -> None:
        self.published.append((snapshot, dict(scalars)))

    def close(self) -> None:
        self.closed = True


def test_sinks_see_grads_and_snapshots_and_failures_are_counted(
    net: SmallNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    good, bad = RecordingSink(), RecordingSink(fail=True)
    monkeypatch.setattr(agent_monitor, "build_sinks", lambda _cfg, _on_error: [bad, good])
    with gradmon.attach(net, opt, config=NO_SERVER) as mon:
        mon.log(loss=1.5)
        train_step(net, opt)
        train_step(net, opt)
        assert [step for step, _ in good.collected] == [0, 1]
        _, grads = good.collected[-1]
        assert set(grads) == {n for n, _ in net.named_parameters()}
        assert grads["fc1.weight"][0] is net.fc1.weight.grad
        assert [snap.step for snap, _ in good.published] == [0, 1]  # type: ignore[attr-defined]
        assert good.published[0][1] == {"loss": 1.5}
        assert readings.errors(mon)["sink"] == 2
    assert good.closed and bad.closed
