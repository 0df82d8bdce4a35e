"""deploy/k8s: the kustomize bundle as kubectl renders it, checked the way the API server and
the prometheus-operator would take it.

- Every rendered object validates strictly: PodMonitor and PrometheusRule against the
  operator's CRD schemas (tests/schemas/prometheus-operator-v0.93.0, vendored), ConfigMaps
  against the core schemas of kubernetes-validate. A field the API server would prune is
  an error, so a typo cannot be silently dropped.
- The dashboard ConfigMaps are dashboards/*.json byte for byte.
- Multi-rank: the scrape config the operator builds from the rendered PodMonitor (mirroring
  generatePodMonitorConfig of v0.93.0, pkg/prometheus/promcfg.go) runs in a real Prometheus
  against real agents, one port per rank on two pods; every rank gets the job the rules
  select, the agent's own `rank` label, and the rules' `by (namespace, job)` meets all ranks.
- TLS: the tls overlay's PodMonitor, its Secrets resolved as the operator does, scrapes an
  agent configured by overlays/tls/agent/gradmon.env over mutual TLS with basic auth.

Without kubectl (or prometheus) these tests skip; with CI set they fail and say why.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from gradmon.config import ExporterConfig, load_config
from gradmon.export.server import MetricsServer

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
CRDS = Path(__file__).resolve().parent / "schemas" / "prometheus-operator-v0.93.0"
KUBERNETES_VERSION = "1.32"  # core schemas (kubernetes-validate) checked against
BUNDLES = ("", "overlays/pytorchjob", "overlays/tls", "overlays/tls/agent")


def _missing(what: str) -> NoReturn:
    """Skip, or under CI fail, naming what is missing and how to get it."""
    if os.environ.get("CI"):
        pytest.fail(what)
    pytest.skip(what)


# ---------------------------------------------------------------------------- rendering
def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        _missing(
            "kubectl not found: deploy/k8s is rendered with `kubectl kustomize` "
            "(Debian: apt-get install kubernetes-client; .ci/run installs it)"
        )
    out = subprocess.run(
        [path, "version", "--client"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"Kustomize Version: v(\d+)", out)
    if not match or int(match.group(1)) < 4:
        _missing(
            f"{path} embeds kustomize {match.group(0) if match else '(unknown)'}: the overlays "
            "need kustomize v4 or newer (kubectl 1.21+); deploy/k8s/base alone renders with "
            "older ones"
        )
    return path


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    kubectl = _kubectl()
    out: dict[str, list[dict[str, Any]]] = {}
    for bundle in BUNDLES:
        result = subprocess.run(
            [kubectl, "kustomize", str(K8S / bundle)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, f"kubectl kustomize deploy/k8s/{bundle}: {result.stderr}"
        # A deprecated field would warn on every user's `kubectl apply -k`.
        assert "Warning" not in result.stderr, result.stderr
        out[bundle] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return out


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = (d for d in docs if d["kind"] == kind)
    return doc


# --------------------------------------------------------------------- strict validation
def _strict(schema: Any) -> Any:
    """A CRD's structural schema as JSON Schema, as strict as the API server is: unknown
    fields are an error (the server would prune them) except under
    x-kubernetes-preserve-unknown-fields; `nullable` admits null."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    # A bare {type: object} with no properties (metadata) is checked elsewhere.
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    path = CRDS / f"monitoring.coreos.com_{kind.lower()}s.yaml"
    crd = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert crd["metadata"]["annotations"]["operator.prometheus.io/version"] == "0.93.0"
    (version,) = (v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def validation_errors(doc: dict[str, Any]) -> list[str]:
    """What the API server would reject or prune in `doc` (empty: it takes it as it is)."""
    import kubernetes_validate

    def core(obj: dict[str, Any]) -> list[str]:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return [f"{'/'.join(map(str, exc.path))}: {exc.message}"]
        return []

    if doc.get("apiVersion") == "monitoring.coreos.com/v1":
        validator = _crd_validator(doc["kind"])
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
        # The CRD says only `metadata: {type: object}`; the server checks it as ObjectMeta.
        carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
        return errors + core(carrier)
    return core(doc)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b or "base")
def test_rendered_manifests_pass_strict_schema_validation(
    rendered: dict[str, list[dict[str, Any]]], bundle: str
) -> None:
    docs = rendered[bundle]
    assert docs
    for doc in docs:
        assert validation_errors(doc) == [], f"{doc['kind']} {doc['metadata']['name']}"


def test_the_validation_is_strict(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A misspelt or misplaced field is an error, not pruned in silence."""
    monitor = _one(rendered["overlays/tls"], "PodMonitor")
    typo = copy.deepcopy(monitor)
    typo["spec"]["podMetricsEndpoints"][0]["tlsconfig"] = typo["spec"]["podMetricsEndpoints"][
        0
    ].pop("tlsConfig")
    assert any("tlsconfig" in e for e in validation_errors(typo))
    nested = copy.deepcopy(monitor)
    nested["spec"]["podMetricsEndpoints"][0]["basicAuth"]["password"]["secretName"] = "x"
    assert any("secretName" in e for e in validation_errors(nested))
    labels = copy.deepcopy(monitor)
    labels["metadata"]["lables"] = {"release": "x"}
    assert any("lables" in e for e in validation_errors(labels))
    rule = copy.deepcopy(_one(rendered[""], "PrometheusRule"))
    rule["spec"]["groups"][1]["rules"][0]["severity"] = "critical"  # belongs in labels
    assert any("severity" in e for e in validation_errors(rule))
    dashboard = copy.deepcopy(next(d for d in rendered[""] if d["kind"] == "ConfigMap"))
    dashboard["metadata"]["labels"]["grafana_dashboard"] = 1  # labels are strings
    assert validation_errors(dashboard)


# ------------------------------------------------------------------------------ contents
def test_base_is_the_repository_files(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[""]
    assert sorted(d["kind"] for d in docs) == [
        "ConfigMap",
        "ConfigMap",
        "PodMonitor",
        "PrometheusRule",
    ]
    rule = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text("utf-8"))
    assert _one(docs, "PrometheusRule") == rule  # generated and kept in sync by test_rules
    for bundle in ("overlays/pytorchjob", "overlays/tls"):
        assert _one(rendered[bundle], "PrometheusRule")["spec"] == rule["spec"]


def _render_dashboards_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_dashboards", K8S / "render_dashboards.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_configmaps_are_generated_from_dashboards_json() -> None:
    module = _render_dashboards_module()
    text = (K8S / "base" / "dashboards.yaml").read_text(encoding="utf-8")
    assert text == module.render(), "run: python deploy/k8s/render_dashboards.py"
    docs = [d for d in yaml.safe_load_all(text) if d]
    files = sorted((REPO / "dashboards").glob("*.json"))
    assert len(docs) == len(files) >= 2
    for doc, path in zip(docs, files, strict=True):
        assert doc["data"] == {path.name: path.read_text(encoding="utf-8")}  # byte for byte
        json.loads(doc["data"][path.name])
    assert module.main(["--check"]) == 0


def test_dashboard_configmaps_carry_the_grafana_sidecar_label_and_folder(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    maps = [d for d in rendered[""] if d["kind"] == "ConfigMap"]
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "gradmon"}
        (body,) = cm["data"].values()
        dashboard = json.loads(body)
        # kube-prometheus-stack's Grafana names its data source "Prometheus"; the
        # dashboards pick one with a variable rather than a fixed uid.
        assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])
    # ConfigMaps are limited to 1 MiB, and client-side apply keeps a copy in an annotation
    # limited to 256 KiB.
    assert all(len(json.dumps(cm)) < 200_000 for cm in maps)


def test_podmonitor_sample_limit_covers_one_rank_at_the_layer_cap(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    spec = _one(rendered[""], "PodMonitor")["spec"]
    # Per target (one rank), any parallel layout: 7 series per layer + up to 4 anomaly
    # kinds per layer + ~86 global ones (README.md).
    assert spec["sampleLimit"] >= 11 * ExporterConfig().max_layers + 86


def test_pytorchjob_overlay_sets_namespace_selector_and_release(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["overlays/pytorchjob"]
    assert {d["metadata"]["namespace"] for d in docs} == {"monitoring"}
    for kind in ("PodMonitor", "PrometheusRule"):
        assert _one(docs, kind)["metadata"]["labels"]["release"] == "monitoring"
    spec = _one(docs, "PodMonitor")["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["ml-team"]}
    assert spec["selector"] == {"matchLabels": {"training.kubeflow.org/job-name": "llm-pretrain"}}


def test_tls_agent_config_matches_the_podmonitor(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    env = _one(rendered["overlays/tls/agent"], "ConfigMap")["data"]
    config = load_config(None, environ=env).exporter
    assert config.addr == "0.0.0.0"
    assert config.tls.certfile and config.tls.keyfile and config.tls.client_cafile  # mutual
    assert config.basic_auth.username and config.basic_auth.password_file
    (endpoint,) = _one(rendered["overlays/tls"], "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["scheme"] == "https"
    tls = endpoint["tlsConfig"]
    assert {tls["ca"]["secret"]["name"], tls["cert"]["secret"]["name"]} == {"gradmon-scrape"}
    assert tls["keySecret"]["name"] == "gradmon-scrape" and tls["serverName"]
    assert "insecureSkipVerify" not in tls
    auth = endpoint["basicAuth"]
    assert auth["username"]["name"] == auth["password"]["name"] == "gradmon-scrape"


# ------------------------------------------------------- the operator's scrape config
SHARD = "0"  # the config reloader substitutes $(SHARD); one shard


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _relabel(rc: dict[str, Any]) -> dict[str, Any]:
    """generateRelabelConfig: the CRD's camelCase fields in Prometheus' names and order."""
    known = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement"}
    assert set(rc) <= known | {"action"}, f"relabeling fields not mirrored here: {rc}"
    out: dict[str, Any] = {}
    for field, key in (
        ("sourceLabels", "source_labels"),
        ("separator", "separator"),
        ("targetLabel", "target_label"),
        ("regex", "regex"),
        ("modulus", "modulus"),
        ("replacement", "replacement"),
    ):
        if field in rc:
            out[key] = rc[field]
    if "action" in rc:
        out["action"] = rc["action"].lower()
    return out


def operator_scrape_configs(
    monitor: dict[str, Any], namespace: str, secrets: dict[tuple[str, str], str], certs: Path
) -> list[dict[str, Any]]:
    """The scrape configs prometheus-operator v0.93.0 generates for `monitor` (defaults:
    no scrape class, one shard, relabel selector mechanism), kubernetes_sd_configs left out
    (the caller puts its pods in). `secrets[(name, key)]` are the Secrets' values; TLS
    assets are written under `certs` the way the operator mounts them."""
    spec = monitor["spec"]
    mirrored = {"selector", "podMetricsEndpoints", "sampleLimit", "namespaceSelector"}
    assert set(spec) <= mirrored, f"PodMonitor fields not mirrored here: {set(spec) - mirrored}"
    name = monitor["metadata"]["name"]
    configs = []
    for i, ep in enumerate(spec["podMetricsEndpoints"]):
        handled = {"path", "interval", "relabelings", "scheme", "tlsConfig", "basicAuth", "port"}
        assert set(ep) <= handled, f"endpoint fields not mirrored here: {set(ep) - handled}"
        cfg: dict[str, Any] = {"job_name": f"podMonitor/{namespace}/{name}/{i}"}
        if "interval" in ep:
            cfg["scrape_interval"] = ep["interval"]
        if "path" in ep:
            cfg["metrics_path"] = ep["path"]
        if "scheme" in ep:
            cfg["scheme"] = ep["scheme"]
        if "tlsConfig" in ep:
            tls, out = ep["tlsConfig"], {}

            def asset(ref: dict[str, str], kind: str = "secret") -> str:
                path = certs / f"{kind}_{namespace}_{ref['name']}_{ref['key']}"
                path.write_text(secrets[(ref["name"], ref["key"])], encoding="utf-8")
                return str(path)

            assert set(tls) <= {"ca", "cert", "keySecret", "serverName"}, tls
            if "ca" in tls:
                out["ca_file"] = asset(tls["ca"]["secret"])
            if "cert" in tls:
                out["cert_file"] = asset(tls["cert"]["secret"])
            if "keySecret" in tls:
                out["key_file"] = asset(tls["keySecret"])
            if "serverName" in tls:
                out["server_name"] = tls["serverName"]
            cfg["tls_config"] = out
        if "basicAuth" in ep:
            auth = ep["basicAuth"]
            cfg["basic_auth"] = {
                "username": secrets[(auth["username"]["name"], auth["username"]["key"])],
                "password": secrets[(auth["password"]["name"], auth["password"]["key"])],
            }
        relabel: list[dict[str, Any]] = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            {
                "action": "drop",
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "regex": "(Failed|Succeeded)",
            },
        ]
        selector = spec["selector"]
        assert set(selector) <= {"matchLabels"}, "matchExpressions not mirrored here"
        for key in sorted(selector.get("matchLabels", {})):
            relabel.append(
                {
                    "action": "keep",
                    "source_labels": [
                        f"__meta_kubernetes_pod_label_{_sanitize(key)}",
                        f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}",
                    ],
                    "regex": f"({selector['matchLabels'][key]});true",
                }
            )
        if ep.get("port"):
            relabel.append(
                {
                    "action": "keep",
                    "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                    "regex": ep["port"],
                }
            )
        relabel += [
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {
                "source_labels": ["__meta_kubernetes_pod_container_name"],
                "target_label": "container",
            },
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": f"{namespace}/{name}"},
        ]
        if ep.get("port"):
            relabel.append({"target_label": "endpoint", "replacement": ep["port"]})
        relabel += [_relabel(rc) for rc in ep.get("relabelings", [])]
        relabel += [
            {
                "source_labels": ["__address__"],
                "target_label": "__tmp_hash",
                "modulus": 1,
                "action": "hashmod",
            },
            {"source_labels": ["__tmp_hash"], "regex": SHARD, "action": "keep"},
        ]
        cfg["relabel_configs"] = relabel
        if "sampleLimit" in spec:
            cfg["sample_limit"] = spec["sampleLimit"]
        configs.append(cfg)
    return configs


def watched_namespaces(monitor: dict[str, Any], namespace: str) -> set[str]:
    """getNamespacesFromNamespaceSelector: its own namespace unless matchNames says."""
    selector = monitor["spec"].get("namespaceSelector", {})
    assert not selector.get("any"), "any: true not mirrored here"
    return set(selector.get("matchNames") or [namespace])


def pod_targets(pod: dict[str, Any]) -> list[dict[str, str]]:
    """What Kubernetes service discovery (role: pod) yields for one pod: a target per
    container port, and one per container without ports (address without a port)."""
    labels = {
        "__meta_kubernetes_namespace": pod["namespace"],
        "__meta_kubernetes_pod_name": pod["name"],
        "__meta_kubernetes_pod_ip": "127.0.0.1",
        "__meta_kubernetes_pod_phase": pod.get("phase", "Running"),
        "__meta_kubernetes_pod_ready": "true",
    }
    for key, value in pod["labels"].items():
        labels[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
        labels[f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"] = "true"
    targets = []
    for container, ports in pod["containers"].items():
        base = {
            **labels,
            "__meta_kubernetes_pod_container_name": container,
            "__meta_kubernetes_pod_container_init": "false",
        }
        if not ports:
            targets.append({**base, "__address__": "127.0.0.1"})
        for port_name, number in ports.items():
            targets.append(
                {
                    **base,
                    "__address__": f"127.0.0.1:{number}",
                    "__meta_kubernetes_pod_container_port_name": port_name,
                    "__meta_kubernetes_pod_container_port_number": str(number),
                    "__meta_kubernetes_pod_container_port_protocol": "TCP",
                }
            )
    return targets


def _file_sd(targets: list[dict[str, str]]) -> str:
    """Service discovery's targets as a file_sd file (meta labels pass through file_sd)."""
    groups = []
    for t in targets:
        labels = dict(t)
        groups.append({"targets": [labels.pop("__address__")], "labels": labels})
    return json.dumps(groups)


# ---------------------------------------------------------------------- real Prometheus
class Prometheus:
    def __init__(self, workdir: Path, scrape_configs: list[dict[str, Any]], rules: Any) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            _missing("prometheus not found (Debian: apt-get install prometheus)")
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        rules_file = workdir / "rules.yml"
        rules_file.write_text(yaml.safe_dump({"groups": rules}), encoding="utf-8")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules_file)],
            "scrape_configs": scrape_configs,
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                str(binary),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def wait(self, expr: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(self.log.name).read_text()
            try:
                result = self.query(expr)
            except OSError:
                result = []
            if len(result) >= count:
                return result
            time.sleep(0.25)
        raise AssertionError(f"{expr}: {len(result)} series, expected {count}: {result}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _agent(rank: int, config: ExporterConfig | None = None) -> MetricsServer:
    """One rank's metrics endpoint: the agent's server, serving the rank label the agent
    puts on every series under several ranks."""
    registry = CollectorRegistry()
    Counter("gradmon_steps", "optimizer steps", ["rank"], registry=registry).labels(
        rank=str(rank)
    ).inc(7)
    return MetricsServer(config or ExporterConfig(port=0), 0, registry)


@pytest.fixture
def agents() -> Iterator[list[MetricsServer]]:
    servers: list[MetricsServer] = []
    yield servers
    for server in servers:
        server.close()


def _rules_selector(rules: list[dict[str, Any]], alert: str) -> str:
    (rule,) = (r for g in rules for r in g["rules"] if r.get("alert") == alert)
    match = re.search(r"up\{[^}]*\}", rule["expr"])
    assert match, rule["expr"]
    return match.group(0)


def test_every_rank_of_every_pod_is_scraped_with_the_job_the_rules_select(
    rendered: dict[str, list[dict[str, Any]]], agents: list[MetricsServer], tmp_path: Path
) -> None:
    """Two pods of one PyTorchJob (ranks 0-3 on the master, 4-7 on the worker, each rank on
    port 9400 + local rank, named gradmon-rank<local rank>) and two pods that must not be
    scraped; the base PodMonitor (applied in ml-team) and the pytorchjob overlay's."""
    ranks_per_pod = 4

    def pod(name: str, namespace: str, labels: dict[str, str], first_rank: int) -> Any:
        ports = {}
        for local in range(ranks_per_pod):
            agents.append(_agent(first_rank + local))
            ports[f"gradmon-rank{local}"] = agents[-1].port
        return {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "containers": {"pytorch": {**ports, "http": 1}, "log-shipper": {}},
        }

    run = {
        "training.kubeflow.org/job-name": "llm-pretrain",
        "app.kubernetes.io/name": "my-training-job",
    }
    other = {"training.kubeflow.org/job-name": "other", "app.kubernetes.io/name": "other"}
    pods = [
        pod("llm-pretrain-master-0", "ml-team", run, 0),
        pod("llm-pretrain-worker-0", "ml-team", run, ranks_per_pod),
        pod("other-master-0", "ml-team", other, 0),  # another job
        pod("llm-pretrain-master-0", "ml-sandbox", run, 0),  # another namespace
    ]
    certs = tmp_path / "certs"
    certs.mkdir()
    monitors = {
        # `kubectl apply -k deploy/k8s -n ml-team`
        "gradmon-my-training-job": (_one(rendered[""], "PodMonitor"), "ml-team"),
        "gradmon-llm-pretrain": (_one(rendered["overlays/pytorchjob"], "PodMonitor"), "monitoring"),
    }
    scrape_configs = []
    for monitor, namespace in monitors.values():
        sd = tmp_path / f"sd-{len(scrape_configs)}.json"
        watched = watched_namespaces(monitor, namespace)
        targets = [t for p in pods if p["namespace"] in watched for t in pod_targets(p)]
        sd.write_text(_file_sd(targets), "utf-8")
        for cfg in operator_scrape_configs(monitor, namespace, {}, certs):
            cfg["file_sd_configs"] = [{"files": [str(sd)]}]  # for kubernetes_sd_configs
            cfg["scrape_interval"] = "1s"
            scrape_configs.append(cfg)
    rules = _one(rendered[""], "PrometheusRule")["spec"]["groups"]
    prometheus = Prometheus(tmp_path, scrape_configs, rules)
    try:
        n = 2 * ranks_per_pod
        selector = _rules_selector(rules, "GradmonTargetDown")  # up{job=~"gradmon.*"}
        up = prometheus.wait(selector, 2 * n)
        assert len(up) == 2 * n, up  # the other job's and namespace's pods are not scraped
        by_job: dict[str, list[dict[str, str]]] = {}
        for series in up:
            assert series["value"][1] == "1", series
            by_job.setdefault(series["metric"]["job"], []).append(series["metric"])
        assert set(by_job) == set(monitors)
        for targets in by_job.values():
            assert {t["namespace"] for t in targets} == {"ml-team"}
            assert sorted(t["endpoint"] for t in targets) == sorted(
                [f"gradmon-rank{r}" for r in range(ranks_per_pod)] * 2
            )
            assert {t["pod"] for t in targets} == {"llm-pretrain-master-0", "llm-pretrain-worker-0"}
            assert all("rank" not in t for t in targets)  # not set on the target...
        for job in monitors:  # ...each series carries the agent's own global rank
            series = prometheus.wait(f'gradmon_steps_total{{job="{job}"}}', n)
            assert sorted(int(s["metric"]["rank"]) for s in series) == list(range(n))
            assert not any("exported_rank" in s["metric"] for s in series)
        # The rules meet every rank of a run in one group: what TargetDown and
        # TrainingStalled select, and their `by (namespace, job)`.
        stalled = _rules_selector(rules, "GradmonTrainingStalled")
        groups = prometheus.query(f"count by (namespace, job) ({stalled})")
        assert {(g["metric"]["job"], g["value"][1]) for g in groups} == {
            (job, str(n)) for job in monitors
        }
        # A recording rule over the ranks: one series per run, not per rank.
        steps = prometheus.wait("gradmon:steps:rate5m", 2, timeout=30)
        assert {s["metric"]["job"] for s in steps} == set(monitors)
        assert all(set(s["metric"]) == {"__name__", "namespace", "job"} for s in steps)
    finally:
        prometheus.close()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def test_tls_overlay_scrapes_the_agent_over_mutual_tls_with_basic_auth(
    rendered: dict[str, list[dict[str, Any]]], agents: list[MetricsServer], tmp_path: Path
) -> None:
    if shutil.which("openssl") is None:
        _missing("openssl not found")
    monitor = _one(rendered["overlays/tls"], "PodMonitor")
    server_name = monitor["spec"]["podMetricsEndpoints"][0]["tlsConfig"]["serverName"]
    pki = tmp_path / "pki"
    pki.mkdir()
    for ca in ("agent-ca", "prometheus-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", f"/CN={ca}", "-keyout", str(pki / f"{ca}.key"),
                 "-out", str(pki / f"{ca}.crt"))  # fmt: skip
    for name, ca, ext in (
        ("agent", "agent-ca", f"subjectAltName=DNS:{server_name}"),
        ("prometheus", "prometheus-ca", "extendedKeyUsage=clientAuth"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(pki / f"{name}.key"), "-out", str(pki / f"{name}.csr"))  # fmt: skip
        (pki / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / f"{ca}.crt"),
                 "-CAkey", str(pki / f"{ca}.key"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(pki / f"{name}.ext"),
                 "-out", str(pki / f"{name}.crt"))  # fmt: skip
    password = "correct horse battery staple"
    # The agent's Secret gradmon-agent-tls, mounted at /etc/gradmon (overlays/tls/agent).
    mount = tmp_path / "etc-gradmon"
    mount.mkdir()
    shutil.copy(pki / "agent.crt", mount / "tls.crt")
    shutil.copy(pki / "agent.key", mount / "tls.key")
    shutil.copy(pki / "prometheus-ca.crt", mount / "ca.crt")
    (mount / "password").write_text(password + "\n")
    env = _one(rendered["overlays/tls/agent"], "ConfigMap")["data"]
    env = {k: v.replace("/etc/gradmon", str(mount)) for k, v in env.items()}
    env["GRADMON_EXPORTER__PORT"] = "0"
    agents.append(_agent(0, load_config(None, environ=env).exporter))
    # The Secret gradmon-scrape of the PodMonitor's namespace (the overlay's comment).
    secrets = {
        ("gradmon-scrape", "ca.crt"): (pki / "agent-ca.crt").read_text(),
        ("gradmon-scrape", "tls.crt"): (pki / "prometheus.crt").read_text(),
        ("gradmon-scrape", "tls.key"): (pki / "prometheus.key").read_text(),
        ("gradmon-scrape", "username"): env["GRADMON_EXPORTER__BASIC_AUTH__USERNAME"],
        ("gradmon-scrape", "password"): password,
    }
    pod = {
        "name": "trainer-0",
        "namespace": "ml-team",
        "labels": {"app.kubernetes.io/name": "my-training-job"},
        "containers": {"pytorch": {"gradmon-metrics": agents[0].port}},
    }
    certs = tmp_path / "certs"
    certs.mkdir()
    (cfg,) = operator_scrape_configs(monitor, "ml-team", secrets, certs)
    sd = tmp_path / "sd.json"
    sd.write_text(_file_sd(pod_targets(pod)), "utf-8")
    cfg["file_sd_configs"] = [{"files": [str(sd)]}]
    cfg["scrape_interval"] = "1s"
    rules = _one(rendered["overlays/tls"], "PrometheusRule")["spec"]["groups"]
    prometheus = Prometheus(tmp_path, [cfg], rules)
    try:
        prometheus.wait('gradmon_steps_total{job="gradmon-my-training-job"}', 1)
        (up,) = prometheus.query(_rules_selector(rules, "GradmonTargetDown"))
        assert up["value"][1] == "1" and up["metric"]["endpoint"] == "gradmon-metrics"
        (target,) = prometheus.api("targets", state="active")["activeTargets"]
        assert target["scrapeUrl"].startswith("https://") and target["health"] == "up"
    finally:
        prometheus.close()
