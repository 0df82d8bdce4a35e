"""Pieces the alert rules (gradmon/ops/rules.py) and dashboards share: what a counter
added in a window when its series may be born inside it, and an annotation that names the
layers of the alert's run.

- The agent creates an anomaly or NaN-origin series (`gradmon_anomalies_total{layer,kind}`,
  `gradmon_nonfinite_origin_total{layer}`) at its first count, so the series starts at 1:
  `increase()` only sees changes between samples and misses that first count (a one-off
  event would never show). `since()` compares with the series' value before the window
  instead, and counts a series that had none whole.
- An alert per run (not one per layer: a model-wide event must not page once per layer)
  names its layers in the description: the annotation runs a query for the alert's own
  run (its `run_labels`, filled in from `$labels`), and lists the top layers. The text
  changes without changing the alert's labels, so naming a different layer later neither
  resolves the alert nor restarts its `for`.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["LOOKBACK", "since", "top_layers"]

# How far before a window the rules look for a counter's earlier value: a gap in
# monitoring (Prometheus down, a scrape failing) shorter than this does not make the
# agent's old anomaly series look new.
LOOKBACK = "1h"


def since(series: str, window: str, lookback: str | None = None) -> str:
    """Per series, what the counter `series` (a selector) added over `window`: its value
    less its value before the window (the last sample at most `lookback` before the
    window starts, so that a gap in monitoring is not taken for a new series; None: the
    query's own lookback, 5m), or its whole value where it had none (born in the window)
    or a smaller one (the process restarted: its counters began anew). Unchanged series
    are left out."""
    before = (
        f"last_over_time({series}[{lookback}] offset {window})"
        if lookback
        else f"{series} offset {window}"
    )
    return f"(({series} - {before}) > 0 or {series} < {before} or {series} unless {before})"


def top_layers(
    run_labels: Sequence[str],
    counter: str,
    matchers: str,
    window: str,
    *,
    found: str,
    after: str,
    otherwise: str = "",
    count: tuple[str, str] = ("", ""),
    limit: int = 3,
    lookback: str | None = LOOKBACK,
) -> str:
    """Alert template text: `found`, then up to `limit` layers of the alert's run with the
    most `counter` added in `window` (largest first, each with its count and `count`'s
    singular or plural), then `after`; `otherwise` when none did. `matchers`: more label
    matchers (PromQL)."""
    # Go's fmt: %[n]q is the n-th argument, quoted as PromQL's strings are (Go syntax).
    run = [f"{label}=%[{i}]q" for i, label in enumerate(run_labels, 1)]
    selector = f"{counter}{{{', '.join([*run, matchers] if matchers else run)}}}"
    added = since(selector, window, lookback)
    query = f"sort_desc(topk({limit}, sum by (layer) {added} > 0))"
    if "`" in query:
        raise ValueError(f"a backquote cannot go into a template's raw string: {query}")
    args = " ".join(f"$labels.{label}" for label in run_labels)
    one, many = count
    unit = f" {{{{ if eq $s.Value 1.0 }}}}{one}{{{{ else }}}}{many}{{{{ end }}}}" if one else ""
    return (
        f"{{{{ with printf `{query}` {args} | query }}}}{found}"
        "{{ range $i, $s := . }}{{ if $i }}, {{ end }}{{ $s.Labels.layer }} "
        f'({{{{ $s.Value | printf "%.0f" }}}}{unit}){{{{ end }}}}'
        f"{after}{{{{ else }}}}{otherwise}{{{{ end }}}}"
    )
