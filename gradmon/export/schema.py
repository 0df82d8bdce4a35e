"""What /metrics holds: metric names, help texts, label names and histogram buckets.

The one source that the collector (which serves the families), the alert rules and the
dashboards (which query them) import, so a renamed metric or label cannot leave a rule or
a panel selecting nothing. docs/reference.md ("Metrics") is generated from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ACTIVATION_GAUGES",
    "ACTIVATION_MEAN",
    "ACTIVATION_NONFINITE",
    "ACTIVATION_RMS",
    "ACTIVATION_ZERO_RATIO",
    "AGENT_ERRORS",
    "AGENT_STAGES",
    "ANOMALIES",
    "COLLECTIONS",
    "COLLECT_DURATION",
    "DURATION_BUCKETS",
    "FAMILIES",
    "GLOBAL_NORM",
    "GLOBAL_NORM_BUCKETS",
    "GLOBAL_NORM_PER_STEP",
    "GLOBAL_SUM_SQUARES",
    "GRAD_ABS_MAX",
    "GRAD_NORM",
    "GRAD_RMS",
    "GRAD_STRUCTURALLY_ZERO",
    "GRAD_SUM_SQUARES",
    "GRAD_ZERO_RATIO",
    "INFO",
    "KIND",
    "LAST_COLLECTION",
    "LAYER",
    "LAYER_GAUGES",
    "LAYER_NONFINITE_STEPS",
    "LOSS_SCALE",
    "NAME",
    "NONFINITE_ORIGIN",
    "NONFINITE_STEPS",
    "PARAM_NORM",
    "PUSH_FAMILIES",
    "PUSH_INTERVAL",
    "RANK",
    "RUN_FINISHED",
    "RUN_ID",
    "SCALAR",
    "SKIPPED_STEPS",
    "STAGE",
    "STEP",
    "STEPS",
    "UPDATE_RATIO",
    "VERSION",
    "Family",
    "log_buckets",
]

# Stages of gradmon_agent_errors_total{stage}: every one is exported from 0.
AGENT_STAGES = ("hook", "collect", "publish", "scaler", "sink", "export", "callback", "push")

# Label names.
LAYER = "layer"  # a parameter, module or depth-group name; a module name on activations
KIND = "kind"  # an anomaly kind (gradmon.snapshot.ANOMALY_KINDS)
STAGE = "stage"  # one of AGENT_STAGES
NAME = "name"  # a scalar given to Monitor.log()
RANK = "rank"  # on every series, only under several ranks
VERSION = "version"
RUN_ID = "run_id"


def log_buckets(lo_exp: int, hi_exp: int, per_decade: int) -> tuple[float, ...]:
    """Upper bounds 10**lo_exp .. 10**hi_exp, `per_decade` per power of ten."""
    n = (hi_exp - lo_exp) * per_decade
    return tuple(float(f"{10 ** (lo_exp + i / per_decade):.3g}") for i in range(n + 1))


GLOBAL_NORM_BUCKETS = log_buckets(-8, 8, 2)
DURATION_BUCKETS = log_buckets(-5, 1, 3)


@dataclass(frozen=True)
class Family:
    """One metric family. `name` is what prometheus_client is given (a counter without
    its `_total`); PromQL selects `series` (and a histogram's `bucket`, `sum`, `count`).
    `attr`: the LayerStats/ActivationStats field a per-layer gauge shows."""

    name: str
    type: Literal["gauge", "counter", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    attr: str | None = None

    @property
    def series(self) -> str:
        return self.name + "_total" if self.type == "counter" else self.name

    @property
    def bucket(self) -> str:
        return self.name + "_bucket"

    @property
    def sum(self) -> str:
        return self.name + "_sum"

    @property
    def count(self) -> str:
        return self.name + "_count"


# Run-level families.
INFO = Family(
    "gradmon_info", "gauge", "Identity of the monitored run (value 1).", (VERSION, RUN_ID)
)
STEPS = Family("gradmon_steps", "counter", "Optimizer steps seen, skipped ones included.")
COLLECTIONS = Family("gradmon_collections", "counter", "Steps whose statistics were computed.")
NONFINITE_STEPS = Family(
    "gradmon_nonfinite_steps", "counter", "Collected steps with any NaN/Inf gradient entry."
)
SKIPPED_STEPS = Family(
    "gradmon_skipped_steps",
    "counter",
    "Optimizer steps skipped by the GradScaler for inf/NaN gradients.",
)
STEP = Family("gradmon_step", "gauge", "Training step of the latest snapshot.")
LAST_COLLECTION = Family(
    "gradmon_last_collection_timestamp_seconds", "gauge", "Wall time of the latest snapshot."
)
GLOBAL_NORM = Family(
    "gradmon_grad_global_norm",
    "gauge",
    "L2 norm over the finite entries of all monitored gradients.",
)
GLOBAL_SUM_SQUARES = Family(
    "gradmon_grad_global_sum_squares",
    "gauge",
    "This rank's share of the sum of squares over all monitored gradients (finite entries): "
    "each distinct shard counted on exactly one rank, so the sum over ranks is the squared "
    "global norm.",
)
LOSS_SCALE = Family("gradmon_loss_scale", "gauge", "GradScaler loss scale.")
GLOBAL_NORM_PER_STEP = Family(
    "gradmon_grad_global_norm_per_step",
    "histogram",
    "Global gradient norm observed at every collected step.",
)
COLLECT_DURATION = Family(
    "gradmon_collect_duration_seconds", "histogram", "Host time the agent spent per collection."
)
ANOMALIES = Family(
    "gradmon_anomalies",
    "counter",
    "Health events by layer and kind (vanishing, exploding, nonfinite, dead, spike).",
    (LAYER, KIND),
)
AGENT_ERRORS = Family(
    "gradmon_agent_errors", "counter", "Failures inside the agent; training went on.", (STAGE,)
)
SCALAR = Family("gradmon_scalar", "gauge", "Values given to Monitor.log().", (NAME,))

# Per-layer families (bounded by exporter.max_layers).
GRAD_NORM = Family(
    "gradmon_grad_norm",
    "gauge",
    "L2 norm of the layer's gradient (finite entries).",
    (LAYER,),
    "norm",
)
GRAD_RMS = Family(
    "gradmon_grad_rms", "gauge", "Gradient norm / sqrt(finite numel).", (LAYER,), "rms"
)
GRAD_ABS_MAX = Family(
    "gradmon_grad_abs_max",
    "gauge",
    "Largest absolute finite gradient entry.",
    (LAYER,),
    "abs_max",
)
GRAD_ZERO_RATIO = Family(
    "gradmon_grad_zero_ratio",
    "gauge",
    "Fraction of exactly-zero gradient entries.",
    (LAYER,),
    "zero_ratio",
)
GRAD_SUM_SQUARES = Family(
    "gradmon_grad_sum_squares",
    "gauge",
    "Sum of squares of the layer's gradient: an additive partial, each distinct shard "
    "exported by one rank, so the sum over ranks is the squared layer norm.",
    (LAYER,),
    "sum_squares",
)
PARAM_NORM = Family(
    "gradmon_param_norm", "gauge", "L2 norm of the parameter.", (LAYER,), "param_norm"
)
UPDATE_RATIO = Family(
    "gradmon_update_ratio",
    "gauge",
    "||dw||/||w|| of the layer at the last sampled optimizer step that measured it.",
    (LAYER,),
    "update_ratio",
)
LAYER_NONFINITE_STEPS = Family(
    "gradmon_layer_nonfinite_steps",
    "counter",
    "Collected steps where this layer's gradient had NaN/Inf entries.",
    (LAYER,),
)
NONFINITE_ORIGIN = Family(
    "gradmon_nonfinite_origin",
    "counter",
    "Collected steps whose NaN/Inf started at this layer (or module, with activations).",
    (LAYER,),
)
GRAD_STRUCTURALLY_ZERO = Family(
    "gradmon_grad_structurally_zero",
    "gauge",
    "1 for a layer whose gradient has been negligible since its first collection "
    "(structurally zero, e.g. a bias in front of BatchNorm): judged neither vanishing nor "
    "dead. Only such layers have a series.",
    (LAYER,),
)
LAYER_GAUGES = (GRAD_NORM, GRAD_RMS, GRAD_ABS_MAX, GRAD_ZERO_RATIO, GRAD_SUM_SQUARES, PARAM_NORM)

# Per-module forward statistics (opt-in collect.activations); `layer` holds a module name.
ACTIVATION_RMS = Family(
    "gradmon_activation_rms",
    "gauge",
    "RMS of the module's forward output (finite entries), over the forwards before the "
    "latest collected step.",
    (LAYER,),
    "rms",
)
ACTIVATION_MEAN = Family(
    "gradmon_activation_mean",
    "gauge",
    "Mean of the module's forward output (finite entries).",
    (LAYER,),
    "mean",
)
ACTIVATION_ZERO_RATIO = Family(
    "gradmon_activation_zero_ratio",
    "gauge",
    "Fraction of exactly-zero entries of the module's forward output (dead ReLUs).",
    (LAYER,),
    "zero_ratio",
)
ACTIVATION_NONFINITE = Family(
    "gradmon_activation_nonfinite",
    "counter",
    "Collected steps where this module's forward output had NaN/Inf entries.",
    (LAYER,),
)
ACTIVATION_GAUGES = (ACTIVATION_RMS, ACTIVATION_MEAN, ACTIVATION_ZERO_RATIO)

# How the run ended: 0 while it runs, 1 once Monitor.close() ran without an exception
# ending the run. Served in the final scrape (the exporter lingers for it) and pushed in the
# last push, so that GradmonTargetDown and GradmonPushStale tell a finished run from a dead one.
RUN_FINISHED = Family(
    "gradmon_run_finished",
    "gauge",
    "1 once the run ended cleanly (Monitor.close() without an exception), else 0.",
)

# Only in what exporter.push sends to a Pushgateway (gradmon/export/push.py), beside the
# families below: what the stale-push alert needs to tell a late push from a missing one.
PUSH_INTERVAL = Family(
    "gradmon_push_interval_seconds", "gauge", "exporter.push.interval_seconds of the pushing run."
)
PUSH_FAMILIES = (PUSH_INTERVAL,)

# Every family the agent can serve, in the order a scrape shows them.
FAMILIES = (
    INFO,
    STEPS,
    COLLECTIONS,
    NONFINITE_STEPS,
    SKIPPED_STEPS,
    STEP,
    LAST_COLLECTION,
    GLOBAL_NORM,
    GLOBAL_SUM_SQUARES,
    LOSS_SCALE,
    GLOBAL_NORM_PER_STEP,
    COLLECT_DURATION,
    ANOMALIES,
    AGENT_ERRORS,
    SCALAR,
    RUN_FINISHED,
    *LAYER_GAUGES,
    UPDATE_RATIO,
    LAYER_NONFINITE_STEPS,
    NONFINITE_ORIGIN,
    GRAD_STRUCTURALLY_ZERO,
    *ACTIVATION_GAUGES,
    ACTIVATION_NONFINITE,
)
