"""bench/host_cost.py runs end to end on a small chain (its numbers are not judged here:
speed lives in the benchmark, not in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("design", [[], ["--together"]])
def test_host_cost_runs_and_reports_every_repeat(design: list[str]) -> None:
    """In sets against their own untouched copies (the default) and all in one set."""
    args = ["--sizes", "8", "--rounds", "10", "--warmup", "1", "--repeats", "2", "--json"]
    arms = ["--arms", "gradmon", "gradmon k=10", "not collected", "foreach_norm"]
    out = subprocess.run(
        [sys.executable, "bench/host_cost.py", *args, *arms, *design],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    (row,) = json.loads(out.stdout)
    assert row["tensors"] == 8 and row["none_ms"] > 0
    want = {"gradmon", "gradmon own time", "gradmon k=10", "not collected", "foreach_norm"}
    assert set(row["added_us_per_tensor"]) == want
    assert row["added_us_per_tensor"]["gradmon own time"] > 0  # read off gradmon's registry
    assert len(row["repeats"]) == 2
    for arm, median in row["added_us_per_tensor"].items():
        values = sorted(r[arm] for r in row["repeats"])
        assert values[0] <= median <= values[-1]
