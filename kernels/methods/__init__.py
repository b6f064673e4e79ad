"""Compression methods: one small module each, a frozen settings dataclass with the functions that both the
reference engine (:mod:`mmrag.kernels.reference`) and the vLLM worker (:mod:`mmrag.serving.vllm_plugin.kv`)
call, so the two run one rule.

Two kinds:

- KV methods (:class:`~mmrag.kernels.methods.base.KVMethod`): after each decoder layer's prefill attention,
  which prompt KV entries the cache keeps. Registered by name below; vLLM serves every one of them per
  request (``compression.kv.method``), and ``mmrag bench accuracy`` / ``compression`` take their rows
  from this registry. Adding one is a module and a line here.
- AIM (:mod:`~mmrag.kernels.methods.aim`): the visual-token merge before the LLM and the pruning inside it,
  which act on the model's inputs rather than its cache.

The registry holds import paths, not classes: the HTTP ingress validates a request's method without
importing torch, and vLLM's processes import only the methods they run.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmrag.kernels.methods.base import KVMethod

__all__ = [
    "KV_METHODS",
    "NO_KV_METHOD",
    "kv_method_as_dict",
    "kv_method_class",
    "kv_method_from_dict",
    "make_kv_method",
]

# name -> "module:Class"
KV_METHODS: dict[str, str] = {
    "lookm": "mmrag.kernels.methods.lookm:LookM",
    "random": "mmrag.kernels.methods.random_eviction:RandomEviction",
    "recent": "mmrag.kernels.methods.recent_window:RecentWindow",
    "scores": "mmrag.kernels.methods.score_eviction:ScoreEviction",
}
# The name a request uses to keep its whole cache.
NO_KV_METHOD = "none"


def kv_method_class(name: str) -> type[KVMethod]:
    if name not in KV_METHODS:
        raise ValueError(f"unknown KV method {name!r}; registered: {sorted(KV_METHODS)} (or {NO_KV_METHOD!r})")
    module, _, attribute = KV_METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def make_kv_method(name: str, **params: Any) -> KVMethod:
    """The method ``name`` with ``params``; unknown names, unknown fields and bad values raise ValueError."""
    cls = kv_method_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"KV method {name!r} has no setting {unknown[0]!r} (settings: {sorted(fields)})")
    return cls(**params)


def kv_method_as_dict(method: KVMethod) -> dict[str, Any]:
    """JSON-safe form that crosses processes (vLLM's ``additional_config`` and ``SamplingParams.extra_args``)."""
    return {"method": method.name, **dataclasses.asdict(method)}


def kv_method_from_dict(data: Mapping[str, Any]) -> KVMethod | None:
    """The inverse of :func:`kv_method_as_dict`; ``{"method": "none"}`` is None (keep the whole cache)."""
    params = dict(data)
    name = params.pop("method")
    return None if name == NO_KV_METHOD else make_kv_method(name, **params)
