"""`gradmon bench` runs end to end (a smoke test: speed is reported, never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from gradmon.tools.bench import format_result, run_bench
from gradmon.tools.bench_peers import format_peers, run_peers


def test_bench_reports_ratios() -> None:
    result = run_bench(steps=1, warmup=0, stats_reps=2)
    assert result.tensors == 75 and result.params == 5_251_560
    assert result.step_overhead > 0 and result.stats_over_foreach_norm > 0
    assert "ratio" in format_result(result)


def test_peers_are_all_listed() -> None:
    results = run_peers(steps=1, warmup=0)
    names = [r.name for r in results]
    assert names[0] == "no monitoring" and results[0].ratio == 1.0
    assert any(n.startswith("gradmon") for n in names)
    assert any("wandb" in n for n in names)  # measured, or listed as not installed
    assert all(r.ratio is None or r.ratio > 0 for r in results)
    # The dev extra installs every peer, so in CI each one is measured, none only listed.
    if os.environ.get("CI"):
        assert all(r.ratio is not None for r in results), format_peers(results)
    assert "no monitoring" in format_peers(results)


def _run_script(name: str, *args: str) -> dict[str, Any]:
    """bench/<name> as a user runs it, with tiny sizes: it must not rot."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(root / "bench" / name), *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_load_bench_smoke() -> None:
    r = _run_script("load.py", "--layers", "30", "--scrapers", "2", "--rounds", "1", "--steps", "3")
    assert r["failed_scrapes"] == 0 and r["agent_errors"] == 0 and r["scrapes"] > 0
    assert r["scrape_ms"]["p50"] > 0 and r["scraped_over_baseline"] > 0
    assert r["exposition_bytes"] > 0


def test_soak_bench_smoke() -> None:
    r = _run_script("soak.py", "--steps", "200", "--sample-every", "50", "--scrape-every", "20")
    assert r["failed_scrapes"] == 0 and r["agent_errors"] == 0 and r["scrapes"] == 10
    assert len(r["samples"]) == 4 and "rss_growth_mib" in r  # growth is judged in real runs
