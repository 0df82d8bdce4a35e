from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings
from torch import nn

# CI: the same examples every run, so a property test cannot pass on one run and fail on
# the next; locally hypothesis keeps exploring new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Under CI nothing skips silently: a skip is a failure unless it is about hardware this
# machine does not have (a GPU, a CPU feature, another OS). A missing package, binary or
# C build fails with the reason.
HARDWARE_SKIPS = ("CUDA", "GPU", "flush-denormal", "fork start method", "syncs by itself")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not (os.environ.get("CI") and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    if not any(word in reason for word in HARDWARE_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"CI is set, so this may not skip: {reason}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Skips for a missing system program (their reasons name the apt-get package): say
    # once, after -ra's list, how to get them all.
    missing = [
        r for r in terminalreporter.stats.get("skipped", []) if "apt-get install" in str(r.longrepr)
    ]
    if missing:
        terminalreporter.write_sep("=", "system packages")
        terminalreporter.write_line(
            f"{len(missing)} test(s) skipped for a missing system program (reasons below): "
            "`make setup` installs them when run as root with apt-get; "
            "`python3 scripts/system_packages.py --check` prints the command otherwise"
        )


@pytest.fixture(autouse=True)
def _clean_gradmon_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The agent reads GRADMON_* when loading config; a developer's shell must not leak in.
    for name in list(os.environ):
        if name.startswith("GRADMON_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def net() -> SmallNet:
    return SmallNet()


@pytest.fixture
def no_server() -> dict[str, object]:
    return {"exporter": {"enabled": False}}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: int = 4) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = model(torch.randn(batch, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.fixture
def attached(net: SmallNet, no_server: dict[str, object]) -> Iterator[tuple]:
    import gradmon

    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    mon = gradmon.attach(net, opt, config=no_server)
    yield net, opt, mon
    mon.close()
