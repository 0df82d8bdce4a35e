"""Grafana dashboards as code, built with Grafana's typed SDK (grafana-foundation-sdk).

Two dashboards, written to `dashboards/` by `gradmon dashboards generate` and kept in sync
with this package by tests/ops/test_dashboards.py:

- `gradmon-overview`: global gradient norm (gauge and per-step histogram), NaN/Inf and
  skipped steps, loss scale, anomalies by kind and layer, logged scalars, agent health;
- `gradmon-layers`: log10 gradient norm as a layers x time heatmap, top/bottom layers,
  zero ratio, NaN/Inf layers, parameter norm, update ratio; and a collapsed row of
  activation statistics (`collect.activations`) by module.

Every panel and query variable reads the `datasource` variable, so the dashboards work on
any Prometheus data source. Selectors use `=~` throughout: `rank` only exists under
several ranks, and `rank=~".*"` (the All value) also matches a series without the label.
Activation series name a module in their `layer` label (`encoder.layers.0.linear1`), not a
layer of the gradient families (`...linear1.weight` by default), so they are narrowed by a
`module` variable of their own.
"""

from __future__ import annotations

import json
from pathlib import Path

from gradmon.errors import GradmonError
from gradmon.ops.dashboards.builders import JSONEncoder, dash_m
from gradmon.ops.dashboards.layers import layers
from gradmon.ops.dashboards.overview import overview

__all__ = ["DASHBOARD_FILES", "build", "render", "write"]

# uid -> file name under dashboards/
DASHBOARD_FILES = {
    "gradmon-overview": "gradmon-overview.json",
    "gradmon-layers": "gradmon-layers.json",
}


def build() -> dict[str, dash_m.Dashboard]:
    """The dashboards by uid."""
    return {"gradmon-overview": overview(), "gradmon-layers": layers()}


def render(dashboard: dash_m.Dashboard) -> str:
    """A dashboard's JSON as committed under dashboards/ (stable key order)."""
    return json.dumps(dashboard, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def write(output_dir: str | Path) -> list[Path]:
    """Write every dashboard's JSON into `output_dir` (created if missing)."""
    out = Path(output_dir)
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for uid, dashboard in build().items():
            path = out / DASHBOARD_FILES[uid]
            path.write_text(render(dashboard), encoding="utf-8")
            written.append(path)
    except OSError as exc:
        raise GradmonError(
            f"cannot write dashboards to --output-dir {output_dir}: {exc.strerror or exc}"
        ) from exc
    return written
