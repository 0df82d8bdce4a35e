"""dashboards/*.json as TypeScript typed with Grafana's own published types (`@grafana/schema`,
the version deploy/compose.yaml runs), for `tsc` to check (tests/ops/test_dashboard_types.py).

Each dashboard becomes a module that assigns, as object literals (so that TypeScript's
excess-property check names every field Grafana does not know):
- the whole dashboard to `Dashboard`;
- each row to `RowPanel`, each panel to `Panel`;
- each panel's `options` to its plugin's `Options`, and its `fieldConfig.defaults.custom`
  to its plugin's `FieldConfig` (raw/composable/<type>/panelcfg in the package).

Grafana's enums are TypeScript string enums, which a JSON string cannot be assigned to;
`Json<T>` maps every string enum to the union of its values (`VizOrientation` ->
"auto" | "horizontal" | "vertical"), leaving the structure as it is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent / "grafana_types"
SCHEMA = PROJECT / "node_modules" / "@grafana" / "schema"
COMPOSABLE = "dist/esm/raw/composable"

JSON_TYPE = """\
// Grafana's enums are TypeScript enums; JSON holds their values.
type Json<T> = T extends string
  ? `${T}`
  : T extends readonly (infer U)[]
    ? Json<U>[]
    : T extends object
      ? { [K in keyof T]: Json<T[K]> }
      : T;
"""


@dataclass(frozen=True)
class Plugin:
    """A panel plugin's published types: the module, and whether it has a FieldConfig."""

    module: str  # import specifier
    field_config: bool


def plugins(schema_dir: Path = SCHEMA) -> dict[str, Plugin]:
    """Panel type -> its types, from the installed package (directory = plugin id)."""
    out: dict[str, Plugin] = {}
    for path in sorted((schema_dir / COMPOSABLE).glob("*/panelcfg/x/*PanelCfg_types.gen.d.ts")):
        panel_type = path.parents[2].name
        rel = path.relative_to(schema_dir).as_posix().removesuffix(".d.ts")
        text = path.read_text(encoding="utf-8")
        has_options = "export interface Options" in text
        if has_options and re.fullmatch(r"[a-z0-9]+", panel_type):
            out[panel_type] = Plugin(
                f"@grafana/schema/{rel}", "export interface FieldConfig" in text
            )
    return out


@dataclass
class Module:
    """One dashboard's TypeScript, and what each checked line is (for error messages)."""

    name: str
    lines: list[str] = field(default_factory=list)
    what: dict[int, str] = field(default_factory=dict)  # first line of a check -> what
    problems: list[str] = field(default_factory=list)  # found without tsc

    def check(self, what: str, type_: str, value: Any) -> None:
        ident = f"check_{len(self.what)}"
        first = sum(line.count("\n") + 1 for line in self.lines) + 1  # 1-based, as tsc's
        self.what[first] = what
        self.lines.append(f"export const {ident}: Json<{type_}> = {json.dumps(value, indent=2)};")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def describe(self, line: int) -> str:
        """What the check around `line` (1-based) is."""
        starts = [n for n in self.what if n <= line]
        return self.what[max(starts)] if starts else "the module header"


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))
    return out


def module(path: Path, known: dict[str, Plugin]) -> Module:
    doc = json.loads(path.read_text(encoding="utf-8"))
    dashboard = doc.get("dashboard", doc)
    mod = Module(path.name)
    panels = _panels(dashboard.get("panels", []))
    used = sorted({p.get("type", "") for p in panels} - {"row"})
    aliases = {t: f"p_{t}" for t in used if t in known}
    mod.lines += ['import type * as schema from "@grafana/schema";']
    mod.lines += [f'import type * as {aliases[t]} from "{known[t].module}";' for t in aliases]
    mod.lines += ["", JSON_TYPE]
    mod.check(f"{path.name}: the dashboard", "schema.Dashboard", dashboard)
    for panel in panels:
        kind, title = panel.get("type", "?"), panel.get("title", "?")
        where = f"{path.name}: {kind} panel {title!r}"
        if kind == "row":
            mod.check(where, "schema.RowPanel", panel)
            continue
        mod.check(where, "schema.Panel", panel)
        if kind not in aliases:
            mod.problems.append(f"{where}: Grafana publishes no types for panel type {kind!r}")
            continue
        alias = aliases[kind]
        mod.check(f"{where}, options", f"{alias}.Options", panel.get("options", {}))
        custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom")
        if custom is not None and known[kind].field_config:
            mod.check(f"{where}, fieldConfig.defaults.custom", f"{alias}.FieldConfig", custom)
    return mod
