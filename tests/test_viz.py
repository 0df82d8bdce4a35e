"""gradmon.viz and `gradmon plot` / `gradmon viz maximize`: PNGs from real training, the
errors users meet, and activation maximization on a small conv net."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradmon
from gradmon import viz
from gradmon.tools.cli import main
from tests.conftest import SmallNet

pytest.importorskip("matplotlib")

NO_SERVER: dict[str, Any] = {"exporter": {"enabled": False}}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny convolutions gain nothing from intra-op threads, and on shared CI cores two
    # threads spinning against other jobs made activation maximization ~30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, checking its signature and header chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def assert_png(path: Path, min_bytes: int = 15_000) -> None:
    width, height = png_size(path)
    assert width >= 300 and height >= 200
    assert path.stat().st_size >= min_bytes  # drawn, not a blank canvas


@pytest.fixture
def record(tmp_path: Path) -> Path:
    """A record of a real run: healthy, then NaN/Inf in one layer, then a dead layer."""
    torch.manual_seed(0)
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    path = tmp_path / "run.jsonl"
    # dead_window 5: fc1.bias is all-zero for the last 10 collections of 40
    cfg = {**NO_SERVER, "record": {"path": str(path)}, "health": {"dead_window": 5}}
    with gradmon.attach(net, opt, config=cfg) as mon:
        for i in range(40):
            opt.zero_grad(set_to_none=True)
            loss = net(torch.randn(8, 8)).pow(2).mean()
            loss.backward()
            if i == 20:
                assert net.fc2.weight.grad is not None
                net.fc2.weight.grad[0, 0] = math.nan
            if i >= 30:
                assert net.fc1.bias.grad is not None
                net.fc1.bias.grad.zero_()
            opt.step()
            if i == 20:
                with torch.no_grad():
                    net.fc2.weight.nan_to_num_(0.0)
            mon.log(loss=loss.detach())
    return path


def test_plot_record_draws_a_report(record: Path, tmp_path: Path) -> None:
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    kinds = {a["kind"] for line in lines for a in line["anomalies"]}
    assert {"nonfinite", "dead"} <= kinds  # the picture has anomalies to mark
    out = viz.plot_record(record, tmp_path / "out" / "report.png")
    assert out == tmp_path / "out" / "report.png"
    assert_png(out, min_bytes=40_000)


def test_plot_record_long_and_resumed_runs(tmp_path: Path) -> None:
    # 4000 collections (columns averaged), a resumed run repeating steps, a null norm.
    path = tmp_path / "long.jsonl"
    layer = {"norm": 0.5, "zero_ratio": 0.1, "nan_count": 0, "inf_count": 0}
    with path.open("w") as f:
        for step in [*range(3000), *range(2000, 4000)]:
            norm = None if step == 100 else 10 ** math.sin(step / 300)
            line = {
                "step": step,
                "global_norm": norm,
                "scalars": {"loss": 1 / (step + 1)},
                "layers": {f"l{i}": {**layer, "norm": norm} for i in range(50)},
                "anomalies": [{"layer": "global", "kind": "spike", "value": 30}]
                if step % 500 == 0
                else [],
            }
            f.write(json.dumps(line) + "\n")
    assert_png(viz.plot_record(path, tmp_path / "long.png"))


def test_plot_record_errors(tmp_path: Path) -> None:
    with pytest.raises(gradmon.GradmonError, match="does not exist"):
        viz.plot_record(tmp_path / "missing.jsonl", tmp_path / "x.png")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(gradmon.GradmonError, match="holds no snapshots"):
        viz.plot_record(empty, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_importing_viz_leaves_matplotlib_alone() -> None:
    # matplotlib is an extra: `import gradmon.viz` must work without it (cli.py imports it).
    code = "import sys, gradmon.viz; assert 'matplotlib' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_missing_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, record: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'gradmon\[viz\]'"):
        viz.plot_record(record, tmp_path / "x.png")


def test_plot_gradients_from_model_snapshot_and_monitor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = SmallNet()
    extra = nn.Linear(3, 3)  # never used: no grad
    model = nn.ModuleDict({"net": net, "extra": extra})
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gradmon.attach(net, opt, config=NO_SERVER) as mon:
        net(torch.randn(4, 8)).pow(2).mean().backward()
        assert net.fc2.weight.grad is not None and net.out.bias.grad is not None
        net.fc2.weight.grad[0, :2] = torch.tensor([math.nan, math.inf])
        net.out.bias.grad.zero_()
        opt.step()
        assert_png(viz.plot_gradients(model, tmp_path / "model.png"))
        snap = mon.snapshot()
        assert snap is not None and snap.nonfinite
        assert_png(viz.plot_gradients(snap, tmp_path / "snap.png"))
        assert_png(viz.plot_gradients(mon, tmp_path / "mon.png"))


def test_plot_gradients_errors(tmp_path: Path) -> None:
    with pytest.raises(gradmon.GradmonError, match=r"no gradients.*after loss.backward"):
        viz.plot_gradients(SmallNet(), tmp_path / "x.png")
    with pytest.raises(gradmon.GradmonError, match="needs an nn.Module, a gradmon.Snapshot"):
        viz.plot_gradients({"fc1": 1.0}, tmp_path / "x.png")
    net = SmallNet()
    with (
        gradmon.attach(net, config=NO_SERVER) as mon,
        pytest.raises(gradmon.GradmonError, match="has not collected yet"),
    ):
        viz.plot_gradients(mon, tmp_path / "x.png")


# ------------------------------------------------------- activation maximization
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _activation(model: nn.Module, module: str, unit: int, x: torch.Tensor) -> float:
    out: list[torch.Tensor] = []
    handle = dict(model.named_modules())[module].register_forward_hook(
        lambda _m, _i, o: out.append(o)
    )
    with torch.no_grad():
        model(x)
    handle.remove()
    return float(out[0][:, unit].mean())


def test_maximize_activation_raises_the_unit_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = ConvNet().train()
    model.head[2].weight.requires_grad_(False)  # a frozen layer stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shape = (1, 3, 16, 16)
    for unit in (0, 5):
        x = viz.maximize_activation(model, "features.3", unit, shape, steps=60, lr=0.1)
        assert x.shape == shape and not x.requires_grad
        random_inputs = [
            _activation(model, "features.3", unit, torch.randn(shape)) for _ in range(4)
        ]
        baseline = sum(random_inputs) / len(random_inputs)
        assert _activation(model, "features.3", unit, x) > 3 * max(baseline, 1e-3)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == [True] * 4 + [False, True]
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Same seed, same input.
    a = viz.maximize_activation(model, "features.1", 2, shape, steps=5, seed=3)
    b = viz.maximize_activation(model, "features.1", 2, shape, steps=5, seed=3)
    assert torch.equal(a, b)


def test_maximize_activation_on_features_without_spatial_dims() -> None:
    torch.manual_seed(0)
    model = SmallNet()
    x = viz.maximize_activation(model, "fc2", 3, (2, 8), steps=40, lr=0.1, l2=1e-2)
    assert x.shape == (2, 8)
    assert _activation(model, "fc2", 3, x) > _activation(model, "fc2", 3, torch.randn(2, 8)) + 0.5


def test_maximize_activation_errors() -> None:
    model = ConvNet()
    with pytest.raises(gradmon.GradmonError, match=r"'features\.9'.*'features\.3'") as err:
        viz.maximize_activation(model, "features.9", 0, (1, 3, 8, 8))
    assert "in all" in str(err.value)
    with pytest.raises(gradmon.GradmonError, match=r"unit must be in 0\.\.11"):
        viz.maximize_activation(model, "features.2", 12, (1, 3, 8, 8))
    with pytest.raises(gradmon.GradmonError, match="input_shape"):
        viz.maximize_activation(model, "features.2", 0, (3,))
    with pytest.raises(gradmon.GradmonError, match="steps >= 1"):
        viz.maximize_activation(model, "features.2", 0, (1, 3, 8, 8), steps=0)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())  # removed after the unit error


# ------------------------------------------------------------------------- CLI
def test_cli_plot(record: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.png"
    assert main(["plot", str(record), "-o", str(out)]) == 0
    assert_png(out)
    assert main(["plot", str(record)]) == 0  # default: next to the record
    assert_png(record.with_suffix(".png"))
    assert main(["plot", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_viz_maximize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    torch.save(ConvNet(), checkpoint)
    out = tmp_path / "grid.png"
    args = ["viz", "maximize", "--module", "features.1", "--unit", "0-3,7"]
    args += ["--shape", "1,3,16,16", "--checkpoint", str(checkpoint), "-o", str(out)]
    assert main([*args, "--steps", "10"]) == 0
    assert_png(out)
    assert main([*args[:3], "nope", *args[4:]]) == 2
    assert "valid names include" in capsys.readouterr().err
    torch.save(ConvNet().state_dict(), checkpoint)
    assert main(args) == 2
    assert "not a pickled nn.Module" in capsys.readouterr().err


def test_viz_is_reached_from_the_package_without_an_import() -> None:
    import gradmon

    assert gradmon.viz.plot_record is viz.plot_record
    assert gradmon.integrations.__name__ == "gradmon.integrations"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        gradmon.nothing  # noqa: B018
