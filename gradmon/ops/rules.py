"""Prometheus alerting and recording rules, rendered from the agent's config.

One source, two formats: a plain Prometheus rules file (`prometheus`) and a Kubernetes
`PrometheusRule` (`k8s`). The thresholds are `Config.health`, the values the agent's own
health rules use, interpolated into every expression (the monitoring-mixin way); windows,
`for` durations and selectors are `RuleOptions` fields.

PromQL facts the expressions are built on:
- NaN compares false, so NaN/Inf is detected from counters, never from a gauge's value;
- gauges hold the latest snapshot only, so persistent conditions use gauges with `for`
  (they keep firing while the condition lasts), and a spike is judged against a median
  taken *before* the window that holds the spike (a lagged baseline the spike cannot
  inflate);
- every gradmon_* series of a run carries the run's target labels; ranks of one run are
  combined with `by (namespace, job)` (`RuleOptions.run_labels`);
- anomaly and NaN-origin series are born at their first count, which increase() misses:
  rule_parts.since() counts them, and alerts that concern layers fire once per run and
  name the layers in their description (rule_parts.top_layers()).
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any, Literal, get_args

import yaml

from gradmon.config import Config
from gradmon.errors import GradmonError
from gradmon.export import schema
from gradmon.export.schema import GLOBAL_NORM_BUCKETS
from gradmon.ops.recording_rules import FINISHED, recording_rules, target_labels
from gradmon.ops.rule_options import RUNBOOK_URL, RuleOptions
from gradmon.ops.rule_parts import LOOKBACK, since, top_layers
from gradmon.snapshot import GLOBAL_LAYER

__all__ = [
    "ALERT_NAMES",
    "FORMATS",
    "RUNBOOK_URL",
    "Format",
    "RuleOptions",
    "alert_rules",
    "groups",
    "recording_rules",
    "render",
]

Format = Literal["prometheus", "k8s"]
FORMATS: tuple[str, ...] = get_args(Format)


ALERT_NAMES = (
    "GradmonTargetDown",
    "GradmonTrainingStalled",
    "GradmonNonFiniteGradients",
    "GradmonExplodingGradients",
    "GradmonVanishingGradients",
    "GradmonGradNormSpike",
    "GradmonDeadLayer",
    "GradmonLossScaleCollapse",
    "GradmonPushStale",
)

# The widest ratio between neighbouring bounds of the global-norm histogram (half-decade
# buckets, so ~3.16), rounded up: histogram_quantile(1, ...) is the upper bound of the
# bucket that holds the largest observation, and dividing by this ratio gives a value
# that is never above that observation (a lower bound, so no false spike).
NORM_BUCKET_RATIO = math.ceil(1000 * max(b / a for a, b in pairwise(GLOBAL_NORM_BUCKETS))) / 1000


def _num(value: float, name: str) -> str:
    """A PromQL number literal that round-trips (repr: 1e-07, 1000.0)."""
    if not math.isfinite(value):
        raise GradmonError(f"{name}: {value!r} cannot go into an alert rule; use a finite number")
    return repr(float(value))


def alert_rules(config: Config, options: RuleOptions | None = None) -> list[dict[str, Any]]:
    """The alerts (docs/reference.md, "Alerts"), thresholds from `config.health`."""
    o = options or RuleOptions()
    h = config.health
    run = ", ".join(o.run_labels)
    up = f"up{{{o.job_selector}}}"
    exploding = _num(h.exploding_norm, "health.exploding_norm")
    vanishing_rms = _num(h.vanishing_rms, "health.vanishing_rms")
    vanishing_ratio = _num(h.vanishing_ratio, "health.vanishing_ratio")
    spike = _num(h.spike_factor, "health.spike_factor")
    floor = _num(o.loss_scale_floor, "RuleOptions.loss_scale_floor")
    drop = _num(2.0**o.loss_scale_max_halvings, "RuleOptions.loss_scale_max_halvings")
    width = _num(NORM_BUCKET_RATIO, "NORM_BUCKET_RATIO")
    nf = o.nonfinite_window
    skipping = o.loss_scale_skipping_window
    # The series the alerts select (export/schema.py names them).
    g, per_step = schema.GLOBAL_NORM.series, schema.GLOBAL_NORM_PER_STEP.bucket
    steps, scale = schema.STEPS.series, schema.LOSS_SCALE.series
    norm, rms, zeros = (
        schema.GRAD_NORM.series,
        schema.GRAD_RMS.series,
        schema.GRAD_ZERO_RATIO.series,
    )
    # Layers the agent found structurally zero (a bias in front of BatchNorm): it says so
    # once, and judges them neither vanishing nor dead; neither do these rules.
    structural = (
        f"unless on ({run}, layer)\n"
        f"max by ({run}, layer) ({schema.GRAD_STRUCTURALLY_ZERO.series}) == 1"
    )
    # The median of the global norm over a window that ended spike_baseline_offset ago,
    # used only once that whole window lies inside the run (the series existed in the
    # first spike_baseline_offset of it): early in a run the norm can grow many-fold from
    # its first values, which is no spike.
    baseline = (
        f"(\n"
        f"    quantile_over_time(0.5, {g}[{o.spike_baseline}] offset {o.spike_baseline_offset})"
        f" > 0\n"
        f"    and\n"
        f"    present_over_time({g}[{o.spike_baseline_offset}] offset {o.spike_baseline})\n"
        f"  )"
    )

    def alert(
        name: str,
        expr: str,
        for_: str,
        severity: str,
        summary: str,
        description: str,
    ) -> dict[str, Any]:
        return {
            "alert": name,
            "expr": expr,
            "for": for_,
            "labels": {"severity": severity},
            "annotations": {
                "summary": summary,
                "description": description,
                "runbook_url": f"{o.runbook_url}#{name.lower()}",
            },
        }

    value = '{{ $value | printf "%.4g" }}'
    spiking = f'kind=~"spike|exploding", layer!="{GLOBAL_LAYER}"'
    layer_spikes = f"{schema.ANOMALIES.series}{{{spiking}}}"

    def spiked_layers(found: str, after: str) -> str:
        return top_layers(
            o.run_labels,
            schema.ANOMALIES.series,
            spiking,
            o.spike_window,
            found=found,
            after=after,
            count=("collection", "collections"),
        )

    return [
        alert(
            "GradmonTargetDown",
            # A run that finished cleanly said so in its final scrape (FINISHED): its
            # target is down because it is done.
            f"{up} == 0\nunless on ({target_labels(o)})\n{FINISHED} == 1",
            o.target_down_for,
            "warning",
            "gradmon agent {{ $labels.instance }} is down",
            "Prometheus has failed to scrape the gradmon agent at {{ $labels.instance }} "
            f"(job {{{{ $labels.job }}}}) for {o.target_down_for}, and its last scrape did "
            "not say that the run had finished: the training process crashed, was killed "
            "or hangs, the metrics port is unreachable, or the scrape went over "
            "sample_limit. A run that ended cleanly (Monitor.close()) does not page; "
            "remove finished targets from the scrape config when convenient.",
        ),
        alert(
            "GradmonTrainingStalled",
            f"max by ({run}) (increase({steps}[{o.stalled_window}])) == 0\n"
            f"and on ({run})\n"
            f"max by ({run}) ({up}) == 1",
            o.stalled_for,
            "warning",
            "Training {{ $labels.job }} makes no progress",
            "The gradmon agent of {{ $labels.job }} is up but has seen no optimizer step "
            f"({steps}) for {o.stalled_window}: the job may hang in a collective, "
            "the data loader or I/O, or run a long evaluation or checkpoint.",
        ),
        alert(
            "GradmonNonFiniteGradients",
            # Skipping a step with inf/NaN grads is what a GradScaler is for: occasional
            # skips are healthy AMP, and a scaler that keeps skipping is
            # GradmonLossScaleCollapse. Without AMP a NaN/Inf gradient is never normal,
            # whether the loop skipped the step (mon.collect(skipped=True)) or not. So:
            # non-finite steps, unless the run has a scaler in play (a gradmon_loss_scale
            # other than exactly 1, the value of a disabled GradScaler(enabled=False))
            # and steps were skipped in the same window. With a scaler and no skip, the
            # non-finite steps reached the optimizer.
            f"max by ({run}) (increase({schema.NONFINITE_STEPS.series}[{nf}])) > 0\n"
            f"unless on ({run})\n"
            f"(\n"
            f"  max by ({run}) (increase({schema.SKIPPED_STEPS.series}[{nf}])) > 0\n"
            f"  and on ({run})\n"
            f"  max by ({run}) ({scale}) != 1\n"
            f")",
            o.nonfinite_for,
            "critical",
            "NaN/Inf gradients in {{ $labels.job }}",
            '{{ $value | printf "%.0f" }} collected steps of {{ $labels.job }} in the last '
            f"{nf} had NaN/Inf gradient entries that no GradScaler absorbed: the run has "
            "no active scaler (without AMP, NaN/Inf is never normal, skipped or not), or "
            "its scaler skipped no step, so they reached the optimizer. "
            + top_layers(
                o.run_labels,
                schema.NONFINITE_ORIGIN.series,
                "",
                nf,
                # Snapshot.nonfinite_origin, counted per step: where to look first.
                found="NaN/Inf started in ",
                after=" (gradmon_nonfinite_origin_total); ",
                count=("step", "steps"),
            )
            + "gradmon_layer_nonfinite_steps_total names every layer it reached.",
        ),
        alert(
            "GradmonExplodingGradients",
            f"max by ({run}, layer) (max_over_time({norm}[{o.exploding_window}])) > {exploding}",
            o.exploding_for,
            "critical",
            "Exploding gradient in {{ $labels.layer }} ({{ $labels.job }})",
            "The gradient L2 norm of layer {{ $labels.layer }} in {{ $labels.job }} has "
            f"stayed above health.exploding_norm = {exploding} for {o.exploding_for} "
            f"(largest in the last {o.exploding_window}: {value}).",
        ),
        alert(
            "GradmonVanishingGradients",
            f"(\n"
            f"  max by ({run}, layer) ({rms}) < {vanishing_rms}\n"
            f"  or\n"
            f"  max by ({run}, layer) ({rms})\n"
            f"    < on ({run}) group_left ()\n"
            f"  ({vanishing_ratio} * quantile by ({run}) (0.5, {rms}))\n"
            f")\n"
            f"unless on ({run}, layer)\n"
            f"min by ({run}, layer) ({zeros}) == 1\n"
            f"{structural}",
            o.vanishing_for,
            "warning",
            "Vanishing gradient in {{ $labels.layer }} ({{ $labels.job }})",
            "The gradient rms of layer {{ $labels.layer }} in {{ $labels.job }} has been "
            f"{value}, below health.vanishing_rms = {vanishing_rms} or below "
            f"health.vanishing_ratio = {vanishing_ratio} times the median layer rms, "
            f"for {o.vanishing_for}.",
        ),
        alert(
            "GradmonGradNormSpike",
            # scope="global": the global norm against its lagged median.
            f"label_replace(\n"
            f"  max by ({run}) (\n"
            f"    max_over_time({g}[{o.spike_window}])\n"
            f"    / {baseline}\n"
            f"  ) > {spike}\n"
            f"  or\n"
            # Steps between scrapes: the histogram sees every collected step.
            f"  max by ({run}) (\n"
            f"    histogram_quantile(1, rate({per_step}[{o.spike_window}])) / {width}\n"
            f"    / {baseline}\n"
            f"  ) > {spike},\n"
            f'  "scope", "global", "", ""\n'
            f")\n"
            f"or\n"
            # scope="layer": the layers the agent saw jump against their own history (a
            # residual branch can jump 1000x with the global norm flat). One alert per
            # run, valued the number of layers: a model-wide jump is no page per layer.
            f"label_replace(\n"
            f"  count by ({run}) (\n"
            f"    sum by ({run}, layer) {since(layer_spikes, o.spike_window, LOOKBACK)} > 0\n"
            f"  ),\n"
            f'  "scope", "layer", "", ""\n'
            f")",
            o.spike_for,
            "warning",
            '{{ if eq $labels.scope "layer" }}Gradient spike in a layer of {{ $labels.job }}'
            "{{ else }}Gradient norm spike in {{ $labels.job }}{{ end }}",
            '{{ if eq $labels.scope "layer" }}'
            '{{ $value | printf "%.0f" }} layer(s) of {{ $labels.job }} jumped against their '
            f"own recent history in the last {o.spike_window} (the agent's per-layer rule: "
            f"health.spike_factor = {spike} times the layer's median norm, widened by its "
            "spread): "
            + spiked_layers("", ". ")
            + "One layer alone is that layer (a residual branch, a custom backward, one "
            "parameter group); many at once is a model-wide cause (learning rate, a bad "
            "batch), the first named jumped at the most collections."
            "{{ else }}The global gradient norm of {{ $labels.job }} reached "
            f"{value} times its median of the {o.spike_baseline} before "
            f"(health.spike_factor = {spike})."
            + spiked_layers(" Layers that jumped against their own history: ", ".")
            + "{{ end }}",
        ),
        alert(
            "GradmonDeadLayer",
            f"min by ({run}, layer) ({zeros}) == 1\n{structural}",
            o.dead_for,
            "warning",
            "Dead layer {{ $labels.layer }} ({{ $labels.job }})",
            "Every gradient entry of layer {{ $labels.layer }} in {{ $labels.job }} has "
            f"been exactly zero, or the layer got no gradient, for {o.dead_for}.",
        ),
        alert(
            "GradmonLossScaleCollapse",
            f"min by ({run}) (\n"
            f"  {scale} < {floor}\n"
            f"  or\n"
            f"  {scale} <= max_over_time({scale}[{o.loss_scale_window}])"
            f" / {drop}\n"
            f")\n"
            f"or on ({run})\n"
            # A collapse lasts while the scale stays at its lowest and steps keep being
            # skipped, also once the maximum has left the window: a scale pinned at a floor
            # (DeepSpeed's min_loss_scale) does not halve any more. Only a collapse that
            # fired goes on (its own ALERTS series), so a disabled GradScaler (1.0) under a
            # loop that skips NaN steps is never one.
            f"(\n"
            f"  min by ({run}) ({scale} <= min_over_time({scale}[{skipping}]))\n"
            f"  and on ({run})\n"
            f"  max by ({run}) (increase({schema.SKIPPED_STEPS.series}[{skipping}])) > 0\n"
            f"  and on ({run})\n"
            f'  ALERTS{{alertname="GradmonLossScaleCollapse", alertstate="firing"}}\n'
            f")",
            o.loss_scale_for,
            "critical",
            "Loss scale collapsed in {{ $labels.job }}",
            f"The GradScaler loss scale of {{{{ $labels.job }}}} is {value}: below {floor}, "
            f"or {o.loss_scale_max_halvings}+ net halvings below its maximum of the last "
            f"{o.loss_scale_window}, or it collapsed and has stayed at its lowest while "
            f"steps kept being skipped (in the last {skipping}; a scale pinned at a floor). "
            "Steps are being skipped for inf/NaN gradients.",
        ),
        alert(
            "GradmonPushStale",
            # exporter.push: the Pushgateway keeps a dead run's last push for ever, and its
            # push_time_seconds stops; a run that ended cleanly said so in its last push.
            f"(time() - push_time_seconds{{{o.job_selector}}})\n"
            f"  > {o.push_stale_intervals} * {schema.PUSH_INTERVAL.series}\n"
            f"unless\n"
            f"{schema.RUN_FINISHED.series} == 1",
            o.push_stale_for,
            "warning",
            "{{ $labels.job }} on {{ $labels.instance }} stopped pushing",
            "The gradmon agent of {{ $labels.job }} on {{ $labels.instance }} last pushed to "
            "the Pushgateway {{ $value | humanizeDuration }} ago, more than "
            f"{o.push_stale_intervals} of its push intervals, and its last push did not say "
            "that the run finished: the job was killed, preempted or ran out of memory, "
            "hangs, or cannot reach the Pushgateway. Delete its group from the Pushgateway "
            "once handled.",
        ),
    ]


def groups(config: Config, options: RuleOptions | None = None) -> list[dict[str, Any]]:
    """The rule groups, as the `groups:` of a rules file / a PrometheusRule's spec."""
    o = options or RuleOptions()
    return [
        {"name": "gradmon.rules", "rules": recording_rules(o)},
        {"name": "gradmon.alerts", "rules": alert_rules(config, o)},
    ]


class _Dumper(yaml.SafeDumper):
    """SafeDumper with multi-line strings as `|` blocks and indented sequences."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def _dump(data: Any) -> str:
    # Insertion order (sort_keys=False) and no line folding: byte-stable output.
    text: str = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 30)
    return text


def render(
    config: Config, fmt: Format = "prometheus", *, options: RuleOptions | None = None
) -> str:
    """The rules as YAML text: a Prometheus rules file or a Kubernetes PrometheusRule."""
    if fmt not in FORMATS:
        raise GradmonError(f"rules format {fmt!r} is not one of {', '.join(FORMATS)}")
    o = options or RuleOptions()
    h = config.health
    header = (
        "# Generated by gradmon/rules.py: do not edit by hand. Regenerate with\n"
        f"#   gradmon rules --format {fmt} [--config FILE] --output PATH\n"
        f"# health: vanishing_rms={h.vanishing_rms!r} vanishing_ratio={h.vanishing_ratio!r} "
        f"exploding_norm={h.exploding_norm!r} spike_factor={h.spike_factor!r}\n"
    )
    body: dict[str, Any] = {"groups": groups(config, o)}
    if fmt == "k8s":
        body = {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": o.k8s_name, "labels": dict(o.k8s_labels)},
            "spec": body,
        }
    return header + _dump(body)
