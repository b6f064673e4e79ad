"""The one configuration of an mmrag server: a root model of typed sub-configs, validated at the edge.

Every field has a default, so an empty file (or none) is a working server on the default model (`smol`).
YAML files are read with :meth:`MmragConfig.from_file`; command-line overrides use dotted paths
(``--set engine.max_model_len=4096``) and go through the same validation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from mmrag.serving.files.config import FilesConfig
from mmrag.serving.retrieval.config import RetrievalConfig
from mmrag.serving.vector_stores.config import VectorStoresConfig


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a config file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name: str = Field(
        default="smol",
        description="A registered model (`mmrag models list`), prepared into the cache on first use.",
    )
    path: str | None = Field(
        default=None, description="Local checkpoint directory (HF layout); set, it is served instead of `name`."
    )
    served_name: str | None = Field(
        default=None, description="The name clients put in `model`. None: the registered model's own name."
    )
    tiny_seed: int = Field(default=0, description="Seed of the generated `tiny-random` model.")
    tool_call_parser: str | None = Field(
        default=None,
        description="vLLM's tool-call parser for this model's call format (`vllm serve --tool-call-parser` names: "
        "hermes, llama3_json, mistral, ...), which `tool_choice: auto` needs to read calls from the answer. None: "
        "`auto` is a 400 (required and named calls work with any model). `hermes` reads the `<tool_call>` blocks "
        "the fallback tool prompt asks for, for models whose chat template has no tools section.",
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from mmrag.serving.models.registry import MODELS

        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; registered: {', '.join(MODELS)}")
        return name

    @field_validator("tool_call_parser")
    @classmethod
    def _known_parser(cls, name: str | None) -> str | None:
        if name is not None:
            known = vllm_tool_parsers()
            if name not in known:
                raise ValueError(f"unknown tool-call parser {name!r}; vLLM's: {', '.join(sorted(known))}")
        return name

    @model_validator(mode="after")
    def _default_served_name(self) -> ModelConfig:
        if self.served_name is None:
            from mmrag.serving.models.registry import MODELS

            self.served_name = Path(self.path).name if self.path else MODELS[self.name].served_name
        return self


def vllm_tool_parsers() -> frozenset[str]:
    """The tool-call parser names vLLM registers, read from its table without importing vLLM (which takes
    10-25 s and a GiB here: a config is validated by every CLI command and test). The table is the pinned
    0.32's ``_TOOL_PARSERS_TO_REGISTER``; should a later vLLM move it, its registry is asked instead."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return frozenset()  # no vLLM here (a client-only install): nothing can parse
    table = Path(spec.origin).parent / "tool_parsers" / "__init__.py"
    try:
        for node in ast.parse(table.read_text()).body:
            if isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "_TOOL_PARSERS_TO_REGISTER" for t in node.targets
            ):
                return frozenset(ast.literal_eval(node.value))
    except (OSError, SyntaxError, ValueError):
        pass
    from vllm.tool_parsers import ToolParserManager

    return frozenset(ToolParserManager.list_registered())


class EngineConfig(_Strict):
    max_model_len: int = Field(default=2048, gt=0, description="Context length (prompt + completion).")
    dtype: str = Field(default="auto", description="vLLM dtype: auto, bfloat16, float16, float32.")
    enforce_eager: bool = Field(default=True, description="Skip graph capture/compilation (fast start).")
    seed: int = Field(default=0, description="Engine seed for sampling without a request seed.")
    kv_cache_space_gib: int = Field(
        default=2, ge=1, description="CPU backend only: KV cache GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM AsyncEngineArgs field, passed through; unknown names are errors.",
    )
    structured_outputs_backend: Literal["xgrammar", "guidance", "outlines", "auto"] = Field(
        default="xgrammar",
        description="vLLM's structured-output backend, for response_format, structured_outputs and forced tool calls "
        "(docs/usage.md: which work on the CPU build). 'guidance' (llguidance) takes the JSON-schema features "
        "xgrammar lacks; 'auto' is vLLM's choice per request. Not lm-format-enforcer: the installed 0.11.3 imports "
        "a module vLLM 0.32 no longer has, and every constrained request fails.",
    )
    compact_json: bool = Field(
        default=True,
        description="Constrained JSON has no free whitespace between its tokens (xgrammar and guidance only): with "
        "it, a model (a random one above all) can spend every token on blank space and never close the JSON.",
    )

    @model_validator(mode="after")
    def _compact_json_backend(self) -> EngineConfig:
        if self.compact_json and self.structured_outputs_backend not in ("xgrammar", "guidance"):
            raise ValueError(
                f"compact_json needs structured_outputs_backend xgrammar or guidance, not "
                f"{self.structured_outputs_backend!r} (set compact_json: false)"
            )
        return self

    @field_validator("engine_kwargs")
    @classmethod
    def _no_clash(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        owned = {"model", "served_model_name", "max_model_len", "dtype", "enforce_eager", "seed"}
        clash = sorted(owned & kwargs.keys())
        if clash:
            raise ValueError(f"set {clash} through their own engine fields, not engine_kwargs")
        return kwargs


class LimitsConfig(_Strict):
    max_images_per_request: int = Field(default=8, ge=0, description="Images across all messages.")
    max_image_bytes: int = Field(default=10 * 2**20, gt=0, description="Encoded size cap per image.")
    max_image_pixels: int = Field(
        default=25_000_000, gt=0, description="Declared width x height cap (decompression bombs)."
    )
    max_image_aspect_ratio: float = Field(
        default=20.0,
        ge=1.0,
        description="Longest side / shortest side cap: the model's processor scales the short side up, so a "
        "1 x 100000 image would ask it for gigabytes.",
    )
    max_request_image_pixels: int = Field(
        default=50_000_000,
        gt=0,
        description="Declared width x height summed over a request's images, checked before any is decoded.",
    )
    max_videos_per_request: int = Field(
        default=1,
        ge=0,
        description="video_url parts across all messages (models that take video only; 0 refuses them all).",
    )
    max_video_bytes: int = Field(
        default=32 * 2**20,
        gt=0,
        description="Encoded size cap per video (a data: URL must also fit in max_request_bytes).",
    )
    max_video_frames: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Frames kept per video, sampled uniformly over it; each counts against "
        "max_request_image_pixels and is downscaled as images are (image_downscale_pixels).",
    )
    video_decode_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Time one video may take to decode (a 400 after it): the stream is read in order up to the "
        "last sampled frame, so a long video of small frames costs CPU that its byte size does not bound.",
    )
    image_downscale_pixels: int = Field(
        default=2048 * 2048,
        gt=0,
        description="Decoded images above this many pixels are downscaled (aspect kept) before the model sees "
        "them; well above what a CLIP-style processor uses, so answers do not change.",
    )
    max_messages: int = Field(default=256, gt=0, description="Messages per request.")
    max_prompt_chars: int | None = Field(
        default=None,
        gt=0,
        description="Characters of message text per request, checked before images are fetched and retrieval "
        "runs (a 400 on messages); None: 16 per token of engine.max_model_len, more than any prompt that fits.",
    )
    max_content_parts: int = Field(
        default=1024,
        gt=0,
        description="Content parts (text, image_url and video_url) over a request's messages, counted before "
        "validation.",
    )
    max_tools: int = Field(default=128, gt=0, description="Function tools per chat request (OpenAI's own cap).")
    max_schema_bytes: int = Field(
        default=64 * 1024,
        gt=0,
        description="JSON schemas per request (response_format, structured_outputs and every tool's parameters, "
        "compact JSON, summed): grammar compilation grows with the schema, so a larger one is a 400 at the edge.",
    )
    max_request_bytes: int = Field(default=64 * 2**20, gt=0, description="HTTP body size cap.")
    body_read_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Time to receive a whole request body (a 408 after it): a body sent slowly must not hold an "
        "ingress slot for the whole server.request_timeout_s.",
    )
    body_idle_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest wait for the next piece of a request body (a 408 after it)."
    )
    body_min_bytes_per_s: float = Field(
        default=16384.0,
        gt=0,
        description="Slowest accepted body rate: a body that declares N bytes must arrive within "
        "body_idle_timeout_s + N / this (and body_read_timeout_s), else a 408; so a byte-a-second trickle of a "
        "small body gives its ingress slot back in seconds, not after the whole total timeout.",
    )
    max_n: int = Field(default=8, gt=0, description="Largest `n` (choices per request).")
    max_completion_prompts: int = Field(
        default=32,
        gt=0,
        description="Prompts in one /v1/completions request (`prompt` as a list); each is generated with `n` "
        "choices, so a request runs up to this x max_n sequences.",
    )
    max_embedding_inputs: int = Field(
        default=2048,
        gt=0,
        description="Texts in one /v1/embeddings request (OpenAI's own cap; LangChain sends 1000 at a time), "
        "counted before any is validated.",
    )
    max_embedding_input_chars: int = Field(
        default=32768,
        gt=0,
        description="Characters of one /v1/embeddings input (OpenAI's 8192-token cap at about 4 characters a "
        "token): the encoder reads only its first tokens (MiniLM: 256), so more text would cost tokenizing and "
        "change nothing.",
    )
    max_completion_tokens: int | None = Field(
        default=None, description="Cap on max_tokens; None: whatever fits in max_model_len."
    )
    worker_threads: int = Field(
        default=4,
        gt=0,
        description="Threads per ingress replica that parse large bodies and decode images off the event loop; "
        "more requests than this wait for one (CPU and memory stay bounded, small requests keep flowing).",
    )
    image_fetch_timeout_s: float = Field(default=5.0, gt=0, description="Per-URL fetch timeout.")
    image_max_redirects: int = Field(default=3, ge=0, description="Redirects followed per image URL.")
    image_url_schemes: list[Literal["http", "https", "data"]] = Field(
        default_factory=lambda: ["http", "https", "data"],
        description="Accepted image URL schemes; ['data'] makes the server fetch nothing remote.",
    )
    allow_private_image_urls: bool = Field(
        default=False,
        description="Allow image URLs that resolve to loopback/private/link-local addresses.",
    )
    image_url_allowlist: list[str] = Field(
        default_factory=list,
        description="Hosts always allowed for image URLs (exact host names, or IPs), private or not.",
    )


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling, the fields users tune most (the rest keep Serve's defaults)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    metrics_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="How often replicas and handles report ongoing requests to the controller (Serve's "
        "default 10 s; shorter reacts faster, e.g. in tests).",
    )
    look_back_period_s: float = Field(
        default=30.0,
        gt=0,
        description="Window over which the reported ongoing requests are averaged (Serve's default 30 s); "
        "keep it above metrics_interval_s.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class DeploymentConfig(_Strict):
    """One Ray Serve deployment's scale and resources."""

    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count (ignored if autoscaling).")
    autoscaling: AutoscalingConfig | None = Field(default=None, description="Serve autoscaling; None: fixed.")
    max_ongoing_requests: int = Field(default=64, gt=0, description="Concurrent requests per replica.")
    max_queued_requests: int = Field(
        default=256, description="Caller-side queue cap; past it 503 + Retry-After. -1: unbounded."
    )
    num_cpus: float = Field(default=0.0, ge=0, description="Logical CPUs reserved per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica.")
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(
        default=20.0,
        ge=0,
        description="How long a stopping replica (scale-in, node drain, update) may finish its requests before "
        "Serve kills it (Serve's default 20 s); set it to the longest request not to cut, e.g. the "
        "server.request_timeout_s of a generation. A Kubernetes pod's grace period must cover it (k8s/README.md).",
    )
    graceful_shutdown_wait_loop_s: float = Field(
        default=2.0, gt=0, description="How often a stopping replica checks whether its requests are done."
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica: a name that only some worker groups advertise keeps the "
        "replicas on those pods (on Kubernetes, the CPU group: k8s/README.md, 'Placement').",
    )

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        scale: dict[str, Any] = (
            {"autoscaling_config": self.autoscaling.model_dump()}
            if self.autoscaling
            else {"num_replicas": self.num_replicas}
        )
        return {
            **scale,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
            | ({"resources": dict(self.resources)} if self.resources else {}),
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
        }


class DeploymentsConfig(_Strict):
    ingress: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(max_ongoing_requests=256))
    llm: DeploymentConfig = Field(default_factory=DeploymentConfig)
    retriever: DeploymentConfig = Field(
        default_factory=DeploymentConfig,
        description="The retriever (encoder + Milvus client). On Milvus Lite opened in-process "
        "(retrieval.milvus_lite_server false, or outside `mmrag serve`) it must stay at one replica.",
    )


class ServerConfig(_Strict):
    host: str = Field(default="127.0.0.1", description="HTTP bind address.")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port.")
    ray_address: str | None = Field(default=None, description="Existing Ray cluster to join; None starts a local one.")
    ray_num_cpus: int | None = Field(
        default=None, description="Logical CPUs of a local Ray (None: the machine's count)."
    )
    request_timeout_s: float = Field(default=600.0, gt=0, description="End-to-end limit per request.")
    keep_alive_timeout_s: int = Field(
        default=5,
        ge=1,
        description="How long Serve's HTTP proxy keeps an idle client connection open between requests (Ray's "
        "default is 90 s); raise it above the idle timeout of a load balancer in front.",
    )
    allowed_hosts: list[str] | None = Field(
        default=None,
        description="Host header names (port ignored) accepted besides loopback ones (localhost, 127.0.0.0/8, "
        "::1); ['*']: any; others get a 403. None: loopback names only on a server bound to a loopback address "
        "with no API keys (a web page cannot reach it through DNS rebinding), any name otherwise.",
    )
    allowed_origins: list[str] | None = Field(
        default=None,
        description="Origin headers (scheme://host[:port]) accepted besides loopback ones; ['*']: any; others get "
        "a 403 (requests without Origin, i.e. not from a browser, always pass). None: loopback origins only on a "
        "server bound to a loopback address with no API keys, any otherwise.",
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Bearer keys accepted on /v1/*; empty with no key file: open."
    )
    api_key_file: str | None = Field(
        default=None, description="File with one accepted key per line (e.g. a mounted Kubernetes Secret)."
    )
    admin_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Bearer keys that are also accepted and see every vector store (not only their own), and "
        "may share one with another key (`mmrag_shared_with` on POST /v1/vector_stores/{id}).",
    )
    playground: bool = Field(
        default=True,
        description="Serve the playground page at /playground (and redirect / to it): static files that call "
        "only the public API, with the key typed into the page. Its files are public; every call it makes needs "
        "a key when keys are set. On by default for people trying the server; turn it off in production.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO")
    engine_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="WARNING", description="vLLM's own log level (it is chatty at INFO)."
    )

    def accepted_api_keys(self) -> list[str]:
        """Keys from the config, the key file and ``$MMRAG_API_KEYS`` (comma-separated), read when a
        replica starts (on Kubernetes, a Secret arrives as that variable or as the file)."""
        keys = [key.get_secret_value() for key in [*self.api_keys, *self.admin_api_keys]]
        keys += [key.strip() for key in os.environ.get("MMRAG_API_KEYS", "").split(",") if key.strip()]
        if self.api_key_file:
            keys += [line.strip() for line in Path(self.api_key_file).read_text().splitlines() if line.strip()]
        return keys


class LookMConfig(_Strict):
    """KV compaction in the served model, LOOK-M by default: each prompt-with-images' KV cache compacted
    after prefill (:mod:`mmrag.serving.vllm_plugin.kv`); requests may pick any other registered KV method
    (``compression.kv``). Turning it on turns vLLM's prefix caching and chunked prefill off (compaction
    rewrites blocks in place and scores every prompt query in one step)."""

    enabled: bool = Field(default=False, description="Compact the KV cache of prompts with images after prefill.")
    heavy_ratio: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Share of the prompt kept by attention score (text always kept)."
    )
    recent_ratio: float = Field(default=0.1, ge=0.0, le=1.0, description="Share of the prompt kept as the last tokens.")
    image_budget: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Instead of the two ratios: keep every text entry and this share of the image entries "
        "(by score). Suits short, text-heavy prompts, where the ratios leave no image entry at all.",
    )
    merge: Literal["pivotal", "averaged", "weighted", "none"] = Field(
        default="pivotal", description="How evicted entries are folded into kept ones ('none': evict only)."
    )

    def settings(self) -> Any:
        """The reference engine's :class:`~mmrag.kernels.methods.lookm.LookM` with these values."""
        from mmrag.kernels.methods.lookm import LookM

        return LookM(
            heavy_ratio=self.heavy_ratio,
            recent_ratio=self.recent_ratio,
            merge=None if self.merge == "none" else self.merge,
            image_budget=self.image_budget,
        )


class CompressionConfig(_Strict):
    """Visual-token and KV compression in the served model (vLLM plugin, :mod:`mmrag.serving.vllm_plugin`)."""

    aim_plugin: bool = Field(
        default=True,
        description="Serve LLaVA checkpoints with mmrag's AimLlava (AIM stage (a)); at keep ratio 1 its outputs "
        "are stock vLLM's. False: vLLM's own class, and requests may not ask for compression.",
    )
    aim_keep_ratio: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="AIM stage (a): share of each image's visual tokens kept after bipartite merging "
        "(ceil(T * ratio) per image; 1 = no merge). Requests override it with compression.aim_keep_ratio.",
    )
    aim_positions: Literal["contiguous", "spread"] = Field(
        default="contiguous",
        description="Where merged visual tokens sit: 'contiguous' (AIM: consecutive positions, later text moves "
        "closer) or 'spread' (across the image's original span; later text keeps its positions).",
    )
    lookm: LookMConfig = Field(default_factory=LookMConfig)


class MmragConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    deployments: DeploymentsConfig = Field(default_factory=DeploymentsConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    vector_stores: VectorStoresConfig = Field(default_factory=VectorStoresConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    files: FilesConfig = Field(default_factory=FilesConfig)

    @classmethod
    def from_file(cls, path: str | Path | None, overrides: list[str] | None = None) -> MmragConfig:
        """Load YAML (or nothing: the defaults) and apply ``key.path=value`` overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text())
            if not isinstance(loaded, dict | None):
                raise ValueError(f"{path}: the top level must be a mapping")
            data = loaded or {}
        for item in overrides or []:
            apply_override(data, item)
        return cls.model_validate(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (``8``, ``true``, ``[1, 2]``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not of the form key.path=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a mapping")
    node[leaf] = yaml.safe_load(raw)
