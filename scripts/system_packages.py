#!/usr/bin/env python3
"""The system programs the test suite and `gradmon demo --with-prometheus` use, and the
Debian/Ubuntu packages that provide them; `make setup` runs this before the pip install.

    python3 scripts/system_packages.py            # install what is missing, when it can
    python3 scripts/system_packages.py --check    # only say what is missing

Each program is looked for on PATH. The packages of the missing ones are installed with
`apt-get install` when this runs as root on a machine with apt-get; otherwise (or with
--check) it prints the exact command to run and exits 0, and the tests that need them
skip, each naming what it lacks (`make test` lists the skips with their reasons). With CI
set, a program still missing at the end is an error (exit 1): CI runs every test.

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["NEEDS", "Need", "Plan", "main", "plan"]


@dataclass(frozen=True)
class Need:
    """A program (any of `names` on PATH will do), its Debian package, who uses it."""

    names: tuple[str, ...]
    package: str
    used_by: str


NEEDS: tuple[Need, ...] = (
    Need(
        ("prometheus",),
        "prometheus",
        "end-to-end tests (tests/tools/test_e2e_prometheus.py), dashboard queries, "
        "gradmon demo --with-prometheus",
    ),
    Need(("promtool",), "prometheus", "alert rule unit tests (promtool test rules)"),
    # Debian installs Alertmanager as `prometheus-alertmanager`; upstream calls it
    # `alertmanager`.
    Need(
        ("alertmanager", "prometheus-alertmanager"),
        "prometheus-alertmanager",
        "end-to-end alert delivery, gradmon demo --with-prometheus",
    ),
    Need(("amtool",), "prometheus-alertmanager", "Alertmanager config checks"),
    Need(("kubectl",), "kubernetes-client", "deploy/k8s rendering (kubectl kustomize)"),
    Need(("openssl",), "openssl", "TLS and client-certificate tests"),
    # tests/ops/test_dashboard_types.py: dashboards/*.json against @grafana/schema with tsc
    # (npm ci in tests/ops/grafana_types on its first run).
    Need(("node",), "nodejs", "dashboards checked against Grafana's published types (tsc)"),
    Need(("npm",), "npm", "installs @grafana/schema and typescript for that check"),
    # Debian installs it as `prometheus-pushgateway`; upstream calls it `pushgateway`.
    Need(
        ("pushgateway", "prometheus-pushgateway"),
        "prometheus-pushgateway",
        "exporter.push end to end (tests/test_push.py)",
    ),
)

APT_INSTALL = ("apt-get", "install", "-y", "-qq", "--no-install-recommends")


@dataclass(frozen=True)
class Plan:
    """What is missing, and what to do about it."""

    missing: tuple[Need, ...]
    packages: tuple[str, ...]  # in NEEDS order, each once
    is_root: bool
    can_install: bool  # root and apt-get: install them now

    @property
    def command(self) -> str:
        """The exact command a user runs (with sudo unless root)."""
        prefix = "" if self.is_root else "sudo "
        return f"{prefix}{' '.join(APT_INSTALL[:3])} --no-install-recommends " + " ".join(
            self.packages
        )


def plan(
    which: Callable[[str], str | None] = shutil.which,
    is_root: bool | None = None,
    needs: Sequence[Need] = NEEDS,
) -> Plan:
    """The missing programs and their packages; installable when root with apt-get."""
    missing = tuple(n for n in needs if not any(which(name) for name in n.names))
    packages = tuple(dict.fromkeys(n.package for n in missing))
    if is_root is None:
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    return Plan(missing, packages, is_root, bool(is_root and which("apt-get")))


def _report(p: Plan) -> str:
    lines = ["system packages: missing"]
    for need in p.missing:
        lines.append(f"  {' or '.join(need.names)} ({need.package}): {need.used_by}")
    lines.append(f"install them with:\n  {p.command}")
    lines.append(
        "(other systems: the upstream release archives of Prometheus and Alertmanager, "
        "kubectl, openssl and Node.js, on PATH)\n"
        "until then the tests that need them skip, each naming what it lacks "
        "(listed under 'short test summary info')"
    )
    return "\n".join(lines)


def _install(p: Plan) -> bool:
    """apt-get update + install; False (after saying why) when apt-get fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"system packages: installing {' '.join(p.packages)} (apt-get, as root)", flush=True)
    for argv in (["apt-get", "update", "-qq"], [*APT_INSTALL, *p.packages]):
        done = subprocess.run(argv, env=env, check=False, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            print(f"system packages: `{' '.join(argv)}` failed ({done.returncode})", flush=True)
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="say what is missing, install nothing")
    args = parser.parse_args(argv)
    p = plan()
    if not p.missing:
        print("system packages: all present", flush=True)
        return 0
    if p.can_install and not args.check and _install(p):
        p = plan()
        if not p.missing:
            return 0
    print(_report(p), file=sys.stderr, flush=True)
    if os.environ.get("CI"):
        print("CI is set: every test must run, so this is an error", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
