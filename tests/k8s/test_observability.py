"""The Grafana dashboard and the scrape configuration point at metrics that exist, with the panels an
operator needs; Prometheus scrapes Ray's per-node metrics port only (every replica's series once), and the
app's metrics reach it through Ray's metrics."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from mmrag.serving import metrics as app_metrics
from mmrag.serving.metrics import METRICS, IngressMetrics
from tests.k8s.manifests import K8S, only, pod_templates, ray_container, rayservice, render

DASHBOARD = K8S / "observability" / "grafana-dashboard.json"
REQUIRED_PANELS = {
    "Requests per second by status",
    "Request latency",
    "Time to first token",
    "Queue",
    "KV cache usage",
    "Tokens saved by compression",
    "Retrieval latency",
    "Serve replicas (autoscaling)",
    "Ray pods (autoscaling)",
}
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "avg", "max", "min", "count", "le", "irate"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def metric_names() -> set[str]:
    names = set()
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r"\{[^}]*\}", "", target["expr"])  # drop label matchers
            expr = re.sub(r"\[[^\]]*\]", "", expr)  # and range selectors
            for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
                if word not in PROMQL_WORDS and ("_" in word or ":" in word):
                    names.add(word)
    return names


def base_name(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def package_source(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    return "\n".join(p.read_text(errors="ignore") for p in root.rglob("*.py") if "test" not in p.name)


def _found(source: str, name: str) -> set[str]:
    return {q for q in (f'"{name.removeprefix("ray_")}"', f'"{base_name(name).removeprefix("ray_")}"') if q in source}


def test_dashboard_has_the_operator_panels():
    panels = dashboard()["panels"]
    assert {p["title"] for p in panels} >= REQUIRED_PANELS
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_dashboard_mmrag_metrics_are_the_ones_ray_exports():
    """mmrag's metrics come from Ray's metrics port, named as Ray names them (``ray_`` + the name, counters
    ``_total``): each dashboard name must be one the ingress registers, and none may be the bare name that only
    the per-process ``/metrics`` endpoint serves."""
    exported = set().union(*(spec.exported_names(ray=True) for spec in METRICS.values()))
    used = metric_names()
    assert not {n for n in used if n.startswith("mmrag_")}, "the bare names come from :8000/metrics, not scraped"
    mmrag = {n for n in used if n.startswith("ray_mmrag_")}
    assert mmrag
    assert not mmrag - exported, f"the dashboard queries metrics the ingress does not export: {mmrag - exported}"


def test_every_ingress_metric_is_in_the_single_process_exposition():
    """``GET /metrics`` (single process) serves the same metrics under their own names."""
    text = IngressMetrics(ray=False).exposition()
    for spec in METRICS.values():
        family = f"{spec.name}_total" if spec.kind == "counter" else spec.name
        assert f"# TYPE {family} {spec.kind}" in text, spec.name


def test_dashboard_vllm_metrics_exist():
    """vLLM's Ray stat logger exports ``vllm:x`` as ``ray_vllm_x`` (":" is not allowed in Ray's names)."""
    source = package_source("vllm")
    used = {base_name(n) for n in metric_names() if n.startswith("ray_vllm_")}
    assert used
    missing = {n for n in used if f'"vllm:{n.removeprefix("ray_vllm_")}"' not in source}
    assert not missing, f"unknown vLLM metric names: {missing}"


def test_dashboard_ray_metrics_exist():
    source = package_source("ray")
    used = {n for n in metric_names() if n.startswith("ray_") and not n.startswith(("ray_mmrag_", "ray_vllm_"))}
    assert used
    # Ray exports its metric "x" as "ray_x" (histograms add _bucket/_sum/_count).
    missing = {n for n in used if not _found(source, n)}
    assert not missing, f"unknown Ray metric names: {missing}"


def test_engine_stat_loggers_only_inside_a_replica():
    assert app_metrics.engine_stat_loggers() is None, "outside Serve: vLLM's own defaults"


def test_the_engine_exports_vllm_metrics_through_ray():
    """Without it the dashboard's ray_vllm_* panels stay empty."""
    engine = (Path(app_metrics.__file__).parent / "engine" / "vllm_engine.py").read_text()
    assert "engine_stat_loggers()" in engine


class FakeRayMetric:
    def __init__(self, name, description="", boundaries=None, tag_keys=()):
        self.name, self.tag_keys, self.records = name, tag_keys, []

    def inc(self, value, tags=None):
        self.records.append(("inc", value, tags))

    def set(self, value, tags=None):
        self.records.append(("set", value, tags))

    def observe(self, value, tags=None):
        self.records.append(("observe", value, tags))


def test_ingress_metrics_mirror_into_ray(monkeypatch):
    """Inside a replica every change reaches Ray's metric too: counters (Ray refuses a 0 increment), the
    in-flight gauge as its current value, labels as tags; the private registry keeps counting as before."""
    made: dict[str, FakeRayMetric] = {}

    def fake(spec):
        made[spec.name] = FakeRayMetric(spec.name, tag_keys=spec.labels)
        return made[spec.name]

    monkeypatch.setattr(app_metrics, "_ray_metric", fake)
    metrics = IngressMetrics(ray=True)
    assert set(made) == set(METRICS)
    metrics.requests.labels(status="200").inc()
    metrics.in_flight.inc()
    metrics.in_flight.inc()
    metrics.in_flight.dec()
    metrics.latency.observe(0.5)
    metrics.prompt_tokens.inc(0)
    metrics.completion_tokens.inc(3)
    assert made["mmrag_requests"].records == [("inc", 1.0, {"status": "200"})]
    assert made["mmrag_requests_in_flight"].records == [("set", 1.0, {}), ("set", 2.0, {}), ("set", 1.0, {})]
    assert made["mmrag_request_latency_seconds"].records == [("observe", 0.5, {})]
    assert made["mmrag_prompt_tokens"].records == []
    assert made["mmrag_completion_tokens"].records == [("inc", 3, {})]
    text = metrics.exposition()
    assert 'mmrag_requests_total{status="200"} 1.0' in text and "mmrag_requests_in_flight 1.0" in text


def test_ray_metrics_accept_the_ingress_definitions():
    """The real ray.serve.metrics classes take every definition (names, tag keys, boundaries)."""
    for spec in METRICS.values():
        assert app_metrics._ray_metric(spec) is not None


def test_podmonitor_scrapes_ports_every_ray_pod_has():
    objects = render("overlays/prod-gpu")
    monitor = only(objects, "PodMonitor", "mmrag")
    selector = monitor["spec"]["selector"]["matchLabels"]
    rs = only(objects, "RayService", "mmrag")
    for group, template in pod_templates(rs).items():
        assert selector.items() <= template["metadata"]["labels"].items(), f"{group} is not scraped"
        ports = {p["name"] for p in ray_container(template)["ports"]}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports, f"{group} has no port {endpoint['port']}"
    # Only Ray's per-node metrics port: the Serve port's /metrics answers for whichever replica the pod's proxy
    # picks (sums across pods inflated, counters reset between scrapes), and pods without an ingress replica
    # would fail their scrape.
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e.get("path", "/metrics")) for e in endpoints] == [("metrics", "/metrics")]


def test_dashboard_is_shipped_to_grafana():
    cm = only(render("overlays/prod-gpu"), "ConfigMap", "mmrag-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["mmrag.json"]) == dashboard()
    assert rayservice("overlays/prod-gpu")
