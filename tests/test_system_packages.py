"""scripts/system_packages.py, what `make setup` runs first: which programs are missing,
which Debian packages provide them, install (root + apt-get) or say the exact command."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "system_packages.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("system_packages", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _which(present: set[str]):  # type: ignore[no-untyped-def]
    return lambda name: f"/usr/bin/{name}" if name in present else None


def test_every_program_the_tests_look_for_is_listed() -> None:
    names = {n for need in _module().NEEDS for n in need.names}
    assert {"prometheus", "promtool", "alertmanager", "amtool", "kubectl", "openssl"} <= names
    assert {"node", "npm"} <= names


def test_missing_programs_give_their_packages_once_in_order() -> None:
    sp = _module()
    present = {"kubectl", "openssl", "node", "npm", "prometheus-pushgateway", "apt-get"}
    plan = sp.plan(_which(present), is_root=False)
    assert plan.packages == ("prometheus", "prometheus-alertmanager")
    assert not plan.can_install
    assert plan.command == (
        "sudo apt-get install -y --no-install-recommends prometheus prometheus-alertmanager"
    )
    # Debian's binary name for Alertmanager counts.
    debian = {"prometheus", "promtool", "prometheus-alertmanager", "amtool", "kubectl", "openssl"}
    debian |= {"node", "npm", "prometheus-pushgateway"}
    assert sp.plan(_which(debian), is_root=False).missing == ()


@pytest.mark.parametrize(("root", "apt", "installs"), [(True, True, True), (True, False, False)])
def test_installs_only_as_root_with_apt(root: bool, apt: bool, installs: bool) -> None:
    present = {"apt-get"} if apt else set()
    plan = _module().plan(_which(present), is_root=root)
    assert plan.can_install is installs
    assert plan.command.startswith("apt-get install")  # root: no sudo


def test_check_prints_the_command_and_ci_makes_it_an_error(tmp_path: Path) -> None:
    # An empty PATH: nothing is found, and --check installs nothing whoever runs it.
    argv = [sys.executable, str(SCRIPT), "--check"]
    done = subprocess.run(argv, env={"PATH": str(tmp_path)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager" in (
        done.stderr
    )
    ci = subprocess.run(
        argv, env={"PATH": str(tmp_path), "CI": "1"}, capture_output=True, text=True
    )
    assert ci.returncode == 1 and "CI is set" in ci.stderr
