"""`Pushgateway`: a Prometheus Pushgateway process on 127.0.0.1, without persistence, that
can be killed and started again on the same port (tests of exporter.push)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
from pathlib import Path

from gradmon.tools.localstack.common import (
    LOOPBACK,
    OPENER,
    LocalStackError,
    Served,
    find_binary,
    free_port,
    tail,
    terminate,
)

__all__ = ["Pushgateway"]


class Pushgateway(Served):
    """`pushgateway` (Debian: prometheus-pushgateway) on 127.0.0.1:port (a free one)."""

    def __init__(
        self, binary: str | os.PathLike[str] | None = None, startup_timeout: float = 30.0
    ) -> None:
        self._binary = binary
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None

    @property
    def address(self) -> str:
        if self.port is None:
            raise LocalStackError("the Pushgateway is not started")
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Pushgateway:
        """Start it (again: on the port it had, so pushers find it where they left it)."""
        if self.running:
            return self
        binary = find_binary("pushgateway", self._binary)
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="gradmon-pushgateway-"))
        if self.port is None:
            self.port = free_port()
        log = self._workdir / "pushgateway.log"
        argv = [
            binary,
            f"--web.listen-address={self.address}",
            # No persistence: Debian's default keeps groups in /var/lib/prometheus across
            # restarts; a restart here starts empty, as a crashed one without a volume does.
            "--persistence.file=",
            "--log.level=warn",
        ]
        with log.open("ab") as out:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with OPENER.open(f"{self.url}/-/ready", timeout=1.0) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        terminate(self._proc)
        raise LocalStackError(f"pushgateway did not start; the end of {log}:\n{tail(log)}")

    def kill(self) -> None:
        """SIGKILL, as a crash would; its pushed groups are gone (no persistence)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc)
            self._proc = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self.port = None
