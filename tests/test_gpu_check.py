"""bench/gpu_check.sh, the one command a lent GPU machine runs, still resolves on this
checkout (imports, GPU test collection, the bench CLI) after files move."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_resolves_every_stage() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu_check --dry-run: ok" in done.stdout
