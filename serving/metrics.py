"""The ingress's Prometheus metrics, in a registry of their own (a Serve replica's process also holds
Ray's and, in the LLM replica, vLLM's collectors; a private registry keeps the exposition unambiguous).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mmrag.serving.openai.protocol import Usage

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class IngressMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mmrag_requests", "Chat requests by HTTP status.", ["status"], registry=self.registry)
        self.latency = Histogram(
            "mmrag_request_latency_seconds",
            "Time from request to last byte.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "mmrag_time_to_first_token_seconds",
            "Time from request to the first generated text.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter("mmrag_prompt_tokens", "Prompt tokens.", registry=self.registry)
        self.completion_tokens = Counter("mmrag_completion_tokens", "Generated tokens.", registry=self.registry)
        self.embedding_inputs = Counter(
            "mmrag_embedding_inputs", "Texts embedded by /v1/embeddings.", registry=self.registry
        )
        self.embedding_tokens = Counter(
            "mmrag_embedding_tokens", "Encoder tokens read by /v1/embeddings.", registry=self.registry
        )
        self.in_flight = Gauge("mmrag_requests_in_flight", "Requests being served.", registry=self.registry)
        # Their ratio is what AIM's merge saves across the traffic (both count images' placeholder tokens).
        self.visual_tokens_before = Counter(
            "mmrag_visual_tokens_before_merge", "Visual tokens the images would take unmerged.", registry=self.registry
        )
        self.visual_tokens_after = Counter(
            "mmrag_visual_tokens_after_merge", "Visual tokens the images took in prompts.", registry=self.registry
        )
        # Their ratio is what LOOK-M's compaction saves in the KV cache across prompts with images.
        self.kv_tokens_prompt = Counter(
            "mmrag_kv_tokens_prompt", "Prompt KV entries after prefill (prompts with images).", registry=self.registry
        )
        self.kv_tokens_kept = Counter(
            "mmrag_kv_tokens_kept", "Prompt KV entries kept after LOOK-M (prompts with images).", registry=self.registry
        )

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
