"""`gradmon bench` runs end to end (a smoke test: speed is reported, never asserted)."""

from __future__ import annotations

import os

from gradmon.bench import format_result, run_bench
from gradmon.bench_peers import format_peers, run_peers


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
