"""docs/reference.md is generated from the code (gradmon/tools/reference.py) and must match
it; and it is complete against what users read: the config models, every family a live
/metrics serves, the alert rules, the public API."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

import gradmon
from gradmon.config import Config
from gradmon.export import schema
from gradmon.ops.rules import ALERT_NAMES, alert_rules
from gradmon.tools import reference

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / reference.PATH
REGENERATE = "regenerate it: python -m gradmon.tools.reference --output docs/reference.md"


def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


def test_page_is_what_the_code_generates() -> None:
    assert _page() == reference.render(), f"{PAGE} is out of date; {REGENERATE}"
    assert reference.main(["--check", str(PAGE)]) == 0


def _keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += _keys(info.annotation, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", info.get_default(call_default_factory=True)))
    return out


def test_every_config_key_with_its_default_and_a_meaning() -> None:
    rows = {
        m.group(1): m.group(2).split(" | ")
        for m in re.finditer(r"^\| `([a-z_.]+)` \| (.*) \|$", _page(), re.M)
    }
    keys = _keys(Config)
    assert len(keys) > 40
    for key, default in keys:
        assert key in rows, f"config key {key} is not in {PAGE}; {REGENERATE}"
        kind, shown, meaning = rows[key][0], rows[key][-2], rows[key][-1]
        expected = "null" if default is None else str(default).lower()
        if isinstance(default, float | int) and not isinstance(default, bool):
            expected = repr(default)
        assert shown == f"`{expected}`", (key, shown)
        assert kind and meaning.strip(), f"{key}: no meaning in gradmon/config.py (description=)"


def test_every_family_served_on_metrics_is_listed() -> None:
    """A live monitor with every opt-in family on: each gradmon_* family it serves."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    registry = CollectorRegistry()
    config = {
        "exporter": {"port": 0},
        "collect": {"activations": True, "update_ratio_every": 1},
    }
    with gradmon.attach(model, opt, scaler=scaler, config=config, registry=registry) as mon:
        for _ in range(2):
            opt.zero_grad()
            x = torch.randn(8, 4)
            x[0, 0] = float("nan")  # NaN/Inf counters and the origin get series
            scaler.scale(model(x).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
        mon.log(loss=1.0)
        mon.snapshot(wait=True)
        served = {m.name for m in registry.collect() if m.name.startswith("gradmon_")}
        served |= {m.name for m in mon.registry.collect() if m.name.startswith("gradmon_")}
    page = _page()
    assert len(served) >= len(schema.FAMILIES)
    for name in sorted(served):
        # prometheus_client names a counter family without its _total.
        assert re.search(rf"^\| `{name}(_total)?` \|", page, re.M), f"{name} missing; {REGENERATE}"
    for family in schema.FAMILIES:
        assert f"| `{family.series}` | {family.type} |" in page


def test_every_alert_and_recording_rule() -> None:
    page = _page()
    for rule in alert_rules(Config()):
        name = rule["alert"]
        assert name in ALERT_NAMES
        section = page.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        assert f"`for: {rule['for']}`" in section and rule["labels"]["severity"] in section
        assert rule["annotations"]["runbook_url"] in section
        assert rule["expr"].rstrip() in section


def test_public_api_is_listed() -> None:
    page = _page()
    for name in gradmon.__all__:
        assert f"`{name}`" in page, name
    for member in ("collect", "snapshot", "log", "on_anomaly", "close", "port"):
        assert re.search(rf"^\| `{member}` \| .+ \| \S.* \|$", page, re.M), member


def test_readme_and_code_point_at_the_reference_not_a_missing_design_file() -> None:
    texts = [REPO / "README.md", *sorted((REPO / "gradmon").rglob("*.py"))]
    stale = [str(p.relative_to(REPO)) for p in texts if "DESIGN.md" in p.read_text("utf-8")]
    assert not stale, f"these mention DESIGN.md, which the repo has not: {stale}"
    assert "docs/reference.md" in (REPO / "README.md").read_text(encoding="utf-8")
