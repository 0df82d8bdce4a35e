"""dashboards/*.json against Grafana's own published TypeScript types (`@grafana/schema`,
the version of the Grafana image deploy/compose.yaml pins), through the TypeScript
compiler: every field Grafana does not know, every enum value it does not have, every
required option missing is a `tsc` error, named here by dashboard and panel.

tests/ops/dashboard_ts.py writes the modules; tests/ops/grafana_types/ pins the packages
(package-lock.json). The first run installs them with `npm ci` (node and npm: Debian
`nodejs`, `npm`; `make setup` installs them as root). Without npm, or without the npm
registry on a first run, these tests skip, or fail when CI is set.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from tests.ops.dashboard_ts import PROJECT, SCHEMA, Module, module, plugins

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
COMPOSE = REPO / "deploy" / "compose.yaml"
TSC_ERROR = re.compile(r"^(?P<file>[^(\s]+)\((?P<line>\d+),\d+\): error (?P<msg>TS\d+: .*)$")


def _missing(what: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{what}; CI is set, so the Grafana type check cannot be skipped")
    pytest.skip(what)


def _grafana_version() -> str:
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    image: str = services["grafana"]["image"]
    return image.rpartition(":")[2]


def _pinned() -> dict[str, str]:
    package = json.loads((PROJECT / "package.json").read_text(encoding="utf-8"))
    pins: dict[str, str] = package["devDependencies"]
    return pins


def test_types_are_those_of_the_pinned_grafana() -> None:
    version = _grafana_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{COMPOSE}: pin an exact Grafana version"
    assert _pinned()["@grafana/schema"] == version
    lock = json.loads((PROJECT / "package-lock.json").read_text(encoding="utf-8"))
    assert lock["packages"]["node_modules/@grafana/schema"]["version"] == version


def _installed(name: str) -> str | None:
    try:
        meta = PROJECT / "node_modules" / name / "package.json"
        version: str = json.loads(meta.read_text(encoding="utf-8"))["version"]
    except (OSError, ValueError, KeyError):
        return None
    return version


@pytest.fixture(scope="module")
def tsc() -> str:
    """The pinned `tsc`, after `npm ci` when node_modules does not hold the pinned versions."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        _missing("node/npm are not on PATH (Debian: apt-get install nodejs npm)")
    if any(_installed(name) != version for name, version in _pinned().items()):
        argv = [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"]
        done = subprocess.run(
            argv, cwd=PROJECT, capture_output=True, text=True, timeout=600, check=False
        )
        if done.returncode != 0:
            _missing(
                f"`npm ci` in {PROJECT} failed (the npm registry is needed once): "
                f"{done.stderr.strip()[-500:]}"
            )
    return str(PROJECT / "node_modules" / "typescript" / "bin" / "tsc")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory inside the npm project (so that imports resolve), removed afterwards."""
    path = PROJECT / ".generated" / uuid.uuid4().hex
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _type_errors(tsc: str, workdir: Path, modules: dict[str, Module]) -> list[str]:
    """tsc's errors over the modules, each named by what it checked."""
    files = {}
    for name, mod in modules.items():
        path = workdir / f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}.ts"
        path.write_text(mod.text(), encoding="utf-8")
        files[path.name] = mod
    config = {"extends": "../../tsconfig.json", "files": sorted(files)}
    (workdir / "tsconfig.json").write_text(json.dumps(config), encoding="utf-8")
    node = shutil.which("node")
    assert node is not None
    done = subprocess.run(
        [node, tsc, "-p", str(workdir)], capture_output=True, text=True, timeout=300, check=False
    )
    errors, unparsed = [], []
    for line in done.stdout.splitlines():
        m = TSC_ERROR.match(line)
        if m:
            mod = files[Path(m["file"]).name]
            errors.append(f"{mod.describe(int(m['line']))}: {m['msg']}")
        elif line.strip() and not line.startswith(" "):
            unparsed.append(line)
    assert done.returncode == 0 or errors, done.stdout + done.stderr
    assert not unparsed, "\n".join(unparsed)
    return errors + [p for mod in modules.values() for p in mod.problems]


def test_dashboards_match_grafanas_published_types(tsc: str, workdir: Path) -> None:
    assert DASHBOARDS, "no dashboards/*.json"
    known = plugins()
    assert {"timeseries", "stat", "heatmap"} <= set(known), sorted(known)
    modules = {path.name: module(path, known) for path in DASHBOARDS}
    errors = _type_errors(tsc, workdir, modules)
    assert not errors, "\n".join(errors)


def _broken(doc: dict[str, Any], kind: str) -> tuple[dict[str, Any], str]:
    """A copy of `doc` with one panel of `kind` broken; the panel's title."""
    broken = copy.deepcopy(doc)
    stack = list(broken["panels"])
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        if panel.get("type") == kind:
            return broken, panel
    raise AssertionError(f"no {kind} panel")


BREAKAGES = {
    # name: (panel type, what to break, what the error must say)
    "unknown panel field": ("timeseries", lambda p: p.update(colour="red"), '"colour"'),
    "enum value Grafana lacks": (
        "stat",
        lambda p: p["options"].update(colorMode="rainbow"),
        '"rainbow"',
    ),
    "required option missing": ("stat", lambda p: p["options"].pop("textMode"), "textMode"),
    "unknown custom field option": (
        "timeseries",
        lambda p: p["fieldConfig"]["defaults"]["custom"].update(lineWidht=2),
        "lineWidht",
    ),
    "unknown heatmap option": ("heatmap", lambda p: p["options"].update(colour={}), '"colour"'),
}


def test_the_check_names_what_grafana_does_not_know(tsc: str, workdir: Path) -> None:
    known = plugins()
    path = next(p for p in DASHBOARDS if "overview" in p.name)
    doc = json.loads(path.read_text(encoding="utf-8"))
    modules, expected = {}, {}
    for name, (kind, breakage, says) in BREAKAGES.items():
        broken, panel = _broken(doc, kind)
        breakage(panel)
        target = workdir / f"{name}.json"
        target.write_text(json.dumps(broken), encoding="utf-8")
        modules[name] = module(target, known)
        expected[name] = (f"{kind} panel {panel['title']!r}", says)
    # A variable with a field of the interval variables (what the SDK used to add).
    broken = copy.deepcopy(doc)
    broken["templating"]["list"][1]["auto_min"] = "10s"
    (workdir / "variable.json").write_text(json.dumps(broken), encoding="utf-8")
    modules["variable"] = module(workdir / "variable.json", known)
    # A panel type Grafana 11 has no types for (the old `graph`).
    broken, panel = _broken(doc, "timeseries")
    panel["type"] = "graph"
    (workdir / "graph.json").write_text(json.dumps(broken), encoding="utf-8")
    modules["graph"] = module(workdir / "graph.json", known)

    errors = _type_errors(tsc, workdir, modules)
    text = "\n".join(errors)
    for name, (where, says) in expected.items():
        assert any(e.startswith(f"{name}.json: {where}") and says in e for e in errors), (
            f"{name}: {where} / {says} not in:\n{text}"
        )
    assert any(e.startswith("variable.json: the dashboard") and "auto_min" in e for e in errors)
    assert any("no types for panel type 'graph'" in e for e in errors), text
    assert SCHEMA.is_dir()
