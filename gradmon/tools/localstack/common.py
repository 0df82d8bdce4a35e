"""What the local stack's parts share: loopback addresses, free ports, HTTP without
proxies, finding the binaries, stopping processes, start()/stop() as a context manager."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from gradmon.errors import GradmonError

if TYPE_CHECKING:
    from typing import Self

LOOPBACK = "127.0.0.1"

# binary -> (names to look for on PATH, Debian/Ubuntu package). Debian installs
# Alertmanager as `prometheus-alertmanager`; upstream tarballs call it `alertmanager`.
_BINARIES: dict[str, tuple[tuple[str, ...], str]] = {
    "prometheus": (("prometheus",), "prometheus"),
    "alertmanager": (("alertmanager", "prometheus-alertmanager"), "prometheus-alertmanager"),
    "pushgateway": (("pushgateway", "prometheus-pushgateway"), "prometheus-pushgateway"),
}

STOP_TIMEOUT = 10.0  # seconds from SIGTERM to SIGKILL
HTTP_TIMEOUT = 5.0
# Never through a proxy from the environment: everything here is on loopback.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LocalStackError(GradmonError):
    """The local Prometheus/Alertmanager could not be started or asked."""


class MissingBinaryError(LocalStackError):
    """A binary the local stack needs is not on PATH."""

    def __init__(self, binary: str, names: Sequence[str], package: str) -> None:
        self.binary = binary
        self.package = package
        looked = " or ".join(f"`{n}`" for n in names)
        super().__init__(
            f"{binary} is not installed: no {looked} on PATH. Install it (Debian/Ubuntu: "
            f"`apt-get install {package}`)"
        )


def find_binary(binary: str, path: str | os.PathLike[str] | None = None) -> str:
    """The path of `prometheus`, `alertmanager` or `pushgateway`; MissingBinaryError names
    the package."""
    if binary not in _BINARIES:
        raise LocalStackError(f"unknown binary {binary!r}; one of {', '.join(_BINARIES)}")
    names, package = _BINARIES[binary]
    if path is not None:
        found = shutil.which(os.fspath(path))
        if found is None:
            raise LocalStackError(f"{binary}_bin={os.fspath(path)!r} is not an executable")
        return found
    for name in names:
        found = shutil.which(name)
        if found is not None:
            return found
    raise MissingBinaryError(binary, names, package)


@dataclass(frozen=True)
class Target:
    """A scrape target: `host:port` of a gradmon agent, its job label and extra labels."""

    address: str
    job: str = "gradmon"
    labels: Mapping[str, str] = field(default_factory=dict)

    def group(self) -> dict[str, Any]:
        """The file_sd target group. Target-group labels win over the scrape job's name."""
        return {"targets": [self.address], "labels": {**self.labels, "job": self.job}}


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def duration(value: float) -> str:
    """Seconds as a Prometheus duration (whole milliseconds)."""
    if not (math.isfinite(value) and value > 0):
        raise LocalStackError(f"a duration must be a positive number of seconds, not {value!r}")
    ms = max(1, round(value * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def http_json(
    url: str,
    params: Mapping[str, str] | None = None,
    *,
    data: bytes | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> Any:
    """GET (or POST `data`) a loopback URL and decode its JSON (None for an empty body);
    errors name the URL (without its query) and what failed."""
    full = f"{url}?{urllib.parse.urlencode(params)}" if params else url
    request = urllib.request.Request(full, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with OPENER.open(request, timeout=timeout) as response:
            text = response.read().decode("utf-8")
            return json.loads(text) if text.strip() else None
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", errors="replace")
        try:
            detail = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            detail = body
        raise LocalStackError(f"{url}: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LocalStackError(f"{url}: {exc}") from exc


def terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


class Served:
    """start() and stop() as a context manager: `with X(...) as x:` starts and stops."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
