"""The ingress's metrics: one Prometheus registry of its own, mirrored into Ray's metrics inside a Serve replica.

The private registry is what ``GET /metrics`` serves: exact for a single process (``mmrag serve`` on one
ingress replica, the tests). On a Ray cluster that endpoint answers for whichever ingress replica the
pod's proxy picks, so a scraper would see counters jump between replicas. There every metric is also
recorded through ``ray.serve.metrics`` (``ray.util.metrics`` with the Serve replica's tags), which the
metrics agent of each Ray node exports on its metrics port (8080 on Kubernetes) as ``ray_<name>`` (counters
``ray_<name>_total``), one series per replica: sums over pods and replicas add up.

:data:`METRICS` names every metric once; the Grafana dashboard's queries are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram

from mmrag.serving.logs import in_serve_replica
from mmrag.serving.openai.protocol import Usage

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    doc: str
    labels: tuple[str, ...] = ()

    def exported_names(self, ray: bool) -> set[str]:
        """The series names a scrape shows: Prometheus' own, or Ray's (``ray_`` prefix)."""
        base = f"ray_{self.name}" if ray else self.name
        suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
        return {base + suffix for suffix in suffixes[self.kind]}


METRICS = {
    spec.name: spec
    for spec in (
        MetricSpec("mmrag_requests", "counter", "Requests by HTTP status.", ("status",)),
        MetricSpec("mmrag_request_latency_seconds", "histogram", "Time from request to last byte."),
        MetricSpec("mmrag_time_to_first_token_seconds", "histogram", "Time from request to the first generated text."),
        MetricSpec("mmrag_prompt_tokens", "counter", "Prompt tokens."),
        MetricSpec("mmrag_completion_tokens", "counter", "Generated tokens."),
        MetricSpec("mmrag_requests_in_flight", "gauge", "Requests being served."),
        MetricSpec("mmrag_embedding_inputs", "counter", "Texts embedded by /v1/embeddings."),
        MetricSpec("mmrag_embedding_tokens", "counter", "Encoder tokens read by /v1/embeddings."),
        # Their ratio is what AIM's merge saves across the traffic (both count images' placeholder tokens).
        MetricSpec("mmrag_visual_tokens_before_merge", "counter", "Visual tokens the images would take unmerged."),
        MetricSpec("mmrag_visual_tokens_after_merge", "counter", "Visual tokens the images took in prompts."),
        # Their ratio is what LOOK-M's compaction saves in the KV cache across prompts with images.
        MetricSpec("mmrag_kv_tokens_prompt", "counter", "Prompt KV entries after prefill (prompts with images)."),
        MetricSpec("mmrag_kv_tokens_kept", "counter", "Prompt KV entries kept after LOOK-M (prompts with images)."),
    )
}


class _Metric:
    """One metric in the private registry and, inside a replica, in Ray's (``labels`` binds label values)."""

    def __init__(self, spec: MetricSpec, registry: CollectorRegistry, ray: bool) -> None:
        self.spec = spec
        kwargs: dict[str, Any] = {"labelnames": spec.labels, "registry": registry}
        if spec.kind == "histogram":
            kwargs["buckets"] = _LATENCY_BUCKETS
        prom_cls = {"counter": PromCounter, "gauge": PromGauge, "histogram": PromHistogram}[spec.kind]
        self._prom: Any = prom_cls(spec.name, spec.doc, **kwargs)
        self._ray: Any = _ray_metric(spec) if ray else None
        self._tags: dict[str, str] = {}
        self._value = 0.0  # a gauge's current value: Ray's gauges are set, not moved

    def labels(self, **values: str) -> _Metric:
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)
        bound._prom = self._prom.labels(**values)
        bound._tags = {key: str(value) for key, value in values.items()}
        return bound

    def inc(self, amount: float = 1.0) -> None:
        self._prom.inc(amount)
        if self._ray is None:
            return
        if self.spec.kind == "gauge":
            self._set_gauge(amount)
        elif amount > 0:  # Ray's counters refuse 0
            self._ray.inc(amount, tags=self._tags)

    def dec(self, amount: float = 1.0) -> None:
        self._prom.dec(amount)
        if self._ray is not None:
            self._set_gauge(-amount)

    def observe(self, value: float) -> None:
        self._prom.observe(value)
        if self._ray is not None:
            self._ray.observe(value, tags=self._tags)

    def _set_gauge(self, delta: float) -> None:
        self._value += delta
        self._ray.set(self._value, tags=self._tags)


def _ray_metric(spec: MetricSpec) -> Any:
    from ray.serve import metrics as ray_metrics

    if spec.kind == "histogram":
        return ray_metrics.Histogram(spec.name, spec.doc, boundaries=list(_LATENCY_BUCKETS), tag_keys=spec.labels)
    cls = ray_metrics.Counter if spec.kind == "counter" else ray_metrics.Gauge
    return cls(spec.name, spec.doc, tag_keys=spec.labels)


class IngressMetrics:
    def __init__(self, ray: bool | None = None) -> None:
        """``ray``: also record into Ray's metrics; None: when running inside a Serve replica."""
        self.registry = CollectorRegistry()
        self.ray = in_serve_replica() if ray is None else ray
        metric = {name: _Metric(spec, self.registry, self.ray) for name, spec in METRICS.items()}
        self.requests = metric["mmrag_requests"]
        self.latency = metric["mmrag_request_latency_seconds"]
        self.ttft = metric["mmrag_time_to_first_token_seconds"]
        self.prompt_tokens = metric["mmrag_prompt_tokens"]
        self.completion_tokens = metric["mmrag_completion_tokens"]
        self.in_flight = metric["mmrag_requests_in_flight"]
        self.embedding_inputs = metric["mmrag_embedding_inputs"]
        self.embedding_tokens = metric["mmrag_embedding_tokens"]
        self.visual_tokens_before = metric["mmrag_visual_tokens_before_merge"]
        self.visual_tokens_after = metric["mmrag_visual_tokens_after_merge"]
        self.kv_tokens_prompt = metric["mmrag_kv_tokens_prompt"]
        self.kv_tokens_kept = metric["mmrag_kv_tokens_kept"]

    def observe_usage(self, usage: Usage) -> None:
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.completion_tokens.inc(usage.completion_tokens)
        if usage.mmrag is not None:
            self.visual_tokens_before.inc(usage.mmrag.visual_tokens_before)
            self.visual_tokens_after.inc(usage.mmrag.visual_tokens_after)
            self.kv_tokens_prompt.inc(usage.mmrag.kv_tokens_prompt)
            self.kv_tokens_kept.inc(usage.mmrag.kv_tokens_kept)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


def engine_stat_loggers() -> list[type] | None:
    """The ``stat_loggers`` for vLLM's ``AsyncLLM`` in this process. Inside a Serve replica: vLLM's Prometheus
    logger (the engine's text in ``/metrics``) and its Ray logger (``ray_vllm_*`` on Ray's metrics port, one
    series per replica); vLLM adds neither default Prometheus logger once one is given, so both are. Elsewhere
    None: vLLM's defaults."""
    if not in_serve_replica():
        return None
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    # Ray's first: every PrometheusStatLogger (the Ray one is a subclass) starts by unregistering all vllm:*
    # collectors from prometheus_client's registry, so the other order left /metrics without the engine's.
    return [RayPrometheusStatLogger, PrometheusStatLogger]
