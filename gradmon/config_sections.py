"""The sections of the configuration: one pydantic model per section (collect,
exporter and its TLS/auth/push, health, tensorboard, record), with their defaults, bounds
and descriptions. The whole `Config` and how it is loaded are in gradmon/config.py."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    # extra="forbid" makes every unknown key an error naming the key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from exc
    return value


class CollectConfig(Section):
    """What is measured, how often, and with which kernel."""

    every_n_steps: int = Field(1, ge=1, description="statistics on every n-th optimizer step")
    include: str | None = Field(None, description="regex on layer names; null = all")
    exclude: str | None = Field(None, description="regex on layer names to leave out")
    granularity: Literal["parameter", "module", "depth"] = Field(
        "parameter",
        description="one series per parameter, per module, or per module-path prefix "
        "of collect.depth components (`encoder.layers.3`)",
    )
    depth: int = Field(2, ge=1, description="module-path components kept when granularity is depth")
    backend: Literal["auto", "torch", "cpu", "triton"] = Field(
        "auto",
        description="statistics kernel: auto (the C kernel for CPU grads, Triton for CUDA grads "
        "when it imports, else torch), or one of them; a backend that cannot run is an error "
        "naming this key",
    )
    update_ratio_every: int = Field(
        0,
        ge=0,
        description="gradmon_update_ratio (|dw|/|w|) on every n-th collection at an "
        "optimizer step; 0 = off",
    )
    update_ratio_max_bytes: int = Field(
        256 << 20,
        gt=0,
        description="device memory per device for the copy of the old weights; layers past "
        "it are measured round-robin over successive samples",
    )
    activations: bool = Field(
        False,
        description="also record each module's forward output (rms, mean, zero ratio, "
        "NaN/Inf counts) in the forwards before a collected step; "
        "see gradmon/agent/features/activations.py",
    )
    activations_include: str | None = Field(
        None,
        description="regex searched in module names (`encoder.layers.0.linear1`, `(root)` for "
        "the model itself); null = every leaf module (one without children). When set, "
        "containers match too, e.g. `layers\\.\\d+$` for whole blocks. Only modules whose "
        "output is (or starts with) a floating-point tensor are ever recorded",
    )
    activations_exclude: str | None = Field(
        None, description="regex on module names to leave out of the activation statistics"
    )

    _regex = field_validator("include", "exclude", "activations_include", "activations_exclude")(
        _check_regex
    )


class TLSConfig(Section):
    """HTTPS for /metrics (SECURITY.md)."""

    certfile: str | None = Field(
        None, description="PEM certificate (chain) of the server; set with keyfile for HTTPS"
    )
    keyfile: str | None = Field(None, description="PEM private key of certfile")
    client_cafile: str | None = Field(
        None,
        description="mutual TLS: only clients with a certificate signed by this CA are served",
    )


class BasicAuthConfig(Section):
    """HTTP basic auth for /metrics (SECURITY.md)."""

    username: str | None = Field(
        None,
        description="the user name (sent by scrapers of /metrics; by the agent to the "
        "Pushgateway under exporter.push); null = off",
    )
    password_file: str | None = Field(
        None, description="a file holding the password (one line), read once at attach()"
    )


_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class PushTLSConfig(Section):
    """HTTPS to the Pushgateway (the client side of exporter.tls)."""

    cafile: str | None = Field(
        None,
        description="PEM CA bundle that signed the Pushgateway's certificate; null = the system's",
    )
    certfile: str | None = Field(
        None, description="mutual TLS: the client certificate shown to the Pushgateway"
    )
    keyfile: str | None = Field(None, description="PEM private key of certfile")


class PushConfig(Section):
    """Push the same families to a Prometheus Pushgateway, for jobs that cannot be scraped
    (batch, SLURM, preemptible): gradmon/export/push.py."""

    url: str | None = Field(
        None,
        description="the Pushgateway, e.g. http://pushgateway:9091; null = no pushing",
    )
    interval_seconds: float = Field(
        15.0, gt=0, description="push every this many seconds, from a background thread"
    )
    job: str = Field(
        "gradmon",
        min_length=1,
        description="the `job` label of the pushed group (the shipped rules select "
        'job=~"gradmon.*")',
    )
    grouping: dict[str, str] = Field(
        default_factory=dict,
        description="more grouping labels (e.g. run: $SLURM_JOB_ID), added to `instance` "
        "(this host's name) and, under several ranks, `rank`",
    )
    timeout_seconds: float = Field(5.0, gt=0, description="one push waits at most this long")
    tls: PushTLSConfig = Field(default_factory=PushTLSConfig)
    basic_auth: BasicAuthConfig = Field(default_factory=BasicAuthConfig)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("grouping")
    @classmethod
    def _label_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, label in value.items():
            if not _LABEL_NAME.match(name) or name.startswith("__") or name == "job":
                raise ValueError(
                    f"{name!r} is not a grouping label name (letters, digits, _; not job, "
                    "not starting with __)"
                )
            if not label:
                raise ValueError(f"grouping label {name!r} has an empty value")
        return value


class ExporterConfig(Section):
    """The /metrics HTTP endpoint of the training process."""

    enabled: bool = Field(True, description="serve /metrics; false = no server (snapshots only)")
    addr: str = Field(
        "127.0.0.1",
        description="address to listen on; 0.0.0.0 (every interface) only when asked for",
    )
    port: int = Field(
        9400, ge=0, le=65535, description="0 = ephemeral; each rank uses port + local_rank"
    )
    per_layer: bool = Field(
        True, description="export the per-layer families; false = run-level families only"
    )
    per_layer_ranks: Literal["auto", "first", "all"] = Field(
        "auto",
        description="which ranks export the per-layer families when world size > 1: auto "
        "(each distinct shard of a layer from exactly one rank, replicas from none, every "
        "pipeline stage its own layers: sums over ranks are exact; see agent/placement.py), "
        "first (rank 0 only, every layer whole: exact for replicas such as DDP), all (every "
        "rank its own view: replicas add up more than once)",
    )
    max_layers: int = Field(
        512,
        ge=1,
        description="per-layer families for at most this many layers (in model order), with "
        "a warning naming the first layer left out; statistics and health cover every layer",
    )
    max_scrapes_per_second: float = Field(
        10.0,
        ge=0,
        description="scrapes answered per second at most, one at a time; the surplus waits "
        "(without the GIL), which bounds what scrapers hammering /metrics take from training "
        "(each answered scrape still takes the GIL: see bench/load.py); 0 = no limit",
    )
    linger_seconds: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="Monitor.close() of a run that ended cleanly keeps /metrics up until "
        "each scraper has scraped once more (so Prometheus sees gradmon_run_finished 1 and "
        "GradmonTargetDown stays quiet): at most this long, at most two of the scraper's "
        "intervals, and not at all when nothing scraped; 0 = close at once",
    )
    tls: TLSConfig = Field(default_factory=TLSConfig)
    basic_auth: BasicAuthConfig = Field(default_factory=BasicAuthConfig)
    push: PushConfig = Field(default_factory=PushConfig)


class HealthConfig(Section):
    """Thresholds. The same values render the Prometheus alert rules; README "Health rules
    and their defaults" gives the measurement behind each default."""

    vanishing_rms: float = Field(1e-7, ge=0, description="layer grad rms below this is vanishing")
    vanishing_ratio: float = Field(
        1e-4, ge=0, lt=1, description="layer rms below this fraction of the median layer rms"
    )
    exploding_norm: float = Field(
        1e6,
        gt=0,
        description="absolute ceiling on a layer's grad L2 norm; growth against the layer's "
        "own history (spike_factor) is the main rule, this only catches what no healthy run "
        "of any reduction or batch size reaches",
    )
    spike_factor: float = Field(
        10.0,
        gt=1,
        description="a norm (global, or a layer's own) above this many times its running "
        "median is a spike",
    )
    spike_mad: float = Field(
        3.0,
        ge=0,
        description="a layer's spike threshold is spike_factor * exp(spike_mad * the robust "
        "spread (1.4826 MAD) of its log-norm): noisy layers need larger jumps",
    )
    spike_window: int = Field(
        20, ge=3, description="collections in each running median (global and per layer)"
    )
    spike_warmup: int = Field(
        10, ge=1, description="collections (of a layer: with a gradient) before spikes are judged"
    )
    patience: int = Field(
        3,
        ge=1,
        description="consecutive collections before vanishing is reported, a layer's spike "
        "becomes exploding, and a negligible gradient is called structurally zero",
    )
    dead_window: int = Field(
        20,
        ge=1,
        description="consecutive collections without a (non-zero) gradient before a layer is "
        "dead (or twice its longest idle run so far, if longer): long enough for conditional "
        "computation (MoE experts idle for a few steps)",
    )
    structural_ratio: float = Field(
        3e-5,
        ge=0,
        lt=1,
        description="a gradient below this fraction of the median layer rms at every "
        "collection since the first is structurally zero (rounding noise), said once",
    )

    @model_validator(mode="after")
    def _warmup_fits_window(self) -> HealthConfig:
        if self.spike_warmup > self.spike_window:
            raise ValueError(
                f"health.spike_warmup ({self.spike_warmup}) is larger than health.spike_window "
                f"({self.spike_window}): the running median holds at most spike_window "
                "collections, so spikes would never be judged; lower spike_warmup or raise "
                "spike_window"
            )
        return self


class _SinkSection(Section):
    """What every sink's storage thread takes (gradmon/sinks/writer.py)."""

    stall_after: float = Field(
        5.0,
        gt=0,
        description="a storage call (open, write, flush) running longer than this counts "
        "as an agent error, again every 0.5 s while it hangs",
    )
    close_timeout: float = Field(
        5.0,
        ge=0,
        description="Monitor.close() waits at most this long for queued snapshots; past it "
        "the sink's thread is left behind (counted, logged with the path)",
    )


class TensorboardConfig(_SinkSection):
    """TensorBoard event files (gradmon/sinks/tensorboard.py; gradmon[tensorboard] extra)."""

    logdir: str | None = Field(
        None, description="write event files here; `{rank}` is replaced by the rank; null = off"
    )
    histogram_every: int = Field(
        100, ge=0, description="a histogram of each layer's grad every n collections; 0 = off"
    )
    histogram_bins: int = Field(64, ge=1, le=1024, description="bins of each histogram")
    histogram_max_elements: int = Field(
        1 << 20, ge=1, description="larger grads are histogrammed from a strided sample"
    )
    flush_secs: int = Field(10, ge=1, description="event files are flushed at least this often")
    max_queue: int = Field(
        100, ge=1, description="snapshots waiting for the writer thread; past it they are dropped"
    )
    writer: Literal["auto", "torch", "tensorboardX"] = Field(
        "auto", description="auto: torch.utils.tensorboard, else tensorboardX"
    )


class RecordConfig(_SinkSection):
    """The JSONL record file read by `gradmon plot` (gradmon/sinks/record.py)."""

    path: str | None = Field(
        None, description="one JSON line per snapshot; `{rank}` is replaced by the rank"
    )
    mode: Literal["append", "overwrite"] = Field(
        "append", description="append to an existing file, or start it afresh"
    )
    every: int = Field(
        1, ge=1, description="write every n-th snapshot, and every one with an anomaly"
    )
    max_queue: int = Field(
        1000, ge=1, description="snapshots waiting for the writer thread; past it they are dropped"
    )
    fsync: bool = Field(
        True, description="fsync after each batch of lines (NFS reports write errors there)"
    )
