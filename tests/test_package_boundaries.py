"""The agent never loads gradmon.ops or gradmon.tools: they are rendered from Config or
run from the command line, never inside a training process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, torch, gradmon
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with gradmon.attach(model, opt, config={"exporter": {"port": 0}}) as mon:
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    import urllib.request
    urllib.request.urlopen(f"http://127.0.0.1:{mon.port}/metrics", timeout=10).read()
loaded = sorted(m for m in sys.modules if m.startswith(("gradmon.ops", "gradmon.tools")))
assert not loaded, loaded
assert "gradmon.export.schema" in sys.modules
"""


def test_a_served_training_run_loads_neither_ops_nor_tools() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_no_agent_module_imports_ops_or_tools() -> None:
    """Statically, too: an import inside a function would not show in the run above."""
    offenders = []
    for path in (REPO / "gradmon").rglob("*.py"):
        rel = path.relative_to(REPO / "gradmon").parts
        if rel[0] in ("ops", "tools", "__main__.py"):
            continue
        text = path.read_text(encoding="utf-8")
        if "gradmon.ops" in text or "gradmon.tools" in text:
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders
