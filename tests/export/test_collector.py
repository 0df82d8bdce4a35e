"""/metrics over a real socket, parsed with prometheus_client's own parser."""

from __future__ import annotations

import logging
import socket
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.parser import text_string_to_metric_families

import gradmon
from gradmon import GradmonError
from gradmon.export.collector import ExportState, GradmonCollector, Histogram
from gradmon.export.schema import GLOBAL_NORM_BUCKETS
from gradmon.snapshot import ActivationStats, LayerStats, Snapshot

from .. import readings
from ..conftest import SmallNet, train_step

PORT0 = {"exporter": {"port": 0}}


def scrape(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family: object) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples}  # type: ignore[attr-defined]


CONTRACT = {
    "gradmon_info": "gauge",
    "gradmon_steps": "counter",
    "gradmon_collections": "counter",
    "gradmon_step": "gauge",
    "gradmon_last_collection_timestamp_seconds": "gauge",
    "gradmon_grad_global_norm": "gauge",
    "gradmon_grad_global_norm_per_step": "histogram",
    "gradmon_nonfinite_steps": "counter",
    "gradmon_skipped_steps": "counter",
    "gradmon_anomalies": "counter",
    "gradmon_grad_norm": "gauge",
    "gradmon_grad_rms": "gauge",
    "gradmon_grad_abs_max": "gauge",
    "gradmon_grad_zero_ratio": "gauge",
    "gradmon_grad_sum_squares": "gauge",
    "gradmon_layer_nonfinite_steps": "counter",
    "gradmon_param_norm": "gauge",
    "gradmon_scalar": "gauge",
    "gradmon_agent_errors": "counter",
    "gradmon_collect_duration_seconds": "histogram",
}


def test_metrics_scraped_over_a_socket(net: SmallNet) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with gradmon.attach(net, opt, config={**PORT0, "run_id": "r1"}) as mon:
        assert mon.port and mon.port != 9400
        for _ in range(3):
            loss = train_step(net, opt)
        mon.log(loss=loss)
        snap = mon.snapshot()
        assert snap is not None
        fams = scrape(mon.port)
    for name, kind in CONTRACT.items():
        assert name in fams, name
        assert fams[name].type == kind, name
        assert fams[name].documentation, name
    assert samples(fams["gradmon_info"]) == {
        (("run_id", "r1"), ("version", gradmon.__version__)): 1
    }
    steps = {s.name: s.value for s in fams["gradmon_steps"].samples}
    assert steps["gradmon_steps_total"] == 3
    assert {s.name: s.value for s in fams["gradmon_step"].samples}["gradmon_step"] == 2
    norms = {s.labels["layer"]: s.value for s in fams["gradmon_grad_norm"].samples}
    assert list(norms) == [n for n, _ in net.named_parameters()]
    for layer, value in norms.items():
        assert value == pytest.approx(snap.layers[layer].norm)
    hist = {
        s.labels.get("le"): s.value
        for s in fams["gradmon_grad_global_norm_per_step"].samples
        if s.name.endswith("_bucket")
    }
    assert hist["+Inf"] == 3
    scalars = {s.labels["name"]: s.value for s in fams["gradmon_scalar"].samples}
    assert scalars["loss"] == pytest.approx(float(loss))
    errors = {s.labels["stage"]: s.value for s in fams["gradmon_agent_errors"].samples}
    assert set(errors.values()) == {0.0} and "hook" in errors
    # the process collector of our own registry is served too
    assert "process_resident_memory_bytes" in fams or "python_info" in fams


def test_server_stops_on_close(net: SmallNet) -> None:
    mon = gradmon.attach(net, config=PORT0)
    port = mon.port
    assert port is not None
    scrape(port)
    mon.close()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_port_in_use_is_a_clear_error(net: SmallNet) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(GradmonError, match=f"exporter.port {port} .* already in use"):
            gradmon.attach(net, config={"exporter": {"port": port}})
    for p in net.parameters():
        assert not p._post_accumulate_grad_hooks  # the failed attach left nothing behind


def test_injected_registry_and_anomaly_counters(net: SmallNet) -> None:
    registry = CollectorRegistry()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    cfg = {"exporter": {"enabled": False}, "health": {"exploding_norm": 1e-9}}
    with gradmon.attach(net, opt, config=cfg, registry=registry) as mon:
        assert mon.port is None
        train_step(net, opt)
        train_step(net, opt)
        value = registry.get_sample_value(
            "gradmon_anomalies_total", {"layer": "fc1.weight", "kind": "exploding"}
        )
        assert value == 2
        assert registry.get_sample_value("gradmon_collections_total") == 2
    assert registry.get_sample_value("gradmon_collections_total") is None  # unregistered


def test_max_layers_caps_per_layer_series(net: SmallNet, caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    cfg = {"exporter": {"enabled": False, "max_layers": 2}}
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with caplog.at_level(logging.WARNING, logger="gradmon"):
        mon = gradmon.attach(net, opt, config=cfg, registry=registry)
    assert "exporter.max_layers is 2" in caplog.text and "fc2.weight" in caplog.text
    with mon:
        train_step(net, opt)
        snap = mon.snapshot()
        assert snap is not None and len(snap.layers) == 6  # statistics still cover all
        fams = {f.name: f for f in registry.collect()}
        assert len(fams["gradmon_grad_norm"].samples) == 2
        assert fams["gradmon_grad_global_norm"].samples[0].value == pytest.approx(snap.global_norm)


def test_per_layer_off(net: SmallNet) -> None:
    registry = CollectorRegistry()
    cfg = {"exporter": {"enabled": False, "per_layer": False}}
    with gradmon.attach(net, config=cfg, registry=registry) as mon:
        net(torch.randn(2, 8)).sum().backward()
        mon.collect()
        names = {f.name for f in registry.collect()}
    assert "gradmon_grad_global_norm" in names and "gradmon_grad_norm" not in names


def test_basic_auth_not_silently_ignored(net: SmallNet, tmp_path: object) -> None:
    cfg = {"exporter": {"port": 0, "basic_auth": {"username": "u"}}}
    with pytest.raises(GradmonError, match="exporter.basic_auth"):
        gradmon.attach(net, config=cfg)


def test_scraping_while_training(net: SmallNet) -> None:
    import threading

    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    failures: list[BaseException] = []
    seen_steps: list[float] = []
    stop = threading.Event()
    with gradmon.attach(net, opt, config=PORT0) as mon:
        port = mon.port
        assert port is not None

        def scraper() -> None:
            for _ in range(200):  # bounded, and stops with the training loop
                if stop.is_set():
                    return
                try:
                    fams = scrape(port)
                    if "gradmon_step" in fams:
                        seen_steps.append(fams["gradmon_step"].samples[0].value)
                except BaseException as exc:
                    failures.append(exc)

        threads = [threading.Thread(target=scraper) for _ in range(3)]
        for t in threads:
            t.start()
        for _ in range(30):
            train_step(net, opt)
            mon.snapshot(wait=True)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not any(readings.errors(mon).values())
    assert not failures
    assert seen_steps, "no scrape saw a snapshot"


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text; version=1.0.0"])
def test_cached_exposition_matches_the_registry(net: SmallNet, accept: str) -> None:
    """The server reuses the per-layer families between publishes: what it serves equals
    the registry's own exposition, in both formats, and follows every new snapshot."""
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as parse_openmetrics,
    )
    from prometheus_client.parser import text_string_to_metric_families as parse_text

    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    parse = parse_openmetrics if accept else parse_text

    def gradmon_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in parse(text)
            for s in f.samples
            if s.name.startswith("gradmon_") and "duration" not in s.name
        }

    with gradmon.attach(net, opt, config={"exporter": {"port": 0}}) as mon:
        for _ in range(3):
            train_step(net, opt)
            request = urllib.request.Request(
                f"http://127.0.0.1:{mon.port}/metrics", headers={"Accept": accept}
            )
            with urllib.request.urlopen(request, timeout=10) as resp:
                served = resp.read().decode()
            encoder = generate_latest if not accept else openmetrics_latest
            want = gradmon_samples(encoder(mon.registry).decode())
            got = gradmon_samples(served)
            assert got == want
            assert ("gradmon_grad_norm", (("layer", "fc1.weight"),)) in got
            assert got[("gradmon_step", ())] == readings.steps(mon) - 1


# ----------------------------------------------------------- the collector on its own
def _state(step: int = 7, rank: int | None = None, norm: object = 1.5) -> ExportState:
    """An ExportState as the agent hands it over: a snapshot of two layers, one module."""
    layer = LayerStats(
        numel=10, norm=norm, rms=0.5, abs_max=2.0, mean=0.0, min=-1.0, max=1.0,
        zero_ratio=0.25, nan_count=0, inf_count=0, param_norm=3.0, sum_squares=2.25,
    )  # fmt: skip
    snap = Snapshot(
        step=step,
        global_norm=4.5,
        nonfinite=False,
        layers={"a.weight": layer, "b.weight": layer},
        timestamp=1.7e9,
        activations={"a": ActivationStats(5, 0.5, 0.1, 0.2, 0, 0)},
    )
    hist = Histogram(GLOBAL_NORM_BUCKETS)
    hist.observe(4.5)
    return ExportState(
        version="0.1.0",
        run_id="r",
        rank=rank,
        steps_total=step + 1,
        collections_total=step + 1,
        snapshot=snap,
        layer_names=["a.weight", "b.weight"],
        anomalies_total={("a.weight", "spike"): 2},
        errors_total={"hook": 0, "export": 1},
        scalars={"loss": 0.5},
        loss_scale=256.0,
        global_norm_hist=hist,
        activation_names=["a"],
        activation_nonfinite_total={"a": 1},
    )


OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.mark.parametrize("rank", [None, 3])
def test_exposition_is_the_registrys_own_rendering(rank: int | None) -> None:
    """exposition() reuses the per-snapshot families' bytes between scrapes; what it
    returns is byte for byte what prometheus_client renders from the same registry, in
    both formats, other collectors before and after it included, and follows a new state."""
    states = [_state(7, rank)]
    registry = CollectorRegistry()
    Counter("before", "A collector registered first.", registry=registry).inc()
    collector = GradmonCollector(lambda: states[-1])
    registry.register(collector)
    Counter("after", "A collector registered last.", registry=registry).inc(2)
    for step in (7, 7, 8):
        states.append(_state(step, rank))
        for accept, encode in (("", generate_latest), (OPENMETRICS, openmetrics_latest)):
            assert collector.exposition(registry, accept)[0] == encode(registry)
    assert registry.get_sample_value("gradmon_step", {"rank": "3"} if rank else {}) == 8
    labels = {"layer": "a.weight", **({"rank": "3"} if rank else {})}
    assert registry.get_sample_value("gradmon_grad_norm", labels) == 1.5


def test_a_failing_family_is_reported_and_the_rest_served() -> None:
    """A per-layer value that cannot be encoded: on_error hears of it at every scrape,
    the run-level families and the other collectors are still served."""
    errors: list[BaseException] = []
    registry = CollectorRegistry()
    collector = GradmonCollector(lambda: _state(norm="not a number"), errors.append)
    registry.register(collector)
    Counter("app_events", "The user's own metric.", registry=registry).inc()
    body, _ = collector.exposition(registry, "")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert "gradmon_steps" in fams and "app_events" in fams
    assert "gradmon_grad_norm" not in fams
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    assert collector.exposition(registry, "")[0] == body  # tried again, not cached
    assert len(errors) == 2


def test_without_on_error_a_failure_propagates() -> None:
    def broken() -> ExportState:
        raise RuntimeError("state unavailable")

    registry = CollectorRegistry()
    registry.register(GradmonCollector(broken))
    with pytest.raises(RuntimeError, match="state unavailable"):
        generate_latest(registry)


def test_shares_are_served_where_the_state_has_them() -> None:
    """A rank's additive shares (agent/placement.py): the global one always, a layer's
    where it differs from the layer's own sum (a module mixing sharded and replicated
    parameters); every other value is the rank's own view."""
    state = _state(rank=1)
    state.global_sum_squares = 3.0
    state.layer_sum_squares = {"b.weight": 0.75}
    registry = CollectorRegistry()
    registry.register(GradmonCollector(lambda: state))
    rank = {"rank": "1"}
    assert registry.get_sample_value("gradmon_grad_global_sum_squares", rank) == 3.0
    sq = {
        n: registry.get_sample_value("gradmon_grad_sum_squares", {"layer": n, **rank})
        for n in ("a.weight", "b.weight")
    }
    assert sq == {"a.weight": 2.25, "b.weight": 0.75}
    assert registry.get_sample_value("gradmon_grad_norm", {"layer": "b.weight", **rank}) == 1.5
    state.global_sum_squares = None  # no share known: no series
    assert registry.get_sample_value("gradmon_grad_global_sum_squares", rank) is None
