"""Unusual gradients and parameters: handled, or skipped with a counted, named reason,
while training goes on with statistics for the remaining layers."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import gradmon
from gradmon import GradmonError
from gradmon.agent import gather
from gradmon.stats import Col, reference

from . import readings

NO_SERVER = {"exporter": {"enabled": False}}


def _dense_reference(grad: torch.Tensor) -> list[float]:
    g = grad.to_dense() if grad.layout != torch.strided else grad
    if g.is_complex():
        g = torch.view_as_real(g)
    return reference.tensor_partials(g)


class EmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.fc = nn.Linear(4, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.emb(idx)).sum()
        return out


def test_sparse_embedding_grads_counted_over_the_dense_shape() -> None:
    model = EmbedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model(torch.tensor([1, 2, 2, 7])).backward()
            grad = model.emb.weight.grad
            assert grad is not None and grad.layout == torch.sparse_coo
            want = _dense_reference(grad)
            opt.step()
        snap = mon.snapshot()
        assert snap is not None and snap.step == 2
        s = snap.layers["emb.weight"]
        assert s.received and s.numel == 40
        assert s.norm == pytest.approx(math.sqrt(want[Col.SUM_SQ]), rel=1e-6)
        assert s.mean == pytest.approx(want[Col.SUM] / 40, rel=1e-6, abs=1e-12)
        assert s.min == pytest.approx(min(want[Col.MIN], 0.0))
        assert s.max == pytest.approx(max(want[Col.MAX], 0.0))
        # Rows 0, 3-6, 8, 9 got no gradient: their 28 implicit zeros count.
        assert s.zero_ratio == pytest.approx(want[Col.ZERO_COUNT] / 40)
        assert s.zero_ratio >= 28 / 40
        assert "fc.weight" in snap.layers and snap.layers["fc.weight"].received
        assert mon.skipped == {}
        assert readings.errors(mon)["collect"] == 0 and readings.errors(mon)["hook"] == 0


def test_sparse_grad_with_duplicate_indices_is_coalesced() -> None:
    model = EmbedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        opt.zero_grad()
        model(torch.tensor([3, 3, 3])).backward()
        model(torch.tensor([3, 5])).backward()  # accumulates an uncoalesced sparse grad
        grad = model.emb.weight.grad
        assert grad is not None
        want = _dense_reference(grad)
        opt.step()
        s = mon.snapshot().layers["emb.weight"]  # type: ignore[union-attr]
        assert s.norm == pytest.approx(math.sqrt(want[Col.SUM_SQ]), rel=1e-6)
        assert s.zero_ratio == pytest.approx(want[Col.ZERO_COUNT] / 40)


class ComplexNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
        self.fc = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(torch.complex64) @ self.w.T  # [b, 3]
        out: torch.Tensor = self.fc(torch.view_as_real(z).sum(-1)[..., :2]).pow(2).mean()
        return out


def test_complex_parameters_measured_over_real_and_imaginary_parts() -> None:
    model = ComplexNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        opt.zero_grad()
        model(torch.randn(5, 2)).backward()
        grad = model.w.grad
        assert grad is not None and grad.is_complex()
        want = _dense_reference(grad)
        opt.step()
        snap = mon.snapshot()
        assert snap is not None
        s = snap.layers["w"]
        assert s.numel == 12  # 6 complex entries = 12 real ones
        assert s.norm == pytest.approx(torch.linalg.vector_norm(grad).item(), rel=1e-5)
        assert s.norm == pytest.approx(math.sqrt(want[Col.SUM_SQ]), rel=1e-6)
        assert s.abs_max == pytest.approx(want[Col.ABS_MAX])
        assert s.param_norm == pytest.approx(torch.linalg.vector_norm(model.w).item(), rel=1e-5)
        assert snap.layers["fc.weight"].received
        assert mon.skipped == {}


def test_integer_and_bool_parameters_without_grad_are_not_monitored() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    model.register_parameter(
        "steps", nn.Parameter(torch.tensor([1, 2], dtype=torch.int64), requires_grad=False)
    )
    model.register_parameter("mask", nn.Parameter(torch.tensor([True, False]), requires_grad=False))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with gradmon.attach(model, opt, config=NO_SERVER) as mon:
        assert mon.layer_names == ["0.weight", "0.bias"]
        assert mon.skipped == {"steps": "requires_grad=False", "mask": "requires_grad=False"}
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
        snap = mon.snapshot()
        assert snap is not None and set(snap.layers) == {"0.weight", "0.bias"}
        assert sum(readings.errors(mon).values()) == 0  # frozen parameters are not agent errors


def test_all_meta_model_is_a_clear_error() -> None:
    with torch.device("meta"):
        model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GradmonError, match=r"meta device.*'weight'.*to_empty"):
        gradmon.attach(model, opt, config=NO_SERVER)


def test_meta_parameters_are_skipped_with_a_counted_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].to_empty(device="meta")  # half-materialized model
    with caplog.at_level(logging.WARNING, logger="gradmon"):
        mon = gradmon.attach(model, None, config=NO_SERVER)
    with mon:
        assert set(mon.skipped) == {"1.weight", "1.bias"}
        assert all("meta device" in r for r in mon.skipped.values())
        assert readings.errors(mon)["collect"] == 2
        assert "'1.weight' is not monitored" in caplog.text
        model[0](torch.randn(4, 3)).sum().backward()
        mon.collect()
        snap = mon.snapshot()
        assert snap is not None and set(snap.layers) == {"0.weight", "0.bias"}
        assert snap.layers["0.weight"].norm > 0
        text = _scrape(mon)
        assert 'gradmon_agent_errors_total{stage="collect"} 2.0' in text


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_unsupported_grad_layout_is_skipped_and_training_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Linear(3, 3, dtype=torch.complex64)
            self.r = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.r(self.c(x.to(torch.complex64)).abs())

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    # torch refuses to assign a CSR .grad to a dense parameter, but a custom
    # autograd/optimizer setup may hand one over: the agent sees it as CSR here, through
    # the function it reads every grad that needs a view with (complex ones do).
    original = gather.grad_view

    def as_csr(grad: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
        return original(grad.to_sparse_csr() if grad.shape == (3, 3) else grad)

    monkeypatch.setattr(gather, "grad_view", as_csr)
    with gradmon.attach(model, opt, config=NO_SERVER) as mon, caplog.at_level(logging.WARNING):
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
        snap = mon.snapshot()
        assert snap is not None and snap.step == 3
        assert "sparse_csr" in mon.skipped["c.weight"]
        assert readings.errors(mon)["collect"] == 1  # counted once per parameter
        assert caplog.text.count("'c.weight' is not monitored") == 1
        assert not snap.layers["c.weight"].received
        assert snap.layers["r.weight"].received and snap.layers["r.weight"].norm > 0
        # a skipped layer is not reported dead
        assert all(a.layer != "c.weight" for a in snap.anomalies)


def test_parameters_added_after_attach_are_named_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmon.attach(model, opt, config=NO_SERVER) as mon, caplog.at_level(logging.WARNING):
        head = nn.Linear(2, 1)
        model.add_module("head", head)
        opt.add_param_group({"params": list(head.parameters())})
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
        snap = mon.snapshot()
        assert snap is not None and snap.step == 2
        assert set(snap.layers) == {"0.weight", "0.bias"}
        assert mon.skipped == {
            "head.weight": "added after attach() (attach again to monitor it)",
            "head.bias": "added after attach() (attach again to monitor it)",
        }
        assert readings.errors(mon)["collect"] == 2
        assert caplog.text.count("'head.weight' is not monitored") == 1


def _scrape(mon: gradmon.Monitor) -> str:
    from prometheus_client import generate_latest

    return generate_latest(mon.registry).decode()
